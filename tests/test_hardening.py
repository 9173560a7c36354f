"""Hardening: faults on real components, load, and the security promises.

Each test breaks one thing the way it breaks in the field and checks what a pull sees: a
registry killed while a blob streams, a slow or dead token endpoint, an upstream that throttles,
a token that expires in the middle of a pull, a client that is slow or goes away, 64 pulls at
once. The mirror is a real `acr mirror start` (the default template, so the proxy runs in a
child process supervised by the engine) in front of the real docker-registry and token server;
small loopback servers written here stand in where a real registry cannot misbehave on demand.
Memory, file descriptors and connections are read from /proc of the proxy process itself.

The security half checks the listener, the loopback-only endpoints, the `Authorization` header
on redirect chains, and that no token the token server ever issued shows up in a log line, an
error page, a flow file, `/status`, `/metrics` or `acr dump`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
from mitmproxy import http as mhttp
from mitmproxy import io as mio
from mitmproxy.test import tflow, tutils

from tests.harness.images import (
    ACCEPT_ALL_MANIFESTS,
    host_platform,
    make_image,
    make_index,
    platform_string,
    push_image,
    push_index,
    push_random_blob,
    sha256_digest,
)
from tests.harness.fakeserver import Fake, Seen, _Handler, relay
from tests.harness.inprocess import drive
from tests.harness.mirror import ACR, Mirror
from tests.harness.procs import rss_kib, wait_for
from tests.harness.ports import LOOPBACK, direct_session
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer, decode_jwt

ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
MiB = 1 << 20


# --- helpers shared with tests/test_bad_input.py ---------------------------------------------


def ns(host: str) -> str:
    return urllib.parse.quote(host, safe="")








def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _tcp_table(pid: int) -> Iterator[tuple[str, int, str, int, str, str]]:
    """(local ip hex, local port, remote ip hex, remote port, state, inode) of every TCP socket
    in the process' network namespace."""
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            lip, lport = f[1].rsplit(":", 1)
            rip, rport = f[2].rsplit(":", 1)
            yield lip, int(lport, 16), rip, int(rport, 16), f[3], f[9]


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections that the process holds to `port` (any loopback address)."""
    mine = _socket_inodes(pid)
    return sum(1 for _, _, _, rport, state, inode in _tcp_table(pid) if state == "01" and rport == port and inode in mine)


def accepted_connections(pid: int, port: int) -> int:
    """Client connections the process still holds on its listening `port` (any state but LISTEN)."""
    mine = _socket_inodes(pid)
    return sum(1 for _, lport, _, _, state, inode in _tcp_table(pid) if state != "0A" and lport == port and inode in mine)


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses (hex, as /proc writes them) the process listens on at `port`."""
    mine = _socket_inodes(pid)
    return {lip for lip, lport, _, _, state, inode in _tcp_table(pid) if state == "0A" and lport == port and inode in mine}


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes to the mirror; (what came back, whether the server closed the connection)."""
    out = b""
    closed = False
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return out, True
        deadline = time.monotonic() + timeout
        s.settimeout(0.3)
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                head, _, body = out.partition(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if _ and m and len(body) >= int(m[1]):
                    break  # a whole answer on a connection kept open
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out += chunk
    return out, closed


def status_of(raw: bytes) -> int:
    first = raw.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[1].isdigit() else 0


def body_of(raw: bytes) -> bytes:
    return raw.partition(b"\r\n\r\n")[2]


def oci_error(r: requests.Response, status: int, code: Optional[str] = None) -> dict[str, Any]:
    """The answer is the spec's error document with this status (and code)."""
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert r.headers.get("Content-Type", "").startswith("application/json"), r.headers
    if r.request.method == "HEAD":
        assert r.content == b"" and int(r.headers["Content-Length"]) > 0
        return {}
    (error,) = r.json()["errors"]
    assert error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def issued_tokens(ts: TokenServer) -> list[str]:
    """Every access token the token server handed out (RS256 signatures are deterministic, so
    signing the recorded claims again gives the very tokens) and every refresh token it knows."""
    return [ts.sign(claims) for claims in list(ts.issued)] + list(ts.refresh_tokens)


# --- the mirror under test ------------------------------------------------------------------


