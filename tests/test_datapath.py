"""Acceptance tests of the data path: real registries, real containerd, real skopeo, and a
real `acr mirror start` process in between.

Each test makes the mirror prove one promise of the data path, in a way that fails when the promise
is broken: containerd pulls private images with no credentials of its own and gets the digests
that were pushed; blobs arrive whole or not at all; storage redirects never see the registry's
token; refused requests reach no server; no token reaches a log line or a flow file; failures
are answered within a bounded time with a status that makes containerd fall back.

Small loopback servers written here stand in where a real registry cannot misbehave on demand
(a recording server, a storage host behind a redirect, an upstream that hangs or cuts bodies).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
from mitmproxy import http as mhttp
from mitmproxy import io as mio

from tests.conftest import HostsDir
from tests.harness.containerd import Ctr
from tests.harness.images import (
    ACCEPT_ALL_MANIFESTS,
    RegistryClient,
    host_platform,
    make_image,
    make_index,
    other_platform,
    platform_string,
    push_image,
    push_index,
    push_random_blob,
    sha256_digest,
)
from tests.harness.fakeserver import Fake, Seen, _Handler, relay
from tests.harness.procs import rss_kib, wait_for
from tests.harness.mirror import Mirror
from tests.harness.ports import LOOPBACK, ClosedPort, direct_session
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}  # docker-registry hides OCI manifests from clients that do not accept them
UNBUFFERED = {"PYTHONUNBUFFERED": "1"}  # the mirror's log lines reach the file at once
#: Lines of the mirror's log that are not about one request.
_STARTUP = re.compile(r"^(INFO|WARNING) |listening at|loaded an ACR refresh token|loaded user |teleport \((auto|always|never)\): |^\s*$")
_SUMMARY = re.compile(r"^\[[\d:.]+\] (GET|HEAD) ")


# --- small helpers ----------------------------------------------------------------------


def _ns(host: str) -> str:
    return urllib.parse.quote(host, safe="")


@pytest.fixture
def start_mirror(mirror_factory: Callable[..., Mirror], tmp_path: Path) -> Callable[..., Mirror]:
    """`acr mirror start` with an unbuffered log (tests read it while it runs) and its `.host`
    step writing into a private hosts folder, never the node's /etc/containerd/certs.d."""
    hosts = tmp_path / "mirror-hosts.d"
    hosts.mkdir(exist_ok=True)

    def start(upstream: str, **kwargs: Any) -> Mirror:
        kwargs["env"] = dict(UNBUFFERED, **kwargs.get("env", {}))
        kwargs["args"] = ["--hosts-dir", str(hosts), *kwargs.get("args", [])]
        return mirror_factory(upstream, **kwargs)

    return start


def runmd_of(start: Callable[..., Mirror], upstream: str) -> str:
    """The runmd `acr init --upstream` writes, with `{port}` for the mirror's port."""
    probe = start(upstream, start=False)
    return probe.runmd_path.read_text().replace(probe.host, "127.0.0.1:{port}")


def request_lines(log: str) -> list[str]:
    """The log lines written while serving, minus the once-per-mirror ones."""
    lines = log.splitlines()
    start = next((i for i, line in enumerate(lines) if "listening at" in line), -1)
    out = []
    for line in lines[start + 1:]:
        if line.startswith(("Exception in callback", "handle:", "Traceback", "  ")):
            break  # mitmproxy's shutdown noise when a connection is still open
        if not _STARTUP.search(line):
            out.append(line)
    return out


def read_flows(path: Path) -> list[mhttp.HTTPFlow]:
    with open(path, "rb") as f:
        return [f for f in mio.FlowReader(f).stream() if isinstance(f, mhttp.HTTPFlow)]


def issued_tokens(ts: TokenServer) -> list[str]:
    """Every access token the token server handed out (RS256 signing is deterministic) and
    every refresh token it knows."""
    return [ts.sign(claims) for claims in list(ts.issued)] + list(ts.refresh_tokens)








