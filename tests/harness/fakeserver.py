"""A loopback HTTP server that tests control: it records every request and lets a handler answer.

As an upstream of the mirror it proves whether the mirror sent it anything at all (the default
handler answers 404), and it counts connections and streamed bytes for the fault tests.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from tests.harness.ports import LOOPBACK, direct_session


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.owner.lock:
            self.server.owner.connections += 1
            self.server.owner.open += 1

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass
        with self.server.owner.lock:
            self.server.owner.open -= 1

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _any(self) -> None:
        seen = Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(seen)
        try:
            owner.handler(self, seen)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_CONNECT = do_OPTIONS = _any

    def reply(self, status: int, body: bytes = b"", headers: Optional[dict[str, str]] = None,
              length: Optional[int] = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def json(self, status: int, obj: Any, headers: Optional[dict[str, str]] = None) -> None:
        self.reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def cut(self) -> None:
        """Drop the connection at once (no more bytes)."""
        self.close_connection = True
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def stream(self, size: int, chunk: bytes, headers: Optional[dict[str, str]] = None) -> None:
        """Send `size` bytes of `chunk` repeated, counting what went out; stops at a broken pipe."""
        owner = self.server.owner
        self.send_response(200)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if self.command == "HEAD":
            return
        with owner.lock:
            owner.streams += 1
        left = size
        try:
            while left > 0:
                piece = chunk[: min(len(chunk), left)]
                self.wfile.write(piece)
                left -= len(piece)
                with owner.lock:
                    owner.sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            with owner.lock:
                owner.broken += 1
            self.close_connection = True
        finally:
            with owner.lock:
                owner.streams -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: "Fake"


Handler = Callable[[_Handler, Seen], None]


class Fake:
    """A threaded HTTP/1.1 server on loopback that records requests and lets `handler` answer.

    It counts connections (`open` now, `connections` ever) and, for bodies sent with
    `h.stream()`, the streams in progress, the bytes sent and the streams cut by the peer.
    """

    def __init__(self, handler: Optional[Handler] = None) -> None:
        self.handler: Handler = handler or (lambda h, seen: h.json(404, {"errors": []}))
        self.lock = threading.Lock()
        self.requests: list[Seen] = []
        self.connections = self.open = self.streams = self.sent = self.broken = 0
        self._httpd = _Server((LOOPBACK, 0), _Handler)
        self._httpd.owner = self
        self.port = int(self._httpd.server_address[1])
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def seen(self, pattern: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.requests if pattern in s.path]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


#: Hop-by-hop headers and those a relay sets itself.
_HOP = {"host", "connection", "keep-alive", "transfer-encoding", "content-length", "accept-encoding"}


def relay(h: _Handler, seen: Seen, upstream: str, drop_auth: bool = False) -> None:
    """Pass a request to `upstream` and stream its answer back (a fake server that fronts a real one)."""
    headers = {k: v for k, v in seen.headers.items() if k not in _HOP and not (drop_auth and k == "authorization")}
    with direct_session() as s, s.request(seen.method, upstream + seen.path, headers=headers, allow_redirects=False,
                                          stream=True, timeout=30) as r:
        h.send_response(r.status_code)
        for k, v in r.headers.items():
            if k.lower() not in _HOP:
                h.send_header(k, v)
        length = r.headers.get("Content-Length")
        if length is None and seen.method != "HEAD":
            data = r.content
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        h.send_header("Content-Length", length or "0")
        h.end_headers()
        if seen.method != "HEAD":
            for chunk in r.iter_content(256 * 1024):
                h.wfile.write(chunk)