@pytest.fixture
def start(mirror_factory: Callable[..., Mirror]) -> Callable[..., Mirror]:
    """`acr mirror start` (the default template: engine, proxy in a child) with an unbuffered
    log, its `.host` step writing into a folder of the test's own."""

    def go(upstreams: Any, **kwargs: Any) -> Mirror:
        kwargs["env"] = {"PYTHONUNBUFFERED": "1", **kwargs.get("env", {})}
        return mirror_factory(upstreams, **kwargs)

    return go


def pull(s: requests.Session, m: Mirror, host: str, repo: str, tag: str) -> int:
    """What containerd does for `host/repo:tag`, through the mirror, checking every digest.
    Returns the bytes fetched."""
    q = f"?ns={ns(host)}"
    head = s.head(f"{m.url}/v2/{repo}/manifests/{tag}{q}", headers=ACCEPT, timeout=30)
    assert head.status_code == 200, (repo, tag, head.status_code)
    digest = head.headers["Docker-Content-Digest"]
    got = s.get(f"{m.url}/v2/{repo}/manifests/{digest}{q}", headers=ACCEPT, timeout=30)
    assert got.status_code == 200 and sha256_digest(got.content) == digest, (repo, got.status_code)
    doc = got.json()
    total = len(got.content)
    if "manifests" in doc:
        want = host_platform()
        (child,) = [d for d in doc["manifests"] if d["platform"]["architecture"] == want["architecture"]]
        got = s.get(f"{m.url}/v2/{repo}/manifests/{child['digest']}{q}", headers=ACCEPT, timeout=30)
        assert got.status_code == 200 and sha256_digest(got.content) == child["digest"]
        doc = got.json()
        total += len(got.content)
    for d in [doc["config"], *doc["layers"]]:
        blob = s.get(f"{m.url}/v2/{repo}/blobs/{d['digest']}{q}", timeout=30)
        assert blob.status_code == 200 and sha256_digest(blob.content) == d["digest"], (repo, d["digest"], blob.status_code)
        total += len(blob.content)
    return total


# === faults ====================================================================================


def test_registry_killed_mid_blob_is_an_error_and_the_mirror_serves_the_next_pull(
    registry_factory: Callable[..., Registry], start: Callable[..., Mirror], repo_name: str, tmp_path: Path,
) -> None:
    workdir = tmp_path / "killed-registry"
    reg = registry_factory(workdir=workdir)
    size = 64 * MiB
    digest, _ = push_random_blob(reg, repo_name, size, seed=17)
    image = make_image({"after": repo_name.encode()})
    push_image(reg, repo_name, "v1", image)
    m = start(reg.url)
    pid = m.serving_pid()
    url = f"{m.url}/v2/{repo_name}/blobs/{digest}?ns={ns(reg.host)}"

    got, error = 0, None
    with direct_session() as s, s.get(url, stream=True, timeout=30) as r:
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
        chunks = r.iter_content(MiB)
        while got < 2 * MiB:
            got += len(next(chunks))
        assert reg.proc is not None
        os.killpg(reg.proc.pid, signal.SIGKILL)  # mid-body: no goodbye, no FIN from a handler
        reg.proc.wait()
        reg.proc = None
        try:
            for chunk in chunks:
                got += len(chunk)
        except requests.RequestException as e:
            error = e
    assert error is not None and got < size, f"the client saw a clean end after {got} of {size} bytes"
    assert wait_for(lambda: re.search(rf"GET blobs {re.escape(repo_name)}:{digest} -> .*error", m.log_text()) is not None, 3), \
        "the cut blob has no log line that says so"

    # The registry comes back on the same port with the same storage: the mirror serves at once.
    back = registry_factory(workdir=workdir, port=reg.port)
    assert back.port == reg.port
    with direct_session() as s:
        assert pull(s, m, reg.host, repo_name, "v1") > 0
        with s.get(url, stream=True, timeout=30) as r:
            h = hashlib.sha256()
            for chunk in r.iter_content(MiB):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == digest
    assert m.serving_pid() == pid, "the proxy process was restarted: it must have crashed"


