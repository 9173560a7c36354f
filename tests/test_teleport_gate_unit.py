"""Teleport's gate without a network: the modes in mirror.runmd and `acr_teleport`, the node
check (containerd's config.toml in both schemas, the snapshotter's socket), how often it runs
and what it logs, the target's overlaybd layers, and `acr overlaybd configure` with its
`.node-check` finding.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions, http
from mitmproxy.test import taddons

from addons import catalog
from addons.chain import AcrMirror
from addons.node import node_check, overlaybd_config
from addons.node.containerd_config import ConfigError
from addons.proxy.upstream import NeedsIO
from addons.teleport.discover import teleport_shared
from addons.registry import oci
from addons.registry.oci import Descriptor
from addons.runmd.runtime import Runtime
from addons.runmd.syntax import RunmdError
from addons.teleport.gate import Gate, NodeStreams, node_streams
from addons.teleport.teleport import (STREAMING, TeleportConfig, Teleport, estargz_layers_missing,
                                      overlaybd_layers_missing)
from tests.harness.mirror import ACR
from tests.harness.overlaybd import StreamingNode
from addons.core.offline import AnswerAdapter, run_hooks_now
from tests.harness.inprocess import install
from tests.test_teleport_unit import (RUNMD, Registry, make_flow, manifest, mirror_of, overlaybd_layer,
                                      streamable_manifest)

AUTO = RUNMD.replace(".teleport   overlaybd, always", ".teleport   overlaybd")
OVERLAYFS_CONFIG = """\
version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
"""


# --- the runmd and the option -------------------------------------------------------------


def test_teleport_formats_and_modes_in_the_runmd() -> None:
    assert Teleport.parse("overlaybd") == TeleportConfig(("overlaybd",), "auto")
    assert Teleport.parse("") == TeleportConfig(("overlaybd",), "auto")
    assert Teleport.parse("overlaybd, always") == TeleportConfig(("overlaybd",), "always")
    assert Teleport.parse("OverlayBD,never") == TeleportConfig(("overlaybd",), "never")
    assert Teleport.parse("overlaybd, auto") == TeleportConfig(("overlaybd",), "auto")
    assert Teleport.parse("estargz") == TeleportConfig(("estargz",), "auto")
    assert Teleport.parse("overlaybd, estargz, auto") == TeleportConfig(("overlaybd", "estargz"), "auto")
    assert Teleport.parse("estargz, overlaybd, always") == TeleportConfig(("estargz", "overlaybd"), "always")


EXPECTED = ("expected '.teleport FORMAT[, FORMAT ...][, MODE]' with formats overlaybd or estargz "
            "and a mode auto or always or never last, e.g. 'overlaybd, estargz, auto'")


@pytest.mark.parametrize("line, fragment", [
    ("overlaybd, sometimes", f"{EXPECTED}: unknown format 'sometimes'"),
    ("overlaybd, auto, always", f"{EXPECTED}: the mode 'auto' must come last"),
    ("always", f"{EXPECTED}: no format in 'always'"),
    ("estargz, estargz", f"{EXPECTED}: 'estargz' is listed twice"),
    ("stargz, auto", f"{EXPECTED}: unknown format 'stargz'"),
])
def test_a_wrong_mode_is_a_runmd_error_naming_its_line(line: str, fragment: str) -> None:
    text = RUNMD.replace("overlaybd, always", line).replace("{types}", STREAMING)
    number = text.splitlines().index(f":   .teleport   {line}") + 1
    with pytest.raises(RunmdError) as e:
        catalog.parse_text(text, "mirror.runmd")
    assert f"mirror.runmd:{number}:" in str(e.value) and fragment in str(e.value)


def test_acr_init_writes_auto(tmp_path: Path) -> None:
    subprocess.run([ACR, "--runmd", str(tmp_path / "mirror.runmd"), "init", "--upstream", "http://127.0.0.1:5000"],
                   check=True, capture_output=True)
    compiled = catalog.load(tmp_path / "mirror.runmd")
    (step,) = [s for _, s in compiled.document.steps("teleport")]
    assert step.input == "overlaybd, auto" and compiled.config(step) == TeleportConfig(("overlaybd",), "auto")


# --- the node check ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3], ids=["containerd-1.x", "containerd-2.x"])
@pytest.mark.parametrize("snapshotter, fmt", [("overlaybd", "overlaybd"), ("stargz", "estargz")])
def test_a_node_streams_with_its_snapshotter_declared_and_its_socket_answering(
        version: int, snapshotter: str, fmt: str) -> None:
    with StreamingNode(version, snapshotter=snapshotter) as node:
        assert node_streams(node.config) == NodeStreams(snapshotter, fmt)
        node.stop()
        assert node_streams(node.config) == NodeStreams(snapshotter, missing=(
            f"the {snapshotter} snapshotter does not answer on {node.socket_path} (Connection refused)"))


def test_what_a_node_lacks_is_said(tmp_path: Path) -> None:
    assert node_streams(tmp_path / "none.toml") == NodeStreams("overlayfs", missing=(
        f"no {tmp_path / 'none.toml'}: containerd runs with its default snapshotter (overlayfs)"))
    plain = tmp_path / "plain.toml"
    plain.write_text(OVERLAYFS_CONFIG)
    assert node_streams(plain) == NodeStreams("overlayfs", missing=(
        "CRI's snapshotter is 'overlayfs', not a streaming one ('overlaybd' or 'stargz') "
        '(plugins."io.containerd.grpc.v1.cri".containerd)'))
    # containerd 1.x hides the layer annotations from snapshotters unless told otherwise
    for snapshotter in ("overlaybd", "stargz"):
        with StreamingNode(2, snapshotter=snapshotter) as node:
            node.config.write_text(node.config.read_text().replace("  disable_snapshot_annotations = false\n", ""))
            assert node_streams(node.config).missing == (
                'plugins."io.containerd.grpc.v1.cri".containerd.disable_snapshot_annotations is not false '
                f"({snapshotter} needs the layer annotations)")
    # the snapshotter CRI names must be the one declared
    with StreamingNode(2, snapshotter="stargz") as node:
        node.config.write_text(node.config.read_text().replace("[proxy_plugins.stargz]", "[proxy_plugins.other]"))
        assert node_streams(node.config).missing == "no [proxy_plugins.stargz] declares the stargz snapshotter"
    bad = tmp_path / "bad.toml"
    bad.write_text("version = [")
    assert (node_streams(bad).missing or "").startswith(f"cannot read {bad}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_gate_checks_at_most_every_30_seconds_off_the_loop_and_logs_a_change_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = [NodeStreams("overlayfs", missing="no overlaybd"), NodeStreams("overlayfs", missing="no overlaybd"),
               NodeStreams("overlaybd", "overlaybd")]
    seen_threads: list[str] = []

    def probe(config: Path) -> NodeStreams:
        seen_threads.append(threading.current_thread().name)
        return answers.pop(0)

    clock = Clock()
    gate = Gate(Path("/x/config.toml"), probe=probe, clock=clock)
    caplog.set_level(logging.INFO, "addons.teleport.gate")
    with pytest.raises(NeedsIO):
        gate.verdict(io=False)  # nothing known yet: the route hands it to a worker thread
    assert gate.verdict(io=True).missing == "no overlaybd" and gate.checks == 1
    clock.now += 29.9
    assert gate.verdict(io=False).missing == "no overlaybd" and gate.checks == 1  # fresh: no check
    clock.now += 0.2
    assert gate.verdict(io=False).missing == "no overlaybd"  # stale: used while a background check runs
    deadline = time.monotonic() + 10
    while gate.checks < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gate.checks == 2 and seen_threads[-1] != threading.current_thread().name
    clock.now += 31
    assert gate.verdict(io=True).streams and gate.checks == 3
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        "teleport (auto): tag pulls get the original images: this node streams no teleported format: no overlaybd",
        "teleport (auto): this node streams overlaybd images (overlaybd snapshotter, /x/config.toml)",
    ]


# --- through the chain ---------------------------------------------------------------------------


def teleport_world(text: str, tmp_path: Path) -> tuple[Registry, AcrMirror, AnswerAdapter, str, str]:
    reg = Registry(("oci",))
    mirror = mirror_of(text)
    mirror.state.home = tmp_path  # type: ignore[union-attr]
    adapter = install(mirror.state, reg)  # type: ignore[arg-type]
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable", artifactType=STREAMING)
    target = reg.put(body, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(body), {"streaming.format": "overlaybd"}, STREAMING))
    return reg, mirror, adapter, original, target


def pull_with(mirror: AcrMirror, ref: str = "v1", method: str = "HEAD", **options: Any) -> http.HTTPFlow:
    flow = make_flow(f"/v2/app/manifests/{ref}?ns=127.0.0.1%3A5000", method)
    with taddons.context(mirror) as tctx:
        tctx.configure(mirror, acr_platform="linux/amd64", **options)
        run_hooks_now(mirror.addons, flow, ("requestheaders", "request", "response"))
    return flow


def test_auto_teleports_on_a_streaming_node_and_checks_it_once(tmp_path: Path) -> None:
    _, mirror, _, original, target = teleport_world(AUTO, tmp_path)
    counters = mirror.state.counters  # type: ignore[union-attr]
    with StreamingNode() as node:
        cold = pull_with(mirror, acr_containerd_config=str(node.config))
        assert cold.response is not None and cold.response.headers["Docker-Content-Digest"] == target
        assert counters["worker_hops"] == 1
        warm = pull_with(mirror, acr_containerd_config=str(node.config))
        assert warm.response is not None and warm.response.headers["Docker-Content-Digest"] == target
        # The tag is asked for again, on the event loop (no hop); the node's verdict comes from memory.
        assert counters["worker_hops"] == 1
    gate = teleport_shared(mirror.state).gate  # type: ignore[union-attr]
    assert gate.checks == 1 and gate.public()["node_streams"] is True


def test_auto_serves_the_original_where_the_node_cannot_stream(tmp_path: Path) -> None:
    _, mirror, _, original, target = teleport_world(AUTO, tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(OVERLAYFS_CONFIG)
    flows = [pull_with(mirror, method=m, acr_containerd_config=str(config)) for m in ("HEAD", "GET")]
    for f in flows:
        assert f.response is not None and f.response.headers["Docker-Content-Digest"] == original
        t = f.metadata["acr"]["teleport"]
        assert t["skipped"] == "snapshotter"
        assert t["message"] == ("CRI's snapshotter is 'overlayfs', not a streaming one ('overlaybd' or 'stargz') "
                                '(plugins."io.containerd.grpc.v1.cri".containerd); on offer: overlaybd')
        assert f.comment.split("\n")[0] == "no teleport: snapshotter" and not f.marked
        assert "teleport: not teleported: snapshotter: CRI's snapshotter is 'overlayfs'" in f.comment
        assert f.metadata["acr"]["steps"][-1].startswith("teleport: not teleported: snapshotter: ")
    (line,) = mirror.teleports(flows[:1])
    assert line.startswith("app:v1 not teleported: snapshotter: CRI's snapshotter is 'overlayfs'")
    why = mirror.why(flows[:1])
    assert any("teleport: not teleported: snapshotter" in w for w in why)
    assert mirror.state.counters["teleport:snapshotter"] == 2  # type: ignore[union-attr]
    public = teleport_shared(mirror.state).gate.public()  # type: ignore[union-attr]
    assert public["mode"] == "auto" and public["node_streams"] is False and "overlayfs" in public["missing"]


def test_the_option_overrides_the_runmd(tmp_path: Path) -> None:
    _, mirror, _, original, target = teleport_world(RUNMD, tmp_path)  # runmd: always
    config = tmp_path / "config.toml"
    config.write_text(OVERLAYFS_CONFIG)
    opts = {"acr_containerd_config": str(config)}
    assert pull_with(mirror, **opts).response.headers["Docker-Content-Digest"] == target  # type: ignore[union-attr]
    never = pull_with(mirror, acr_teleport="never", **opts)
    assert never.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    assert never.metadata["acr"]["teleport"] == {"skipped": "never", "message": "teleport is set to never"}
    auto = pull_with(mirror, acr_teleport="auto", **opts)
    assert auto.metadata["acr"]["teleport"]["skipped"] == "snapshotter"
    gate = teleport_shared(mirror.state).gate  # type: ignore[union-attr]
    assert gate.checks == 1  # only auto asks the node
    with pytest.raises(exceptions.OptionsError, match="acr_teleport: unknown teleport mode 'maybe'"):
        pull_with(mirror, acr_teleport="maybe")


def test_never_in_the_runmd(tmp_path: Path) -> None:
    _, mirror, _, original, _ = teleport_world(RUNMD.replace("overlaybd, always", "overlaybd, never"), tmp_path)
    f = pull_with(mirror)
    assert f.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    assert f.metadata["acr"]["teleport"]["skipped"] == "never"


# --- the target's format ---------------------------------------------------------------------------


def test_overlaybd_layers_are_recognised() -> None:
    assert overlaybd_layers_missing(streamable_manifest("x")) is None
    assert overlaybd_layers_missing(manifest("x")) == "it has no layers"
    tar = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "a" * 64, "size": 3}
    assert "layer 1 is not an overlaybd blob" in (overlaybd_layers_missing(
        manifest("x", layers=[overlaybd_layer("a"), tar])) or "")
    only_digest = overlaybd_layer("b")
    del only_digest["annotations"]["containerd.io/snapshot/overlaybd/blob-size"]
    assert "layer 0 is not an overlaybd blob" in (overlaybd_layers_missing(manifest("x", layers=[only_digest])) or "")
    bad_size = overlaybd_layer("c")
    bad_size["annotations"]["containerd.io/snapshot/overlaybd/blob-size"] = "12 bytes"
    assert "blob-size is not a size" in (overlaybd_layers_missing(manifest("x", layers=[bad_size])) or "")


def test_a_target_without_overlaybd_layers_is_format(tmp_path: Path) -> None:
    reg, mirror, _, _, _ = teleport_world(RUNMD, tmp_path)
    original = reg.put(manifest("original 2"), oci.OCI_MANIFEST, tag="v2")
    plain = manifest("streamable but tar+gzip", layers=[
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "b" * 64, "size": 9}])
    target = reg.put(plain, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(plain), {"streaming.format": "overlaybd"}, STREAMING))
    f = pull_with(mirror, "v2")
    assert f.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    t = f.metadata["acr"]["teleport"]
    assert t["skipped"] == "format"
    assert t["message"] == f"streamable manifest {target} is not overlaybd: layer 0 is not an overlaybd blob " \
        "(no containerd.io/snapshot/overlaybd/blob-digest and blob-size annotations)"


# --- eStargz beside overlaybd: the format this node streams -------------------------------------------


def estargz_layer(seed: str) -> dict[str, Any]:
    """A layer descriptor as `ctr-remote image convert --estargz --oci` writes it: still a
    gzip tar, annotated with its TOC's digest and its uncompressed size."""
    data = f"estargz {seed}".encode()
    toc = b"stargz.index.json " + data
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(data), "size": len(data),
            "annotations": {"containerd.io/snapshot/stargz/toc.digest": sha(toc),
                            "io.containers.estargz.uncompressed-size": "10240"}}


