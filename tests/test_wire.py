"""The mirror's transport for small answers (addons.core.wire), against a loopback server that
writes exactly the bytes each test gives it: the thread's `http.client` pool and the event
loop's pool must read every framing RFC 9112 allows the same way, keep connections open only
when the answer says so, and fail as `requests` fails.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from addons.core import wire
from addons.core.wire import WHOLE_BODY_LIMIT, WireAdapter
from addons.proxy.upstream import _prepare
from tests.harness.aad import pem_of, self_signed
from tests.harness.ports import LOOPBACK, free_port

#: What the server does with one request: the bytes to write back, then whether to close.
Script = Callable[[bytes], tuple[bytes, bool]]


class RawServer:
    """Answers each request on a connection with `script(request_head)`; counts connections."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        #: Connections the client closed (the server read their end or failed to write).
        self.closed = 0
        self.heads: list[bytes] = []
        self.sock = socket.create_server((LOOPBACK, free_port()))
        self.port = self.sock.getsockname()[1]
        self.sock.settimeout(0.2)
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{LOOPBACK}:{self.port}"

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue  # a timeout, or the socket closed by `stop`
            self.connections += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        buf = b""
        if self.tls is not None:
            try:
                conn.settimeout(10)
                conn = self.tls.wrap_socket(conn, server_side=True)
            except (OSError, ssl.SSLError):
                conn.close()
                return
        with conn:
            conn.settimeout(10)
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        self.closed += 1
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                self.heads.append(head)
                answer, close = self.script(head)
                try:
                    conn.sendall(answer)
                except OSError:
                    self.closed += 1
                    return
                if close:
                    return

    def stop(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., RawServer]]:
    servers: list[RawServer] = []

    def make(script: Script, tls: ssl.SSLContext | None = None) -> RawServer:
        servers.append(RawServer(script, tls))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def session() -> tuple[requests.Session, WireAdapter]:
    s = requests.Session()
    s.trust_env = False
    adapter = WireAdapter(max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s, adapter


def on_thread(url: str, method: str = "GET", timeout: float = 5.0, verify: Any = True) -> requests.Response:
    s, adapter = session()
    return adapter.send(_prepare(s, method, url, {}), stream=False, timeout=(timeout, timeout), verify=verify)


def on_loop(url: str, method: str = "GET", timeout: float = 5.0, times: int = 1, verify: Any = True) -> list[requests.Response]:
    s, adapter = session()

    async def run() -> list[requests.Response]:
        return [await adapter.asend(_prepare(s, method, url, {}), timeout=(timeout, timeout), verify=verify)
                for _ in range(times)]

    return asyncio.run(run())


def body_of(resp: requests.Response) -> bytes:
    return b"".join(resp.iter_content(65536))


def fixed(status: int, body: bytes, *fields: str, close: bool = False) -> Script:
    head = f"HTTP/1.1 {status} X\r\n" + "".join(f"{f}\r\n" for f in fields)
    return lambda _: ((head + "\r\n").encode() + body, close)


GZIPPED = gzip.compress(b'{"a":1}')
FRAMINGS = {
    "content-length": fixed(200, b'{"a":1}', "Content-Length: 7", "Content-Type: application/json"),
    "chunked with an extension and a trailer": lambda _: (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\n{\"a\r\n4\r\n\":1}\r\n0\r\nX-T: 1\r\n\r\n", False),
    "close-delimited": fixed(200, b'{"a":1}', "Connection: close", close=True),
    "gzip although identity was asked for": fixed(
        200, GZIPPED, "Content-Encoding: gzip", f"Content-Length: {len(GZIPPED)}"),
}


@pytest.mark.parametrize("framing", FRAMINGS)
def test_every_framing_reads_the_same_body_on_the_thread_and_on_the_loop(serve, framing: str) -> None:
    server = serve(FRAMINGS[framing])
    url = f"{server.url}/v2/r/manifests/v1"
    thread, loop = on_thread(url), on_loop(url)[0]
    assert thread.status_code == loop.status_code == 200
    assert body_of(thread) == body_of(loop) == b'{"a":1}'
    assert loop.request.url == url


def test_the_loop_reads_past_an_interim_answer(serve) -> None:
    """http.client (and so urllib3) skips only 100 Continue; the loop skips every 1xx but 101."""
    server = serve(lambda _: (
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}", False))
    resp = on_loop(server.url + "/x")[0]
    assert resp.status_code == 200 and body_of(resp) == b'{"a":1}'


def test_repeated_fields_are_joined_and_names_are_case_insensitive(serve) -> None:
    server = serve(fixed(404, b"", "Content-Length: 0", "Link: <a>", "link: <b>", "WWW-Authenticate: Bearer x"))
    for resp in (on_thread(server.url + "/v2/"), on_loop(server.url + "/v2/")[0]):
        assert resp.status_code == 404
        assert resp.headers["LINK"] == "<a>, <b>"
        assert resp.headers["www-authenticate"] == "Bearer x"


def test_the_loop_sends_one_request_line_and_asks_for_identity(serve) -> None:
    server = serve(fixed(200, b"ok", "Content-Length: 2"))
    on_loop(server.url + "/v2/r/manifests/v1?ns=x", "HEAD")
    head = server.heads[0].decode()
    assert head.startswith("HEAD /v2/r/manifests/v1?ns=x HTTP/1.1\r\n")
    assert f"Host: {LOOPBACK}:{server.port}" in head and "Accept-Encoding: identity" in head


def test_a_line_break_in_a_header_never_reaches_the_wire(serve) -> None:
    server = serve(fixed(200, b"ok", "Content-Length: 2"))
    s, adapter = session()
    bad = _prepare(s, "GET", server.url + "/x", {"Accept": "a\r\nX-Injected: 1"}, own_url=True)
    with pytest.raises(requests.exceptions.InvalidHeader):
        asyncio.run(adapter.asend(bad, timeout=(5, 5)))
    assert server.heads == []


def test_a_head_answer_has_no_body_and_its_connection_is_kept(serve) -> None:
    server = serve(fixed(200, b"", "Content-Length: 1234"))
    first, second = on_loop(server.url + "/x", "HEAD", times=2)
    assert first.headers["Content-Length"] == "1234" and body_of(second) == b""
    assert server.connections == 1


@pytest.mark.parametrize("where", ["thread", "loop"])
def test_connections_are_kept_open_and_a_closed_one_is_replaced_once(serve, where: str) -> None:
    kept = serve(fixed(200, b"x", "Content-Length: 1"))
    # Answers without "Connection: close", then closes: the next request finds it closed.
    dropped = serve(fixed(200, b"x", "Content-Length: 1", close=True))
    for server, connections in ((kept, 1), (dropped, 3)):
        if where == "loop":
            answers = on_loop(server.url + "/x", times=3)
        else:
            s, adapter = session()
            answers = []
            for _ in range(3):
                answers.append(adapter.send(_prepare(s, "GET", server.url + "/x", {}), timeout=(5, 5)))
                time.sleep(0.05)  # the server's close arrives before the next request
        assert [body_of(a) for a in answers] == [b"x"] * 3
        assert server.connections == connections


def test_connection_close_and_http_1_0_are_not_kept(serve) -> None:
    closing = serve(fixed(200, b"x", "Content-Length: 1", "Connection: close"))
    assert [body_of(a) for a in on_loop(closing.url + "/x", times=2)] == [b"x", b"x"]
    assert closing.connections == 2
    old = serve(lambda _: (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", False))
    assert [body_of(a) for a in on_loop(old.url + "/x", times=2)] == [b"x", b"x"]
    assert old.connections == 2


def test_an_answer_over_the_limit_is_cut_there_for_the_callers_size_check(serve) -> None:
    big = b"x" * (WHOLE_BODY_LIMIT + 100)
    server = serve(fixed(200, big, f"Content-Length: {len(big)}"))
    for resp in (on_thread(server.url + "/x"), on_loop(server.url + "/x")[0]):
        assert len(body_of(resp)) == WHOLE_BODY_LIMIT + 1


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"NOT-HTTP\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n bad: folded\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_a_broken_answer_is_a_connection_error_on_the_loop(serve, answer: bytes) -> None:
    server = serve(lambda _: (answer, True))
    with pytest.raises(requests.ConnectionError):
        on_loop(server.url + "/x")


def test_a_slow_answer_times_out_and_a_closed_port_is_refused(serve) -> None:
    server = serve(lambda _: (time.sleep(1.5), (b"", True))[1])
    with pytest.raises(requests.ReadTimeout):
        on_loop(server.url + "/x", timeout=0.3)
    with pytest.raises(requests.ReadTimeout):
        on_thread(server.url + "/x", timeout=0.3)
    closed = f"http://{LOOPBACK}:{free_port()}/x"
    with pytest.raises(requests.ConnectionError):
        on_loop(closed)
    with pytest.raises(requests.ConnectionError):
        on_thread(closed)


def test_tls_is_verified_against_the_trusted_certificates_on_both_pools(serve, tmp_path: Path) -> None:
    """A registry is HTTPS (ACR is): the certificate is checked, by default against certifi's
    bundle as `requests` does, or against the file `verify` names."""
    key, cert = self_signed("lifec test registry", ip=LOOPBACK)
    (tmp_path / "server.pem").write_text(pem_of(key, cert))
    (tmp_path / "ca.pem").write_text(pem_of(key, cert).split("-----END PRIVATE KEY-----\n", 1)[1])
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "server.pem")
    server = serve(fixed(200, b'{"a":1}', "Content-Length: 7"), tls)
    url = f"{server.url}/v2/r/manifests/v1"
    ca = str(tmp_path / "ca.pem")
    assert body_of(on_thread(url, verify=ca)) == body_of(on_loop(url, verify=ca, times=2)[1]) == b'{"a":1}'
    assert server.connections == 2  # one per pool: the loop's second request reused its own
    for send in (on_thread, on_loop):
        with pytest.raises(requests.exceptions.SSLError):
            send(url)  # a self-signed certificate is not in certifi's bundle


def test_a_cancelled_lookup_closes_its_connection(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve(lambda _: (time.sleep(0.5), (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", False))[1])
    s, adapter = session()
    # Every connection stays referenced, so only the wire's own close can end it (not the GC).
    opened: list[wire.LoopConnection] = []
    original = wire.LoopConnection.__init__

    def keep(self: wire.LoopConnection, *args: Any) -> None:
        original(self, *args)
        opened.append(self)

    monkeypatch.setattr(wire.LoopConnection, "__init__", keep)

    async def run() -> tuple[int, int, int]:
        task = asyncio.ensure_future(adapter.asend(_prepare(s, "GET", server.url + "/x", {}), timeout=(5, 5)))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.8)  # the server has answered and reads the connection's end
        closed = server.closed
        wire = adapter._loop_wire
        assert wire is not None
        idle = sum(len(v) for v in wire._idle.values())
        resp = await adapter.asend(_prepare(s, "GET", server.url + "/x", {}), timeout=(5, 5))
        return closed, idle, len(resp.content)

    closed, idle, size = asyncio.run(run())
    assert closed == 1, "the cancelled lookup left its connection open"
    assert idle == 0 and size == 1
    assert server.connections == 2 == len(opened)  # the cancelled one was not reused mid-answer