def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes or goes quiet."""
    out = b""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        s.sendall(data)
        deadline = time.monotonic() + timeout
        s.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                if b"\r\n\r\n" in out:
                    break
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
    return out


def status_of(raw: bytes) -> int:
    first = raw.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 else 0


# --- containerd pulls private images --------------------------------------------------


@pytest.mark.e2e
def test_containerd_pulls_private_images_with_a_refresh_token(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer,
    tmp_hosts_dir: HostsDir, repo_name: str, start_mirror: Callable[..., Mirror], tmp_path: Path,
) -> None:
    """No credentials in containerd; hosts.toml `server` refuses connections: only the mirror,
    with the ACR-style refresh token in its access_token file, can make these pulls work."""
    single = make_image({"etc/single": repo_name.encode()})
    push_image(token_registry, repo_name, "single", single)
    host, other = platform_string(host_platform()), other_platform()
    index = make_index([(p, make_image({"p": f"{repo_name} {p}".encode()}, platform=p))
                        for p in (other, host)])
    push_index(token_registry, repo_name, "multi", index)
    refresh = token_server.issue_refresh_token()
    flows_path = tmp_path / "flows.mitm"
    m = start_mirror(token_registry.url, credentials=refresh,
                     sets=[f"save_stream_file={flows_path}"])
    tmp_hosts_dir.write(token_registry.host, m.url)
    token_server.clear_log()

    ref = f"{token_registry.host}/{repo_name}:single"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == single.digest
    assert {single.config.digest, single.layers[0].digest} <= containerd.content_digests()
    # One line per request for the simple pull: HEAD tag, GET manifest, GET config, GET layer.
    lines = request_lines(m.log_text())
    assert len(lines) == 4 and all(_SUMMARY.match(line) for line in lines), lines
    assert [line.split()[1] for line in lines].count("HEAD") == 1, lines

    multi = f"{token_registry.host}/{repo_name}:multi"
    result = containerd.pull(multi, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(multi) == index.digest
    mine, theirs = index.for_platform(host), index.for_platform(other)
    content = containerd.content_digests()
    assert {index.digest, mine.digest, mine.config.digest, mine.layers[0].digest} <= content
    assert theirs.layers[0].digest not in content

    # The refresh token was used (OAuth2 POST, as ACR), and never handed to containerd.
    assert token_server.count("token_post") >= 1
    assert any(r.params.get("grant_type") == ["refresh_token"] for r in token_server.requests)
    lines = request_lines(m.log_text())
    m.stop()

    # Every request: decisions in metadata, a comment, and exactly one log line.
    flows = read_flows(flows_path)
    assert len(flows) == len(lines) >= 8
    for f in flows:
        meta = f.metadata.get("acr")
        assert meta and meta.get("route") in ("manifests", "blobs") and meta.get("steps"), meta
        assert f.comment and f.response is not None and f.response.status_code == 200
        assert "Authorization" not in f.request.headers
    digests = {f.metadata["acr"]["resolved"]["digest"] for f in flows if f.metadata["acr"]["route"] == "manifests"}
    assert {single.digest, index.digest, mine.digest} <= digests


@pytest.mark.e2e
def test_containerd_pulls_through_the_mirror_from_an_htpasswd_registry(
    containerd: Ctr, htpasswd_registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    user, password = htpasswd_registry.credentials or ("", "")
    image = make_image({"basic": repo_name.encode()})
    push_image(htpasswd_registry, repo_name, "v1", image)
    m = start_mirror(htpasswd_registry.url, credentials=f"{user}:{password}")
    tmp_hosts_dir.write(htpasswd_registry.host, m.url)

    ref = f"{htpasswd_registry.host}/{repo_name}:v1"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == image.digest
    assert image.layers[0].digest in containerd.content_digests()
    assert password not in m.log_text()


def test_head_and_get_of_a_tag_agree(
    token_registry: Registry, token_server: TokenServer, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    image = make_image({"agree": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    # The runmd `acr init` writes, as it is: its `.tags get` route is the one under test.
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    path = f"/v2/{repo_name}/manifests/v1?ns={_ns(token_registry.host)}"
    head = m.head(path, headers=ACCEPT)
    hops = m.get("/status").json()["counters"]["worker_hops"]
    get = m.get(path, headers=ACCEPT)
    assert head.status_code == get.status_code == 200
    # With the token cached, the tag is asked for on the event loop: no thread hop.
    assert m.get("/status").json()["counters"]["worker_hops"] == hops
    for name in ("Docker-Content-Digest", "Content-Type", "Content-Length"):
        assert head.headers[name] == get.headers[name], name
    assert head.content == b""
    assert sha256_digest(get.content) == head.headers["Docker-Content-Digest"] == image.digest
    blob = m.head(f"/v2/{repo_name}/blobs/{image.layers[0].digest}?ns={_ns(token_registry.host)}")
    assert blob.status_code == 200 and int(blob.headers["Content-Length"]) == image.layers[0].size
    tags = m.get(f"/v2/{repo_name}/tags/list?ns={_ns(token_registry.host)}")
    assert tags.status_code == 200 and tags.json()["tags"] == ["v1"]
    assert f"GET tags {repo_name} -> 200 [{token_registry.host}]" in m.log_text()  # the mirror's tags route, logged in


def test_the_client_query_reaches_the_registry_encoded_as_sent(
    registry: Registry, repo_name: str, start_mirror: Callable[..., Mirror],
) -> None:
    """Query values are decoded when the mirror parses a request: each of its routes sends them
    upstream encoded again, so `a&n=1` stays one value and a space stays a space."""
    image = make_image({"query": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    m = start_mirror(registry.url)
    query = "last=a%26n%3D1&q=a+b"
    paths = [f"/v2/{repo_name}/tags/list", f"/v2/{repo_name}/manifests/v1",
             f"/v2/{repo_name}/blobs/{image.layers[0].digest}"]
    for path in paths:
        r = m.get(f"{path}?ns={_ns(registry.host)}&{query}", headers=ACCEPT)
        assert r.status_code == 200, (path, r.status_code, r.text)
    def asked() -> list[str]:
        return [line.split('"')[1] for line in registry.log_text().splitlines() if f" /v2/{repo_name}/" in line]

    wanted = [f"GET {path}?{query} HTTP/1.1" for path in paths]
    wait_for(lambda: all(w in asked() for w in wanted), 5)  # access-log lines follow the answers
    for w in wanted:
        assert w in asked(), asked()


def test_a_missing_blob_is_the_registry_404_byte_for_byte(
    registry: Registry, repo_name: str, start_mirror: Callable[..., Mirror],
) -> None:
    """containerd and skopeo read the error JSON: the mirror answers what docker-registry answers."""
    push_image(registry, repo_name, "v1", make_image({"present": repo_name.encode()}))
    m = start_mirror(registry.url)
    path = f"/v2/{repo_name}/blobs/{sha256_digest(b'never pushed ' + repo_name.encode())}"
    direct = direct_session()
    for method in ("GET", "HEAD"):
        mine = m.get(f"{path}?ns={_ns(registry.host)}") if method == "GET" else m.head(f"{path}?ns={_ns(registry.host)}")
        theirs = direct.request(method, registry.url + path, timeout=10)
        assert mine.status_code == theirs.status_code == 404, (method, mine.status_code, mine.text)
        assert mine.content == theirs.content, method
        for name in ("Content-Type", "Content-Length", "Docker-Distribution-Api-Version"):
            assert mine.headers.get(name) == theirs.headers.get(name), (method, name)
    assert json.loads(m.get(f"{path}?ns={_ns(registry.host)}").content)["errors"][0]["code"] == "BLOB_UNKNOWN"


# --- skopeo (registries.conf mirror: no ns, /v2/ ping, Accept lines) -------------------


@pytest.mark.e2e
def test_skopeo_pulls_through_the_mirror_without_ns(
    token_registry: Registry, token_server: TokenServer, repo_name: str,
    start_mirror: Callable[..., Mirror], tmp_path: Path,
) -> None:
    image = make_image({"skopeo": repo_name.encode()}, oci=False)
    push_image(token_registry, repo_name, "v1", image)
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    conf = tmp_path / "registries.conf"
    conf.write_text(
        f'[[registry]]\nlocation = "{token_registry.host}"\ninsecure = true\n'
        f'[[registry.mirror]]\nlocation = "{m.host}"\ninsecure = true\n'
    )
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    out = tmp_path / "copy"
    result = subprocess.run(
        ["skopeo", "--registries-conf", str(conf), "--policy", str(policy), "copy",
         "--src-tls-verify=false", f"docker://{token_registry.host}/{repo_name}:v1", f"dir:{out}"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr
    assert sha256_digest((out / "manifest.json").read_bytes()) == image.digest
    for blob in image.blobs:
        assert sha256_digest((out / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest
    # Through the mirror (the registry itself would have refused skopeo: it has no credentials).
    log = m.log_text()
    assert f"GET manifests {repo_name}:v1 -> 200" in log, log
    assert f"GET blobs {repo_name}:{image.layers[0].digest} -> 200" in log, log


# --- big blobs: streamed, whole, in flat memory ----------------------------------------


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.alone
def test_a_1gib_blob_arrives_whole_in_flat_memory(
    registry: Registry, repo_name: str, start_mirror: Callable[..., Mirror],
) -> None:
    size = 1 << 30
    digest, pushed = push_random_blob(registry, repo_name, size, seed=7)
    assert pushed == size
    m = start_mirror(registry.url)
    pid = m.serving_pid()
    peak = [rss_kib(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    h = hashlib.sha256()
    got = 0
    started = time.monotonic()
    try:
        with direct_session() as s, s.get(f"{m.url}/v2/{repo_name}/blobs/{digest}?ns={_ns(registry.host)}",
                                    stream=True, timeout=30) as r:
            assert r.status_code == 200
            assert int(r.headers["Content-Length"]) == size
            for chunk in r.iter_content(1 << 20):
                h.update(chunk)
                got += len(chunk)
    finally:
        stop.set()
        sampler.join()
    elapsed = time.monotonic() - started
    assert got == size
    assert "sha256:" + h.hexdigest() == digest
    assert peak[0] < 150 * 1024, f"mirror RSS peaked at {peak[0] // 1024} MiB"
    print(f"1 GiB through the mirror in {elapsed:.1f} s ({size / elapsed / 1e6:.0f} MB/s), "
          f"peak RSS {peak[0] // 1024} MiB")


def test_a_truncated_blob_is_an_error_never_a_short_blob(
    fake_server: Callable[..., Fake], start_mirror: Callable[..., Mirror],
) -> None:
    """The upstream promises N bytes and closes after N/2: the client must see a failure."""
    body = secrets.token_bytes(256 * 1024)
    digest = sha256_digest(body)
    chunked = "sha256:" + "c" * 64

    def upstream(h: _Handler, seen: Seen) -> None:
        if seen.path == "/v2/":
            return h.json(200, {})
        if seen.path.endswith(digest):
            h.send_response(200)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Docker-Content-Digest", digest)
            h.end_headers()
            if seen.method == "GET":
                h.wfile.write(body[: len(body) // 2])
            return h.cut()
        if seen.path.endswith(chunked):
            h.send_response(200)
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            if seen.method == "GET":
                h.wfile.write(b"10000\r\n" + body[:65536] + b"\r\n")
            return h.cut()
        if "/manifests/" in seen.path:
            h.send_response(200)
            h.send_header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            h.send_header("Content-Length", "1000")
            h.end_headers()
            h.wfile.write(b'{"schemaVersion":2,')
            return h.cut()
        h.json(404, {"errors": []})

    up = fake_server(upstream)
    m = start_mirror(up.url)
    for ref in (digest, chunked):
        with direct_session() as s:
            try:
                r = s.get(f"{m.url}/v2/x/blobs/{ref}", timeout=15)
            except (requests.exceptions.ChunkedEncodingError, requests.ConnectionError):
                continue  # the connection broke off: the client knows the blob is incomplete
            assert r.status_code >= 500, (ref, r.status_code, len(r.content))
    # A manifest cut short is a gateway error, not a served manifest.
    r = m.get("/v2/x/manifests/v1", timeout=15)
    assert r.status_code == 502, r.text


# --- fallback -------------------------------------------------------------------------


@pytest.mark.e2e
def test_containerd_falls_back_to_server_when_the_mirror_is_stopped(
    containerd: Ctr, registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    image = make_image({"fallback": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    m = start_mirror(registry.url)
    tmp_hosts_dir.write(registry.host, m.url, server=registry.url)
    m.stop()
    ref = f"{registry.host}/{repo_name}:v1"
    started = time.monotonic()
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == image.digest
    assert time.monotonic() - started < 20
    assert "GET" not in m.log_text().split("listening at")[-1]


@pytest.mark.e2e
def test_containerd_falls_back_when_the_upstream_is_down(
    containerd: Ctr, registry_factory: Callable[..., Registry], tmp_hosts_dir: HostsDir,
    repo_name: str, start_mirror: Callable[..., Mirror],
) -> None:
    """The mirror's upstream is down: it answers a gateway error at once and containerd pulls
    from the next host (a replica as `server`), so a broken upstream never hangs a pull."""
    image = make_image({"down": repo_name.encode()})
    primary, replica = registry_factory(), registry_factory()
    for reg in (primary, replica):
        push_image(reg, repo_name, "v1", image)
    m = start_mirror(primary.url)
    primary.stop()
    tmp_hosts_dir.write(primary.host, m.url, server=replica.url)
    ref = f"{primary.host}/{repo_name}:v1"
    started = time.monotonic()
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == image.digest
    assert time.monotonic() - started < 20
    assert re.search(r"HEAD manifests .* -> 50[234]", m.log_text()), m.log_text()


# --- storage redirects ----------------------------------------------------------------


class StorageRig:
    """A registry front that answers blob GETs with 307 to a loopback "storage" host.

    The front relays everything else to the real token registry and checks blob GETs with the
    registry (so they must carry a valid token); storage serves the bytes, fetched from the
    registry, and records the headers it was sent.
    """

    def __init__(self, make: Callable[..., Fake], registry: Registry) -> None:
        self.registry = registry
        self.client = RegistryClient.of(registry)
        self.storage = make(self._storage)
        self.front = make(self._front)
        self.sig = secrets.token_hex(8)

    def _front(self, h: _Handler, seen: Seen) -> None:
        m = re.match(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$", seen.path)
        if not m or seen.method not in ("GET", "HEAD"):  # ACR redirects both
            return relay(h, seen, self.registry.url)
        headers = {k: v for k, v in seen.headers.items() if k == "authorization"}
        with direct_session() as s:
            check = s.head(self.registry.url + seen.path, headers=headers, timeout=10)
        if check.status_code != 200:
            out = {k: v for k, v in check.headers.items() if k.lower() == "www-authenticate"}
            return h.json(check.status_code, {"errors": [{"code": "UNAUTHORIZED"}]}, out)
        location = f"{self.storage.url}/blobs/{m[1]}/{m[2]}?sig={self.sig}"
        h.reply(307, b"", {"Location": location})

    def _storage(self, h: _Handler, seen: Seen) -> None:
        m = re.match(r"^/blobs/(.+)/(sha256:[0-9a-f]{64})\?sig=(\w+)$", seen.path)
        if not m or m[3] != self.sig:
            return h.reply(403, b"bad signature")
        r = self.client.request("GET", f"/v2/{m[1]}/blobs/{m[2]}", repo=m[1])
        h.reply(r.status_code, r.content, {"Content-Type": "application/octet-stream"})


@pytest.mark.e2e
def test_blob_redirects_are_followed_without_the_token(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer, tmp_hosts_dir: HostsDir,
    repo_name: str, start_mirror: Callable[..., Mirror], fake_server: Callable[..., Fake],
) -> None:
    image = make_image({"storage": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    rig = StorageRig(fake_server, token_registry)
    m = start_mirror(rig.front.url, credentials=token_server.issue_refresh_token())
    tmp_hosts_dir.write(rig.front.host, m.url)

    ref = f"{rig.front.host}/{repo_name}:v1"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == image.digest

    blob_gets = [s for s in rig.front.requests if s.method == "GET" and "/blobs/" in s.path]
    assert blob_gets and all(s.headers.get("authorization", "").startswith("Bearer ") for s in blob_gets)
    fetched = [s for s in rig.storage.requests if s.path.startswith("/blobs/")]
    assert {s.path.split("/")[-1].split("?")[0] for s in fetched} >= {b.digest for b in image.blobs}
    assert all("authorization" not in s.headers for s in fetched), fetched
    assert "via storage" in m.log_text()


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["option", "runmd"])
def test_client_mode_hands_the_redirect_to_the_client(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer, tmp_hosts_dir: HostsDir,
    repo_name: str, start_mirror: Callable[..., Mirror], fake_server: Callable[..., Fake],
    how: str,
) -> None:
    image = make_image({"client": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    rig = StorageRig(fake_server, token_registry)
    refresh = token_server.issue_refresh_token()
    if how == "option":
        m = start_mirror(rig.front.url, credentials=refresh, sets=["acr_follow_redirects=false"])
    else:
        text = runmd_of(start_mirror, rig.front.url)
        assert ":   .pull\n" in text
        m = start_mirror(rig.front.url, credentials=refresh, runmd=text.replace(":   .pull\n", ":   .pull client\n"))
    layer = image.layers[0]
    r = direct_session().get(f"{m.url}/v2/{repo_name}/blobs/{layer.digest}?ns={_ns(rig.front.host)}",
                       allow_redirects=False, timeout=15)
    assert r.status_code == 307, r.text
    assert r.headers["Location"].startswith(rig.storage.url)
    assert not rig.storage.requests  # the mirror itself did not go there

    tmp_hosts_dir.write(rig.front.host, m.url)
    ref = f"{rig.front.host}/{repo_name}:v1"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == image.digest
    assert rig.storage.requests and all("authorization" not in s.headers for s in rig.storage.requests)


# --- never an open proxy ---------------------------------------------------------------


def test_unknown_ns_absolute_form_and_connect_reach_no_server(
    fake_server: Callable[..., Fake], start_mirror: Callable[..., Mirror],
) -> None:
    upstream = fake_server(lambda h, seen: h.json(200, {}) if seen.path == "/v2/" else h.json(404, {"errors": []}))
    bystander = fake_server()
    m = start_mirror(upstream.url)
    digest = "sha256:" + "a" * 64
    cases = {
        "unknown ns": f"GET /v2/x/manifests/v1?ns={_ns(bystander.host)} HTTP/1.1\r\nHost: {m.host}\r\nConnection: close\r\n\r\n",
        "unknown ns blob": f"GET /v2/x/blobs/{digest}?ns=evil.example.com HTTP/1.1\r\nHost: {m.host}\r\nConnection: close\r\n\r\n",
        "absolute-form": f"GET {bystander.url}/v2/x/manifests/v1 HTTP/1.1\r\nHost: {bystander.host}\r\nConnection: close\r\n\r\n",
        "absolute-form upstream": f"GET {upstream.url}/v2/x/manifests/v1 HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n",
        "CONNECT": f"CONNECT {bystander.host} HTTP/1.1\r\nHost: {bystander.host}\r\nConnection: close\r\n\r\n",
        "CONNECT upstream": f"CONNECT {upstream.host} HTTP/1.1\r\nHost: {upstream.host}\r\nConnection: close\r\n\r\n",
        "not the API": f"GET /{bystander.host}/x HTTP/1.1\r\nHost: {bystander.host}\r\nConnection: close\r\n\r\n",
    }
    for what, text in cases.items():
        raw = raw_request(m.port, text.encode())
        status = status_of(raw)
        assert 400 <= status < 500, (what, raw[:300])
    # The control: a routed request does reach the upstream. A refused request that had been
    # forwarded anyway would have reached a server before its answer, so before this one.
    assert m.get("/v2/x/manifests/v1").status_code == 404
    assert [s.path for s in upstream.requests] == ["/v2/", "/v2/x/manifests/v1"]
    assert bystander.requests == []


# --- no secrets in logs or flow files ---------------------------------------------------


@pytest.mark.e2e
def test_no_token_in_the_log_or_the_flow_file(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer, tmp_hosts_dir: HostsDir,
    repo_name: str, start_mirror: Callable[..., Mirror], fake_server: Callable[..., Fake],
    tmp_path: Path,
) -> None:
    image = make_image({"secret": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    bodies = {b.digest: b.data for b in image.blobs}

    def front(h: _Handler, seen: Seen) -> None:
        """The registry, except that a client asking for it fails a forwarded blob GET."""
        path, _, query = seen.path.partition("?")
        fail = dict(urllib.parse.parse_qsl(query)).get("test-fail")
        if fail and seen.method == "GET" and "/blobs/" in path:
            if fail == "midway":
                data = bodies[path.rsplit("/", 1)[-1]]
                h.send_response(200)
                h.send_header("Content-Length", str(len(data)))
                h.end_headers()
                h.wfile.write(data[: len(data) // 2])
            return h.cut()
        relay(h, seen, token_registry.url)

    fr = fake_server(front)
    flows_path = tmp_path / "flows.mitm"
    refresh = token_server.issue_refresh_token()
    m = start_mirror(fr.url, credentials=refresh, sets=[f"save_stream_file={flows_path}", "termlog_verbosity=debug"])
    tmp_hosts_dir.write(fr.host, m.url)
    ref = f"{fr.host}/{repo_name}:v1"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    # Failures after the token went on the wire: before the answer, and halfway through the body.
    for fail in ("before", "midway"):
        with direct_session() as s:
            try:
                r = s.get(f"{m.url}/v2/{repo_name}/blobs/{image.layers[0].digest}?ns={_ns(fr.host)}&test-fail={fail}",
                          timeout=15)
                assert r.status_code >= 500 or len(r.content) < image.layers[0].size
            except requests.RequestException:
                pass
    forwarded = [s for s in fr.requests if "test-fail=" in s.path]
    assert forwarded and all(s.headers["authorization"].startswith("Bearer ") for s in forwarded)
    log = m.log_text()
    m.stop()

    secrets_ = issued_tokens(token_server)
    assert refresh in secrets_ and len(secrets_) >= 2
    raw = flows_path.read_bytes()
    for secret in secrets_:
        for where, text in (("log", log), ("flow file", raw.decode("latin-1"))):
            assert secret not in text, f"a token is in the {where}"
            assert secret.rsplit(".", 1)[-1] not in text, f"a token signature is in the {where}"
    assert "Bearer" not in log
    flows = read_flows(flows_path)
    failed = [f for f in flows if "test-fail=" in f.request.path]
    assert len(failed) == 2, "the failed blob GETs should be saved"
    for f in flows:
        assert "Authorization" not in f.request.headers, f.request.headers
        assert "Bearer" not in json.dumps(f.metadata, default=str)
        assert "Bearer" not in (f.comment or "")
        assert all("Bearer" not in v for v in f.request.headers.values())


# --- failures are bounded --------------------------------------------------------------


def _timed(fn: Callable[[], requests.Response]) -> tuple[requests.Response, float]:
    started = time.monotonic()
    r = fn()
    return r, time.monotonic() - started


def test_upstream_down_is_answered_at_once_with_a_gateway_error(
    closed_port: ClosedPort, start_mirror: Callable[..., Mirror],
) -> None:
    m = start_mirror(closed_port.url)
    ns = _ns(closed_port.host)
    for method, path in (("HEAD", f"/v2/x/manifests/v1?ns={ns}"), ("GET", f"/v2/x/manifests/v1?ns={ns}"),
                         ("GET", f"/v2/x/blobs/sha256:{'b' * 64}?ns={ns}"), ("HEAD", f"/v2/x/blobs/sha256:{'b' * 64}?ns={ns}")):
        r, took = _timed(lambda: direct_session().request(method, m.url + path, timeout=20))
        assert r.status_code in (502, 503, 504), (method, path, r.status_code)
        assert took < 3, (method, path, took)


def test_an_upstream_that_never_answers_is_bounded_by_the_timeout(
    start_mirror: Callable[..., Mirror], fake_server: Callable[..., Fake],
) -> None:
    """Accepts TCP, never answers: the mirror answers within acr_upstream_timeout + 2 s."""
    timeout = 1.5
    with socket.socket() as silent:
        silent.bind((LOOPBACK, 0))
        silent.listen(64)  # the kernel completes handshakes; nobody ever reads
        host = f"{LOOPBACK}:{silent.getsockname()[1]}"
        m = start_mirror(f"http://{host}", sets=[f"acr_upstream_timeout={timeout}"])
        r, took = _timed(lambda: m.head(f"/v2/x/manifests/v1?ns={_ns(host)}", headers=ACCEPT))
        assert r.status_code == 504 and took < timeout + 2, (r.status_code, took)

    # /v2/ answers (anonymous) but manifests and blobs hang: the mirror's own requests time out.
    def stall(h: _Handler, seen: Seen) -> None:
        if seen.path == "/v2/":
            return h.json(200, {})
        time.sleep(timeout + 5)
        h.cut()

    slow = fake_server(stall)
    m2 = start_mirror(slow.url, sets=[f"acr_upstream_timeout={timeout}"])
    for method, path in (("GET", "/v2/x/manifests/v1"), ("GET", f"/v2/x/blobs/sha256:{'d' * 64}"),
                         ("HEAD", f"/v2/x/blobs/sha256:{'d' * 64}")):
        r, took = _timed(lambda: direct_session().request(method, m2.url + path, headers=ACCEPT, timeout=30))
        assert r.status_code == 504, (method, path, r.status_code)
        assert took < timeout + 2, (method, path, took)


def test_an_upstream_that_stalls_mid_body_is_cut_off(
    start_mirror: Callable[..., Mirror], fake_server: Callable[..., Fake],
) -> None:
    """The client gets the blob's first half, then a broken transfer: never a complete blob with
    success, and never a wait on the stalled upstream past the mirror's upstream timeout."""
    timeout = 1.5
    body = secrets.token_bytes(1 << 20)
    digest = sha256_digest(body)

    def stall(h: _Handler, seen: Seen) -> None:
        if seen.path == "/v2/":
            return h.json(200, {})
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if seen.method == "GET":
            h.wfile.write(body[: len(body) // 2])
            h.wfile.flush()
            time.sleep(timeout + 8)  # longer than the client waits between bytes, below
        h.cut()

    up = fake_server(stall)
    m = start_mirror(up.url, sets=[f"acr_upstream_timeout={timeout}"])
    received = bytearray()
    broken: Optional[Exception] = None
    with direct_session() as s, s.get(f"{m.url}/v2/x/blobs/{digest}", stream=True, timeout=timeout + 5) as r:
        assert r.status_code == 200 and r.headers["Content-Length"] == str(len(body)), (r.status_code, r.headers)
        try:
            for chunk in r.iter_content(64 * 1024):
                received += chunk
        except requests.exceptions.ChunkedEncodingError as e:  # the connection ended short of Content-Length
            broken = e
        except requests.exceptions.ConnectionError as e:  # requests' read timeout while streaming
            pytest.fail(f"the mirror kept the client waiting on a stalled upstream: {e}")
    assert broken is not None, f"the transfer ended as if complete after {len(received)} of {len(body)} bytes"
    assert 0 < len(received) < len(body) and body.startswith(bytes(received)), len(received)


def test_token_server_down_is_a_quick_gateway_error(
    token_server_factory: Callable[..., TokenServer], registry_factory: Callable[..., Registry],
    start_mirror: Callable[..., Mirror], repo_name: str,
) -> None:
    from tests.harness.ports import free_port

    port = free_port()
    ts = token_server_factory(service=f"127.0.0.1:{port}", users={"u": "p"})
    reg = registry_factory("token", token_server=ts, port=port)
    m = start_mirror(reg.url, credentials=ts.issue_refresh_token())
    ts.stop()
    for path in (f"/v2/{repo_name}/manifests/v1", f"/v2/{repo_name}/blobs/sha256:{'e' * 64}"):
        r, took = _timed(lambda: m.get(path))
        assert 500 <= r.status_code < 600, r.status_code
        assert took < 3, took


def test_a_manifest_whose_content_does_not_match_its_digest_is_a_502(
    registry: Registry, repo_name: str, start_mirror: Callable[..., Mirror],
    fake_server: Callable[..., Fake],
) -> None:
    image = make_image({"tamper": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    tampered = image.manifest.replace(b'"schemaVersion":2', b'"schemaVersion":2 ')

    def upstream(h: _Handler, seen: Seen) -> None:
        if "/manifests/" in seen.path:
            return h.reply(200, tampered, {"Content-Type": image.media_type})
        relay(h, seen, registry.url)

    up = fake_server(upstream)
    m = start_mirror(up.url)
    for method in ("GET", "HEAD"):
        r = direct_session().request(method, f"{m.url}/v2/{repo_name}/manifests/{image.digest}", timeout=15)
        assert r.status_code == 502, (method, r.status_code)
    assert r.headers.get("Docker-Content-Digest") is None
    # A tag whose registry claims a digest its content does not have: also refused.
    def lying(h: _Handler, seen: Seen) -> None:
        if "/manifests/" in seen.path:
            return h.reply(200, tampered, {"Content-Type": image.media_type, "Docker-Content-Digest": image.digest})
        relay(h, seen, registry.url)

    up.handler = lying
    assert m.get(f"/v2/{repo_name}/manifests/v1").status_code == 502


# --- tokens: renewal after 401, expiry, one fetch for concurrent pulls --------------------


def test_a_401_with_a_cached_token_drops_it_and_retries_once(
    token_registry: Registry, token_server: TokenServer, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    image = make_image({"renew": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    calls = {"n": 0}

    def first_token_is_useless(user: Optional[str], typ: str, name: str, actions: list[str]) -> list[str]:
        calls["n"] += 1
        return [] if calls["n"] == 1 else list(actions)

    token_server.knobs.authorize = first_token_is_useless
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    token_server.clear_log()
    r = m.head(f"/v2/{repo_name}/manifests/v1", headers=ACCEPT)
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == image.digest
    assert token_server.count("token_post") == 2  # the useless token, then a good one
    r = m.get(f"/v2/{repo_name}/blobs/{image.layers[0].digest}")
    assert r.status_code == 200 and r.content == image.layers[0].data
    assert token_server.count("token_post") == 2  # the good one is cached and reused

    # A registry that keeps refusing: one retry, then a gateway error (no loop).
    token_server.knobs.authorize = lambda *a: []
    other = f"{repo_name}-other"
    token_server.clear_log()
    r = m.get(f"/v2/{other}/manifests/v1")
    assert r.status_code == 502
    assert token_server.count("token_post") == 2


def test_tokens_are_renewed_before_they_expire(
    token_registry: Registry, token_server: TokenServer, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    image = make_image({"expiry": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    token_server.expires_in = 6  # a short life is cached for half of it (not 30 s less)
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    token_server.clear_log()
    path = f"/v2/{repo_name}/manifests/{image.digest}"
    assert m.get(f"/v2/{repo_name}/manifests/v1", headers=ACCEPT).status_code == 200
    assert m.get(f"/v2/{repo_name}/blobs/{image.config.digest}").status_code == 200
    assert token_server.count("token_post") == 1
    time.sleep(3.2)  # past half the token's life: the mirror must fetch a new one
    assert m.get(f"/v2/{repo_name}/blobs/{image.layers[0].digest}").status_code == 200
    assert token_server.count("token_post") == 2
    assert m.head(path, headers=ACCEPT).status_code == 200


def test_concurrent_pulls_share_one_token_fetch(
    token_registry: Registry, token_server: TokenServer, repo_name: str,
    start_mirror: Callable[..., Mirror],
) -> None:
    image = make_image(layers=[{f"l{i}": f"{repo_name} {i}".encode()} for i in range(6)])
    push_image(token_registry, repo_name, "v1", image)

    pulling, all_arrived = threading.Event(), threading.Event()

    def slow_grant(user: Optional[str], typ: str, name: str, actions: list[str]) -> list[str]:
        if pulling.is_set():
            all_arrived.wait(20)  # the first fetch is held until every request has reached the mirror
        return list(actions)

    token_server.knobs.authorize = slow_grant
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    token_server.clear_log()
    barrier = threading.Barrier(len(image.blobs) + 1)
    results: dict[str, tuple[int, bytes]] = {}

    def fetch(path: str) -> None:
        barrier.wait()
        r = direct_session().get(m.url + path, headers=ACCEPT, timeout=30)
        results[path] = (r.status_code, r.content)

    paths = [f"/v2/{repo_name}/blobs/{b.digest}" for b in image.blobs] + [f"/v2/{repo_name}/manifests/v1"]
    threads = [threading.Thread(target=fetch, args=(p,)) for p in paths]
    served = m.get("/status").json()["counters"].get("requests", 0)
    pulling.set()
    for t in threads:
        t.start()
    assert wait_for(lambda: m.get("/status").json()["counters"].get("requests", 0) == served + len(paths), 20)
    all_arrived.set()
    for t in threads:
        t.join(30)
    assert all(status == 200 for status, _ in results.values()) and len(results) == len(paths), results
    for b in image.blobs:
        assert results[f"/v2/{repo_name}/blobs/{b.digest}"][1] == b.data
    assert token_server.count("token_post") == 1


# --- one upstream request per blob ------------------------------------------------------


def registry_blob_requests(reg: Registry, repo: str, digest: str, since: int) -> list[str]:
    """Methods of the registry's access-log lines for one blob, after byte offset `since`."""
    text = reg.log_path.read_bytes()[since:].decode(errors="replace")
    return re.findall(rf'"(GET|HEAD) /v2/{re.escape(repo)}/blobs/{re.escape(digest)}\S* HTTP/1\.1" ', text)


def test_each_blob_get_is_one_upstream_request_and_no_body_is_fetched_twice(
    token_registry: Registry, token_server: TokenServer, repo_name: str, start_mirror: Callable[..., Mirror],
) -> None:
    digest, size = push_random_blob(token_registry, repo_name, 3 << 20, seed=14)
    other, _ = push_random_blob(token_registry, repo_name, 1 << 20, seed=15)
    m = start_mirror(token_registry.url, credentials=token_server.issue_refresh_token())
    since = token_registry.log_path.stat().st_size
    with direct_session() as s:
        # The first blob of an upstream whose blob mode is unknown, then warm tokens and a known mode.
        for blob in (digest, other, digest, digest):
            r = s.get(f"{m.url}/v2/{repo_name}/blobs/{blob}?ns={_ns(token_registry.host)}", timeout=30)
            assert r.status_code == 200 and sha256_digest(r.content) == blob
    # The registry writes its access-log line after the answer: wait for the lines expected,
    # and any extra request would keep them from being exactly these.
    wait_for(lambda: registry_blob_requests(token_registry, repo_name, digest, since) == ["GET"] * 3
             and registry_blob_requests(token_registry, repo_name, other, since) == ["GET"], 5)
    assert registry_blob_requests(token_registry, repo_name, digest, since) == ["GET"] * 3
    assert registry_blob_requests(token_registry, repo_name, other, since) == ["GET"]
    # A Range request is one upstream request too, passed through unchecked.
    since = token_registry.log_path.stat().st_size
    r = direct_session().get(f"{m.url}/v2/{repo_name}/blobs/{digest}?ns={_ns(token_registry.host)}",
                       headers={"Range": "bytes=100-199"}, timeout=30)
    assert r.status_code == 206 and len(r.content) == 100 and r.headers["Content-Range"] == f"bytes 100-199/{size}"
    wait_for(lambda: registry_blob_requests(token_registry, repo_name, digest, since) == ["GET"], 5)
    assert registry_blob_requests(token_registry, repo_name, digest, since) == ["GET"]


def _registries_conf(tmp_path: Path, upstream: str, mirror: str) -> tuple[Path, Path]:
    conf = tmp_path / "registries.conf"
    conf.write_text(f'[[registry]]\nlocation = "{upstream}"\ninsecure = true\n'
                    f'[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n')
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return conf, policy


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["follow", "client"])
@pytest.mark.parametrize("tool", ["skopeo", "podman"])
def test_skopeo_and_podman_pull_blobs_from_a_redirecting_registry(
    token_registry: Registry, token_server: TokenServer, repo_name: str, start_mirror: Callable[..., Mirror],
    fake_server: Callable[..., Fake], tmp_path: Path, tool: str, mode: str,
) -> None:
    """Unchanged clients pull through the mirror whether it follows storage redirects (the body
    handed off past mitmproxy) or hands them on (`.pull client`: the client follows them)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    image = make_image({tool: repo_name.encode()}, oci=False)
    push_image(token_registry, repo_name, "v1", image)
    rig = StorageRig(fake_server, token_registry)
    sets = [] if mode == "follow" else ["acr_follow_redirects=false"]
    m = start_mirror(rig.front.url, credentials=token_server.issue_refresh_token(), sets=sets)
    conf, policy = _registries_conf(tmp_path, rig.front.host, m.host)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(tmp_path), "CONTAINERS_REGISTRIES_CONF": str(conf)}
    ref = f"{rig.front.host}/{repo_name}:v1"
    if tool == "skopeo":
        out = tmp_path / "copy"
        cmd = ["skopeo", "--registries-conf", str(conf), "--policy", str(policy), "copy", "--src-tls-verify=false",
               f"docker://{ref}", f"dir:{out}"]
    else:
        runroot = tempfile.mkdtemp(prefix="pm-", dir="/tmp")  # podman refuses a runroot over 50 characters
        cmd = ["podman", "--root", str(tmp_path / "root"), "--runroot", runroot, "--storage-driver", "vfs",
               "pull", "--tls-verify=false", "--signature-policy", str(policy), ref]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        if tool == "podman":
            shutil.rmtree(runroot, ignore_errors=True)
    assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
    if tool == "skopeo":
        for blob in image.blobs:
            assert sha256_digest((out / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest
    # Every blob came from storage, without the registry's token, through the mirror.
    fetched = {s.path.split("/")[-1].split("?")[0] for s in rig.storage.requests if s.path.startswith("/blobs/")}
    assert fetched >= {b.digest for b in image.blobs}
    assert all("authorization" not in s.headers for s in rig.storage.requests)
    assert f"GET blobs {repo_name}:{image.layers[0].digest} -> {200 if mode == 'follow' else 307}" in m.log_text()