def sha(data: bytes) -> str:
    import hashlib
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_estargz_layers_are_recognised() -> None:
    assert estargz_layers_missing(manifest("x", layers=[estargz_layer("a"), estargz_layer("b")])) is None
    assert estargz_layers_missing(streamable_manifest("x")) == (
        "layer 0 is not an eStargz layer (no containerd.io/snapshot/stargz/toc.digest and "
        "io.containers.estargz.uncompressed-size annotations)")
    no_size = estargz_layer("c")
    del no_size["annotations"]["io.containers.estargz.uncompressed-size"]
    assert "layer 1 is not an eStargz layer" in (estargz_layers_missing(
        manifest("x", layers=[estargz_layer("a"), no_size])) or "")
    bad_toc = estargz_layer("d")
    bad_toc["annotations"]["containerd.io/snapshot/stargz/toc.digest"] = "not a digest"
    assert estargz_layers_missing(manifest("x", layers=[bad_toc])) == (
        "layer 0: containerd.io/snapshot/stargz/toc.digest is not a digest")
    assert overlaybd_layers_missing(manifest("x", layers=[estargz_layer("e")])) is not None


def two_formats_world(text: str, tmp_path: Path, formats: tuple[str, ...] = ("overlaybd", "estargz"),
                      ) -> tuple[Registry, AcrMirror, str, dict[str, str]]:
    """A tag with a streamable copy in each of `formats`, each a referrer naming its format."""
    reg = Registry(("oci",))
    mirror = mirror_of(text)
    mirror.state.home = tmp_path  # type: ignore[union-attr]
    install(mirror.state, reg)  # type: ignore[arg-type]
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    copies = {}
    for fmt in formats:
        layer = overlaybd_layer(fmt) if fmt == "overlaybd" else estargz_layer(fmt)
        body = manifest(f"{fmt} copy", layers=[layer], artifactType=STREAMING)
        copies[fmt] = reg.put(body, oci.OCI_MANIFEST)
        reg.refer(original, Descriptor(oci.OCI_MANIFEST, copies[fmt], len(body),
                                       {"streaming.format": fmt, "streaming.platform.os": "linux",
                                        "streaming.platform.arch": "amd64"}, STREAMING))
    return reg, mirror, original, copies


