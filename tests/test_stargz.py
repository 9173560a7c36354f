"""Teleport on a real lazy-pulling node: the stargz snapshotter through the mirror, end to end.

One node for the module (tests/harness/stargz.py: the daemon built from Debian's Go packages with
our main, FUSE, and a containerd whose CRI snapshotter it is), one registry with a referrers front,
and one eStargz pair (tests/harness/estargz.py: the original, and its copy made by `ctr-remote image
convert --estargz --oci`, linked as a streaming referrer). The mirror is what `acr init
--teleport-format estargz` writes (`.teleport estargz, auto`), pointed at the node's config.toml.
The snapshotter's config sends its Range GETs for the front's registry to the mirror: the
registry's access log tells them apart from direct reads by their User-Agent (the mirror's reads
are its own, `python-requests`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import cri
from tests.harness.containerd import Containerd, Ctr, write_hosts_toml
from tests.harness.estargz import HELLO, StargzPair, blob_reads, log_since, log_size, push_pair
from tests.harness.mirror import Mirror
from tests.harness.ports import ClosedPort, free_port
from tests.harness.referrers import ReferrersFront
from tests.harness.registry import Registry
from tests.harness.stargz import (CTR_REMOTE, StargzNode, config_toml, estargz_mirror, fuse_missing, mounts_under,
                                  wait_ready)

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
REPO = "stargz/hello"
HELLO_TEXT = b"hello from the eStargz copy\n"
#: Incompressible filler the container never reads: a lazy start must not fetch it.
FILLER = 4 << 20
#: The mirror's own upstream reads (requests), as the registry's access log shows them.
MIRROR_AGENT = "python-requests/"
#: CRI pulls land in this containerd namespace.
K8S = "k8s.io"


@dataclasses.dataclass
class Site:
    """The module's registry and front, its stargz node and the mirror the node reads through."""

    reg: Registry
    front: ReferrersFront
    node: StargzNode
    home: Path
    mirror: Mirror = dataclasses.field(init=False)

    def mirror_of(self, name: str, *, config: Path, port: int | None = None, sets: tuple[str, ...] = ()) -> Mirror:
        """A started mirror of the front with `.teleport estargz, auto`, judging the node that
        ``config`` describes."""
        m = estargz_mirror(self.home / name, self.front.url, config, port=port, sets=sets)
        m.start(timeout=60)  # a loaded CI machine: a start may be slow
        return m


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A registry of the module's own (its access log is this module's alone), the referrers
    front, the stargz node reading the front through the mirror, and that mirror."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("stargz-site")
    with Registry("anonymous", workdir=home / "registry") as reg, ReferrersFront(reg.url) as front:
        port = free_port()
        with StargzNode({front.host: f"127.0.0.1:{port}"}) as node:
            site = Site(reg, front, node, home)
            site.mirror = site.mirror_of("mirror", config=node.containerd.config_path, port=port)
            try:
                yield site
            finally:
                site.mirror.stop()


@pytest.fixture(scope="module")
def pair(site: Site) -> StargzPair:
    return push_pair(site.front, site.node.containerd.client("conversion"), REPO, "v1", hello=HELLO_TEXT,
                     filler_bytes=FILLER)


@pytest.fixture
def closed() -> Iterator[ClosedPort]:
    with ClosedPort() as port:
        yield port


@pytest.fixture
def hosts(site: Site, tmp_path: Path, closed: ClosedPort) -> Path:
    """containerd's hosts dir for the front: the mirror, then a port that refuses."""
    write_hosts_toml(tmp_path / "certs.d", site.front.host, closed.url, hosts=[(site.mirror.url, ["pull", "resolve"])])
    return tmp_path / "certs.d"


def unique(prefix: str) -> str:
    """A namespace or container name no other run uses: runc keeps its state per namespace and
    name in one folder for every containerd on the machine."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def ctr(site: Site) -> Iterator[Ctr]:
    """A fresh namespace on the stargz node, dropped after the test."""
    client = site.node.containerd.client(unique("t"))
    yield client
    client.drop_namespace()


def rpull(ctr: Ctr, ref: str, hosts: Path) -> "subprocess.CompletedProcess[str]":
    """`ctr-remote image rpull --hosts-dir`: containerd resolves through hosts.toml, the
    snapshotter mounts each eStargz layer lazily instead of containerd downloading it."""
    return subprocess.run([CTR_REMOTE, "-a", ctr.address, "-n", ctr.namespace, "image", "rpull",
                           "--hosts-dir", str(hosts), ref], capture_output=True, text=True, timeout=120)


def run_cat(ctr: Ctr, ref: str, snapshotter: str = "stargz") -> "subprocess.CompletedProcess[str]":
    """`ctr run` of the image's `cat` of the file that only the image has."""
    return ctr.ctr("run", "--rm", "--snapshotter", snapshotter, ref, unique("cat"), "/bin/cat", f"/{HELLO}",
                   timeout=120)


