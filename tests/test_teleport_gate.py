"""Teleport's gate end to end: real containerd pulling through a real `acr mirror start`.

The node's containerd here unpacks with overlayfs (or native): the harness daemon's own
config.toml is what `auto` reads, so `auto` must serve the originals and say why everywhere a
teleport decision shows (log line, flow comment, `acr.why`, `acr.teleports`, `/metrics`,
`/status`). `always` teleports regardless, `never` never does, and `auto` on a node whose
config declares overlaybd (and whose snapshotter socket answers: a listening stand-in) does.
The kubelet's way, CRI `PullImage` through a containerd started from an edited config, shows
the same.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterator, Optional

import pytest
import requests

from addons.chain import AcrMirror
from tests.conftest import ClosedPort, HostsDir
from tests.harness.containerd import Containerd, Ctr, write_hosts_toml
from tests.harness.cri import pull_image
from tests.harness.images import Image, make_image, push_image
from tests.harness.mirror import Mirror
from tests.harness.overlaybd import StreamingNode
from tests.harness.referrers import ReferrersFront
from tests.harness.registry import Registry
from tests.test_containerd_config import ConfiguredContainerd
from tests.test_teleport import (PLACEHOLDER_UPSTREAM, flows_of, init_runmd, log_lines, pull,  # noqa: F401
                                 push_streamable, streamable)


@pytest.fixture
def site(registry: Registry, referrers_front: ReferrersFront, repo_name: str) -> tuple[Image, str]:
    """`repo:v1` and its streamable copy (a streaming.v1 referrer); returns (original, target)."""
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    target = push_streamable(registry, repo_name, image, streamable(repo_name))
    return image, target


@pytest.fixture
def start(mirror_factory: Callable[..., Mirror], tmp_hosts_dir: HostsDir, tmp_path: Path,
          referrers_front: ReferrersFront, init_runmd: str) -> Callable[..., Mirror]:  # noqa: F811
    """A mirror of `acr init`'s runmd (teleport `auto`) for the front, recording its flows."""

    def make(*, node: Path, mode: Optional[str] = None, sets: tuple[str, ...] = ()) -> Mirror:
        text = init_runmd.replace(PLACEHOLDER_UPSTREAM, referrers_front.url)
        if mode:
            text = text.replace(".teleport     overlaybd, auto", f".teleport     overlaybd, {mode}")
        m = mirror_factory(referrers_front.url, runmd=text,
                           sets=[f"acr_containerd_config={node}", f"save_stream_file={tmp_path / 'flows.mitm'}", *sets],
                           args=["--hosts-dir", str(tmp_path / "runtime-certs.d")], env={"PYTHONUNBUFFERED": "1"})
        tmp_hosts_dir.write(referrers_front.host, m.url)
        return m

    return make


@pytest.fixture
def this_node(containerd_daemon: Containerd) -> Path:
    """This node's containerd config: the harness daemon's own (overlayfs or native, no overlaybd)."""
    path = containerd_daemon.config_path
    assert path.is_file() and "overlaybd" not in path.read_text()
    return path


def _get(m: Mirror, path: str) -> requests.Response:
    return m.get(path)