BOTH_AUTO = RUNMD.replace(".teleport   overlaybd, always", ".teleport   overlaybd, estargz, auto")


@pytest.mark.parametrize("snapshotter, fmt", [("stargz", "estargz"), ("overlaybd", "overlaybd")])
def test_auto_serves_the_copy_for_the_nodes_snapshotter(tmp_path: Path, snapshotter: str, fmt: str) -> None:
    _, mirror, _, copies = two_formats_world(BOTH_AUTO, tmp_path)
    with StreamingNode(snapshotter=snapshotter) as node:
        for method in ("HEAD", "GET"):
            f = pull_with(mirror, method=method, acr_containerd_config=str(node.config))
            assert f.response is not None and f.response.headers["Docker-Content-Digest"] == copies[fmt]
            assert f.metadata["acr"]["teleport"]["format"] == fmt
            assert f.comment.split("\n")[0] == f"🚀 → {copies[fmt][7:15]} {fmt}"
    gate = teleport_shared(mirror.state).gate  # type: ignore[union-attr]
    assert gate.public()["format"] == fmt and gate.public()["snapshotter"] == snapshotter


def test_a_stargz_node_never_gets_an_overlaybd_image_nor_an_overlaybd_node_an_estargz_one(tmp_path: Path) -> None:
    for snapshotter, only in (("stargz", "overlaybd"), ("overlaybd", "estargz")):
        _, mirror, original, _ = two_formats_world(BOTH_AUTO, tmp_path, (only,))
        with StreamingNode(snapshotter=snapshotter) as node:
            f = pull_with(mirror, acr_containerd_config=str(node.config))
        assert f.response is not None and f.response.headers["Docker-Content-Digest"] == original
        node_format = "estargz" if snapshotter == "stargz" else "overlaybd"
        assert f.metadata["acr"]["teleport"] == {"skipped": "snapshotter", "message": (
            f"this node streams {node_format} (CRI's snapshotter is '{snapshotter}'); on offer: {only}")}


