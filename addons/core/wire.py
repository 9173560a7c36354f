"""Small upstream answers read whole over kept-open connections: the mirror's `requests` transport.

A warm manifest lookup is one small GET upstream, and its cost is on every tag pull. Measured
per GET on this machine: `requests` with urllib3 1.6 ms of CPU, urllib3 alone 0.8 ms,
`http.client` on a kept-open connection 0.4 ms, h11 over asyncio streams 0.5 ms, a plain
reader over asyncio streams 0.15-0.35 ms. So the mirror's session keeps `requests`'
interface (one place for timeouts, hooks and errors) and its adapter:

- answers a request sent with `stream=False` (manifest, referrer, tag list and blob HEAD
  requests from a worker thread) from a pool of `http.client` connections, reading the body
  whole, at most `WHOLE_BODY_LIMIT` bytes;
- answers `asend` (a warm tag lookup, addons.proxy.upstream.asend) on the event loop, with no
  thread hop, from a pool of asyncio connections (`LoopWire`);
- sends streamed requests (blob bodies) through `requests`' own urllib3 adapter.

Answers have the shape `requests` gives, with the body in memory; the offline transport
(addons.core.offline) answers both `send` and `asend` the same way.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import os
import socket
import ssl
import threading
import zlib
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.structures import CaseInsensitiveDict
from requests.utils import DEFAULT_CA_BUNDLE_PATH

#: A small answer larger than this is cut here and its connection closed: the caller's own
#: size check (4 MiB for manifests and referrer indexes) then refuses it.
WHOLE_BODY_LIMIT = 8 * 1024 * 1024
#: Idle connections kept per upstream origin.
IDLE_PER_ORIGIN = 16
#: Only these go over kept-open connections: repeating one on a fresh connection, after a
#: kept-open one turned out closed by the server, is always safe.
IDEMPOTENT = frozenset({"GET", "HEAD"})

Headers = Mapping[str, str] | Sequence[tuple[str, str]]


def whole_response(adapter: requests.adapters.HTTPAdapter, request: requests.PreparedRequest,
                   status: int, headers: Headers, body: bytes, reason: str | None = None) -> requests.Response:
    """A `requests` answer whose body is already in memory, as urllib3 would have streamed it
    (a short body under a longer Content-Length still fails to read, as on the wire)."""
    raw = urllib3.HTTPResponse(
        body=io.BytesIO(body),
        headers=headers,
        status=status,
        reason=reason,
        preload_content=False,
        decode_content=False,
        request_method=request.method,
    )
    return adapter.build_response(request, raw)


def in_memory_response(request: requests.PreparedRequest, status: int, reason: str,
                       fields: Sequence[tuple[str, str]], body: bytes) -> requests.Response:
    """A `requests` answer whose body is read already (`content`; `raw` is None), built without
    urllib3: half the CPU of `whole_response`. Repeated fields are joined with ", ", as urllib3 does."""
    resp = requests.Response()
    headers = CaseInsensitiveDict()
    for name, value in fields:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    resp.status_code, resp.reason, resp.headers = status, reason, headers
    resp._content, resp._content_consumed = body, True
    resp.url, resp.request = request.url or "", request
    resp.encoding = requests.utils.get_encoding_from_headers(headers)
    return resp


def origin(url: Any) -> tuple[str, str, int]:
    """(scheme, host, port) of a split http(s) URL: what a kept-open connection is for."""
    scheme = url.scheme.lower()
    if scheme not in ("http", "https") or not url.hostname:
        raise requests.exceptions.InvalidURL(f"cannot send to {url.geturl()}")
    return scheme, url.hostname, url.port or (443 if scheme == "https" else 80)


def _timeouts(timeout: Any) -> tuple[float | None, float | None]:
    if isinstance(timeout, tuple):
        return timeout[0], timeout[1]
    return timeout, timeout


class WireAdapter(requests.adapters.HTTPAdapter):
    """`requests`' adapter, with `stream=False` GETs and HEADs answered over kept-open connections."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._contexts: dict[Any, ssl.SSLContext] = {}
        self._loop_wire: LoopWire | None = None

    async def asend(self, request: requests.PreparedRequest, timeout: Any = None, verify: Any = True) -> requests.Response:
        """`send(stream=False)` on the event loop: the same answer, with no thread."""
        loop = asyncio.get_running_loop()
        if self._loop_wire is None or self._loop_wire.loop is not loop:
            self._loop_wire = LoopWire(loop, self._context)
        status, reason, fields, body = await self._loop_wire.send(request, timeout, verify)
        return in_memory_response(request, status, reason, fields, body)

    def send(self, request: requests.PreparedRequest, stream: bool = False, timeout: Any = None,
             verify: Any = True, cert: Any = None, proxies: Any = None) -> requests.Response:
        if stream or cert or proxies or request.method not in IDEMPOTENT or request.body:
            return super().send(request, stream=stream, timeout=timeout, verify=verify, cert=cert, proxies=proxies)
        return self._send_whole(request, timeout, verify)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        if self._loop_wire is not None:
            self._loop_wire.close()
        super().close()

    def _send_whole(self, request: requests.PreparedRequest, timeout: Any, verify: Any) -> requests.Response:
        key = origin(urlsplit(request.url or ""))
        connect, read = _timeouts(timeout)
        headers = dict(request.headers)
        for attempt in (0, 1):
            conn, reused = self._take(key, connect, verify)
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(read)
                conn.request(request.method or "GET", request.path_url, headers=headers)
                if conn.sock is not None:
                    conn.sock.settimeout(read)
                resp = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server had closed the kept-open connection: once more, fresh
                raise requests.ConnectionError(e, request=request) from None
            except socket.timeout as e:  # TimeoutError
                kind = requests.ConnectTimeout if conn.sock is None else requests.ReadTimeout
                conn.close()
                raise kind(e, request=request) from None
            except ssl.SSLError as e:
                conn.close()
                raise requests.exceptions.SSLError(e, request=request) from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise requests.ConnectionError(e, request=request) from None
            return self._answer(key, conn, resp, request)
        raise AssertionError("unreachable")

    def _answer(self, key: tuple[str, str, int], conn: http.client.HTTPConnection,
                resp: http.client.HTTPResponse, request: requests.PreparedRequest) -> requests.Response:
        headers = resp.getheaders()
        keep = False
        try:
            body = resp.read(WHOLE_BODY_LIMIT + 1)
            keep = resp.isclosed() and not resp.will_close and len(body) <= WHOLE_BODY_LIMIT
        except http.client.IncompleteRead as e:
            body = e.partial
        except socket.timeout as e:
            conn.close()
            raise requests.ReadTimeout(e, request=request) from None
        except (OSError, http.client.HTTPException):
            body = b""
        if keep:
            self._give(key, conn)
        else:
            conn.close()
        if len(body) > WHOLE_BODY_LIMIT:  # cut on purpose: the body read is all there is
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        return whole_response(self, request, resp.status, headers, body, resp.reason)

    def _take(self, key: tuple[str, str, int], connect: float | None, verify: Any) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            conn = idle.pop() if idle else None
        if conn is not None:
            return conn, True
        scheme, host, port = key
        if scheme == "https":
            return http.client.HTTPSConnection(host, port, timeout=connect, context=self._context(verify)), False
        return http.client.HTTPConnection(host, port, timeout=connect), False

    def _give(self, key: tuple[str, str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < IDLE_PER_ORIGIN:
                idle.append(conn)
                return
        conn.close()

    def _context(self, verify: Any) -> ssl.SSLContext:
        """requests' TLS rules: certifi's bundle, or the file or folder `verify` names, or none."""
        with self._lock:
            ctx = self._contexts.get(verify)
            if ctx is None:
                ctx = ssl.create_default_context()
                if verify is False:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                else:
                    where = DEFAULT_CA_BUNDLE_PATH if verify is True else str(verify)
                    if os.path.isdir(where):
                        ctx.load_verify_locations(capath=where)
                    else:
                        ctx.load_verify_locations(cafile=where)
                self._contexts[verify] = ctx
            return ctx


class LoopConnection:
    """One kept-open connection of the event loop's pool."""

    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class ProtocolError(Exception):
    """An upstream answer that is not HTTP/1.1 as RFC 9112 writes it."""


def parse_head(head: bytes) -> tuple[bytes, int, str, list[tuple[str, str]]]:
    """(version, status, reason, headers) of an answer's head (status line and fields, CRLF CRLF)."""
    lines = head[:-4].split(b"\r\n")
    try:
        version, code, *rest = lines[0].split(b" ", 2)
        status = int(code)
    except ValueError:
        raise ProtocolError(f"bad status line {lines[0][:80]!r}") from None
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not 100 <= status <= 999:
        raise ProtocolError(f"bad status line {lines[0][:80]!r}")
    fields: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or line[:1] in b" \t":
            raise ProtocolError(f"bad header line {line[:80]!r}")
        fields.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return version, status, (rest[0] if rest else b"").decode("latin-1"), fields


def _decoded(body: bytes, encoding: str) -> bytes:
    """A gzip or deflate body a server sent although asked for identity, at most the limit."""
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding[:40]}")
    wbits = 16 + zlib.MAX_WBITS if encoding != "deflate" else zlib.MAX_WBITS
    try:
        return zlib.decompressobj(wbits).decompress(body, WHOLE_BODY_LIMIT + 1)
    except zlib.error as e:
        raise ProtocolError(f"bad {encoding} body ({e})") from None


def _field(fields: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in fields if k.lower() == name]


class LoopWire:
    """The same small answers on the event loop, with no thread hop: for a warm tag lookup.

    HTTP/1.1 over asyncio streams, kept-open connections per origin; answers delimited by
    Content-Length, chunked or the connection's close, as RFC 9112 says. Parsed here rather
    than by h11: h11 costs 0.35 ms of CPU per answer on this machine, a third of what a warm
    lookup may add. Only the event loop's task calls it, so its pool needs no lock; `timeout`
    is for the whole answer, which is small.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: Any) -> None:
        #: Connections belong to the loop that opened them.
        self.loop = loop
        self._idle: dict[tuple[str, str, int], list[LoopConnection]] = {}
        self._tls = tls
        #: TLS contexts by `verify`, built in a thread: reading a CA bundle blocks.
        self._contexts: dict[Any, ssl.SSLContext] = {}

    async def send(self, request: requests.PreparedRequest, timeout: Any, verify: Any) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """(status, reason, headers, body); raises `requests` exceptions as the adapter does."""
        url = urlsplit(request.url or "")
        key = origin(url)
        connect, read = _timeouts(timeout)
        method = request.method or "GET"
        lines = [f"{method} {request.path_url} HTTP/1.1", f"Host: {url.netloc}"]
        lines += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() not in ("host", "accept-encoding")]
        lines.append("Accept-Encoding: identity")  # a small answer is not worth decoding
        if " " in request.path_url or any("\r" in line or "\n" in line for line in lines):
            raise requests.exceptions.InvalidHeader(f"a line break or space in the request to {request.url}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        for attempt in (0, 1):
            conn, reused = await self._take(key, connect, verify, request)
            try:
                async with asyncio.timeout(read):
                    return await self._exchange(key, conn, method, data)
            except _Stale as e:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server had closed the kept-open connection: once more, fresh
                raise requests.ConnectionError(str(e), request=request) from None
            except TimeoutError as e:
                conn.close()
                raise requests.ReadTimeout(e, request=request) from None
            except ssl.SSLError as e:
                conn.close()
                raise requests.exceptions.SSLError(e, request=request) from None
            except (OSError, ProtocolError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                conn.close()
                raise requests.ConnectionError(f"{e.__class__.__name__}: {e}", request=request) from None
            except BaseException:  # cancelled (the client went away): the connection is mid-answer
                conn.close()
                raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    async def _exchange(self, key: tuple[str, str, int], conn: LoopConnection, method: str,
                        data: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        reader = conn.reader
        conn.writer.write(data)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as e:
                if not e.partial:
                    raise _Stale("upstream closed the connection") from None
                raise
            except (ConnectionResetError, BrokenPipeError):
                raise _Stale("upstream reset the connection") from None
            version, status, reason, fields = parse_head(head)
            if status == 101:
                raise ProtocolError("101 Switching Protocols to a request that asked for no upgrade")
            if not 100 <= status < 200:
                break  # an interim answer (100 Continue, 103 Early Hints) is followed by the real one
        keep = version == b"HTTP/1.1" and not any("close" in v.lower() for v in _field(fields, "connection"))
        chunked = any("chunked" in v.lower() for v in _field(fields, "transfer-encoding"))
        lengths = {v for v in _field(fields, "content-length")}
        if method == "HEAD" or status in (204, 304):
            body = b""
        elif chunked:
            body = await self._chunked(reader)
        elif lengths:
            if len(lengths) > 1:
                raise ProtocolError("conflicting Content-Length")
            length = int(lengths.pop())
            if length < 0:
                raise ProtocolError("negative Content-Length")
            if length > WHOLE_BODY_LIMIT:
                body, keep = await reader.readexactly(WHOLE_BODY_LIMIT + 1), False  # the caller's size check refuses it
            else:
                body = await reader.readexactly(length)
        else:  # delimited by the close
            body, keep = b"", False
            while len(body) <= WHOLE_BODY_LIMIT and (more := await reader.read(WHOLE_BODY_LIMIT + 1 - len(body))):
                body += more
        encoding = ",".join(_field(fields, "content-encoding")).strip().lower()
        if encoding and encoding != "identity" and body:
            body = _decoded(body, encoding)
            fields = [(k, v) for k, v in fields if k.lower() not in ("content-encoding", "content-length")]
        idle = self._idle.setdefault(key, [])
        if keep and len(idle) < IDLE_PER_ORIGIN:
            idle.append(conn)
        else:
            conn.close()
        return status, reason, fields, body

    @staticmethod
    async def _chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            n = int(line.split(b";", 1)[0].strip(), 16)
            if n == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass  # trailer fields
                return b"".join(parts)
            size += n
            if size > WHOLE_BODY_LIMIT:
                raise ProtocolError(f"chunked answer larger than {WHOLE_BODY_LIMIT} bytes")
            chunk = await reader.readexactly(n + 2)
            if chunk[-2:] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            parts.append(chunk[:-2])

    async def _take(self, key: tuple[str, str, int], connect: float | None, verify: Any,
                    request: requests.PreparedRequest) -> tuple[LoopConnection, bool]:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                return conn, True
            conn.close()
        scheme, host, port = key
        tls = None
        if scheme == "https":
            tls = self._contexts.get(verify)
            if tls is None:
                tls = self._contexts[verify] = await asyncio.to_thread(self._tls, verify)
        try:
            async with asyncio.timeout(connect):
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls is not None else None,
                )
        except TimeoutError as e:
            raise requests.ConnectTimeout(e, request=request) from None
        except ssl.SSLError as e:
            raise requests.exceptions.SSLError(e, request=request) from None
        except OSError as e:
            raise requests.ConnectionError(e, request=request) from None
        return LoopConnection(reader, writer), False


class _Stale(Exception):
    """A kept-open connection the server had closed: no answer began on it."""
