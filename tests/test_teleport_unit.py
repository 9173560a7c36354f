"""Teleport without a network: the pure functions of discover and teleport, the referrers
client over a fake upstream (API learning, caching, expiry, failures), and the hooks of a
`resolve → discover → teleport` chain driven through mitmproxy's test utilities.

The fake upstream is a `requests` transport adapter mounted on the mirror's own session, so
the plugins run their real code paths (send, read_manifest, parse_referrers) end to end.
"""

from __future__ import annotations

import hashlib
import json
import re
from urllib.parse import urlsplit
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons import catalog

from addons.teleport import discover

from addons.registry import oci
from addons.chain import AcrMirror
from addons.core.offline import Answer, AnswerAdapter, run_hooks_now
from addons.teleport.discover import DiscoverError, ReferrersClient, filter_types, parse_referrers
from addons.registry.oci import Descriptor, Platform, Upstream
from addons.proxy.state import MirrorState
from tests.harness.inprocess import calls, install
from addons.teleport.teleport import (DADI, OVERLAYBD_NATIVE, STREAMING, STREAMING_LINK, NoTeleport,
                             annotated_platform_matches, choose, parse_platform,
                             platform_child, target_of)

AMD64 = Platform(architecture="amd64", os="linux")
ARM64 = Platform(architecture="arm64", os="linux", variant="v8")
UPSTREAM = Upstream.from_spec("http://127.0.0.1:5000")
NS = UPSTREAM.ns


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dg(n: int) -> str:
    return "sha256:" + f"{n:064x}"


def desc(n: int, artifact_type: Optional[str] = STREAMING, media_type: str = oci.OCI_MANIFEST,
         size: int = 100, **annotations: str) -> Descriptor:
    return Descriptor(media_type=media_type, digest=dg(n), size=size,
                      annotations={k.replace("_", "."): v for k, v in annotations.items()} or None,
                      artifact_type=artifact_type)


def streaming(n: int, os_: Optional[str] = None, arch: Optional[str] = None, fmt: str = "overlaybd",
              artifact_type: str = STREAMING, **extra: str) -> Descriptor:
    a = {"streaming.format": fmt, "streaming.version": "v1", **extra}
    if os_:
        a["streaming.platform.os"] = os_
    if arch:
        a["streaming.platform.arch"] = arch
    return Descriptor(media_type=oci.OCI_MANIFEST, digest=dg(n), size=100, annotations=a,
                      artifact_type=artifact_type)


# --- parse_platform ------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("linux/amd64", Platform(architecture="amd64", os="linux")),
    ("linux/arm64/v8", Platform(architecture="arm64", os="linux", variant="v8")),
    (" linux/arm/v7 ", Platform(architecture="arm", os="linux", variant="v7")),
    ("windows/amd64", Platform(architecture="amd64", os="windows")),
])
def test_parse_platform(text: str, expected: Platform) -> None:
    assert parse_platform(text) == expected


@pytest.mark.parametrize("text", ["", "linux", "linux/", "/amd64", "linux/arm/v7/x", "linux//v7"])
def test_parse_platform_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="os/arch"):
        parse_platform(text)


# --- annotated_platform_matches --------------------------------------------------------


def test_annotated_platform_none_when_the_referrer_names_no_platform() -> None:
    assert annotated_platform_matches(streaming(1), AMD64) is None
    assert annotated_platform_matches(desc(1), AMD64) is None


@pytest.mark.parametrize("os_, arch, want, expected", [
    ("linux", "amd64", AMD64, True),
    ("linux", "arm64", AMD64, False),
    ("windows", "amd64", AMD64, False),
    ("linux", "arm64", ARM64, True),
    (None, "amd64", AMD64, False),  # half a platform is not this platform
])
def test_annotated_platform_matches(os_: Optional[str], arch: str, want: Platform, expected: bool) -> None:
    assert annotated_platform_matches(streaming(1, os_, arch), want) is expected


def test_annotated_platform_variant() -> None:
    v7 = streaming(1, "linux", "arm", **{"streaming.platform.variant": "v7"})
    assert annotated_platform_matches(v7, Platform(architecture="arm", os="linux", variant="v7")) is True
    assert annotated_platform_matches(v7, Platform(architecture="arm", os="linux", variant="v6")) is False
    # no variant wanted, or none named: os/arch decide
    assert annotated_platform_matches(v7, Platform(architecture="arm", os="linux")) is True
    assert annotated_platform_matches(streaming(2, "linux", "arm64"), ARM64) is True


# --- parse_referrers -----------------------------------------------------------------


def _index(*descs: dict[str, Any]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_INDEX, "manifests": list(descs)}).encode()


RAW = {"mediaType": oci.OCI_MANIFEST, "digest": dg(7), "size": 512, "artifactType": STREAMING,
       "annotations": {"streaming.format": "overlaybd", "streaming.platform.arch": "amd64"}}


@pytest.mark.parametrize("api", ["oci", "tagschema"])
def test_parse_referrers_reads_an_oci_index(api: str) -> None:
    (d,) = parse_referrers(_index(RAW), api)
    assert (d.digest, d.size, d.artifact_type, d.media_type) == (dg(7), 512, STREAMING, oci.OCI_MANIFEST)
    assert d.annotations == RAW["annotations"]


def test_parse_referrers_reads_legacy_oras() -> None:
    (d,) = parse_referrers(json.dumps({"referrers": [dict(RAW, artifactType=DADI)]}).encode(), "oras")
    assert d.artifact_type == DADI and d.digest == dg(7)
    # the ORAS document has no `manifests`, an index has no `referrers`
    assert parse_referrers(_index(RAW), "oras") == []
    assert parse_referrers(json.dumps({"referrers": [RAW]}).encode(), "oci") == []