def test_auto_with_a_format_teleport_does_not_serve_is_snapshotter(tmp_path: Path) -> None:
    only_overlaybd = RUNMD.replace(".teleport   overlaybd, always", ".teleport   overlaybd")
    _, mirror, original, _ = two_formats_world(only_overlaybd, tmp_path)
    with StreamingNode(snapshotter="stargz") as node:
        f = pull_with(mirror, acr_containerd_config=str(node.config))
    assert f.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    assert f.metadata["acr"]["teleport"]["message"] == (
        "this node streams estargz (CRI's snapshotter is 'stargz'); on offer: overlaybd, estargz")


def test_a_node_without_a_streaming_snapshotter_is_told_what_was_on_offer(tmp_path: Path) -> None:
    _, mirror, original, _ = two_formats_world(BOTH_AUTO, tmp_path, ("estargz",))
    config = tmp_path / "config.toml"
    config.write_text(OVERLAYFS_CONFIG)
    f = pull_with(mirror, acr_containerd_config=str(config))
    assert f.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    assert f.metadata["acr"]["teleport"]["message"] == (
        "CRI's snapshotter is 'overlayfs', not a streaming one ('overlaybd' or 'stargz') "
        '(plugins."io.containerd.grpc.v1.cri".containerd); on offer: estargz')