def assert_streamed_through_the_mirror(site: Site, pair: StargzPair, since: int) -> None:
    """Every read of the copy's layer the registry answered came from the mirror, as Range reads,
    and together they are a small part of the layer."""
    reads = blob_reads(log_since(site.reg.log_path, since), pair.copy_layer)
    assert reads, "the snapshotter read nothing from the registry"
    assert {r.status for r in reads} == {206}, reads
    assert all(r.agent.startswith(MIRROR_AGENT) for r in reads), f"reads that bypassed the mirror: {reads}"
    fetched = sum(r.bytes for r in reads)
    assert fetched < pair.copy_size // 4, f"{fetched} of {pair.copy_size} bytes fetched before the first output"


# --- the daemon and its harness ------------------------------------------------------------


def test_config_uses_upstreams_keys_and_sends_each_registry_to_its_mirror() -> None:
    config = tomllib.loads(config_toml({"registry.example:5000": "127.0.0.1:8578", "b.example": "127.0.0.1:1"}))
    assert config == {"no_background_fetch": True, "resolver": {"host": {
        "registry.example:5000": {"mirrors": [{"host": "127.0.0.1:8578", "insecure": True}]},
        "b.example": {"mirrors": [{"host": "127.0.0.1:1", "insecure": True}]}}}}


def test_stopping_the_node_leaves_nothing_mounted(site: Site, pair: StargzPair, hosts: Path) -> None:
    """SIGTERM by PID: our daemon closes the snapshotter, which unmounts its FUSE layers itself."""
    with StargzNode({site.front.host: site.mirror.host}) as other:
        ctr = other.containerd.client(unique("mounts"))
        ref = f"{site.front.host}/{REPO}@{pair.copy}"
        assert rpull(ctr, ref, hosts).returncode == 0
        name = unique("mounted")
        container = ctr.ctr("run", "-d", "--snapshotter", "stargz", ref, name, "/bin/cat", f"/{HELLO}")
        assert container.returncode == 0, container.stderr
        ctr.ctr("tasks", "delete", "--force", name)  # its shim would outlive containerd; the container stays
        root = other.snapshotter.root
        assert any("/snapshots/" in p for p in mounts_under(root)), "the eStargz layer was not mounted"
        other.containerd.stop()
        left = other.snapshotter.stop()
    assert left == []
    assert mounts_under(root) == []


def test_readiness_waits_for_containerd_to_reach_the_snapshotter(site: Site) -> None:
    """wait_ready returns only once containerd can prepare a snapshot on it: with the daemon
    gone it gives up in one line."""
    with StargzNode({site.front.host: site.mirror.host}) as other:
        other.snapshotter.stop()
        with pytest.raises(TimeoutError, match="cannot reach the stargz snapshotter"):
            wait_ready(other.containerd, timeout=1.0)


# --- through the mirror, teleport `auto` -------------------------------------------------------


def test_tag_rpull_lands_on_the_estargz_copy_and_streams_through_the_mirror(
        site: Site, pair: StargzPair, hosts: Path, ctr: Ctr) -> None:
    """`ctr-remote image rpull` of the tag: the mirror answers with the copy, the snapshotter mounts
    its layer without downloading it, `ctr run` prints the file, and only a small part of the layer
    was read, every byte of it through the mirror."""
    ref = f"{site.front.host}/{REPO}:v1"
    site.node.restart_cold()  # nothing cached from another test's reads
    start = log_size(site.reg.log_path)
    pulled = rpull(ctr, ref, hosts)
    assert pulled.returncode == 0, pulled.stderr
    assert ctr.image_target(ref) == pair.copy
    assert pair.copy_layer not in ctr.content_digests(), "containerd downloaded the layer: not lazy"
    out = run_cat(ctr, ref)
    assert out.returncode == 0, out.stderr
    assert out.stdout.encode() == HELLO_TEXT
    assert_streamed_through_the_mirror(site, pair, start)
    log = site.mirror.log_text()
    assert f"HEAD manifests {REPO}:v1 -> 200 {pair.original} teleported to {pair.copy}" in log
    assert f"GET blobs {REPO}:{pair.copy_layer} -> 206" in log


