"""Teleport acceptance: real containerd pulling through a real `acr mirror start` from the real
registry, with the OCI 1.1 referrers API (or its absence, or the legacy ORAS endpoint, or a
broken one) provided by `tests.harness.referrers.ReferrersFront` in front of the registry.

The streamable images have the layers overlaybd's converter writes (a plain tar holding
`overlaybd.commit`, annotated with its digest, size and file system), pushed as referrers the
way each format does it; containerd's default snapshotter unpacks them (into one blob file): a
test proves a teleport by the digest containerd's image points at and by the content it fetched.
The mirror runs `acr init`'s `auto` mode, pointed at a node that streams (`StreamingNode`: a
config.toml that declares the overlaybd snapshotter, and a listening socket at its address);
tests/test_teleport_gate.py is about the other nodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest
from mitmproxy import http as mhttp
from mitmproxy import io as mio

from tests.conftest import HostsDir
from tests.harness.containerd import Ctr
from tests.harness.images import (OCI_INDEX, OCI_MANIFEST, Image, Index, canonical_json, host_platform,
                                  make_image, make_index, platform_string, push_image, push_index,
                                  push_referrer, referrers_tag, sha256_digest)
from tests.harness.mirror import ACR, Mirror
from tests.harness.overlaybd import StreamingNode
from tests.harness.ports import direct_session
from tests.harness.referrers import FILTERS_HEADER, ReferrersFront
from tests.harness.registry import Registry
from addons.proxy.context import read_record

STREAMING = "application/vnd.azure.artifact.streaming.v1"
STREAMING_LINK = "application/vnd.azure.artifact.streaming.link.v1"
OVERLAYBD_NATIVE = "application/vnd.containerd.overlaybd.native.v1+json"
DADI = "dadi.image.v1"
ORAS_ARTIFACT = "application/vnd.cncf.oras.artifact.manifest.v1+json"
SBOM = "application/spdx+json"
ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json", "*/*"))

HOST = platform_string(host_platform())
HOST_ARCH = host_platform()["architecture"]
OTHER = "linux/arm64/v8" if HOST_ARCH == "amd64" else "linux/amd64"

#: The seed's runmd (DESIGN §2), pointed at a local registry; `.login-acr`/`.install` need Azure.
SEED_RUNMD = """\
``` start mirror
+ .runtime
: .mirror       {upstream}
: .host         127.0.0.1:{port}, resolve, pull

+ .proxy          127.0.0.1:{port}
: .manifests      head, get
:   .login        access_token
:   .authn        oauth2
:   .resolve      application/vnd.docker.distribution.manifest.list.v2+json
:   .discover     dadi.image.v1
:   .teleport     overlaybd
: .blobs          get
:   .login        access_token
:   .authn        oauth2
:   .pull
```
"""

RUNMD = """\
``` start mirror
+ .runtime
: .mirror       {upstream}
+ .proxy          127.0.0.1:{port}
: .manifests      head, get
:   .authn        oauth2
:   .resolve      application/vnd.oci.image.index.v1+json
:   .discover     {types}
{teleport}: .blobs          head, get
:   .authn        oauth2
:   .pull
```
"""


def runmd(upstream: str, types: str, teleport: bool = True) -> str:
    return RUNMD.replace("{upstream}", upstream).replace("{types}", types).replace(
        "{teleport}", ":   .teleport     overlaybd\n" if teleport else "")


# --- building streamable images ---------------------------------------------------------


def streamable(text: str, platform: str = HOST, oci: bool = True) -> Image:
    """A streamable image as overlaybd's converter writes one: each layer an overlaybd blob
    (a plain tar holding `overlaybd.commit`) annotated with its digest, size and file system."""
    return make_image({"streamable.txt": text.encode()}, platform=platform, oci=oci, overlaybd=True)


def annotations_for(platform: Optional[str]) -> dict[str, str]:
    a = {"streaming.format": "overlaybd", "streaming.version": "v1"}
    if platform:
        os_, arch = platform.split("/")[:2]
        a.update({"streaming.platform.os": os_, "streaming.platform.arch": arch})
    return a


def push_streamable(reg: Any, repo: str, subject: Any, img: Image, artifact_type: str = STREAMING,
                    platform: Optional[str] = HOST) -> str:
    """Push `img` as a referrer of `subject` in the given format; returns the digest containerd
    should end up with (the streamable manifest's)."""
    if artifact_type == STREAMING_LINK:
        # ACR's link: a small artifact whose annotations name the streamable manifest.
        push_image(reg, repo, None, img)
        a = annotations_for(platform)
        a.update({"streaming.mediaType": img.media_type, "streaming.digest": img.digest,
                  "streaming.size": str(img.size)})
        push_referrer(reg, repo, subject, STREAMING_LINK, a)
        return img.digest
    # streaming.v1, overlaybd native, dadi: the referrer IS the streamable manifest.
    a = annotations_for(platform) if artifact_type == STREAMING else {}
    d = push_referrer(reg, repo, subject, artifact_type, a or None, config=img.config,
                      layers=list(img.layers))
    return str(d["digest"])


# --- the mirror --------------------------------------------------------------------------


PLACEHOLDER_UPSTREAM = "http://placeholder.invalid:5000"
PLACEHOLDER_ADDRESS = "127.0.0.1:65535"


@pytest.fixture(scope="module")
def streaming_node() -> Iterator[StreamingNode]:
    """This module's node streams overlaybd images, as far as the mirror can tell."""
    with StreamingNode() as node:
        yield node


def node_sets(node: StreamingNode) -> list[str]:
    return [f"acr_containerd_config={node.config}"]


@pytest.fixture(scope="module")
def init_runmd(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `acr init` writes (its default artifact types, `.teleport overlaybd`), rendered once
    per module: each mirror then starts from it without another `acr init` process."""
    path = tmp_path_factory.mktemp("init") / "mirror.runmd"
    subprocess.run([ACR, "--runmd", str(path), "init", "--upstream", PLACEHOLDER_UPSTREAM,
                    "--mirror-address", PLACEHOLDER_ADDRESS, "--force"], check=True, capture_output=True)
    text = path.read_text()
    assert re.search(rf"^:\s+\.discover\s+{re.escape(f'{STREAMING}, {STREAMING_LINK}, {OVERLAYBD_NATIVE}')}$", text, re.M)
    assert re.search(r"^:\s+\.teleport\s+overlaybd, auto$", text, re.M)
    return text.replace(PLACEHOLDER_ADDRESS, "127.0.0.1:{port}")


@pytest.fixture
def start(mirror_factory: Callable[..., Mirror], tmp_hosts_dir: HostsDir, tmp_path: Path,
          referrers_front: ReferrersFront, init_runmd: str, streaming_node: StreamingNode) -> Callable[..., Mirror]:
    """A mirror of the front, with containerd's hosts.toml for the front pointing at it."""

    def make(*, text: Optional[str] = None, sets: tuple[str, ...] = ()) -> Mirror:
        m = mirror_factory(
            referrers_front.url, runmd=text or init_runmd.replace(PLACEHOLDER_UPSTREAM, referrers_front.url),
            sets=[*node_sets(streaming_node), *sets],
            # Keep `.host` away from /etc/containerd/certs.d; unbuffered so the log is current.
            args=["--hosts-dir", str(tmp_path / "runtime-certs.d")],
            env={"PYTHONUNBUFFERED": "1"},
        )
        tmp_hosts_dir.write(referrers_front.host, m.url)
        return m

    return make


@dataclasses.dataclass
class Site:
    """A referrers front and the mirror that serves it."""

    front: ReferrersFront
    mirror: Mirror


@pytest.fixture(scope="module")
def _shared_site(registry: Registry, init_runmd: str, tmp_path_factory: pytest.TempPathFactory,
                 streaming_node: StreamingNode) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("shared-mirror")
    with ReferrersFront(registry.url) as front:
        m = Mirror(home, [front.url], runmd=init_runmd.replace(PLACEHOLDER_UPSTREAM, front.url),
                   args=["--hosts-dir", str(home / "runtime-certs.d")], env={"PYTHONUNBUFFERED": "1"},
                   sets=node_sets(streaming_node))
        try:
            yield Site(front, m)
        finally:
            m.stop()


@pytest.fixture
def shared(_shared_site: Site, tmp_hosts_dir: HostsDir, request: pytest.FixtureRequest) -> Iterator[Site]:
    """The module's mirror (`acr init`'s runmd) in front of the OCI 1.1 API: starting a mirror
    costs seconds, so the tests that need nothing else share one. Each test has its own
    repository, so the mirror's caches never mix tests; the front's log starts empty."""
    site = _shared_site
    site.front.mode, site.front.page_size = "oci", None
    site.front.clear_log()
    tmp_hosts_dir.write(site.front.host, site.mirror.url)
    yield site
    site.front.mode = "oci"
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(f"--- shared mirror log {site.mirror.log_path} ---\n{site.mirror.log_text()[-4000:]}")


def site_for(api: str, request: pytest.FixtureRequest) -> Site:
    """The shared site for the OCI API; a fresh front and mirror for any other mode (a mirror
    learns an upstream's API once)."""
    if api == "oci":
        return request.getfixturevalue("shared")
    front: ReferrersFront = request.getfixturevalue("referrers_front")
    front.mode = api
    return Site(front, request.getfixturevalue("start")())


def pull(containerd: Ctr, hosts: HostsDir, ref: str) -> str:
    result = containerd.pull(ref, hosts_dir=hosts)
    assert result.returncode == 0, result.stderr
    target = containerd.image_target(ref)
    assert target is not None
    return target


def log_lines(m: Mirror, pattern: str) -> list[str]:
    return [line for line in m.log_text().splitlines() if re.search(pattern, line)]


def flows_of(path: Path) -> list[mhttp.HTTPFlow]:
    with open(path, "rb") as f:
        return [fl for fl in mio.FlowReader(f).stream() if isinstance(fl, mhttp.HTTPFlow)]


# --- the fixture speaks the referrers API --------------------------------------------------


def test_front_speaks_the_oci_referrers_api_and_proxies_the_rest(
    registry: Registry, referrers_front: ReferrersFront, repo_name: str,
) -> None:
    front, s = referrers_front, direct_session()
    image = make_image({"a": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    stream = push_referrer(registry, repo_name, image, STREAMING, annotations_for(HOST))
    sbom = push_referrer(registry, repo_name, image, SBOM, {"org.example": "sbom"})
    api = f"{front.url}/v2/{repo_name}/referrers/{image.digest}"

    r = s.get(api)
    assert r.status_code == 200 and r.headers["Content-Type"] == OCI_INDEX
    doc = r.json()
    assert doc["schemaVersion"] == 2 and doc["mediaType"] == OCI_INDEX
    assert doc["manifests"] == [stream, sbom]  # built from the referrer manifests themselves
    assert FILTERS_HEADER not in r.headers

    r = s.get(api, params={"artifactType": SBOM})
    assert r.json()["manifests"] == [sbom] and r.headers[FILTERS_HEADER] == "artifactType"
    front.mode = "nofilter"
    r = s.get(api, params={"artifactType": SBOM})
    assert r.json()["manifests"] == [stream, sbom] and FILTERS_HEADER not in r.headers

    front.mode, front.page_size = "oci", 1
    r = s.get(api)
    assert r.json()["manifests"] == [stream] and 'rel="next"' in r.headers["Link"]
    r = s.get(front.url + r.links["next"]["url"])
    assert r.json()["manifests"] == [sbom] and "Link" not in r.headers
    front.page_size = None

    # an unknown subject has no referrers, not a 404; a bad digest is a 400
    assert s.get(f"{front.url}/v2/{repo_name}/referrers/{sha256_digest(b'x')}").json()["manifests"] == []
    assert s.get(f"{front.url}/v2/{repo_name}/referrers/latest").status_code == 400

    oras = f"{front.url}/v2/{repo_name}/_oras/artifacts/referrers"
    assert s.get(oras, params={"digest": image.digest}).status_code == 404
    front.mode = "oras"
    assert s.get(api).status_code == 404
    r = s.get(oras, params={"digest": image.digest, "artifactType": STREAMING})
    assert r.status_code == 200 and r.json() == {"referrers": [stream]}

    front.mode = "none"
    assert s.get(api).status_code == 404 and s.get(oras, params={"digest": image.digest}).status_code == 404
    front.mode = "error"
    assert s.get(api).status_code == 500
    front.mode = "garbage"
    r = s.get(api)
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()

    # everything else is the registry's own answer, byte for byte
    r = s.get(f"{front.url}/v2/{repo_name}/manifests/{referrers_tag(image.digest)}", headers={"Accept": OCI_INDEX})
    assert r.status_code == 200 and [m["digest"] for m in r.json()["manifests"]] == [stream["digest"], sbom["digest"]]
    for method in ("GET", "HEAD"):
        via = s.request(method, f"{front.url}/v2/{repo_name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        direct = s.request(method, f"{registry.url}/v2/{repo_name}/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert via.status_code == direct.status_code == 200
        assert via.content == direct.content
        for h in ("Content-Type", "Content-Length", "Docker-Content-Digest"):
            assert via.headers[h] == direct.headers[h]
    assert s.get(f"{front.url}/v2/{repo_name}/blobs/{image.layers[0].digest}").content == image.layers[0].data
    assert s.get(f"{front.url}/v2/{repo_name}/manifests/nope").status_code == 404
    # pushing through it works too (uploads, Location headers)
    other = make_image({"b": repo_name.encode()})
    push_image(front, repo_name, "v2", other, method="chunked")
    assert s.get(f"{registry.url}/v2/{repo_name}/manifests/v2", headers={"Accept": OCI_MANIFEST}).content == other.manifest

    kinds = {x.kind for x in front.seen()}
    assert {"oci", "oras", "tagschema", "other"} <= kinds
    assert front.referrers_calls() == len(front.seen()) - len(front.seen("other"))


# --- tag pulls --------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("api", ["oci", "none"], ids=["referrers-api", "tag-schema"])
def test_tag_pull_is_teleported_to_the_streamable_manifest(
    containerd: Ctr, registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str,
    request: pytest.FixtureRequest, api: str,
) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    fast = streamable(f"streamable {repo_name}")
    target = push_streamable(registry, repo_name, image, fast)
    site = site_for(api, request)
    m, referrers_front = site.mirror, site.front

    ref = f"{referrers_front.host}/{repo_name}:v1"
    assert pull(containerd, tmp_hosts_dir, ref) == target != image.digest
    content = containerd.content_digests()
    assert {target, fast.config.digest, fast.layers[0].digest} <= content
    assert image.layers[0].digest not in content  # the original was never fetched
    (line,) = log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200")
    assert f"{image.digest} teleported to {target}" in line
    used = {s.kind for s in referrers_front.seen() if s.kind != "other"}
    # a mirror that knows the API asks it once; one that does not yet tries OCI, ORAS, the tag schema
    assert used == ({"oci"} if api == "oci" else {"oci", "oras", "tagschema"})


@pytest.mark.e2e
def test_pull_by_digest_gets_the_original(
    containerd: Ctr, registry: Registry, shared: Site, tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    push_streamable(registry, repo_name, image, streamable(repo_name))
    ref = f"{shared.front.host}/{repo_name}@{image.digest}"
    assert pull(containerd, tmp_hosts_dir, ref) == image.digest
    assert shared.front.referrers_calls() == 0


@pytest.mark.e2e
def test_tag_without_referrer_gets_the_original(
    containerd: Ctr, registry: Registry, shared: Site, tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    push_referrer(registry, repo_name, image, SBOM, {"org.example": "not streamable"})
    m = shared.mirror
    ref = f"{shared.front.host}/{repo_name}:v1"
    assert pull(containerd, tmp_hosts_dir, ref) == image.digest
    assert log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200 {image.digest} no teleport \(no-referrer\)")


@pytest.mark.e2e
def test_teleport_off_serves_the_original(
    containerd: Ctr, registry: Registry, referrers_front: ReferrersFront, tmp_hosts_dir: HostsDir,
    repo_name: str, start: Callable[..., Mirror],
) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    push_streamable(registry, repo_name, image, streamable(repo_name))
    start(text=runmd(referrers_front.url, STREAMING, teleport=False))
    assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == image.digest


# --- multi-arch ------------------------------------------------------------------------


def _multiarch(repo_name: str) -> Index:
    return make_index([(p, make_image({"platform.txt": f"{repo_name} {p}".encode()}, platform=p))
                       for p in (OTHER, HOST)])


@pytest.mark.e2e
def test_multiarch_tag_acr_style_index_level_referrers(
    containerd: Ctr, registry: Registry, shared: Site, tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    """ACR: the index has one streaming.v1 referrer per platform, told apart by annotations."""
    index = _multiarch(repo_name)
    push_index(registry, repo_name, "multi", index)
    targets = {p: push_streamable(registry, repo_name, index, streamable(f"{repo_name} {p}", p), platform=p)
               for p in (OTHER, HOST)}  # the other platform's is listed first
    ref = f"{shared.front.host}/{repo_name}:multi"
    assert pull(containerd, tmp_hosts_dir, ref) == targets[HOST]
    assert targets[OTHER] not in containerd.content_digests()
    assert len(shared.front.seen("oci")) == 1


@pytest.mark.e2e
def test_multiarch_tag_child_manifest_referrer(
    containerd: Ctr, registry: Registry, shared: Site, tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    """The converter's way: a referrer on each platform manifest, none on the index."""
    index = _multiarch(repo_name)
    push_index(registry, repo_name, "multi", index)
    targets = {p: push_streamable(registry, repo_name, index.for_platform(p), streamable(f"{repo_name} {p}", p),
                                  platform=None) for p in (OTHER, HOST)}
    ref = f"{shared.front.host}/{repo_name}:multi"
    assert pull(containerd, tmp_hosts_dir, ref) == targets[HOST]
    asked = [s.path.rsplit("/", 1)[1] for s in shared.front.seen("oci")]
    assert asked == [index.digest, index.for_platform(HOST).digest]


# --- failures of the referrers endpoint ------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("mode, reason", [("error", "upstream"), ("slow", "timeout"), ("garbage", "bad-json")])
def test_broken_referrers_endpoint_never_breaks_the_pull(
    containerd: Ctr, registry: Registry, referrers_front: ReferrersFront, tmp_hosts_dir: HostsDir,
    repo_name: str, start: Callable[..., Mirror], tmp_path: Path, mode: str, reason: str,
) -> None:
    referrers_front.mode = mode
    # Longer than the default acr_discover_timeout (5 s). A shorter timeout cannot be set yet:
    # mitmproxy 11.0.2's `--set` parser has no float options (acr_* float options refuse).
    referrers_front.slow_seconds = 6.0
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    push_streamable(registry, repo_name, image, streamable(repo_name))
    flows_path = tmp_path / "flows.mitm"
    m = start(sets=(f"save_stream_file={flows_path}",))

    ref = f"{referrers_front.host}/{repo_name}:v1"
    assert pull(containerd, tmp_hosts_dir, ref) == image.digest
    assert log_lines(m, rf"HEAD manifests {repo_name}:v1 -> 200 {image.digest} no teleport \({reason}\)")
    m.stop()
    (head,) = [f for f in flows_of(flows_path)
               if f.request.method == "HEAD" and read_record(f).get("reference") == "v1"]
    meta = read_record(head)
    assert meta["teleport"]["skipped"] == reason
    assert meta["discover"]["error"] == reason
    assert head.response is not None and head.response.headers["Docker-Content-Digest"] == image.digest
    assert not head.marked and head.comment.split("\n")[0] == f"no teleport: {reason}"


# --- HEAD and GET agree ---------------------------------------------------------------------


@pytest.mark.e2e
def test_head_and_get_of_a_teleported_tag_agree(registry: Registry, shared: Site, repo_name: str) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    target = push_streamable(registry, repo_name, image, streamable(repo_name))
    m, referrers_front = shared.mirror, shared.front
    path = f"/v2/{repo_name}/manifests/v1?ns={referrers_front.host}"
    head = m.head(path, headers={"Accept": ACCEPT})
    get = m.get(path, headers={"Accept": ACCEPT})
    assert head.status_code == get.status_code == 200
    for h in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
        assert head.headers[h] == get.headers[h], h
    assert head.headers["Docker-Content-Digest"] == target
    assert head.headers["Content-Type"] == OCI_MANIFEST
    assert head.content == b""
    assert int(get.headers["Content-Length"]) == len(get.content)
    assert "sha256:" + hashlib.sha256(get.content).hexdigest() == target
    assert json.loads(get.content)["artifactType"] == STREAMING
    # by digest: exactly the original, whatever its referrers
    by_digest = m.get(f"/v2/{repo_name}/manifests/{image.digest}?ns={referrers_front.host}", headers={"Accept": ACCEPT})
    assert by_digest.headers["Docker-Content-Digest"] == image.digest and by_digest.content == image.manifest


# --- referrer formats ----------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("shape", ["oras-artifact", "image-manifest"])
def test_seed_runmd_teleports_with_legacy_oras_referrers(
    containerd: Ctr, registry: Registry, referrers_front: ReferrersFront, tmp_hosts_dir: HostsDir,
    repo_name: str, start: Callable[..., Mirror], shape: str,
) -> None:
    referrers_front.mode = "oras"
    image = make_image({"original.txt": repo_name.encode()}, oci=False)  # the seed's era: Docker schema 2
    push_image(registry, repo_name, "v1", image)
    if shape == "oras-artifact":
        # What the seed's converter pushed: an ORAS artifact manifest whose blobs[0] is the
        # converted image manifest (distribution cannot store it: the front keeps it).
        fast = streamable(repo_name, oci=False)
        push_image(registry, repo_name, None, fast)
        target = fast.digest
        artifact = {"mediaType": ORAS_ARTIFACT, "artifactType": DADI, "blobs": [fast.descriptor()],
                    "subject": image.descriptor()}
        desc = referrers_front.add_artifact(repo_name, canonical_json(artifact))
        assert desc["mediaType"] == ORAS_ARTIFACT and desc["artifactType"] == DADI
    else:  # a dadi referrer that is itself the image manifest
        target = push_streamable(registry, repo_name, image, streamable(repo_name), artifact_type=DADI)
    m = start(text=SEED_RUNMD.replace("{upstream}", referrers_front.url))
    assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == target
    oras = referrers_front.seen("oras")
    assert oras and oras[-1].query == {"digest": [image.digest], "artifactType": [DADI]}
    assert log_lines(m, f"teleported to {target}")


@pytest.mark.e2e
@pytest.mark.parametrize("artifact_type", [STREAMING, STREAMING_LINK, OVERLAYBD_NATIVE],
                         ids=["streaming.v1", "link.v1", "overlaybd-native"])
def test_each_referrer_format_teleports(
    containerd: Ctr, registry: Registry, shared: Site, tmp_hosts_dir: HostsDir, repo_name: str,
    artifact_type: str,
) -> None:
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    fast = streamable(repo_name)
    target = push_streamable(registry, repo_name, image, fast, artifact_type=artifact_type)
    if artifact_type == STREAMING_LINK:
        assert target == fast.digest
    # the shared mirror runs `acr init`'s runmd: streaming.v1, link.v1, overlaybd native
    assert pull(containerd, tmp_hosts_dir, f"{shared.front.host}/{repo_name}:v1") == target
    assert fast.layers[0].digest in containerd.content_digests()


@pytest.mark.e2e
def test_a_registry_that_ignores_the_filter_is_filtered_by_the_mirror(
    containerd: Ctr, registry: Registry, referrers_front: ReferrersFront, tmp_hosts_dir: HostsDir,
    repo_name: str, start: Callable[..., Mirror],
) -> None:
    referrers_front.mode = "nofilter"
    image = make_image({"original.txt": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    # an unrelated artifact that would unpack as an image, listed first
    decoy = push_referrer(registry, repo_name, image, SBOM, annotations_for(HOST),
                          config=streamable("decoy").config, layers=list(streamable("decoy").layers))
    target = push_streamable(registry, repo_name, image, streamable(repo_name))
    start(text=runmd(referrers_front.url, STREAMING))
    assert pull(containerd, tmp_hosts_dir, f"{referrers_front.host}/{repo_name}:v1") == target != decoy["digest"]
    (call,) = referrers_front.seen("oci")
    assert call.query == {"artifactType": [STREAMING]}


# --- caching: referrers calls per tag pull ----------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("api", ["oci", "none"], ids=["referrers-api", "tag-schema"])
def test_one_referrers_call_cold_none_warm(
    containerd: Ctr, registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str,
    request: pytest.FixtureRequest, api: str,
) -> None:
    targets = {}
    for tag in ("learn", "v1", "plain"):
        image = make_image({"t": f"{repo_name} {tag}".encode()})
        push_image(registry, repo_name, tag, image)
        targets[tag] = (push_streamable(registry, repo_name, image, streamable(f"{repo_name} {tag}"))
                        if tag != "plain" else image.digest)
    referrers_front = site_for(api, request).front
    ref = lambda tag: f"{referrers_front.host}/{repo_name}:{tag}"  # noqa: E731
    assert pull(containerd, tmp_hosts_dir, ref("learn")) == targets["learn"]  # learns the API

    for tag in ("v1", "plain"):
        referrers_front.clear_log()
        assert pull(containerd, tmp_hosts_dir, ref(tag)) == targets[tag]
        assert referrers_front.referrers_calls() == 1, (tag, referrers_front.seen())  # cold
        assert containerd.remove_image(ref(tag)).returncode == 0
        referrers_front.clear_log()
        assert pull(containerd, tmp_hosts_dir, ref(tag)) == targets[tag]
        assert referrers_front.referrers_calls() == 0, (tag, referrers_front.seen())  # warm (negative: < 30 s)


# --- with authentication -----------------------------------------------------------------------


@pytest.mark.e2e
def test_teleport_through_a_token_registry(
    containerd: Ctr, token_registry: Registry, token_server: Any, tmp_hosts_dir: HostsDir, repo_name: str,
    mirror_factory: Callable[..., Mirror], init_runmd: str, tmp_path: Path, streaming_node: StreamingNode,
) -> None:
    """The referrers lookup and the streamable manifest go upstream with the flow's token."""
    user, password = token_registry.credentials or ("", "")
    image = make_image({"original.txt": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    fast = streamable(repo_name)
    target = push_streamable(token_registry, repo_name, image, fast)
    with ReferrersFront(token_registry.url, credentials=(user, password)) as front:
        m = mirror_factory(front.url, runmd=init_runmd.replace(PLACEHOLDER_UPSTREAM, front.url),
                           credentials=f"{user}:{password}", args=["--hosts-dir", str(tmp_path / "rt")],
                           env={"PYTHONUNBUFFERED": "1"}, sets=node_sets(streaming_node))
        tmp_hosts_dir.write(front.host, m.url)
        assert pull(containerd, tmp_hosts_dir, f"{front.host}/{repo_name}:v1") == target
        (call,) = front.seen("oci")
        assert call.authorized  # the mirror's token for the repository went with it
        assert fast.layers[0].digest in containerd.content_digests()
        assert password not in m.log_text()