def test_always_serves_the_first_format_on_offer_in_teleports_order(tmp_path: Path) -> None:
    for line, fmt in (("estargz, overlaybd, always", "estargz"), ("overlaybd, estargz, always", "overlaybd")):
        _, mirror, _, copies = two_formats_world(RUNMD.replace("overlaybd, always", line), tmp_path)
        f = pull_with(mirror)
        assert f.response.headers["Docker-Content-Digest"] == copies[fmt]  # type: ignore[union-attr]
    _, mirror, _, copies = two_formats_world(RUNMD.replace("overlaybd, always", "estargz, overlaybd, always"),
                                             tmp_path, ("overlaybd",))
    assert pull_with(mirror).response.headers["Docker-Content-Digest"] == copies["overlaybd"]  # type: ignore[union-attr]


def test_an_estargz_referrer_whose_layers_are_plain_is_format(tmp_path: Path) -> None:
    reg, mirror, _, _ = two_formats_world(RUNMD.replace("overlaybd, always", "estargz, always"), tmp_path, ())
    original = reg.put(manifest("original 2"), oci.OCI_MANIFEST, tag="v2")
    plain = manifest("not converted", layers=[
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "sha256:" + "b" * 64, "size": 9}])
    target = reg.put(plain, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(plain), {"streaming.format": "estargz"}, STREAMING))
    f = pull_with(mirror, "v2")
    assert f.response.headers["Docker-Content-Digest"] == original  # type: ignore[union-attr]
    assert f.metadata["acr"]["teleport"] == {"skipped": "format", "message": (
        f"streamable manifest {target} is not estargz: layer 0 is not an eStargz layer "
        "(no containerd.io/snapshot/stargz/toc.digest and io.containers.estargz.uncompressed-size annotations)")}


