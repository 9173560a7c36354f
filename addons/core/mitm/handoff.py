"""The socket hand-off: a response body written to the client socket by the mirror itself,
and the connection table it and the stall watchdog use.

mitmproxy moves a streamed body chunk by chunk through its layers (one event, a layer walk
and several copies per read): at best ~0.45 of the wire on this kind of machine. A blob the
mirror fetched itself instead keeps its flow (request, status, headers, timestamps: what
mitmweb, flow files and /metrics see) while its *body* bypasses the layers:

1. the addon sets `flow.response` to the upstream's status and headers with an empty body
   and a real `Content-Length` (or `Transfer-Encoding: chunked`), and calls `hand_off` in
   `responseheaders`, which mitmproxy runs for an addon's response before writing it;
2. `hand_off` shadows the client `StreamWriter.write` of that connection (found through the
   `proxyserver` addon, as `upstream_reader` finds readers). mitmproxy's next write there is
   the response head (`Http1Server.send(ResponseHeaders)` is one `SendData`); it goes out
   unchanged, and every later write (the chunked terminator `0\\r\\n\\r\\n`, a next response) is
   held back;
3. once the head has left the transport's buffer, a thread writes the body to a `dup` of the
   client socket (`body(sock)`, blocking sendall: no event-loop work per chunk). Then, on the
   event loop, the held writes go out in order and `flow.response.timestamp_end` is set and an
   `update` hook lets mitmweb show the real duration. A body that returns False (or raises) is
   cut: the socket is shut down before its last byte and mitmproxy's transport aborted, so the
   client sees a broken transfer, never a success.

Only plain-TCP HTTP/1 client connections are handed off (a TLS or HTTP/2 connection frames
bytes itself): `can_hand_off` says so before the upstream request is made, and the caller
streams those through mitmproxy (addons.proxy.stream). tests/test_datapath_unit.py pins what this relies on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from mitmproxy import ctx, hooks, http
from mitmproxy.connection import Client, Connection

logger = logging.getLogger(__name__)



def connection_io(client: Client, conn: Connection) -> Any:
    """The `ConnectionIO` (reader, writer) of `conn` in the handler of `client`'s connection, or None."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client.id)
    return getattr(handler, "transports", {}).get(conn)


def client_has_unsent_bytes(flow: http.HTTPFlow) -> bool:
    """Whether bytes for the client are still queued: mitmproxy then waits for the *client*
    (it reads upstream only once its writers drained), so a quiet upstream is not stalled."""
    io = connection_io(flow.client_conn, flow.client_conn)
    transport = getattr(getattr(io, "writer", None), "transport", None)
    try:
        return transport is not None and transport.get_write_buffer_size() > 0
    except Exception:  # another transport type: assume the upstream is the one to watch
        return False


def abort_server_connection(flow: http.HTTPFlow) -> bool:
    """Cut the flow's upstream connection at once (the client then sees its transfer end short);
    False when mitmproxy has no such connection open."""
    writer = getattr(connection_io(flow.client_conn, flow.server_conn), "writer", None)
    if writer is None:
        return False
    writer.transport.abort()
    return True

#: Seconds a client may take to accept more of a handed-off body (mitmproxy's own idle limit).
CLIENT_SEND_TIMEOUT = 600.0
#: Hand-off tasks in flight (the loop keeps only weak references to tasks).
_tasks: set[asyncio.Task[None]] = set()


def client_io(flow: http.HTTPFlow) -> object | None:
    """The ConnectionIO (reader, writer) mitmproxy's handler keeps for the flow's client."""
    return connection_io(flow.client_conn, flow.client_conn)


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
