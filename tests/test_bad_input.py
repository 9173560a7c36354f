"""The bad-input matrix: one test per kind of bad input, against a running mirror.

Every test sends its bad input to one real `acr mirror start` (shared by the module: the point
is that it keeps serving) and checks three things: the answer is a clear error with the right
status (the distribution spec's error JSON wherever the mirror writes the answer itself), nothing
that should have been refused reached an upstream, and the next good request is served. The
upstreams are the real docker-registry (for the good pulls) and two small loopback servers that
misbehave by repository name (garbled manifests and referrers, wrong lengths, huge manifests).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.harness.images import make_image, push_image, sha256_digest
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import direct_session
from tests.harness.registry import Registry
from tests.test_hardening import (
    ACCEPT,
    Fake,
    Seen,
    _Handler,
    body_of,
    ns,
    oci_error,
    raw_request,
    status_of,
)

MT = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "sha256:" + "c" * 64, "size": 2}
GOOD = json.dumps({"schemaVersion": 2, "mediaType": MT, "config": CONFIG, "layers": []}, separators=(",", ":")).encode()
EMPTY_INDEX = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}).encode()
FOUR_MIB = 4 * 1024 * 1024
DEEP = b"[" * 100_000  # valid-looking, nested deeper than Python's json can read
BLOB = os.urandom(300_000)
BLOB_DIGEST = sha256_digest(BLOB)


def _manifest_of(kind: str) -> tuple[bytes, dict[str, str]] | None:
    """The manifest the misbehaving upstream answers for repository `garbage/<kind>` etc."""
    return {
        "plain": (b"{not json", {"Content-Type": MT}),
        "index": (b"{not json", {"Content-Type": INDEX}),
        "index-shape": (b'{"schemaVersion":2,"manifests":5}', {"Content-Type": INDEX}),
        "deep": (DEEP, {"Content-Type": "application/json"}),
        "deep-index": (DEEP, {"Content-Type": INDEX}),
        "untyped": (b"{not json", {}),
    }.get(kind)


def misbehaving(h: _Handler, seen: Seen) -> None:
    """Speaks the OCI referrers API; misbehaves by repository name (see the tests)."""
    path = seen.path.split("?")[0]
    if path == "/v2/":
        return h.json(200, {})
    parts = path.split("/")
    group = parts[2] if len(parts) > 2 else ""
    kind = parts[3] if len(parts) > 3 else ""
    if "/referrers/" in path:
        body = {"garbage": b"<html>oops", "deep": DEEP, "shape": b'{"manifests":"none"}'}.get(kind, EMPTY_INDEX) \
            if group == "refs" else EMPTY_INDEX
        return h.reply(200, body, {"Content-Type": INDEX})
    if "/manifests/" in path:
        if group == "garbage" and _manifest_of(kind):
            body, headers = _manifest_of(kind)  # type: ignore[misc]
            return h.reply(200, body, headers)
        if group == "refs":
            return h.reply(200, GOOD, {"Content-Type": MT})
        if group == "length":
            full = GOOD
            if kind == "short-claimed":  # fewer bytes announced than sent; the registry's digest header
                return h.reply(200, full, {"Content-Type": MT, "Docker-Content-Digest": sha256_digest(full)},
                               length=len(full) - 20)
            if kind == "long":  # more announced than sent, then the connection closes
                h.reply(200, full, {"Content-Type": MT}, length=len(full) + 100)
                h.close_connection = True
                return
        if group == "big":
            size = FOUR_MIB + (1 if kind == "over" else 0)
            body = b"{" + b" " * (size - 2) + b"}"
            return h.reply(200, body, {"Content-Type": MT})
    if "/blobs/" in path and group == "length":
        # 1000 bytes fewer announced than the blob has: the registry's bytes are not the blob.
        return h.reply(200, BLOB, {"Content-Type": "application/octet-stream",
                                   "Docker-Content-Digest": BLOB_DIGEST}, length=len(BLOB) - 1000)
    if "/manifests/" in path and group == "bydigest":
        return h.reply(200, GOOD[:-20], {"Content-Type": MT}, length=len(GOOD) - 20)
    h.json(404, {"errors": [{"code": "NAME_UNKNOWN", "message": "no such repository"}]})


def tag_schema_only(h: _Handler, seen: Seen) -> None:
    """An upstream without a referrers API whose `sha256-<hex>` tag holds garbage."""
    path = seen.path.split("?")[0]
    if path == "/v2/":
        return h.json(200, {})
    if "/referrers/" in path or "/_oras/" in path:
        return h.json(404, {"errors": [{"code": "NOT_FOUND", "message": "no"}]})
    if "/manifests/sha256-" in path:
        return h.reply(200, b"]]garbage[[", {"Content-Type": INDEX})
    if "/manifests/" in path:
        return h.reply(200, GOOD, {"Content-Type": MT})
    h.json(404, {"errors": []})


@dataclass
class World:
    m: Mirror
    registry: Registry
    fake: Fake
    tagschema: Fake
    good_repo: str
    good_digest: str

    def url(self, path: str, upstream: str = "fake") -> str:
        host = {"fake": self.fake.host, "tagschema": self.tagschema.host, "registry": self.registry.host}[upstream]
        sep = "&" if "?" in path else "?"
        return f"{self.m.url}{path}{sep}ns={ns(host)}"

    def still_serving(self) -> None:
        """The good pull works: the ping, then a manifest and a blob from the real registry."""
        with direct_session() as s:
            assert s.get(self.m.url + "/v2/", timeout=10).status_code == 200
            r = s.head(self.url(f"/v2/{self.good_repo}/manifests/v1", "registry"), headers=ACCEPT, timeout=10)
            assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == self.good_digest
            r = s.get(self.url(f"/v2/{self.good_repo}/manifests/{self.good_digest}", "registry"), headers=ACCEPT, timeout=10)
            assert r.status_code == 200 and sha256_digest(r.content) == self.good_digest

    def log_lines(self) -> list[str]:
        return self.m.log_text().split("listening at")[-1].splitlines()


@pytest.fixture(scope="module")
def world(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    image = make_image({"good": b"the mirror still serves\n"})
    repo = f"bad-input/good-{os.getpid()}"
    push_image(registry, repo, "v1", image)
    fake, tagschema = Fake(misbehaving), Fake(tag_schema_only)
    home = tmp_path_factory.mktemp("bad-input-mirror")
    # Teleport must look into every garbled answer, whatever this machine's snapshotter: `always`.
    m = Mirror(home, [registry.url, fake.url, tagschema.url], env={"PYTHONUNBUFFERED": "1"},
               sets=["acr_teleport=always"])
    try:
        yield World(m, registry, fake, tagschema, repo, image.digest)
    finally:
        m.stop()
        fake.stop()
        tagschema.stop()
        if os.environ.get("ACR_KEEP_LOGS"):
            print(m.log_text())


def send_raw(w: World, method: str, path: str | bytes, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    """One request with the path exactly as given: `requests` (urllib3) would normalise dot
    segments and percent-encoding before the mirror ever saw them."""
    target = path if isinstance(path, bytes) else path.encode()
    head = f" HTTP/1.1\r\nHost: {w.m.host}\r\nAccept: {ACCEPT['Accept']}\r\n{extra}Connection: close\r\n\r\n"
    raw, _ = raw_request(w.m.port, method.encode() + b" " + target + head.encode(), timeout=10)
    lines = raw.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")[1:]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return status_of(raw), headers, body_of(raw)


def _refused_without_upstream(w: World, method: str, path: str | bytes, status: int, code: str | None) -> None:
    before = len(w.fake.requests)
    got, headers, body = send_raw(w, method, path)
    assert got == status, (method, path, got, body[:300])
    assert headers.get("content-type") == "application/json", (path, headers)
    if method == "HEAD":
        assert body == b"" and int(headers["content-length"]) > 0
    else:
        (error,) = json.loads(body)["errors"]
        assert error["message"] and (code is None or error["code"] == code), (path, error)
    assert len(w.fake.requests) == before, f"{path!r} reached the upstream"


# --- the request path -------------------------------------------------------------------------


def test_malformed_repository_names(world: World) -> None:
    q = f"?ns={ns(world.fake.host)}"
    for name in ("Upper/case", "a//b", "-lead", "a/-b", "a..b", "trail_", "a/" + "b" * 260, "a:b", "a@b", "a+b"):
        for method in ("GET", "HEAD"):
            _refused_without_upstream(world, method, f"/v2/{name}/manifests/v1{q}", 400, "NAME_INVALID")
        _refused_without_upstream(world, "GET", f"/v2/{name}/blobs/{BLOB_DIGEST}{q}", 400, "NAME_INVALID")
    world.still_serving()


def test_malformed_tags(world: World) -> None:
    q = f"?ns={ns(world.fake.host)}"
    for tag in ("-v1", ".v1", "v" * 129, "v1!", "a+b", "v1;x", "v1'", "%76%31"):
        for method in ("GET", "HEAD"):
            code = "NAME_INVALID" if "%" in tag else "TAG_INVALID"  # percent-encoding is refused as such
            _refused_without_upstream(world, method, f"/v2/x/manifests/{tag}{q}", 400, code)
    # Bytes that are not ASCII, as a hand-written client might send them unencoded.
    _refused_without_upstream(world, "GET", b"/v2/x/manifests/v\xc3\xa9" + q.encode(), 400, "TAG_INVALID")
    world.still_serving()


def test_malformed_digests(world: World) -> None:
    q = f"?ns={ns(world.fake.host)}"
    bad = ("sha256:abc", "sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "g" * 64,
           "sha256", "sha256:", ":" + "a" * 64, "SHA256:" + "a" * 64, "sha512:" + "a" * 64,
           "md5:d41d8cd98f00b204e9800998ecf8427e", "sha384:" + "a" * 96, "blake3:" + "a" * 64)
    for digest in bad:
        for kind in ("manifests", "blobs"):
            if kind == "manifests" and ":" not in digest:
                continue  # that is a tag, not a digest
            _refused_without_upstream(world, "GET", f"/v2/x/{kind}/{digest}{q}", 400, "DIGEST_INVALID")
        _refused_without_upstream(world, "HEAD", f"/v2/x/blobs/{digest}{q}", 400, "DIGEST_INVALID")
    world.still_serving()


def test_dot_segments_and_encoded_slashes(world: World) -> None:
    """mitmproxy passes the path as sent (no normalisation): the front door must refuse it."""
    q = f"?ns={ns(world.fake.host)}"
    cases = {
        f"/v2/a/../b/manifests/v1{q}": "NAME_INVALID",
        f"/v2/../v2/a/manifests/v1{q}": "NAME_INVALID",
        f"/v2/./a/manifests/v1{q}": "NAME_INVALID",
        f"/v2/a/manifests/..{q}": "TAG_INVALID",
        f"/v2/a/blobs/..{q}": "DIGEST_INVALID",
        f"/v2/a%2Fb/manifests/v1{q}": "NAME_INVALID",
        f"/v2/a%2fb/manifests/v1{q}": "NAME_INVALID",
        f"/v2/%2e%2e/a/manifests/v1{q}": "NAME_INVALID",
        f"/v2/a/manifests/..%2F..%2Fetc%2Fpasswd{q}": "NAME_INVALID",
        f"/v2/a/blobs/..%2f{BLOB_DIGEST}{q}": "NAME_INVALID",
        f"/v2/a%5Cb/manifests/v1{q}": "NAME_INVALID",
        f"/v2/a/manifests/v1%00{q}": "NAME_INVALID",
    }
    for path, code in cases.items():
        for method in ("GET", "HEAD"):
            _refused_without_upstream(world, method, path, 400, code)
    _refused_without_upstream(world, "GET", f"/v2/a\\b/manifests/v1{q}", 400, "NAME_INVALID")
    _refused_without_upstream(world, "GET", f"/v2/a/../../../../etc/passwd{q}", 404, "NOT_FOUND")
    world.still_serving()


def test_very_large_headers_are_refused_and_the_mirror_goes_on(world: World) -> None:
    """mitmproxy reads request heads of any size; the mirror refuses more than 64 KiB with 431
    (a client's Accept is passed upstream) and the next request on a new connection is served."""
    path = f"/v2/{world.good_repo}/manifests/v1?ns={ns(world.registry.host)}"
    for name, size in (("X-Junk", 100 * 1024), ("Accept", 100 * 1024), ("X-Junk", 1024 * 1024)):
        value = ("application/json, " * (size // 18 + 1))[:size] if name == "Accept" else "a" * size
        started = time.monotonic()
        raw, _ = raw_request(world.m.port, f"GET {path} HTTP/1.1\r\nHost: {world.m.host}\r\n{name}: {value}\r\n\r\n".encode(),
                             timeout=10)
        assert time.monotonic() - started < 5, "a large header held the mirror up"
        assert status_of(raw) == 431, raw[:300]
        assert json.loads(body_of(raw))["errors"][0]["code"] == "UNSUPPORTED"
        world.still_serving()
    # Many small headers add up the same way.
    many = "".join(f"X-H{i}: {'v' * 20}\r\n" for i in range(5000))
    raw, _ = raw_request(world.m.port, f"GET {path} HTTP/1.1\r\nHost: {world.m.host}\r\n{many}\r\n".encode())
    assert status_of(raw) == 431, raw[:300]
    # Up to the limit all is well: 16 KiB of junk does not change the answer.
    with direct_session() as s:
        r = s.head(world.m.url + path, headers={**ACCEPT, "X-Junk": "a" * 16 * 1024}, timeout=10)
        assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == world.good_digest
    world.still_serving()


def test_a_very_long_request_line_is_refused_without_holding_up_other_clients(world: World) -> None:
    path = "/v2/x/manifests/" + "a" * 60_000  # under the 64 KiB head limit: the front door's own 400
    results: dict[str, float] = {}

    def long_one() -> None:
        t = time.monotonic()
        raw, _ = raw_request(world.m.port, f"GET {path} HTTP/1.1\r\nHost: {world.m.host}\r\n\r\n".encode(), timeout=30)
        results["long"] = time.monotonic() - t
        results["status"] = status_of(raw)

    def other() -> None:
        time.sleep(0.3)
        t = time.monotonic()
        with direct_session() as s:
            s.get(world.m.url + "/v2/", timeout=30)
        results["other"] = time.monotonic() - t

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda f: f(), (long_one, other)))
    assert results["status"] in (400, 414, 431)
    assert results["other"] < 2, f"a ping waited {results['other']:.1f} s behind a long request line"
    assert results["long"] < 3, f"the long request line took {results['long']:.1f} s"


def test_absolute_form_and_connect_requests(world: World) -> None:
    """The mirror is never a forward proxy: absolute-form gets the OCI error, CONNECT gets
    mitmproxy's own 400 (reverse mode refuses it before any addon could answer) and a closed
    connection; nothing reaches either upstream."""
    before = len(world.fake.requests)
    for target in (f"{world.fake.url}/v2/x/manifests/v1", f"https://{world.fake.host}/v2/", "http://example.com/v2/"):
        raw, _ = raw_request(world.m.port, f"GET {target} HTTP/1.1\r\nHost: {world.fake.host}\r\n\r\n".encode())
        assert status_of(raw) == 400, raw[:300]
        error = json.loads(body_of(raw))["errors"][0]
        assert error["code"] == "UNSUPPORTED" and "not an HTTP proxy" in error["message"]
    for target in (world.fake.host, "example.com:443"):
        raw, closed = raw_request(world.m.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        assert status_of(raw) == 400 and closed, raw[:300]
    time.sleep(0.2)
    assert len(world.fake.requests) == before
    world.still_serving()


def test_unknown_ns(world: World) -> None:
    for value in ("evil.example.com", "EVIL.example.com:443", "", "127.0.0.1%3A1", ns(world.fake.host) + "%2F..",
                  ns(world.fake.host) + ".evil.com", "x" * 5000):
        for kind, ref in (("manifests", "v1"), ("blobs", BLOB_DIGEST)):
            _refused_without_upstream(world, "GET", f"/v2/x/{kind}/{ref}?ns={value}", 404, "NAME_UNKNOWN")
    # Several upstreams: no ns at all names none of them.
    _refused_without_upstream(world, "GET", "/v2/x/manifests/v1", 404, "NAME_UNKNOWN")
    # ns is matched case-insensitively, like host names: the right upstream, not a refusal.
    with direct_session() as s:
        r = s.head(f"{world.m.url}/v2/{world.good_repo}/manifests/v1?ns={ns(world.registry.host.upper())}", headers=ACCEPT, timeout=10)
    assert r.status_code == 200
    world.still_serving()


def test_paths_and_methods_outside_the_pull_api(world: World) -> None:
    q = f"?ns={ns(world.fake.host)}"
    for path in ("/", "/v1/_ping", "/v2x", "/v3/", "//v2/x/manifests/v1", "/v2/_catalog", "/v2/x/unknown/v1",
                 f"/v2/x/manifests/v1/extra{q}", "/favicon.ico", "/metricsx", "/.git/config",
                 f"/v2/x/blobs/uploads/{q}"):
        _refused_without_upstream(world, "GET", path, 404, "NOT_FOUND")
    _refused_without_upstream(world, "POST", f"/v2/x/blobs/uploads/{q}", 404, "NOT_FOUND")
    # Pushing and deleting are refused at the door: a mirror is read-only. docker-registry 2.8 in
    # read-only mode answers these 405 with `Allow: GET, HEAD` too (as text; the mirror's is JSON).
    for method, path, allow in (("PUT", f"/v2/x/manifests/v1{q}", "GET, HEAD"),
                                ("DELETE", f"/v2/x/manifests/v1{q}", "GET, HEAD"),
                                ("DELETE", f"/v2/x/blobs/{BLOB_DIGEST}{q}", "GET, HEAD"),
                                ("PATCH", f"/v2/x/blobs/{BLOB_DIGEST}{q}", "GET, HEAD"),
                                ("OPTIONS", f"/v2/x/manifests/v1{q}", "GET, HEAD"),
                                ("PUT", f"/v2/x/tags/list{q}", "GET")):
        before = len(world.fake.requests)
        with direct_session() as s:
            r = s.request(method, world.m.url + path, data=b"x" if method in ("PUT", "PATCH") else None, timeout=10)
        oci_error(r, 405, "UNSUPPORTED")
        assert r.headers["Allow"] == allow, (method, path)
        assert len(world.fake.requests) == before, f"{method} {path} reached the upstream"
    world.still_serving()


# --- what upstream sends back ------------------------------------------------------------------


def test_garbled_manifest_json_is_served_as_stored_and_never_breaks_teleport(world: World) -> None:
    """A registry stores bytes: content that is not JSON but has a manifest type is served as it
    came, with the digest of exactly those bytes (HEAD and GET agree); teleport looks into it,
    finds garbage and serves the original, saying why. No media type at all: 502."""
    for kind in ("plain", "index", "index-shape", "deep", "deep-index"):
        body, headers = _manifest_of(kind)  # type: ignore[misc]
        digest = sha256_digest(body)
        with direct_session() as s:
            head = s.head(world.url(f"/v2/garbage/{kind}/manifests/v1"), headers=ACCEPT, timeout=15)
            get = s.get(world.url(f"/v2/garbage/{kind}/manifests/v1"), headers=ACCEPT, timeout=15)
            pinned = s.get(world.url(f"/v2/garbage/{kind}/manifests/{digest}"), headers=ACCEPT, timeout=15)
        for r in (head, get, pinned):
            assert r.status_code == 200, (kind, r.request.method, r.status_code, r.text[:200])
            assert r.headers["Docker-Content-Digest"] == digest and r.headers["Content-Type"] == headers["Content-Type"]
            assert int(r.headers["Content-Length"]) == len(body)
        assert get.content == body and pinned.content == body
    lines = world.log_lines()
    for kind, reason in (("index", "bad-json"), ("index-shape", "bad-json"), ("deep-index", "bad-json"), ("plain", "no-referrer")):
        mine = [line for line in lines if f"manifests garbage/{kind}:v1 -> 200" in line]
        assert len(mine) == 2 and all(f"no teleport ({reason})" in line for line in mine), (kind, mine)
    assert not any("Traceback" in line or "teleport failed" in line for line in lines), "teleport crashed"
    with direct_session() as s:
        r = s.get(world.url("/v2/garbage/untyped/manifests/v1"), headers=ACCEPT, timeout=15)
    oci_error(r, 502, "MANIFEST_INVALID")
    world.still_serving()


def test_garbled_referrers_serve_the_original_manifest(world: World) -> None:
    digest = sha256_digest(GOOD)
    for kind in ("garbage", "deep", "shape"):
        with direct_session() as s:
            for method in ("HEAD", "GET"):
                r = s.request(method, world.url(f"/v2/refs/{kind}/manifests/v1"), headers=ACCEPT, timeout=15)
                assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == digest, (kind, r.status_code)
    # The tag-schema fallback (no referrers API) with a garbled `sha256-<hex>` tag: the same.
    with direct_session() as s:
        r = s.get(world.url("/v2/plain/manifests/v1", "tagschema"), headers=ACCEPT, timeout=15)
    assert r.status_code == 200 and r.content == GOOD
    lines = world.log_lines()
    for repo in ("refs/garbage", "refs/deep", "refs/shape", "plain"):
        mine = [line for line in lines if f"manifests {repo}:v1 -> 200" in line]
        assert mine and all("no teleport (bad-json)" in line for line in mine), (repo, mine)
    assert any("/sha256-" in s.path for s in world.tagschema.requests)
    assert not any("Traceback" in line for line in lines)
    world.still_serving()


def test_a_wrong_content_length_from_upstream_is_never_served_as_good_content(world: World) -> None:
    with direct_session() as s:
        # Fewer bytes announced than the registry's digest covers: the digest check refuses it.
        oci_error(s.get(world.url("/v2/length/short-claimed/manifests/v1"), headers=ACCEPT, timeout=15), 502, "DIGEST_INVALID")
        # More announced than sent: cut short.
        oci_error(s.get(world.url("/v2/length/long/manifests/v1"), headers=ACCEPT, timeout=15), 502, "UPSTREAM_UNAVAILABLE")
        # By digest, a short body never matches.
        oci_error(s.get(world.url(f"/v2/bydigest/x/manifests/{sha256_digest(GOOD)}"), headers=ACCEPT, timeout=15),
                  502, "DIGEST_INVALID")
    world.still_serving()


def test_a_blob_whose_bytes_do_not_match_its_digest_is_never_a_success(world: World) -> None:
    url = world.url(f"/v2/length/blob/blobs/{BLOB_DIGEST}")
    for _ in range(2):  # the first GET of an upstream, then one whose blob mode is known
        with direct_session() as s:
            try:
                r = s.get(url, timeout=15)
            except requests.RequestException:
                continue  # the transfer broke off: the client knows
            assert r.status_code >= 500 or hashlib.sha256(r.content).hexdigest() == BLOB_DIGEST.split(":")[1], \
                f"{r.status_code} with {len(r.content)} bytes that are not {BLOB_DIGEST}"
    world.still_serving()


def test_a_manifest_over_4_mib_is_a_502_manifest_invalid(world: World) -> None:
    with direct_session() as s:
        for method in ("HEAD", "GET"):
            oci_error(s.request(method, world.url("/v2/big/over/manifests/v1"), headers=ACCEPT, timeout=30), 502, "MANIFEST_INVALID")
        # Exactly 4 MiB is still a manifest.
        r = s.head(world.url("/v2/big/exact/manifests/v1"), headers=ACCEPT, timeout=30)
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == FOUR_MIB
    world.still_serving()


# --- what the operator writes -------------------------------------------------------------------


GOOD_RUNMD = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy        127.0.0.1:8578
: .manifests    head, get
:   .resolve
```
"""


@pytest.mark.parametrize("name, content, line, words", [
    ("unknown plugin", GOOD_RUNMD.replace(":   .resolve", ":   .resolv"), 6, ["unknown plugin '.resolv'"]),
    ("bad input", GOOD_RUNMD.replace("127.0.0.1:5000", "127.0.0.1:99999"), 3, ["port out of range"]),
    ("unclosed fence", GOOD_RUNMD.rstrip().rsplit("\n", 1)[0] + "\n", 1, ["unclosed block"]),
    ("not UTF-8", GOOD_RUNMD.replace("head, get", "head, g\udcffet"), 5, ["not UTF-8"]),
    ("NUL byte", GOOD_RUNMD.replace("127.0.0.1:5000", "127.0.0.1\x00:5000"), 3, ["'.mirror'"]),
    ("step before a root", "``` start mirror\n: .mirror a.io\n```\n", 2, []),
    ("second proxy", GOOD_RUNMD.replace("```\n", "+ .proxy 127.0.0.1:1\n```\n"), 7, ["proxy"]),
    ("byte order mark, then a mistake", "\ufeff" + GOOD_RUNMD.replace(":   .resolve", ":   .resolv"), 6, [".resolv"]),
])
def test_malformed_runmd_is_one_line_naming_the_line(tmp_path: Path, name: str, content: str, line: int,
                                                     words: list[str]) -> None:
    (tmp_path / "mirror.runmd").write_bytes(content.encode("utf-8", "surrogateescape"))
    for command in (["dump"], ["mirror", "start"]):
        result = subprocess.run([ACR, *command], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode != 0, (name, command)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr, (name, command, result.stderr)
        assert lines[0].startswith(f"acr: mirror.runmd:{line}: "), (name, lines[0])
        for word in words:
            assert word in lines[0], (name, lines[0])
        assert not list(tmp_path.glob(".work")), "a malformed runmd ran a step"


def test_malformed_credential_files_are_a_clear_502_and_other_routes_go_on(world: World) -> None:
    token = world.m.home / "access_token"
    path = world.url(f"/v2/{world.good_repo}/manifests/v1", "registry")
    bad = {  # every secret-looking piece says s3cr3t: none may reach an answer or the log
        "three lines": b"s3cr3t-a s3cr3t-b\nd\ne\n",
        "not UTF-8": b"\xff\xfe\x00s3cr3t-user:s3cr3t-pass\n",
        "empty": b"",
        "JSON list": b'["s3cr3t-user", "s3cr3t-pass"]',
        "JSON without fields": b'{"user": "s3cr3t"}',
        "spaces in a token": b"s3cr3t two words\n",
    }
    try:
        for what, content in bad.items():
            token.write_bytes(content)
            os.utime(token, ns=(time.time_ns(), time.time_ns()))
            with direct_session() as s:
                for method in ("HEAD", "GET"):
                    r = s.request(method, path, headers=ACCEPT, timeout=10)
                    oci_error(r, 502, "UNAUTHORIZED")
                    if method == "GET":
                        assert "access_token" in r.json()["errors"][0]["message"]
                        assert b"s3cr3t" not in r.content, what
                # The routes that need no credentials file go on.
                assert s.get(world.m.url + "/v2/", timeout=10).status_code == 200
                status = s.get(world.m.url + "/status", timeout=10)
                assert status.status_code == 200
                assert {"file": "access_token", "present": True, "kind": "unusable"}.items() <= status.json()["credentials"][0].items()
                r = s.get(world.m.url + f"/auth?remote_url=http://{world.registry.host}/v2/x/blobs/{BLOB_DIGEST}", timeout=10)
                assert r.status_code == 502 and r.json()["success"] is False and b"s3cr3t" not in r.content
        # One error line per file version (not one per request), naming the file, not its content.
        errors = [line for line in world.log_lines() if f"{token}:" in line]
        assert 0 < len(errors) <= len(bad), errors
        assert "s3cr3t" not in world.m.log_text()
    finally:
        token.unlink(missing_ok=True)
    world.still_serving()  # without the file: anonymous again, at once