# --- overlaybd's credentials ------------------------------------------------------------------------

OVERLAYBD_JSON = """\
{
    "logConfig": {
        "logLevel": 1,
        "logPath": "/var/log/overlaybd.log"
    },
    "credentialConfig": {
        "mode": "file",
        "path": "/opt/overlaybd/cred.json"
    },
    "ioEngine": 0,
    "registryFsVersion": "v2"
}
"""
AUTH = "http://127.0.0.1:8578/auth"


def test_credential_config_is_pointed_at_the_mirror_and_nothing_else_moves() -> None:
    edit = overlaybd_config.configure_text(OVERLAYBD_JSON, AUTH)
    assert edit.changes == [f"credentialConfig: file /opt/overlaybd/cred.json -> http {AUTH}"]
    assert edit.new == OVERLAYBD_JSON.replace('"mode": "file"', '"mode": "http"').replace(
        '"/opt/overlaybd/cred.json"', f'"{AUTH}"')
    assert json.loads(edit.new)["credentialConfig"] == {"mode": "http", "path": AUTH}
    assert not overlaybd_config.configure_text(edit.new, AUTH).changed  # a second run changes nothing
    # a timeout of overlaybd's own stays; a config without credentialConfig gets one
    timed = overlaybd_config.configure_text('{"credentialConfig": {"mode": "file", "path": "/c", "timeout": 3}}', AUTH)
    assert json.loads(timed.new)["credentialConfig"] == {"mode": "http", "path": AUTH, "timeout": 3}
    legacy = overlaybd_config.configure_text('{"credentialFilePath": "/opt/overlaybd/cred.json"}', AUTH)
    assert json.loads(legacy.new) == {"credentialFilePath": "/opt/overlaybd/cred.json",
                                      "credentialConfig": {"mode": "http", "path": AUTH}}


@pytest.mark.parametrize("text, fragment", [
    ('{"auths": {"example.azurecr.io": {"username": "u", "password": "p"}}}', "it looks like a credentials file"),
    ('{"name": "left-pad", "version": "1.3.0"}', "not overlaybd's config: none of its keys"),
    ("[1, 2]", "not a JSON object"),
    ("{'logConfig': 1}", "not JSON"),
    ('{"credentialConfig": "http://x/auth"}', "credentialConfig is not a JSON object"),
])
def test_a_json_file_that_is_not_overlaybds_config_is_refused_and_left_alone(
    tmp_path: Path, text: str, fragment: str,
) -> None:
    path = tmp_path / "overlaybd.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        overlaybd_config.configure(path, AUTH)
    assert path.read_text() == text and sorted(os.listdir(tmp_path)) == ["overlaybd.json"]