def test_parse_referrers_empty_index() -> None:
    assert parse_referrers(_index(), "oci") == []
    assert parse_referrers(b'{"schemaVersion": 2}', "oci") == []


@pytest.mark.parametrize("body", [
    b"", b"<html>", b'{"manifests": [', b"[]", b'"text"', b'{"manifests": {}}',
    _index({"mediaType": oci.OCI_MANIFEST, "digest": "sha256:nothex", "size": 1}),
    _index({"mediaType": oci.OCI_MANIFEST, "digest": dg(1), "size": -1}),
    _index({"digest": dg(1), "size": 1}),
    _index("not an object"),  # type: ignore[arg-type]
])
def test_parse_referrers_bad_json(body: bytes) -> None:
    with pytest.raises(DiscoverError) as e:
        parse_referrers(body, "oci")
    assert e.value.reason == "bad-json"


# --- filter_types -------------------------------------------------------------------


def test_filter_types_keeps_wanted_types_in_preference_order() -> None:
    link, native, stream, sbom = (desc(1, STREAMING_LINK), desc(2, OVERLAYBD_NATIVE),
                                  desc(3, STREAMING), desc(4, "application/spdx+json"))
    found = [sbom, link, native, stream]
    assert filter_types(found, (STREAMING, STREAMING_LINK)) == [stream, link]
    assert filter_types(found, (OVERLAYBD_NATIVE, STREAMING)) == [native, stream]
    assert filter_types(found, (DADI,)) == []
    assert filter_types([], (STREAMING,)) == []
    # no artifactType: never a match
    assert filter_types([desc(5, None)], (STREAMING,)) == []


def test_filter_types_keeps_upstream_order_within_a_type() -> None:
    a, b = streaming(1, "linux", "arm64"), streaming(2, "linux", "amd64")
    assert filter_types([a, b], (STREAMING,)) == [a, b]


# --- target_of ------------------------------------------------------------------------


@pytest.mark.parametrize("artifact_type", [STREAMING, OVERLAYBD_NATIVE, DADI])
def test_target_of_a_manifest_referrer_is_itself(artifact_type: str) -> None:
    r = streaming(1, artifact_type=artifact_type)
    assert target_of(r) is r
    bare = desc(2, artifact_type)  # no streaming.format: not refused
    assert target_of(bare) is bare


def test_target_of_a_link_is_the_manifest_it_names() -> None:
    link = desc(1, STREAMING_LINK, **{"streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": dg(9),
                                      "streaming.size": "1234", "streaming.format": "overlaybd"})
    t = target_of(link)
    assert (t.media_type, t.digest, t.size) == (oci.OCI_MANIFEST, dg(9), 1234)


@pytest.mark.parametrize("annotations", [
    {},
    {"streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": dg(9)},
    {"streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": dg(9), "streaming.size": "big"},
    {"streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": "sha256:xyz", "streaming.size": "1"},
    {"streaming.digest": dg(9), "streaming.size": "1"},
])
def test_target_of_a_bad_link_is_bad_json(annotations: dict[str, str]) -> None:
    link = Descriptor(media_type=oci.OCI_MANIFEST, digest=dg(1), size=10, annotations=annotations,
                      artifact_type=STREAMING_LINK)
    with pytest.raises(NoTeleport) as e:
        target_of(link)
    assert e.value.reason == "bad-json"


@pytest.mark.parametrize("artifact_type", [STREAMING, STREAMING_LINK])
def test_a_referrer_of_another_format_is_refused(artifact_type: str) -> None:
    r = streaming(1, fmt="estargz", artifact_type=artifact_type)
    with pytest.raises(NoTeleport) as e:
        choose([r], ("overlaybd",), AMD64, index_level=False)
    assert e.value.reason == "format" and e.value.offered == ("estargz",)
    assert e.value.message == "the referrers offer estargz, not overlaybd"


# --- choose ----------------------------------------------------------------------------


def test_choose_nothing_is_no_referrer() -> None:
    with pytest.raises(NoTeleport) as e:
        choose([], ("overlaybd",), AMD64, index_level=False)
    assert e.value.reason == "no-referrer"


def test_choose_takes_the_first_usable_in_preference_order() -> None:
    first, second = streaming(1), streaming(2)
    c = choose([first, second], ("overlaybd",), AMD64, index_level=False)
    assert c.referrer is first and c.target is first


def test_choose_at_manifest_level_skips_other_platforms_and_formats() -> None:
    arm, wrong_format, ok = streaming(1, "linux", "arm64"), streaming(2, fmt="estargz"), streaming(3)
    c = choose([arm, wrong_format, ok], ("overlaybd",), AMD64, index_level=False)
    assert c.referrer is ok
    # a referrer naming no platform is fine for a platform manifest
    assert choose([streaming(4)], ("overlaybd",), AMD64, index_level=False).referrer.digest == dg(4)


def test_choose_at_index_level_needs_the_platform_named() -> None:
    arm, amd = streaming(1, "linux", "arm64"), streaming(2, "linux", "amd64")
    assert choose([arm, amd], ("overlaybd",), AMD64, index_level=True).referrer is amd
    assert choose([arm, amd], ("overlaybd",), ARM64, index_level=True).referrer is arm
    with pytest.raises(NoTeleport) as e:
        choose([streaming(3)], ("overlaybd",), AMD64, index_level=True)  # names no platform
    assert e.value.reason == "platform"


