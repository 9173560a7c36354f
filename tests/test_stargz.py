"""The real stargz snapshotter through the mirror: a lazy-pulling node, end to end.

One node for the module (tests/harness/stargz.py: the daemon built from Debian's Go packages with
our main, FUSE, and a containerd whose CRI snapshotter it is), one registry with a referrers front,
and one eStargz pair (tests/harness/estargz.py: the original, and its copy made by `ctr-remote image
convert --estargz --oci`, linked as a streaming referrer). The snapshotter's config sends its Range
GETs for the front's registry to the mirror: the registry's access log tells them apart from direct
reads by their User-Agent (the mirror's reads are its own, `python-requests`).
"""

from __future__ import annotations

import secrets
import subprocess
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness.containerd import Ctr, write_hosts_toml
from tests.harness.estargz import HELLO, StargzPair, blob_reads, log_since, log_size, push_pair
from tests.harness.mirror import Mirror
from tests.harness.ports import ClosedPort
from tests.harness.referrers import ReferrersFront
from tests.harness.registry import Registry
from tests.harness.stargz import CTR_REMOTE, StargzNode, config_toml, fuse_missing, mounts_under, wait_ready

pytestmark = [pytest.mark.e2e]

REPO = "stargz/hello"
HELLO_TEXT = b"hello from the eStargz copy\n"
#: Incompressible filler the container never reads: a lazy start must not fetch it.
FILLER = 4 << 20
#: The mirror's own upstream reads (requests), as the registry's access log shows them.
MIRROR_AGENT = "python-requests/"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, ReferrersFront, Mirror]]:
    """A registry of the module's own (its access log is this module's alone), the referrers
    front in front of it, and a mirror of the front as `acr init` writes it."""
    reason = fuse_missing()
    if reason:
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("stargz-site")
    with Registry("anonymous", workdir=home / "registry") as reg, ReferrersFront(reg.url) as front:
        mirror = Mirror(home / "mirror", [front.url], args=["--hosts-dir", str(home / "runtime-certs.d")],
                        env={"PYTHONUNBUFFERED": "1"}, start=False)
        try:
            mirror.start(timeout=60)  # a loaded CI machine: the module's one start may be slow
            yield reg, front, mirror
        finally:
            mirror.stop()


@pytest.fixture(scope="module")
def node(site: tuple[Registry, ReferrersFront, Mirror]) -> Iterator[StargzNode]:
    """The stargz node: its snapshotter reads the front's blobs through the mirror."""
    _, front, mirror = site
    with StargzNode({front.host: mirror.host}) as n:
        yield n


@pytest.fixture(scope="module")
def pair(site: tuple[Registry, ReferrersFront, Mirror], node: StargzNode) -> StargzPair:
    _, front, _ = site
    return push_pair(front, node.containerd.client("conversion"), REPO, "v1", hello=HELLO_TEXT, filler_bytes=FILLER)


@pytest.fixture
def hosts(site: tuple[Registry, ReferrersFront, Mirror], tmp_path: Path) -> Iterator[Path]:
    """containerd's hosts dir for the front: the mirror, then a port that refuses."""
    _, front, mirror = site
    with ClosedPort() as closed:
        write_hosts_toml(tmp_path / "certs.d", front.host, closed.url, hosts=[(mirror.url, ["pull", "resolve"])])
        yield tmp_path / "certs.d"


@pytest.fixture
def ctr(node: StargzNode) -> Iterator[Ctr]:
    """A fresh namespace on the stargz node, dropped after the test (containers first)."""
    client = node.containerd.client(unique("t"))
    yield client
    for line in client.ctr("containers", "ls", "-q").stdout.split():
        client.ctr("containers", "rm", line)
    client.drop_namespace()


def rpull(ctr: Ctr, ref: str, hosts: Path) -> "subprocess.CompletedProcess[str]":
    """`ctr-remote image rpull --hosts-dir`: containerd resolves through hosts.toml, the
    snapshotter mounts each eStargz layer lazily instead of containerd downloading it."""
    return subprocess.run([CTR_REMOTE, "-a", ctr.address, "-n", ctr.namespace, "image", "rpull",
                           "--hosts-dir", str(hosts), ref], capture_output=True, text=True, timeout=120)