def test_acr_overlaybd_configure(tmp_path: Path) -> None:
    def acr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ACR, "--runmd", str(tmp_path / "mirror.runmd"), *args], capture_output=True, text=True,
                              timeout=30)

    assert acr("init", "--upstream", "http://127.0.0.1:5000", "--mirror-address", "localhost:8591").returncode == 0
    path = tmp_path / "overlaybd.json"
    path.write_text(OVERLAYBD_JSON)
    path.chmod(0o640)
    url = "http://127.0.0.1:8591/auth"
    dry = acr("overlaybd", "configure", "--config", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == [f"--- {path}", f"+++ {path}"]
    assert f'+        "path": "{url}"' in dry.stdout and '-        "mode": "file",' in dry.stdout
    assert f"{path}: dry run, nothing written" in dry.stdout
    assert path.read_text() == OVERLAYBD_JSON
    done = acr("overlaybd", "configure", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{path}: updated; the original is kept in {path}.acr-backup",
        f"  credentialConfig: file /opt/overlaybd/cred.json -> http {url}",
        overlaybd_config.RESTART_NOTE,
    ]
    assert json.loads(path.read_text())["credentialConfig"] == {"mode": "http", "path": url}
    assert (tmp_path / "overlaybd.json.acr-backup").read_text() == OVERLAYBD_JSON
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    again = acr("overlaybd", "configure", "--config", str(path))
    assert again.stdout.strip() == f"{path}: no change (credentialConfig already asks the mirror)"
    cred = tmp_path / "cred.json"
    cred.write_text('{"auths": {}}')
    refused = acr("overlaybd", "configure", "--config", str(cred))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"acr: {cred}: not overlaybd's config (it looks like a credentials file): none of its keys "
        "(credentialConfig, cacheConfig, logConfig, ...)"]
    assert cred.read_text() == '{"auths": {}}'


def test_node_check_reports_overlaybd_credentials_that_do_not_point_at_this_mirror(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    obd = tmp_path / "overlaybd.json"
    obd.write_text(OVERLAYBD_JSON)
    (tmp_path / "mirror.runmd").write_text(
        "```\n+ .runtime\n: .node-check none.toml\n:   .overlaybd overlaybd.json\n```\n"
        "```\n+ .runtime\n: .mirror http://127.0.0.1:5000\n+ .proxy localhost:8592\n: .manifests head, get\n```\n")
    compiled = catalog.load(tmp_path / "mirror.runmd")
    caplog.set_level(logging.INFO)
    runtime = Runtime.for_document(compiled)
    runtime.run(roots=list(compiled.document.roots("runtime"))[:1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("overlaybd reads credentials from a file" in w and "acr overlaybd configure" in w for w in warnings)
    overlaybd_config.configure(obd, "http://127.0.0.1:8592/auth")
    caplog.clear()
    runtime.run(roots=list(compiled.document.roots("runtime"))[:1])
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("overlaybd asks this mirror for credentials (http://127.0.0.1:8592/auth)" in m for m in infos)
    obd.write_text(OVERLAYBD_JSON.replace('"file"', '"http"').replace("/opt/overlaybd/cred.json", "http://10.0.0.1/auth"))
    found = node_check.check_node(tmp_path / "none.toml", overlaybd_json=obd, auth_url="http://127.0.0.1:8592/auth")
    assert [f.message for f in found if not f.ok][-1] == (
        f"overlaybd asks http://10.0.0.1/auth for credentials, not this mirror (http://127.0.0.1:8592/auth): "
        f"run 'acr overlaybd configure --config {obd}'")


# --- the README's table of reasons --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def recorded_reasons() -> set[str]:
    """Every reason teleport can record, read from the source: a new one must reach the README."""
    found: set[str] = set()
    for module in ("teleport.py", "discover.py"):
        src = (ROOT / "addons" / "teleport" / module).read_text()
        found |= set(re.findall(r'(?:NoTeleport|DiscoverError)\("([a-z-]+)"', src))
        found |= set(re.findall(r'_record\(ctx, "([a-z-]+)"', src))
        for line in src.splitlines():
            if re.search(r"\breason\b.*=|return \"", line) and " if " in line or line.strip().startswith('return "'):
                found |= set(re.findall(r'"([a-z-]+)"', line))
    return found


def test_the_readme_explains_every_reason() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Will my pulls be teleported?", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z-]+)` \| (.+?) \| (.+?) \|$", section, re.M)
    table = {reason for reason, meaning, fix in rows if meaning.strip() and fix.strip()}
    reasons = recorded_reasons()
    assert {"snapshotter", "format", "never", "no-referrer", "timeout", "auth", "upstream", "fetch"} <= reasons
    assert reasons == table, (reasons - table, table - reasons)