def test_choose_platform_reason() -> None:
    with pytest.raises(NoTeleport) as e:
        choose([streaming(1, "linux", "arm64"), streaming(2, "windows", "amd64")], ("overlaybd",), AMD64,
               index_level=False)
    assert e.value.reason == "platform"
    assert "linux/amd64" in e.value.message


def test_choose_format_reason() -> None:
    with pytest.raises(NoTeleport) as e:
        choose([streaming(1, fmt="estargz"), streaming(2, fmt="nydus")], ("overlaybd",), AMD64, index_level=False)
    assert e.value.reason == "format"


def test_choose_says_format_when_this_platform_has_a_copy_in_another_format() -> None:
    with pytest.raises(NoTeleport) as e:
        choose([streaming(1, fmt="estargz"), streaming(2, "linux", "arm64")], ("overlaybd",), AMD64,
               index_level=False)
    assert e.value.reason == "format" and e.value.offered == ("estargz",)


def test_choose_reports_the_last_failure() -> None:
    bad_link = desc(1, STREAMING_LINK, **{"streaming.format": "overlaybd"})
    with pytest.raises(NoTeleport) as e:
        choose([bad_link, streaming(2, "linux", "arm64")], ("overlaybd",), AMD64, index_level=False)
    assert e.value.reason == "platform"


def test_choose_takes_formats_in_teleports_order_and_names_the_format() -> None:
    obd, stargz, bare = streaming(1), streaming(2, fmt="estargz"), desc(3, STREAMING)
    assert choose([obd, stargz], ("estargz", "overlaybd"), AMD64, index_level=False).referrer is stargz
    c = choose([obd, stargz], ("overlaybd", "estargz"), AMD64, index_level=False)
    assert c.referrer is obd and c.format == "overlaybd"
    # a referrer that names no format is a candidate for the first format (its layers decide)
    assert choose([bare, stargz], ("estargz",), AMD64, index_level=False).referrer is bare
    # an artifact type of overlaybd's own never stands for an eStargz copy
    native = desc(4, OVERLAYBD_NATIVE)
    assert choose([native, stargz], ("estargz",), AMD64, index_level=False).referrer is stargz


def test_choose_a_link_resolves_its_target() -> None:
    link = desc(1, STREAMING_LINK, **{"streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": dg(9),
                                      "streaming.size": "77", "streaming.platform.os": "linux",
                                      "streaming.platform.arch": "amd64"})
    c = choose([link], ("overlaybd",), AMD64, index_level=True)
    assert c.referrer is link and c.target.digest == dg(9) and c.target.size == 77


# --- platform_child ----------------------------------------------------------------------


def _child(n: int, os_: str, arch: str, variant: Optional[str] = None) -> dict[str, Any]:
    p = {"os": os_, "architecture": arch}
    if variant:
        p["variant"] = variant
    return {"mediaType": oci.OCI_MANIFEST, "digest": dg(n), "size": 10 + n, "platform": p}


def test_platform_child_picks_the_wanted_platform() -> None:
    body = _index(_child(1, "linux", "arm64", "v8"), _child(2, "linux", "amd64"), _child(3, "windows", "amd64"))
    assert platform_child(body, AMD64).digest == dg(2)
    assert platform_child(body, ARM64).digest == dg(1)
    assert platform_child(body, Platform(architecture="arm64", os="linux")).digest == dg(1)
    assert platform_child(body, Platform(architecture="amd64", os="windows")).digest == dg(3)


def test_platform_child_variant_must_agree_when_both_name_one() -> None:
    body = _index(_child(1, "linux", "arm", "v6"), _child(2, "linux", "arm", "v7"))
    assert platform_child(body, Platform(architecture="arm", os="linux", variant="v7")).digest == dg(2)


def test_platform_child_missing_platform_is_the_platform_reason() -> None:
    body = _index(_child(1, "linux", "arm64", "v8"), {"mediaType": oci.OCI_MANIFEST, "digest": dg(2), "size": 3})
    with pytest.raises(NoTeleport) as e:
        platform_child(body, AMD64)
    assert e.value.reason == "platform"


@pytest.mark.parametrize("body", [b"not json", b"[1]", _index({"digest": "x"})])
def test_platform_child_bad_index_is_bad_json(body: bytes) -> None:
    with pytest.raises(NoTeleport) as e:
        platform_child(body, AMD64)
    assert e.value.reason == "bad-json"