@pytest.mark.e2e
def test_auto_on_a_node_without_overlaybd_serves_the_original_and_says_why(
    containerd: Ctr, tmp_hosts_dir: HostsDir, referrers_front: ReferrersFront, repo_name: str,
    site: tuple[Image, str], start: Callable[..., Mirror], tmp_path: Path, this_node: Path,
) -> None:
    image, target = site
    node = this_node
    m = start(node=node)
    ref = f"{referrers_front.host}/{repo_name}:v1"
    assert pull(containerd, tmp_hosts_dir, ref) == image.digest != target
    assert target not in containerd.content_digests()
    # the log: once at start, what the node lacks; then each tag pull's line with the reason
    (start_line,) = log_lines(m, r"teleport \(auto\): tag pulls get the original images")
    assert "this node streams no teleported format: CRI's snapshotter is " in start_line
    assert "not a streaming one ('overlaybd' or 'stargz')" in start_line
    (line,) = log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200")
    assert f"{image.digest} no teleport (snapshotter: CRI's snapshotter is " in line
    # /status and /metrics
    status = _get(m, "/status").json()
    assert status["teleport"]["mode"] == "auto" and status["teleport"]["node_streams"] is False
    assert status["teleport"]["containerd_config"] == str(node)
    assert "overlaybd" in status["teleport"]["missing"] and status["counters"]["teleport:snapshotter"] >= 1
    metrics = _get(m, "/metrics").text
    assert re.search(r'^acr_teleport_decisions_total\{reason="snapshotter"\} [1-9]', metrics, re.M), metrics
    # the flows: mitmweb's comment, acr.why, acr.teleports
    m.stop()
    (head,) = [f for f in flows_of(tmp_path / "flows.mitm")
               if f.request.method == "HEAD" and f.metadata.get("acr", {}).get("reference") == "v1"]
    assert head.metadata["acr"]["teleport"]["skipped"] == "snapshotter"
    assert head.comment.split("\n")[0] == "no teleport: snapshotter" and not head.marked
    assert "teleport: not teleported: snapshotter: CRI's snapshotter is " in head.comment
    (told,) = AcrMirror().teleports([head])
    assert told.startswith(f"{repo_name}:v1 not teleported: snapshotter: CRI's snapshotter is ")
    assert any(w.strip().startswith("teleport: not teleported: snapshotter: ") for w in AcrMirror().why([head]))


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["runmd", "option"])
def test_always_teleports_whatever_the_node(
    containerd: Ctr, tmp_hosts_dir: HostsDir, referrers_front: ReferrersFront, repo_name: str,
    site: tuple[Image, str], start: Callable[..., Mirror], how: str, this_node: Path,
) -> None:
    image, target = site
    m = start(node=this_node, **({"mode": "always"} if how == "runmd" else {"sets": ("acr_teleport=always",)}))
    assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == target
    assert log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200 {image.digest} teleported to {target}")


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["runmd", "option"])
def test_never_never_teleports(
    containerd: Ctr, tmp_hosts_dir: HostsDir, referrers_front: ReferrersFront, repo_name: str,
    site: tuple[Image, str], start: Callable[..., Mirror], how: str,
) -> None:
    image, _ = site
    with StreamingNode() as node:  # even where the node streams
        if how == "runmd":
            m = start(node=node.config, mode="never")
        else:  # the option overrides a runmd that says always
            m = start(node=node.config, mode="always", sets=("acr_teleport=never",))
        assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == image.digest
    assert log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200 {image.digest} no teleport \(never\)")
    assert _get(m, "/status").json()["teleport"]["mode"] == "never"


@pytest.mark.e2e
@pytest.mark.parametrize("version", [2, 3], ids=["containerd-1.x-config", "containerd-2.x-config"])
def test_auto_teleports_where_the_node_declares_overlaybd_and_its_socket_answers(
    containerd: Ctr, tmp_hosts_dir: HostsDir, referrers_front: ReferrersFront, repo_name: str,
    site: tuple[Image, str], start: Callable[..., Mirror], version: int,
) -> None:
    image, target = site
    with StreamingNode(version) as node:
        m = start(node=node.config)
        assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == target
        assert log_lines(m, r"teleport \(auto\): this node streams overlaybd images")
        assert _get(m, "/status").json()["teleport"]["node_streams"] is True


# --- CRI: the kubelet's pull, through containerd started from an edited config ---------------


@pytest.fixture(scope="module")
def cri_daemon() -> Iterator[Containerd]:
    """A containerd started from a config.toml that `acr containerd configure` edited: its CRI
    snapshotter is the node's (overlayfs or native), so CRI cannot run overlaybd images."""
    with ConfiguredContainerd() as daemon:
        yield daemon


def cri_hosts(daemon: Containerd, registry_host: str, closed: ClosedPort, mirror: Mirror) -> None:
    hosts_dir = daemon.dir / "node-certs.d"
    write_hosts_toml(str(hosts_dir), registry_host, closed.url, [(mirror.url, ("pull", "resolve"))])


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["auto", "always"])
def test_cri_pull_image_follows_the_gate(
    cri_daemon: Containerd, closed_port: ClosedPort, referrers_front: ReferrersFront, repo_name: str,
    site: tuple[Image, str], start: Callable[..., Mirror], registry: Registry, mode: str,
) -> None:
    image, target = site
    m = start(node=cri_daemon.config_path, mode=mode)
    cri_hosts(cri_daemon, referrers_front.host, closed_port, m)
    ref = f"{referrers_front.host}/{repo_name}:v1"
    image_id = pull_image(cri_daemon.address, ref, timeout=60)
    pulled = cri_daemon.client("k8s.io").image_target(ref)
    if mode == "auto":  # CRI's snapshotter is not overlaybd: the original, and why
        assert image_id == image.config.digest and pulled == image.digest
        assert log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200 {image.digest} no teleport \(snapshotter: ")
    else:
        streamed = json.loads(requests.get(f"{registry.url}/v2/{repo_name}/manifests/{target}",
                                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content)
        assert image_id == streamed["config"]["digest"] and pulled == target