def test_cri_pull_of_the_tag_on_the_stargz_node_runs_the_copy(site: Site, pair: StargzPair, closed: ClosedPort) -> None:
    """The kubelet's way: CRI PullImage with the stargz snapshotter and CRI's own hosts.toml."""
    cd = site.node.containerd
    write_hosts_toml(cd.hosts_dir, site.front.host, closed.url, hosts=[(site.mirror.url, ["pull", "resolve"])])
    ref = f"{site.front.host}/{REPO}:v1"
    k8s = cd.client(K8S)
    site.node.restart_cold()  # nothing cached from another test's reads
    start = log_size(site.reg.log_path)
    try:
        cri.pull_image(cd.address, ref)
        assert k8s.image_target(ref) == pair.copy
        out = run_cat(k8s, ref)
        assert out.returncode == 0, out.stderr
        assert out.stdout.encode() == HELLO_TEXT
        assert_streamed_through_the_mirror(site, pair, start)
    finally:
        k8s.clear()
        (cd.hosts_dir / site.front.host / "hosts.toml").unlink()


def test_pull_by_digest_is_untouched(site: Site, pair: StargzPair, hosts: Path, ctr: Ctr) -> None:
    """The original by digest is the original, lazily pulled (it is no eStargz: containerd
    downloads its layer) and runnable on the stargz node."""
    ref = f"{site.front.host}/{REPO}@{pair.original}"
    pulled = rpull(ctr, ref, hosts)
    assert pulled.returncode == 0, pulled.stderr
    assert ctr.image_target(ref) == pair.original
    assert pair.copy_layer not in ctr.content_digests()
    assert run_cat(ctr, ref).stdout.encode() == HELLO_TEXT


def test_never_never_teleports(site: Site, pair: StargzPair, tmp_path: Path, closed: ClosedPort, ctr: Ctr) -> None:
    m = site.mirror_of("never", config=site.node.containerd.config_path, sets=("acr_teleport=never",))
    try:
        write_hosts_toml(tmp_path / "never.d", site.front.host, closed.url, hosts=[(m.url, ["pull", "resolve"])])
        ref = f"{site.front.host}/{REPO}:v1"
        assert rpull(ctr, ref, tmp_path / "never.d").returncode == 0
        assert ctr.image_target(ref) == pair.original
    finally:
        m.stop()
    assert f"HEAD manifests {REPO}:v1 -> 200 {pair.original}" in m.log_text()
    assert "teleported to" not in m.log_text()


def test_a_node_without_stargz_gets_the_original(site: Site, pair: StargzPair, tmp_path: Path, closed: ClosedPort,
                                                  containerd_daemon: Containerd, containerd: Ctr) -> None:
    """The same mirror setup judging an overlayfs node: the original, with reason `snapshotter`."""
    m = site.mirror_of("overlayfs-node", config=containerd_daemon.config_path)
    try:
        write_hosts_toml(tmp_path / "plain.d", site.front.host, closed.url, hosts=[(m.url, ["pull", "resolve"])])
        ref = f"{site.front.host}/{REPO}:v1"
        pulled = containerd.pull(ref, hosts_dir=tmp_path / "plain.d")
        assert pulled.returncode == 0, pulled.stderr
        assert containerd.image_target(ref) == pair.original
    finally:
        m.stop()
    assert re.search(rf"HEAD manifests {re.escape(REPO)}:v1 -> 200 {pair.original} no teleport \(snapshotter: ",
                     m.log_text()), m.log_text()[-2000:]


# --- the benchmark cannot rot ------------------------------------------------------------------


def test_bench_stargz_runs_with_tiny_sizes() -> None:
    """scripts/bench_stargz.py end to end with a tiny image, one run per link: its figures are
    there and say what happened (the original fetched whole, the copy in part); no timing asserted."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_stargz.py"), "--filler-mib", "0.5",
                             "--repeat", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.splitlines()[-1])
    assert set(figures["links"]) == {"100 Mbit/s", "loopback"}
    for link in figures["links"].values():
        assert link["original"]["fetched_bytes"] == figures["original_layer_bytes"]
        assert 0 < link["estargz"]["fetched_bytes"] < figures["estargz_layer_bytes"]
        assert link["speedup"] > 0 and link["fetched_percent"] > 0
    assert "eStargz starts" in result.stdout