class Registry:
    """A tiny in-memory registry: manifests by tag or digest, referrers per digest, and which
    referrers APIs it speaks (`oci`, `oras`, tag schema always)."""

    def __init__(self, apis: tuple[str, ...] = ("oci",)) -> None:
        self.apis = apis
        self.manifests: dict[str, tuple[str, bytes]] = {}
        self.tags: dict[str, str] = {}
        self.referrers: dict[str, list[dict[str, Any]]] = {}
        self.fail: Optional[Answer] = None  # answer for every referrers call
        self.raise_: Optional[Exception] = None
        self.page_size: Optional[int] = None

    def put(self, body: bytes, media_type: str, tag: Optional[str] = None) -> str:
        d = sha(body)
        self.manifests[d] = (media_type, body)
        if tag:
            self.tags[tag] = d
        return d

    def refer(self, subject: str, descriptor: Descriptor) -> None:
        """List `descriptor` (as a referrers index holds it) among the referrers of `subject`."""
        entry: dict[str, Any] = {"mediaType": descriptor.media_type, "digest": descriptor.digest,
                                 "size": descriptor.size}
        if descriptor.annotations is not None:
            entry["annotations"] = dict(descriptor.annotations)
        if descriptor.artifact_type is not None:
            entry["artifactType"] = descriptor.artifact_type
        assert descriptor.platform is None and descriptor.urls is None and descriptor.data is None
        self.referrers.setdefault(subject, []).append(entry)

    def __call__(self, req: requests.PreparedRequest) -> Answer:
        path, _, query = req.path_url.partition("?")
        m = re.match(r"^/v2/(.+)/manifests/([^/]+)$", path)
        if m:
            ref = m[2]
            if re.match(r"^sha256-[0-9a-f]{64}$", ref):
                if self.fail or self.raise_:
                    return self._fail()
                subject = "sha256:" + ref[7:]
                if subject not in self.referrers:
                    return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
                return 200, {"Content-Type": oci.OCI_INDEX}, _index(*self.referrers[subject])
            d = self.tags.get(ref, ref)
            if d not in self.manifests:
                return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
            media_type, body = self.manifests[d]
            return 200, {"Content-Type": media_type, "Docker-Content-Digest": d}, body
        m = re.match(r"^/v2/(.+)/referrers/([^/]+)$", path)
        if m:
            if "oci" not in self.apis:
                return 404, {}, b"404 page not found"
            if self.fail or self.raise_:
                return self._fail()
            items = self.referrers.get(m[2], [])
            headers = {"Content-Type": oci.OCI_INDEX}
            page = int(re.search(r"page=(\d+)", query)[1]) if "page=" in query else 0
            if self.page_size:
                if (page + 1) * self.page_size < len(items):
                    headers["Link"] = f'<{path}?page={page + 1}>; rel="next"'
                items = items[page * self.page_size:(page + 1) * self.page_size]
            return 200, headers, _index(*items)
        if re.match(r"^/v2/(.+)/_oras/artifacts/referrers$", path):
            if "oras" not in self.apis:
                return 404, {}, b"404 page not found"
            if self.fail or self.raise_:
                return self._fail()
            subject = requests.utils.unquote(re.search(r"digest=([^&]+)", query)[1])
            return 200, {"Content-Type": "application/json"}, json.dumps(
                {"referrers": self.referrers.get(subject, [])}).encode()
        return 404, {}, b""

    def _fail(self) -> Answer:
        if self.raise_:
            raise self.raise_
        assert self.fail
        return self.fail


def _state(tmp_path: Path) -> MirrorState:
    return MirrorState(home=tmp_path, upstreams={NS: UPSTREAM})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def referrer_calls(adapter: AnswerAdapter) -> list[str]:
    return [c for c in calls(adapter) if "/referrers" in c or "/manifests/sha256-" in c]


# --- ReferrersClient: APIs, caching, failures -------------------------------------------


@pytest.mark.parametrize("apis, first_calls, learned", [
    (("oci",), 1, "oci"),
    (("oras",), 2, "oras"),
    ((), 3, "tagschema"),
])
def test_client_learns_the_api_then_costs_one_call_cold_and_none_warm(
    tmp_path: Path, apis: tuple[str, ...], first_calls: int, learned: str,
) -> None:
    state = _state(tmp_path)
    reg = Registry(apis)
    adapter = install(state, reg)
    for n in (1, 2):
        reg.refer(dg(n), streaming(10 + n))
    client = ReferrersClient(state)

    found, api, cached = client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert [d.digest for d in found] == [dg(11)] and api == learned and not cached
    assert len(referrer_calls(adapter)) == first_calls == client.calls
    assert client.apis == {NS: learned}

    adapter.seen.clear()
    found, api, cached = client.referrers(UPSTREAM, "app", dg(2), (STREAMING,), None)  # cold, API known
    assert [d.digest for d in found] == [dg(12)] and api == learned and not cached
    assert len(referrer_calls(adapter)) == 1

    adapter.seen.clear()
    found, _, cached = client.referrers(UPSTREAM, "app", dg(2), (STREAMING,), None)  # warm
    assert cached and [d.digest for d in found] == [dg(12)]
    assert adapter.seen == []


def test_client_sends_the_filter_only_for_one_type_and_filters_itself(tmp_path: Path) -> None:
    state = _state(tmp_path)
    reg = Registry(("oci",))
    adapter = install(state, reg)
    reg.refer(dg(1), desc(20, "application/spdx+json"))  # the fake ignores the filter (no header)
    reg.refer(dg(1), streaming(21))
    reg.refer(dg(1), desc(22, OVERLAYBD_NATIVE))
    client = ReferrersClient(state)
    found, _, _ = client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert [d.digest for d in found] == [dg(21)]
    assert "artifactType=application%2Fvnd.azure.artifact.streaming.v1" in calls(adapter)[-1]
    found, _, _ = client.referrers(UPSTREAM, "app", dg(1), (OVERLAYBD_NATIVE, STREAMING), None)
    assert [d.digest for d in found] == [dg(22), dg(21)]
    assert "artifactType" not in calls(adapter)[-1]


def test_client_follows_link_pages(tmp_path: Path) -> None:
    state = _state(tmp_path)
    reg = Registry(("oci",))
    reg.page_size = 1
    adapter = install(state, reg)
    for n in range(3):
        reg.refer(dg(1), streaming(30 + n))
    found, _, _ = ReferrersClient(state).referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert [d.digest for d in found] == [dg(30), dg(31), dg(32)]
    assert len(referrer_calls(adapter)) == 3