def test_a_slow_token_server_is_a_bounded_504_and_the_mirror_recovers(
    token_registry: Registry, token_server: TokenServer, start: Callable[..., Mirror], repo_name: str,
) -> None:
    image = make_image({"slow-token": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    timeout = 1.0
    m = start(token_registry.url, credentials=token_server.issue_refresh_token(),
              sets=[f"acr_upstream_timeout={timeout}"])

    def slow(user: Optional[str], typ: str, name: str, actions: list[str]) -> list[str]:
        time.sleep(timeout + 3)
        return list(actions)

    token_server.knobs.authorize = slow
    paths = [f"/v2/{repo_name}/manifests/v1", f"/v2/{repo_name}/blobs/{image.layers[0].digest}",
             f"/v2/{repo_name}-other/manifests/v1"] * 3
    started = time.monotonic()

    def get(path: str) -> tuple[requests.Response, float]:
        t = time.monotonic()
        with direct_session() as s:
            r = s.get(m.url + path, headers=ACCEPT, timeout=30)
        return r, time.monotonic() - t

    with ThreadPoolExecutor(len(paths)) as pool:
        answers = list(pool.map(get, paths))
    for r, took in answers:
        oci_error(r, 504, "UPSTREAM_TIMEOUT")
        assert took < timeout + 2, took
    assert time.monotonic() - started < timeout + 3

    token_server.knobs.authorize = None
    with direct_session() as s:
        assert pull(s, m, token_registry.host, repo_name, "v1") > 0


def test_upstream_throttling_and_failures_keep_status_and_retry_after(
    fake_server: Callable[..., Fake], start: Callable[..., Mirror],
) -> None:
    retry_after = {429: "7", 500: "3", 503: "11"}
    blob = secrets.token_bytes(4096)
    digest = sha256_digest(blob)

    def upstream(h: _Handler, seen: Seen) -> None:
        path = seen.path.split("?")[0]
        if path == "/v2/":
            return h.json(200, {})
        m = re.match(r"^/v2/s(\d{3})/", path)
        if m:
            status = int(m[1])
            return h.json(status, {"errors": [{"code": "BUSY", "message": "try later"}]},
                          {"Retry-After": retry_after[status]})
        if path.startswith("/v2/ok/blobs/") or (path.startswith("/v2/flaky/blobs/") and seen.method == "HEAD"):
            return h.reply(200, blob, {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest})
        if path.startswith("/v2/flaky/blobs/"):
            return h.json(429, {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                          {"Retry-After": "13", "WWW-Authenticate": 'Bearer realm="http://127.0.0.1:9/token"'})
        h.json(404, {"errors": [{"code": "NOT_FOUND", "message": "no"}]})

    up = fake_server(upstream)
    m = start(up.url)
    expected = {429: (503, "TOOMANYREQUESTS"), 500: (500, "UPSTREAM_UNAVAILABLE"), 503: (503, "UPSTREAM_UNAVAILABLE")}
    with direct_session() as s:
        for status, (mapped, code) in expected.items():
            for method, kind, ref in (("HEAD", "manifests", "v1"), ("GET", "manifests", "v1"),
                                      ("GET", "blobs", digest), ("HEAD", "blobs", digest)):
                before = len(up.seen(f"/s{status}/"))
                r = s.request(method, f"{m.url}/v2/s{status}/{kind}/{ref}", headers=ACCEPT, timeout=15)
                oci_error(r, mapped, code)
                assert r.headers.get("Retry-After") == retry_after[status], (status, method, kind, r.headers)
                assert len(up.seen(f"/s{status}/")) - before == 1, "the mirror retried a throttled upstream"
        # A registry that serves blobs itself and throttles the blob's one GET: still 503
        # with its Retry-After, no challenge.
        ok = s.get(f"{m.url}/v2/ok/blobs/{digest}", timeout=15)
        assert ok.status_code == 200 and ok.content == blob
        r = s.get(f"{m.url}/v2/flaky/blobs/{digest}", timeout=15)
        assert r.status_code == 503 and r.headers.get("Retry-After") == "13", (r.status_code, r.headers)
        assert "WWW-Authenticate" not in r.headers
        assert [x.method for x in up.seen("/flaky/")] == ["GET"]  # no probe: one request per blob


def test_a_token_expiring_mid_pull_is_renewed_and_the_pull_succeeds(
    token_registry: Registry, token_server: TokenServer, start: Callable[..., Mirror],
    fake_server: Callable[..., Fake], repo_name: str,
) -> None:
    """docker-registry forgives expired tokens for 60 s, so a front that is strict about `exp`
    stands before it: a pull that outlives a 3 s token only works if the mirror renews it."""
    layers = [{f"l{i}": secrets.token_bytes(512 * 1024)} for i in range(3)]
    image = make_image(layers=layers)
    push_image(token_registry, repo_name, "v1", image)
    token_server.expires_in = 3
    expired: list[str] = []

    def strict(h: _Handler, seen: Seen) -> None:
        auth = seen.headers.get("authorization", "")
        if auth.startswith("Bearer ") and decode_jwt(auth[7:])[1]["exp"] <= time.time():
            expired.append(f"{seen.method} {seen.path}")
            with direct_session() as s:  # the registry's own challenge for this path
                r = s.request(seen.method, token_registry.url + seen.path, timeout=10)
            return h.reply(401, r.content, {"WWW-Authenticate": r.headers.get("WWW-Authenticate", ""),
                                            "Content-Type": "application/json"})
        relay(h, seen, token_registry.url)

    front = fake_server(strict)
    m = start(front.url, credentials=token_server.issue_refresh_token())
    token_server.clear_log()
    q = f"?ns={ns(front.host)}"
    started = time.monotonic()
    with direct_session() as s:
        head = s.head(f"{m.url}/v2/{repo_name}/manifests/v1{q}", headers=ACCEPT, timeout=15)
        assert head.status_code == 200 and head.headers["Docker-Content-Digest"] == image.digest
        assert s.get(f"{m.url}/v2/{repo_name}/manifests/{image.digest}{q}", headers=ACCEPT, timeout=15).content == image.manifest
        # The first layer streams slowly, across the token's expiry; the next ones come after it.
        with s.get(f"{m.url}/v2/{repo_name}/blobs/{image.layers[0].digest}{q}", stream=True, timeout=15) as r:
            assert r.status_code == 200
            data = b""
            for chunk in r.iter_content(64 * 1024):
                data += chunk
                time.sleep(0.4)
        assert data == image.layers[0].data
        for blob in (image.config, *image.layers[1:]):
            time.sleep(1.6)
            r = s.get(f"{m.url}/v2/{repo_name}/blobs/{blob.digest}{q}", timeout=15)
            assert r.status_code == 200 and r.content == blob.data, (blob.digest, r.status_code)
    assert time.monotonic() - started > 4, "the pull did not outlive the token"
    assert token_server.count("token_post") >= 2, "the mirror never renewed its token"
    assert expired == [], f"the mirror sent expired tokens: {expired}"


def _big_blob_upstream(fake_server: Callable[..., Fake], size: int) -> tuple[Fake, str, str]:
    """An upstream with a small blob (to learn that it serves blobs itself) and a big one of
    `size` bytes (a whole number of MiB), both with their true digests."""
    chunk = secrets.token_bytes(MiB)
    small = b"small"
    h = hashlib.sha256()
    for _ in range(size // MiB):
        h.update(chunk)
    small_digest, big_digest = sha256_digest(small), "sha256:" + h.hexdigest()

    def upstream(h: _Handler, seen: Seen) -> None:
        path = seen.path.split("?")[0]
        if path == "/v2/":
            return h.json(200, {})
        if path.endswith(small_digest):
            return h.reply(200, small)
        if path.endswith(big_digest):
            return h.stream(size, chunk, {"Content-Type": "application/octet-stream"})
        h.json(404, {"errors": []})

    return fake_server(upstream), small_digest, big_digest


@pytest.mark.alone
def test_a_slow_client_gets_the_whole_blob_in_bounded_memory(
    fake_server: Callable[..., Fake], start: Callable[..., Mirror],
) -> None:
    """The client pauses longer than the upstream timeout: that is the client being slow, not
    the upstream stalling, and the mirror must neither buffer the blob nor cut the client off."""
    size = 128 * MiB
    up, small, big = _big_blob_upstream(fake_server, size)
    timeout = 2.0
    m = start(up.url, sets=[f"acr_upstream_timeout={timeout}"])
    pid = m.serving_pid()
    with direct_session() as s:
        assert s.get(f"{m.url}/v2/x/blobs/{small}", timeout=15).status_code == 200
    base = rss_kib(pid) / 1024
    peak = [base]
    got = 0
    with direct_session() as s, s.get(f"{m.url}/v2/x/blobs/{big}", stream=True, timeout=30) as r:
        assert r.status_code == 200
        chunks = r.iter_content(256 * 1024)
        while got < 4 * MiB:
            got += len(next(chunks))
        for _ in range(int((timeout + 1.5) / 0.25)):  # a pause longer than the upstream timeout
            time.sleep(0.25)
            peak[0] = max(peak[0], rss_kib(pid) / 1024)
        sent_while_paused = up.sent
        try:
            for chunk in chunks:
                got += len(chunk)
        except requests.RequestException as e:
            pytest.fail(f"the slow client was cut off after {got >> 20} of {size >> 20} MiB: {e!r}")
    assert got == size
    assert sent_while_paused < got + 64 * MiB, "the mirror read ahead of the client without bound"
    assert peak[0] - base < 48, f"RSS grew by {peak[0] - base:.0f} MiB while the client paused"


def test_a_client_that_disconnects_mid_blob_releases_the_upstream_connection(
    fake_server: Callable[..., Fake], start: Callable[..., Mirror],
) -> None:
    size = 256 * MiB
    up, small, big = _big_blob_upstream(fake_server, size)
    m = start(up.url)
    pid = m.serving_pid()
    with direct_session() as s:
        assert s.get(f"{m.url}/v2/x/blobs/{small}", timeout=15).status_code == 200
    time.sleep(0.3)
    pooled = connections_to(pid, up.port)  # the mirror's own keep-alive session
    for round_ in range(3):
        with socket.create_connection((LOOPBACK, m.port)) as c:
            c.sendall(f"GET /v2/x/blobs/{big} HTTP/1.1\r\nHost: {m.host}\r\n\r\n".encode())
            got = 0
            while got < 2 * MiB:
                data = c.recv(65536)
                assert data, "the mirror closed the connection early"
                got += len(data)
            assert wait_for(lambda: up.streams == 1, 5)
            assert connections_to(pid, up.port) >= 1  # the stream's (the pooled one, when free)
        # The client is gone: the upstream stream must end (a broken pipe there) and the
        # proxy's connection to it must be closed, not drained to the end or kept open.
        assert wait_for(lambda: up.streams == 0, 5), "the upstream is still streaming to nobody"
        assert up.broken == round_ + 1
        assert wait_for(lambda: connections_to(pid, up.port) <= pooled, 5), \
            f"{connections_to(pid, up.port)} connections to the upstream, {pooled} before"
    assert up.sent < size, "the whole blob was read from upstream for a client that left"
    with direct_session() as s:
        assert s.get(f"{m.url}/v2/x/blobs/{small}", timeout=15).content == b"small"


@pytest.mark.alone
def test_64_parallel_pulls_of_mixed_images_in_flat_memory_and_fds(
    registry: Registry, token_registry: Registry, token_server: TokenServer,
    start: Callable[..., Mirror], repo_name: str,
) -> None:
    images: list[tuple[str, str, str]] = []  # (registry host, repo, tag)
    for i in range(3):
        repo = f"{repo_name}/single{i}"
        layers = [{f"f{j}": secrets.token_bytes(96 * 1024)} for j in range(i + 1)]
        push_image(registry, repo, "v1", make_image(layers=layers, oci=i % 2 == 0))
        images.append((registry.host, repo, "v1"))
    host = platform_string(host_platform())
    other = "linux/arm64/v8" if host_platform()["architecture"] == "amd64" else "linux/amd64"
    index = make_index([(p, make_image({"p": f"{p} {secrets.token_hex(8)}".encode()}, platform=p)) for p in (other, host)])
    push_index(registry, f"{repo_name}/multi", "v1", index)
    images.append((registry.host, f"{repo_name}/multi", "v1"))
    for i in range(2):
        repo = f"{repo_name}/private{i}"
        push_image(token_registry, repo, "v1", make_image(layers=[{"a": secrets.token_bytes(128 * 1024)}, {"b": b"b"}]))
        images.append((token_registry.host, repo, "v1"))

    m = start([registry.url, token_registry.url], credentials=token_server.issue_refresh_token())
    pid = m.serving_pid()
    upstream_ports = (registry.port, token_registry.port, token_server.port)
    fds: list[int] = []
    peak = [rss_kib(pid) / 1024]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib(pid) / 1024)
            time.sleep(0.05)

    def one(i: int) -> int:
        with direct_session() as s:
            return pull(s, m, *images[i % len(images)])

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for _ in range(3):
            with ThreadPoolExecutor(64) as pool:
                sizes = list(pool.map(one, range(64)))
            assert len(sizes) == 64 and all(sizes)
            # Clients are gone: count once the proxy has closed every connection they made.
            assert wait_for(lambda: accepted_connections(pid, m.port) == 0, 30), "client connections left open"
            # Idle keep-alive connections to the registries stay pooled for the next pull; how
            # many depends on how the round's requests overlapped, which the machine's load
            # decides. All other descriptors must stay flat, and the pool can hold no more
            # connections than requests were ever in flight at once (64 per registry).
            pooled = {p: connections_to(pid, p) for p in upstream_ports}
            assert all(n <= 64 for n in pooled.values()), f"upstream connections beyond 64 in flight: {pooled}"
            fds.append(fd_count(pid) - sum(pooled.values()))
    finally:
        stop.set()
        sampler.join()
    log = m.log_text().split("listening at")[-1]
    assert not re.search(r" -> (5\d\d|error)", log), [line for line in log.splitlines() if re.search(r" -> (5\d\d|error)", line)][:5]
    assert peak[0] < 150, f"proxy RSS peaked at {peak[0]:.0f} MiB"
    # A leak grows with the pulls (64 per round, several requests each); pooled upstream
    # connections are counted apart above, so everything else must stay flat.
    assert fds[2] <= fds[0] + 2, f"file descriptors other than pooled upstream connections grew across rounds: {fds}"
    print(f"64 parallel pulls x3: peak RSS {peak[0]:.0f} MiB, other fds after each round {fds}, pooled {pooled}")


# === security ==================================================================================


def test_the_listener_is_loopback_unless_allow_remote_which_warns(
    registry: Registry, start: Callable[..., Mirror], tmp_path: Path,
) -> None:
    m = start(registry.url)
    assert listening_addresses(m.serving_pid(), m.port) == {"0100007F"}  # 127.0.0.1 and nothing else
    assert "every client that reaches it" not in m.log_text()
    text, n = re.subn(rf"(?m)^(\+ \.proxy\s+)127\.0\.0\.1:{m.port}$", r"\g<1>0.0.0.0:{port}", m.runmd_path.read_text())
    m.stop()
    assert n == 1
    remote = start(registry.url, runmd=text, args=["--allow-remote"], home=tmp_path / "remote")
    assert listening_addresses(remote.serving_pid(), remote.port) == {"00000000"}
    assert remote.get("/v2/").status_code == 200
    warnings = [line for line in remote.log_text().splitlines() if "every client that reaches it pulls" in line]
    assert warnings and all(line.startswith("WARNING") for line in warnings), remote.log_text()[-2000:]


ENDPOINTS_RUNMD = """\
``` start mirror
+ .runtime
: .mirror       example.azurecr.io
+ .proxy        localhost:8578
: .manifests    head, get
:   .login      access_token
```
"""


@pytest.mark.parametrize("peer", [("10.1.2.3", 40000), ("192.168.7.7", 1), ("::ffff:10.0.0.1", 1, 0, 0),
                                  ("2001:db8::1", 1, 0, 0), ("fe80::1%eth0", 1, 0, 2), None])
def test_auth_status_and_metrics_answer_loopback_clients_only(tmp_path: Path, peer: Any) -> None:
    from addons import catalog
    from addons.chain import AcrMirror

    secret = "s3cret-refresh-token-" + secrets.token_hex(8)
    (tmp_path / "access_token").write_text(f"puller:{secret}\n")
    (tmp_path / "access_token").chmod(0o600)
    mirror = AcrMirror(catalog.parse_text(ENDPOINTS_RUNMD, str(tmp_path / "mirror.runmd")))

    def ask(path: str, who: Any) -> mhttp.Response:
        req = tutils.treq(method=b"GET", path=path.encode(), authority=b"", host="127.0.0.1", port=9,
                          headers=mhttp.Headers(((b"Host", b"localhost:8578"),)), content=b"")
        flow = tflow.tflow(req=req)
        flow.client_conn.peername = who
        drive(mirror, flow)
        assert flow.response is not None, path
        return flow.response

    paths = ("/auth?remote_url=https://example.azurecr.io/v2/a/blobs/sha256:" + "a" * 64, "/status", "/metrics")
    for path in paths:
        assert ask(path, ("127.0.0.1", 5)).status_code == 200, path  # the control
        r = ask(path, peer)
        assert r.status_code == 403, (path, peer, r.status_code)
        body = r.content or b""
        assert secret.encode() not in body
        for word in (b"auths", b"counters", b"upstreams", b"acr_requests_total", b"puller"):
            assert word not in body, (path, word)


def test_authorization_never_crosses_hosts_on_a_redirect_chain(
    token_registry: Registry, token_server: TokenServer, start: Callable[..., Mirror],
    fake_server: Callable[..., Fake], repo_name: str,
) -> None:
    """registry -> (same origin, relative) -> registry -> storage on another port of the same
    address -> the bytes: the token goes to every hop on the registry's origin and never to
    storage, for GET and HEAD alike."""
    image = make_image({"hops": secrets.token_bytes(64 * 1024)})
    push_image(token_registry, repo_name, "v1", image)
    sig = secrets.token_hex(8)

    def storage(h: _Handler, seen: Seen) -> None:
        m = re.match(r"^/store/(.+)/(sha256:[0-9a-f]{64})\?sig=(\w+)$", seen.path)
        if not m or m[3] != sig:
            return h.reply(403, b"bad signature")
        # Storage reads the registry with credentials of its own (the harness pushes with them).
        from tests.harness.images import RegistryClient

        r = RegistryClient.of(token_registry).request("GET", f"/v2/{m[1]}/blobs/{m[2]}", repo=m[1])
        h.reply(r.status_code, r.content, {"Content-Type": "application/octet-stream"})

    store = fake_server(storage)

    def front(h: _Handler, seen: Seen) -> None:
        m = re.match(r"^/v2/(.+)/blobs/(sha256:[0-9a-f]{64})$", seen.path)
        hop = re.match(r"^/hop/(.+)/(sha256:[0-9a-f]{64})$", seen.path)
        if m:  # the registry checks the token, then redirects on its own origin
            with direct_session() as s:
                check = s.head(token_registry.url + seen.path, timeout=10,
                               headers={k: v for k, v in seen.headers.items() if k == "authorization"})
            if check.status_code != 200:
                return h.reply(check.status_code, b"", {"WWW-Authenticate": check.headers.get("WWW-Authenticate", "")})
            return h.reply(307, b"", {"Location": f"/hop/{m[1]}/{m[2]}"})
        if hop:
            if not seen.headers.get("authorization", "").startswith("Bearer "):
                return h.reply(401, b"")
            return h.reply(307, b"", {"Location": f"http://{LOOPBACK}:{store.port}/store/{hop[1]}/{hop[2]}?sig={sig}"})
        relay(h, seen, token_registry.url)

    fr = fake_server(front)
    m = start(fr.url, credentials=token_server.issue_refresh_token())
    q = f"?ns={ns(fr.host)}"
    with direct_session() as s:
        for blob in image.blobs:
            head = s.head(f"{m.url}/v2/{repo_name}/blobs/{blob.digest}{q}", timeout=15)
            assert head.status_code == 200 and int(head.headers["Content-Length"]) == blob.size
            got = s.get(f"{m.url}/v2/{repo_name}/blobs/{blob.digest}{q}", timeout=15)
            assert got.status_code == 200 and got.content == blob.data
    hops = fr.seen("/hop/")
    assert {s.method for s in hops} == {"GET", "HEAD"}
    assert all(s.headers.get("authorization", "").startswith("Bearer ") for s in hops)
    stored = store.seen("/store/")
    assert {s.method for s in stored} == {"GET", "HEAD"} and len(stored) >= 2 * len(image.blobs)
    assert all("authorization" not in s.headers for s in stored), [s.headers for s in stored]


def test_no_token_in_logs_flows_error_pages_status_metrics_or_dump(
    token_registry: Registry, token_server: TokenServer, start: Callable[..., Mirror],
    repo_name: str, tmp_path: Path,
) -> None:
    image = make_image({"secret": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    denied = f"{repo_name}-denied"
    push_image(token_registry, denied, "v1", image)
    token_server.knobs.authorize = lambda user, typ, name, actions: [] if name == denied else list(actions)
    refresh = token_server.issue_refresh_token()
    flows = tmp_path / "flows.mitm"
    m = start(token_registry.url, credentials=refresh,
              sets=[f"save_stream_file={flows}", "termlog_verbosity=debug"])
    pages: list[bytes] = []
    with direct_session() as s:
        assert pull(s, m, token_registry.host, repo_name, "v1") > 0
        for method, path, status in (
            ("GET", f"/v2/{repo_name}/manifests/nope", 404),                       # upstream 404 with a token
            ("GET", f"/v2/{repo_name}/blobs/sha256:{'0' * 64}", 404),
            ("GET", f"/v2/{denied}/manifests/v1", 502),                            # token without the scope
            ("GET", f"/v2/{denied}/blobs/{image.config.digest}", 502),
            ("GET", f"/v2/{repo_name}/manifests/v1?ns=evil.example.com", 404),     # refused at the door
            ("GET", "/status", 200),
            ("GET", "/metrics", 200),
        ):
            r = s.request(method, m.url + path, headers=ACCEPT, timeout=15)
            assert r.status_code == status, (path, r.status_code, r.text[:200])
            pages.append(r.content + json.dumps(dict(r.headers)).encode())
    log = m.log_text()
    m.stop()
    dump = subprocess.run([ACR, "--runmd", str(m.runmd_path), "dump"], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr

    tokens = issued_tokens(token_server)
    assert refresh in tokens and len(tokens) >= 3, "the pull should have fetched access tokens"
    raw = flows.read_bytes().decode("latin-1")
    places = {"log": log, "flow file": raw, "acr dump": dump.stdout + dump.stderr,
              **{f"page {i}": p.decode("latin-1") for i, p in enumerate(pages)}}
    for token in tokens:
        signature = token.rsplit(".", 1)[-1]
        for where, text in places.items():
            assert token not in text and signature not in text, f"a token is in the {where}"
    for where, text in places.items():
        assert "Bearer ey" not in text, where
    assert "GET manifests" in log and "-> 502" in log  # the log did record those requests
    with open(flows, "rb") as f:
        recorded = [fl for fl in mio.FlowReader(f).stream() if isinstance(fl, mhttp.HTTPFlow)]
    assert len(recorded) >= 8
    for fl in recorded:
        assert "Authorization" not in fl.request.headers


def test_install_never_writes_the_credential_through_a_planted_symlink(tmp_path: Path) -> None:
    """`.install` copies `access_token` into `.work/` through a temporary file: if that name is
    a symlink someone left there, the secret must not land in the file it points to."""
    from addons import catalog
    from addons.runmd.runtime import Runtime

    (tmp_path / "access_token").write_text("the-refresh-token\n")
    (tmp_path / "access_token").chmod(0o600)
    victim = tmp_path / "elsewhere.txt"
    victim.write_text("someone else's file\n")
    victim.chmod(0o644)
    work = tmp_path / ".work"
    work.mkdir(mode=0o700)
    (work / ".access_token.tmp").symlink_to(victim)
    compiled = catalog.parse_text("``` start mirror\n+ .runtime\n: .install access_token\n```\n",
                                  str(tmp_path / "mirror.runmd"))
    Runtime.for_document(compiled).run()
    dst = work / "access_token"
    assert not dst.is_symlink() and dst.read_text() == "the-refresh-token\n"
    assert oct(dst.stat().st_mode & 0o777) == oct(0o600)
    assert victim.read_text() == "someone else's file\n", "the token was written through the symlink"
    assert victim.stat().st_mode & 0o777 == 0o644


def test_a_persons_symlinked_hosts_toml_is_kept_and_never_written_through(tmp_path: Path) -> None:
    """Configuration management often links hosts.toml to a file it owns: install must move the
    link aside (not write into its target) and remove must put the very link back."""
    from addons.node import hostsfile

    managed = tmp_path / "managed" / "hosts.toml"
    managed.parent.mkdir()
    managed.write_text('server = "https://managed.example"\n')
    folder = tmp_path / "certs.d" / "r.io"
    folder.mkdir(parents=True)
    (folder / "hosts.toml").symlink_to(managed)
    ours = hostsfile.MirrorHost("http://127.0.0.1:8578", ("pull", "resolve"))
    hostsfile.install(hostsfile.HostsFile("r.io", "https://r.io", (ours,)), tmp_path / "certs.d")
    # The mirror's table is merged into a copy of the linked file; the link's target is not touched.
    merged = (folder / "hosts.toml").read_text()
    assert not (folder / "hosts.toml").is_symlink() and hostsfile.hostsmerge.marked_urls(merged) == [ours.url]
    assert hostsfile.hostsmerge.unmerge(merged) == 'server = "https://managed.example"\n'
    assert managed.read_text() == 'server = "https://managed.example"\n'
    hostsfile.remove(tmp_path / "certs.d", "r.io")
    assert (folder / "hosts.toml").is_symlink() and os.readlink(folder / "hosts.toml") == str(managed)
    assert managed.read_text() == 'server = "https://managed.example"\n'
