"""Runtime tuning that lets mitmproxy 11.0 stream blobs at a useful fraction of the network's speed.

Where the time goes (py-spy over `acr mirror start` streaming a 1 GiB blob, scripts/bench): the
mirror's own addons do no per-chunk work (a streamed response is `stream = True`, no callable),
and logging is one line per request. What costs is mitmproxy's per-chunk path: every
`reader.read(65535)` of an upstream connection becomes one `DataReceived` event that walks the
layer stack, h11's receive buffer and the client writer. About 4 s of CPU per GiB on plain
asyncio with 64 KiB chunks; 2 s with both adjustments below (each alone gives ~3 s).

1. `run(main)`: run the mirror's event loop on uvloop when it is installed (plain asyncio
   otherwise). Faster transports and loop; nothing in mitmproxy's reverse mode needs the
   default loop.
2. `ReadSize`: an addon that makes each *upstream* connection read up to `READ_SIZE` (1 MiB)
   per event instead of 64 KiB. Mechanism, exactly: in its `server_connected` hook, which
   mitmproxy awaits after it stored the new connection's `ConnectionIO(reader, writer)` in the
   client's `ConnectionHandler.transports` and *before* `handle_connection` starts reading
   (mitmproxy/proxy/server.py, `open_connection`), it finds that `asyncio.StreamReader` through
   the `proxyserver` addon's `connections[client.id]` (the table mitmproxy's own `inject`
   commands use) and

   - shadows the instance's `read` with one that asks for `max(n, READ_SIZE)` bytes, and
   - raises the reader's `_limit` from 64 KiB to `BUFFER_LIMIT` (256 KiB). asyncio pauses the
     socket once more than 2 × limit bytes are buffered, so the buffer never exceeds
     512 KiB + one socket read (256 KiB) < READ_SIZE: every read takes the whole buffer and
     `del buffer[:n]` never has to move a remainder (with limit = 1 MiB it did, and uvloop
     plus 1 MiB reads got *slower* than either alone).

Why it is safe: it touches only upstream connections of this process; the only consumer of
that reader is `handle_connection`, which hands each chunk to the layers whatever its size
(h11 and the TLS layer take any size); back-pressure is unchanged (`drain_writers` after every
chunk, the transport paused above 2 × limit); memory is bounded per connection (≤ 768 KiB
buffered plus the chunk in flight, so RSS stays flat in blob size); and when mitmproxy's
internals are not what this expects (no `proxyserver`, no transport entry, a reader that is
not an `asyncio.StreamReader`, e.g. mitmproxy_rs streams) it does nothing, which is just the
stock behaviour. tests/test_datapath_unit.py pins the assumptions against the installed
mitmproxy, so an upgrade that changes them fails a test instead of silently losing speed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from mitmproxy import ctx, hooks, http
from mitmproxy.proxy import server_hooks

logger = logging.getLogger(__name__)

#: Bytes one upstream read may return (mitmproxy reads 65535).
READ_SIZE = 1 << 20
#: asyncio.StreamReader's limit for upstream readers (default 64 KiB; see the module docstring).
BUFFER_LIMIT = 256 * 1024

T = TypeVar("T")


def loop_factory() -> Any:
    """uvloop's loop factory when uvloop is installed, else None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def enlarge(reader: asyncio.StreamReader, size: int = READ_SIZE, limit: int = BUFFER_LIMIT) -> bool:
    """Make `reader.read(n)` return up to `size` bytes; False if it was already done."""
    if "read" in vars(reader):
        return False
    reader._limit = max(reader._limit, limit)  # type: ignore[attr-defined]
    class_read = type(reader).read

    async def read(n: int = -1) -> bytes:
        return await class_read(reader, size if 0 < n < size else n)

    reader.read = read  # type: ignore[method-assign]
    return True


class ReadSize:
    """Upstream connections read up to READ_SIZE bytes per event (see the module docstring)."""

    name = "acr-read-size"

    def __init__(self, size: int = READ_SIZE, limit: int = BUFFER_LIMIT) -> None:
        self.size = size
        self.limit = limit

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        reader = upstream_reader(data)
        if isinstance(reader, asyncio.StreamReader):
            enlarge(reader, self.size, self.limit)