def unique(prefix: str) -> str:
    """A namespace or container name no other run uses: runc keeps its state per namespace and
    name in one folder for every containerd on the machine."""
    return f"{prefix}-{secrets.token_hex(4)}"


def run_cat(ctr: Ctr, ref: str) -> "subprocess.CompletedProcess[str]":
    """`ctr run` of the image's `cat` of the file that only the image has."""
    return ctr.ctr("run", "--rm", "--snapshotter", "stargz", ref, unique("cat"), "/bin/cat", f"/{HELLO}", timeout=120)


# --- the daemon and its harness ------------------------------------------------------------


def test_config_uses_upstreams_keys_and_sends_each_registry_to_its_mirror() -> None:
    config = tomllib.loads(config_toml({"registry.example:5000": "127.0.0.1:8578", "b.example": "127.0.0.1:1"}))
    assert config == {"no_background_fetch": True, "resolver": {"host": {
        "registry.example:5000": {"mirrors": [{"host": "127.0.0.1:8578", "insecure": True}]},
        "b.example": {"mirrors": [{"host": "127.0.0.1:1", "insecure": True}]}}}}


def test_stopping_the_node_leaves_nothing_mounted(site: tuple[Registry, ReferrersFront, Mirror],
                                                  pair: StargzPair, hosts: Path) -> None:
    """SIGTERM by PID: our daemon closes the snapshotter, which unmounts its FUSE layers itself."""
    _, front, mirror = site
    with StargzNode({front.host: mirror.host}) as other:
        ctr = other.containerd.client(unique("mounts"))
        ref = f"{front.host}/{REPO}@{pair.copy}"
        assert rpull(ctr, ref, hosts).returncode == 0
        container = ctr.ctr("run", "-d", "--snapshotter", "stargz", ref, unique("mounted"), "/bin/cat", f"/{HELLO}")
        assert container.returncode == 0, container.stderr
        root = other.snapshotter.root
        assert any("/snapshots/" in p for p in mounts_under(root)), "the eStargz layer was not mounted"
        other.containerd.stop()
        left = other.snapshotter.stop()
    assert left == []
    assert mounts_under(root) == []


def test_readiness_waits_for_containerd_to_reach_the_snapshotter(site: tuple[Registry, ReferrersFront, Mirror]) -> None:
    """wait_ready returns only once containerd can prepare a snapshot on it: with the daemon
    gone it gives up in one line."""
    _, front, mirror = site
    with StargzNode({front.host: mirror.host}) as other:
        other.snapshotter.stop()
        with pytest.raises(TimeoutError, match="cannot reach the stargz snapshotter"):
            wait_ready(other.containerd, timeout=1.0)


# --- through the mirror -------------------------------------------------------------------


def test_estargz_copy_by_digest_streams_through_the_mirror(
        site: tuple[Registry, ReferrersFront, Mirror], pair: StargzPair, hosts: Path, ctr: Ctr) -> None:
    """rpull of the copy by digest mounts its layer without downloading it; `ctr run` prints the
    file; every byte of the layer the registry sent went to the mirror, and only a small part."""
    reg, front, mirror = site
    ref = f"{front.host}/{REPO}@{pair.copy}"
    start = log_size(reg.log_path)
    pulled = rpull(ctr, ref, hosts)
    assert pulled.returncode == 0, pulled.stderr
    assert ctr.image_target(ref) == pair.copy
    assert pair.copy_layer not in ctr.content_digests(), "containerd downloaded the layer: not lazy"
    out = run_cat(ctr, ref)
    assert out.returncode == 0, out.stderr
    assert out.stdout.encode() == HELLO_TEXT
    reads = blob_reads(log_since(reg.log_path, start), pair.copy_layer)
    assert reads, "the snapshotter read nothing from the registry"
    assert {r.status for r in reads} == {206}, reads
    assert all(r.agent.startswith(MIRROR_AGENT) for r in reads), f"reads that bypassed the mirror: {reads}"
    fetched = sum(r.bytes for r in reads)
    assert fetched < pair.copy_size // 4, f"{fetched} of {pair.copy_size} bytes fetched before the first output"
    assert f"GET blobs {REPO}:{pair.copy_layer} -> 206" in mirror.log_text()