def test_negative_results_expire_quickly_positive_ones_do_not(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discover, "NEGATIVE_TTL", 2.0)
    state = _state(tmp_path)
    reg = Registry(("oci",))
    adapter = install(state, reg)
    clock = Clock()
    client = ReferrersClient(state, clock=clock)

    found, _, cached = client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert found == [] and not cached
    clock.now += 1.0
    assert client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)[2] is True  # still cached
    reg.refer(dg(1), streaming(40))  # the conversion finished meanwhile
    clock.now += 1.5
    found, _, cached = client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert [d.digest for d in found] == [dg(40)] and not cached
    # found referrers stay for hours
    before = len(adapter.seen)
    clock.now += 3600.0
    assert client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)[2] is True
    assert len(adapter.seen) == before


def test_default_ttls() -> None:
    assert discover.NEGATIVE_TTL <= 60 and discover.POSITIVE_TTL >= 3600


@pytest.mark.parametrize("fail, reason", [
    ((500, {}, b'{"errors":[]}'), "upstream"),
    ((503, {}, b""), "upstream"),
    ((429, {}, b""), "upstream"),
    ((401, {}, b""), "auth"),
    ((403, {}, b""), "auth"),
    ((200, {"Content-Type": oci.OCI_INDEX}, b'{"manifests": [ garbage'), "bad-json"),
    ((200, {"Content-Type": oci.OCI_INDEX}, b"x" * (discover.MAX_INDEX_BYTES + 1)), "bad-json"),
])
def test_client_failures_become_reasons_and_are_not_cached(tmp_path: Path, fail: Answer, reason: str) -> None:
    state = _state(tmp_path)
    reg = Registry(("oci",))
    reg.fail = fail
    adapter = install(state, reg)
    client = ReferrersClient(state)
    for _ in range(2):
        with pytest.raises(DiscoverError) as e:
            client.referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
        assert e.value.reason == reason
    assert len(referrer_calls(adapter)) == 2  # a failure is retried next pull


@pytest.mark.parametrize("exc, reason", [
    (requests.ReadTimeout("slow"), "timeout"),
    (requests.ConnectionError("refused"), "upstream"),
])
def test_client_transport_failures(tmp_path: Path, exc: Exception, reason: str) -> None:
    state = _state(tmp_path)
    reg = Registry(("oci",))
    reg.raise_ = exc
    install(state, reg)
    with pytest.raises(DiscoverError) as e:
        ReferrersClient(state).referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert e.value.reason == reason


def test_client_uses_the_discover_timeout(tmp_path: Path) -> None:
    state = _state(tmp_path)
    state.settings.discover_timeout = 0.25
    seen: list[Any] = []

    class Spy(AnswerAdapter):
        def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
                 **kw: Any) -> requests.Response:
            seen.append(timeout)
            return super().send(request, stream, timeout, **kw)

    s = requests.Session()
    s.mount("http://", Spy(Registry(("oci",))))
    state.use_session(s)
    ReferrersClient(state).referrers(UPSTREAM, "app", dg(1), (STREAMING,), None)
    assert seen and all(t[1] == 0.25 for t in seen)


# --- the hooks: resolve → discover → teleport over a fake upstream ------------------------