def upstream_reader(data: server_hooks.ServerConnectionHookData) -> object | None:
    """The reader mitmproxy's connection handler uses for `data.server`, if it can be found."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(data.client.id)
    io = getattr(handler, "transports", {}).get(data.server)
    return getattr(io, "reader", None)


# -- hand-off: a response body written to the client socket by the mirror itself -------------
#
# mitmproxy moves a streamed body chunk by chunk through its layers (one event, a layer walk
# and several copies per read): at best ~0.45 of the wire on this kind of machine. A blob the
# mirror fetched itself instead keeps its flow (request, status, headers, timestamps: what
# mitmweb, flow files and /metrics see) while its *body* bypasses the layers:
#
# 1. the addon sets `flow.response` to the upstream's status and headers with an empty body
#    and a real `Content-Length` (or `Transfer-Encoding: chunked`), and calls `hand_off` in
#    `responseheaders`, which mitmproxy runs for an addon's response before writing it;
# 2. `hand_off` shadows the client `StreamWriter.write` of that connection (found through the
#    `proxyserver` addon, as `upstream_reader` finds readers). mitmproxy's next write there is
#    the response head (`Http1Server.send(ResponseHeaders)` is one `SendData`); it goes out
#    unchanged, and every later write (the chunked terminator `0\r\n\r\n`, a next response) is
#    held back;
# 3. once the head has left the transport's buffer, a thread writes the body to a `dup` of the
#    client socket (`body(sock)`, blocking sendall: no event-loop work per chunk). Then, on the
#    event loop, the held writes go out in order and `flow.response.timestamp_end` is set and an
#    `update` hook lets mitmweb show the real duration. A body that returns False (or raises) is
#    cut: the socket is shut down before its last byte and mitmproxy's transport aborted, so the
#    client sees a broken transfer, never a success.
#
# Only plain-TCP HTTP/1 client connections are handed off (a TLS or HTTP/2 connection frames
# bytes itself): `can_hand_off` says so before the upstream request is made, and the caller
# streams those through mitmproxy as before. tests/test_datapath_unit.py pins what this relies on.

#: Seconds a client may take to accept more of a handed-off body (mitmproxy's own idle limit).
CLIENT_SEND_TIMEOUT = 600.0
#: Hand-off tasks in flight (the loop keeps only weak references to tasks).
_tasks: set[asyncio.Task[None]] = set()


def client_io(flow: http.HTTPFlow) -> object | None:
    """The ConnectionIO (reader, writer) mitmproxy's handler keeps for the flow's client."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(flow.client_conn.id)
    return getattr(handler, "transports", {}).get(flow.client_conn)


def _client_socket(flow: http.HTTPFlow) -> tuple[Any, Any] | None:
    """(writer, socket object) of a plain-TCP client connection, or None."""
    io = client_io(flow)
    writer = getattr(io, "writer", None)
    transport = getattr(writer, "transport", None)
    if not isinstance(writer, asyncio.StreamWriter) or transport is None or transport.is_closing():
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(sock, "fileno"):
        return None
    return writer, sock


def abort_client(flow: http.HTTPFlow) -> bool:
    """Break the flow's client connection at once (no more bytes, no orderly end of the body)."""
    writer = getattr(client_io(flow), "writer", None)
    transport = getattr(writer, "transport", None)
    if transport is None:
        return False
    transport.abort()
    return True


def can_hand_off(flow: http.HTTPFlow) -> bool:
    """Whether the flow's client speaks plain HTTP/1 (no TLS): the connections `hand_off` serves.

    Decided from the flow alone, before any upstream request, so that an offline re-run of a
    recorded flow takes the path the live mirror took; `hand_off` itself still refuses (and its
    caller answers an error) when the live connection cannot be found.
    """
    return not flow.client_conn.tls and flow.request.http_version in ("HTTP/1.1", "HTTP/1.0")


def hand_off(
    flow: http.HTTPFlow,
    body: Callable[[socket.socket], bool],
    done: Callable[[bool], None] | None = None,
) -> bool:
    """Have `body(sock)` (in a thread) write the body of `flow.response` after mitmproxy wrote its head.

    Call in `responseheaders`. `body` returns True when it wrote the whole body; False (or an
    exception) cuts the connection. `done(ok)` runs on the event loop afterwards. Returns False
    (nothing changed) when the connection cannot be handed off.
    """
    try:
        found = _client_socket(flow) if can_hand_off(flow) else None
    except Exception:  # mitmproxy's internals are not what this expects
        found = None
    if found is None:
        return False
    writer, tsock = found
    loop = asyncio.get_running_loop()
    write = type(writer).write
    held: list[bytes] = []
    phase = ["head"]

    def finish(ok: bool) -> None:
        vars(writer).pop("write", None)
        transport = writer.transport
        if ok:
            for data in held:
                if not writer.is_closing():
                    write(writer, data)
        elif not transport.is_closing():
            transport.abort()
        if flow.response is not None:
            flow.response.timestamp_end = time.time()
        if done is not None:
            done(ok)
        try:
            ctx.master.addons.trigger(hooks.UpdateHook([flow]))
        except Exception:
            logger.debug("update hook failed", exc_info=True)

    def work(sock: socket.socket) -> None:
        ok = False
        try:
            sock.settimeout(CLIENT_SEND_TIMEOUT)
            ok = bool(body(sock))
        except Exception as e:
            logger.debug("handed-off body failed: %s", e)
        finally:
            if not ok:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # the client sees the transfer break off
                except OSError:
                    pass
            sock.close()
            try:
                loop.call_soon_threadsafe(finish, ok)
            except RuntimeError:  # the loop is gone: the mirror is stopping
                pass

    async def start() -> None:
        while writer.transport.get_write_buffer_size() and not writer.is_closing():
            await asyncio.sleep(0.001)
        try:
            sock = socket.socket(fileno=os.dup(tsock.fileno()))
        except OSError:
            finish(False)
            return
        threading.Thread(target=work, args=(sock,), name="acr-body", daemon=True).start()

    def shadow(data: bytes) -> None:
        if phase[0] == "head":
            phase[0] = "body"
            write(writer, data)
            task = loop.create_task(start())
            _tasks.add(task)
            task.add_done_callback(_tasks.discard)
        else:
            held.append(bytes(data))

    writer.write = shadow  # type: ignore[method-assign]
    return True