RUNMD = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy        localhost:8578
: .manifests    head, get
:   .resolve    application/vnd.oci.image.index.v1+json
:   .discover   {types}
:   .teleport   overlaybd, always
```
"""
NO_TELEPORT = RUNMD.replace(":   .teleport   overlaybd, always\n", "")
ALL_TYPES = f"{STREAMING}, {STREAMING_LINK}, {OVERLAYBD_NATIVE}, {DADI}"


def manifest(files: str, arch: str = "amd64", **extra: Any) -> bytes:
    config = json.dumps({"architecture": arch, "os": "linux", "files": files}).encode()
    obj = {"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST,
           "config": {"mediaType": oci.OCI_CONFIG, "digest": sha(config), "size": len(config)},
           **{"layers": [], **extra}}
    return json.dumps(obj, sort_keys=True).encode()


def overlaybd_layer(seed: str) -> dict[str, Any]:
    """A layer descriptor as overlaybd's converter writes it: a plain tar holding the blob,
    annotated with its own digest and size (and the file system inside)."""
    data = f"overlaybd.commit {seed}".encode()
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(data), "size": len(data),
            "annotations": {"containerd.io/snapshot/overlaybd/blob-digest": sha(data),
                            "containerd.io/snapshot/overlaybd/blob-size": str(len(data)),
                            "containerd.io/snapshot/overlaybd/blob-fs-type": "ext4"}}


def streamable_manifest(files: str, arch: str = "amd64", **extra: Any) -> bytes:
    """An image manifest whose layers are overlaybd blobs."""
    return manifest(files, arch, **{"layers": [overlaybd_layer(files)], **extra})


def mirror_of(text: str = RUNMD, types: str = ALL_TYPES, platform: str = "linux/amd64") -> AcrMirror:
    m = AcrMirror(catalog.parse_text(text.replace("{types}", types), "mirror.runmd"))
    m.platform = platform  # type: ignore[attr-defined]
    return m


def make_flow(path: str, method: str = "GET") -> http.HTTPFlow:
    req = tutils.treq(method=method.encode(), path=path.encode(), authority=b"", host="127.0.0.1", port=9,
                      headers=http.Headers(((b"Host", b"localhost:8578"),
                                            (b"Accept", oci.DEFAULT_ACCEPT.encode()))),
                      content=b"")
    return tflow.tflow(req=req)


def drive(mirror: AcrMirror, *flows: http.HTTPFlow) -> None:
    with taddons.context(mirror) as tctx:
        if "acr_platform" in tctx.options:  # declared by the .teleport step, when there is one
            tctx.configure(mirror, acr_platform=mirror.platform)  # type: ignore[attr-defined]
        for flow in flows:
            run_hooks_now(mirror.addons, flow, ("requestheaders", "request", "response"))


def pull(mirror: AcrMirror, ref: str, method: str = "HEAD", name: str = "app") -> http.HTTPFlow:
    flow = make_flow(f"/v2/{name}/manifests/{ref}?ns=127.0.0.1%3A5000", method)
    drive(mirror, flow)
    return flow


@pytest.fixture
def world(tmp_path: Path) -> tuple[Registry, AcrMirror, AnswerAdapter]:
    reg = Registry(("oci",))
    mirror = mirror_of()
    mirror.state.home = tmp_path  # type: ignore[union-attr]
    adapter = install(mirror.state, reg)  # type: ignore[arg-type]
    return reg, mirror, adapter


def test_tag_is_teleported_and_head_get_agree(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, adapter = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable", artifactType=STREAMING)
    target = reg.put(body, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(body),
                                   {"streaming.format": "overlaybd"}, STREAMING))

    head, get = pull(mirror, "v1", "HEAD"), pull(mirror, "v1", "GET")
    for f in (head, get):
        assert f.response is not None and f.response.status_code == 200
        assert f.response.headers["Docker-Content-Digest"] == target
        assert f.response.headers["Content-Type"] == oci.OCI_MANIFEST
        assert f.response.headers["Content-Length"] == str(len(body))
        t = f.metadata["acr"]["teleport"]
        assert (t["from"], t["to"], t["format"], t["artifact_type"]) == (original, target, "overlaybd", STREAMING)
        assert f.marked
        assert f.comment.split("\n")[0] == f"🚀 → {target[7:15]} overlaybd"
        json.dumps(f.metadata)  # plain data: saved to flow files
    assert head.response.content == b""
    assert get.response.content == body and sha(get.response.content) == target
    # the HEAD's lookup served the GET: one referrers call for both
    assert len(referrer_calls(adapter)) == 1
    assert mirror.state.counters["teleport:teleported"] == 2  # type: ignore[union-attr]


def test_link_referrer_teleports_to_the_linked_manifest(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable")
    target = reg.put(body, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, dg(99), 10, {
        "streaming.mediaType": oci.OCI_MANIFEST, "streaming.digest": target,
        "streaming.size": str(len(body)), "streaming.format": "overlaybd"}, STREAMING_LINK))
    f = pull(mirror, "v1", "GET")
    assert f.response.headers["Docker-Content-Digest"] == target
    assert f.metadata["acr"]["teleport"]["artifact_type"] == STREAMING_LINK


def test_digest_pinned_is_served_as_asked(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, adapter = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    target = reg.put(streamable_manifest("streamable"), oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(reg.manifests[target][1]), None, STREAMING))
    f = pull(mirror, original, "GET")
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["teleport"]["skipped"] == "digest-pinned"
    assert f.metadata["acr"]["discover"] == {"skipped": "digest-pinned"}
    assert not f.marked
    assert referrer_calls(adapter) == []


def test_no_referrer_serves_the_original_and_says_why(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    f = pull(mirror, "v1", "GET")
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["teleport"]["skipped"] == "no-referrer"
    assert f.comment.split("\n")[0] == "no teleport: no-referrer"
    assert not f.marked


@pytest.mark.parametrize("annotations, reason", [
    ({"streaming.format": "estargz"}, "format"),
    ({"streaming.format": "overlaybd", "streaming.platform.os": "linux", "streaming.platform.arch": "arm64"},
     "platform"),
])
def test_format_and_platform_reasons(world: tuple[Registry, AcrMirror, AnswerAdapter],
                                     annotations: dict[str, str], reason: str) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    target = reg.put(streamable_manifest("streamable"), oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(reg.manifests[target][1]), annotations, STREAMING))
    f = pull(mirror, "v1", "HEAD")
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["teleport"]["skipped"] == reason


def test_a_streamable_target_that_is_not_an_image_manifest_is_format(
        world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    idx = _index({"mediaType": oci.OCI_MANIFEST, "digest": original, "size": 1,
                  "platform": {"os": "linux", "architecture": "amd64"}})
    target = reg.put(idx, oci.OCI_INDEX)
    reg.refer(original, Descriptor(oci.OCI_INDEX, target, len(idx), None, STREAMING))
    f = pull(mirror, "v1", "HEAD")
    assert f.metadata["acr"]["teleport"]["skipped"] == "format"
    assert f.response.headers["Docker-Content-Digest"] == original


@pytest.mark.parametrize("lie, reason", [("size", "size"), ("missing", "fetch")])
def test_a_referrer_that_lies_about_its_target_is_refused(
        world: tuple[Registry, AcrMirror, AnswerAdapter], lie: str, reason: str) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable")
    target = reg.put(body, oci.OCI_MANIFEST) if lie == "size" else dg(12345)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(body) + 1, None, STREAMING))
    f = pull(mirror, "v1", "GET")
    assert f.response.status_code == 200
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["teleport"]["skipped"] == reason


@pytest.mark.parametrize("fail, reason", [
    ((500, {}, b""), "upstream"),
    ((200, {"Content-Type": oci.OCI_INDEX}, b"{"), "bad-json"),
    ((403, {}, b""), "auth"),
])
def test_discover_failures_never_break_the_pull(world: tuple[Registry, AcrMirror, AnswerAdapter],
                                                fail: Answer, reason: str) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    reg.fail = fail
    f = pull(mirror, "v1", "GET")
    assert f.response.status_code == 200
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["discover"]["error"] == reason
    assert f.metadata["acr"]["teleport"]["skipped"] == reason


def test_discover_timeout_never_breaks_the_pull(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    reg.raise_ = requests.ReadTimeout("slow")
    f = pull(mirror, "v1", "HEAD")
    assert f.response.headers["Docker-Content-Digest"] == original
    assert f.metadata["acr"]["teleport"]["skipped"] == "timeout"


def _multiarch(reg: Registry) -> tuple[str, dict[str, str], dict[str, bytes]]:
    children: dict[str, str] = {}
    entries = []
    for arch in ("arm64", "amd64"):
        body = manifest(f"original {arch}", arch)
        children[arch] = reg.put(body, oci.OCI_MANIFEST)
        entries.append({"mediaType": oci.OCI_MANIFEST, "digest": children[arch], "size": len(body),
                        "platform": {"os": "linux", "architecture": arch}})
    index = reg.put(_index(*entries), oci.OCI_INDEX, tag="v1")
    streams = {arch: streamable_manifest(f"streamable {arch}", arch) for arch in ("arm64", "amd64")}
    return index, children, streams


@pytest.mark.parametrize("platform, arch", [("linux/amd64", "amd64"), ("linux/arm64", "arm64")])
def test_index_level_referrers_pick_the_platform(tmp_path: Path, platform: str, arch: str) -> None:
    reg = Registry(("oci",))
    mirror = mirror_of(platform=platform)
    install(mirror.state, reg)  # type: ignore[arg-type]
    index, _, streams = _multiarch(reg)
    targets = {}
    for a, body in streams.items():  # ACR: one streaming.v1 referrer per platform on the index
        targets[a] = reg.put(body, oci.OCI_MANIFEST)
        reg.refer(index, Descriptor(oci.OCI_MANIFEST, targets[a], len(body), {
            "streaming.format": "overlaybd", "streaming.platform.os": "linux", "streaming.platform.arch": a,
        }, STREAMING))
    f = pull(mirror, "v1", "HEAD")
    assert f.response.headers["Docker-Content-Digest"] == targets[arch]
    assert f.response.headers["Content-Type"] == oci.OCI_MANIFEST


def test_child_manifest_referrer_of_the_platform(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, adapter = world
    index, children, streams = _multiarch(reg)
    arm = reg.put(streams["arm64"], oci.OCI_MANIFEST)
    amd = reg.put(streams["amd64"], oci.OCI_MANIFEST)
    reg.refer(children["arm64"], Descriptor(oci.OCI_MANIFEST, arm, len(streams["arm64"]), None, STREAMING))
    reg.refer(children["amd64"], Descriptor(oci.OCI_MANIFEST, amd, len(streams["amd64"]), None, STREAMING))
    f = pull(mirror, "v1", "GET")
    assert f.response.headers["Docker-Content-Digest"] == amd
    assert f.metadata["acr"]["teleport"]["from"] == index
    asked = referrer_calls(adapter)
    assert any(index in c for c in asked) and any(children["amd64"] in c for c in asked)
    assert not any(children["arm64"] in c for c in asked)


def test_index_without_the_host_platform_is_the_platform_reason(tmp_path: Path) -> None:
    reg = Registry(("oci",))
    mirror = mirror_of(platform="linux/s390x")
    install(mirror.state, reg)  # type: ignore[arg-type]
    index, _, _ = _multiarch(reg)
    f = pull(mirror, "v1", "HEAD")
    assert f.response.headers["Docker-Content-Digest"] == index
    assert f.metadata["acr"]["teleport"]["skipped"] == "platform"


def test_without_teleport_step_tags_are_not_teleported(tmp_path: Path) -> None:
    reg = Registry(("oci",))
    mirror = mirror_of(NO_TELEPORT)
    install(mirror.state, reg)  # type: ignore[arg-type]
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    target = reg.put(streamable_manifest("s"), oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(reg.manifests[target][1]), None, STREAMING))
    f = pull(mirror, "v1", "GET")
    assert f.response.headers["Docker-Content-Digest"] == original
    assert "teleport" not in f.metadata["acr"]
    assert f.metadata["acr"]["discover"]["referrers"] == [{"digest": target, "artifact_type": STREAMING}]


def test_acr_teleports_lists_the_decisions(world: tuple[Registry, AcrMirror, AnswerAdapter]) -> None:
    reg, mirror, _ = world
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    reg.put(manifest("plain"), oci.OCI_MANIFEST, tag="plain")
    body = streamable_manifest("streamable")
    target = reg.put(body, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(body), None, STREAMING))
    teleported, plain = pull(mirror, "v1"), pull(mirror, "plain")
    ping = make_flow("/v2/")
    drive(mirror, ping)
    lines = mirror.teleports([teleported, plain, ping])
    assert lines == [
        f"app:v1 teleported {original} -> {target} (overlaybd)",
        "app:plain not teleported: no-referrer: no streamable referrer",
    ]
    with taddons.context(mirror) as tctx:
        out = tctx.master.commands.call("acr.teleports", [teleported])
    assert out == [lines[0]]


# --- dadi.image.v1: the seed's artifact manifests ---------------------------------------------

ORAS_ARTIFACT = "application/vnd.cncf.oras.artifact.manifest.v1+json"


def test_linked_manifest_reads_the_artifact_blobs() -> None:
    from addons.teleport.teleport import linked_manifest

    blob = {"mediaType": oci.DOCKER_MANIFEST, "digest": dg(5), "size": 99}
    body = json.dumps({"mediaType": ORAS_ARTIFACT, "artifactType": DADI,
                       "blobs": [{"mediaType": "application/octet-stream", "digest": dg(4), "size": 1}, blob],
                       "subject": {"mediaType": oci.OCI_MANIFEST, "digest": dg(1), "size": 3}}).encode()
    d = linked_manifest(body)
    assert d is not None and (d.media_type, d.digest, d.size) == (oci.DOCKER_MANIFEST, dg(5), 99)
    # an image manifest with tar layers links to nothing: it is the streamable manifest itself
    assert linked_manifest(manifest("plain")) is None
    with pytest.raises(NoTeleport) as e:
        linked_manifest(b"{")
    assert e.value.reason == "bad-json"
    with pytest.raises(NoTeleport):
        linked_manifest(json.dumps({"blobs": [{"digest": "nope"}]}).encode())


@pytest.mark.parametrize("shape", ["oras-artifact", "image-manifest", "empty-artifact"])
def test_dadi_referrer_of_the_seed(tmp_path: Path, shape: str) -> None:
    reg = Registry(("oras",))
    mirror = mirror_of(types=DADI)
    install(mirror.state, reg)  # type: ignore[arg-type]
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable")
    target = reg.put(body, oci.DOCKER_MANIFEST)
    if shape == "image-manifest":
        reg.refer(original, Descriptor(oci.DOCKER_MANIFEST, target, len(body), None, DADI))
    else:
        blobs = [{"mediaType": oci.DOCKER_MANIFEST, "digest": target, "size": len(body)}] if shape == "oras-artifact" else []
        art = json.dumps({"mediaType": ORAS_ARTIFACT, "artifactType": DADI, "blobs": blobs,
                          "subject": {"mediaType": oci.OCI_MANIFEST, "digest": original, "size": 1}}).encode()
        reg.refer(original, Descriptor(ORAS_ARTIFACT, reg.put(art, ORAS_ARTIFACT), len(art), None, DADI))
    f = pull(mirror, "v1", "GET")
    if shape == "empty-artifact":
        assert f.metadata["acr"]["teleport"]["skipped"] == "format"
        assert f.response.headers["Docker-Content-Digest"] == original
    else:
        assert f.response.headers["Docker-Content-Digest"] == target
        assert f.response.headers["Content-Type"] == oci.DOCKER_MANIFEST
        assert f.response.content == body
        assert f.metadata["acr"]["teleport"]["artifact_type"] == DADI
        assert f.metadata["acr"]["discover"]["api"] == "oras"


# --- one typed context, at most one thread hop ------------------------------------------


def test_a_cold_tag_pull_costs_one_thread_hop_and_a_warm_tag_or_cached_digest_pull_none(
    world: tuple[Registry, AcrMirror, AnswerAdapter],
) -> None:
    reg, mirror, _ = world
    assert mirror.state is not None
    original = reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    body = streamable_manifest("streamable")
    target = reg.put(body, oci.OCI_MANIFEST)
    reg.refer(original, Descriptor(oci.OCI_MANIFEST, target, len(body), None, STREAMING))
    hops = mirror.state.counters
    cold = pull(mirror, "v1")  # manifest, referrers, streamable manifest: all in one thread
    assert cold.metadata["acr"]["teleport"]["to"] == target and hops["worker_hops"] == 1
    requests_before = hops["upstream_requests"]
    warm = pull(mirror, "v1")  # a tag moves: the manifest is asked for again, on the event loop
    assert warm.metadata["acr"]["teleport"]["to"] == target and hops["worker_hops"] == 1
    assert warm.metadata["acr"]["discover"]["cached"] is True
    assert hops["upstream_requests"] == requests_before + 1
    pinned = pull(mirror, original, "GET")  # by digest, every decision cached: no thread
    assert pinned.response.headers["Docker-Content-Digest"] == original
    assert hops["worker_hops"] == 1 and hops["upstream_requests"] == requests_before + 1


def test_the_public_copy_holds_the_decisions_and_no_secret(tmp_path: Path) -> None:
    reg = Registry(("oci",))
    mirror = mirror_of(RUNMD.replace(":   .resolve", ":   .login      access_token\n:   .authn      oauth2\n:   .resolve"))
    assert mirror.state is not None
    mirror.state.home = tmp_path
    (tmp_path / "access_token").write_text("puller:s3cret-password\n")
    (tmp_path / "access_token").chmod(0o600)

    def basic_registry(req: requests.PreparedRequest) -> Answer:
        if urlsplit(req.url or "").path == "/v2/":
            return 401, {"WWW-Authenticate": 'Basic realm="registry"'}, b""
        return reg(req)

    install(mirror.state, basic_registry)
    reg.put(manifest("original"), oci.OCI_MANIFEST, tag="v1")
    flow = pull(mirror, "v1", "GET")
    ctx = mirror.state.contexts[flow]
    assert ctx.manifest is not None and ctx.authorizer is not None
    meta = flow.metadata["acr"]
    assert meta == ctx.public()
    assert set(meta) <= {"route", "route_id", "name", "reference", "ns", "upstream", "auth", "resolved",
                         "discover", "teleport", "forward", "redirected", "stalled", "upstream_status",
                         "refused", "steps", "answered", "streamed", "teleport_target_of"}
    assert [s.split(":")[0] for s in meta["steps"]] == ["proxy", "login", "authn", "resolve", "discover", "teleport"]
    assert meta["auth"] == "basic" and ctx.credentials is not None
    assert "s3cret-password" not in repr(flow.metadata) and "cHVsbGVy" not in repr(flow.metadata)
