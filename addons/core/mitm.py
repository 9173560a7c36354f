"""Everything the mirror does that leans on mitmproxy 11.0's internals, in one module.

Each function here relies on something mitmproxy does not promise as API; tests/test_mitm_internals.py
pins every such assumption against the installed mitmproxy, so that an upgrade that changes one
fails a test instead of silently losing speed, a scrubbed flow file, or a stall cut.

* The addon chain: `put_first_in_chain` puts an addon ahead of the built-in ones (hooks run in
  `AddonManager.chain` order, and `add` only appends), so that the credential scrubbers run before
  `save` writes and mitmweb shows a flow; `swap_addon_class` gives a built-in addon (the flow
  writer `save`) a subclass of its own class in place, keeping its place, open file and options.
* The flow writer: `SaveCopies` is mitmproxy's `Save` writing a copy of each flow that a
  subclass makes (`-w`, mitmweb's and the console's save); it re-implements Save's writing
  methods over Save's own state, and `flows_the_writer_holds` reads that state too.
* The connection table: `client_has_unsent_bytes` and `abort_server_connection` look a flow's
  connections up in the `proxyserver` addon's `connections` (the table mitmproxy's own `inject`
  commands use) and its handler's `transports`, to tell a stalled upstream from a slow client and
  to cut the upstream of a stalled blob.
* Streaming speed, below.

Where the time goes when blobs stream (py-spy over `acr mirror start` streaming a 1 GiB blob,
scripts/bench): the mirror's own addons do no per-chunk work (a streamed response is
`stream = True`, no callable), and logging is one line per request. What costs is mitmproxy's
per-chunk path: every `reader.read(65535)` of an upstream connection becomes one `DataReceived`
event that walks the layer stack, h11's receive buffer and the client writer. About 4 s of CPU
per GiB on plain asyncio with 64 KiB chunks; 2 s with both adjustments below (each alone gives
~3 s).

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
stock behaviour.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import mitmproxy.types
from mitmproxy import command, ctx, flow, hooks, http
from mitmproxy.addons.save import Save
from mitmproxy.connection import Client, Connection
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


def enlarge_reads(reader: asyncio.StreamReader, size: int = READ_SIZE, limit: int = BUFFER_LIMIT) -> bool:
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
            enlarge_reads(reader, self.size, self.limit)


def upstream_reader(data: server_hooks.ServerConnectionHookData) -> object | None:
    """The reader mitmproxy's connection handler uses for `data.server`, if it can be found."""
    return getattr(_connection_io(data.client, data.server), "reader", None)


# --- the connection table ---------------------------------------------------------------------


def _connection_io(client: Client, conn: Connection) -> Any:
    """The `ConnectionIO` (reader, writer) of `conn` in the handler of `client`'s connection, or None."""
    proxyserver = ctx.master.addons.get("proxyserver")
    handler = getattr(proxyserver, "connections", {}).get(client.id)
    return getattr(handler, "transports", {}).get(conn)


def client_has_unsent_bytes(flow: http.HTTPFlow) -> bool:
    """Whether bytes for the client are still queued: mitmproxy then waits for the *client*
    (it reads upstream only once its writers drained), so a quiet upstream is not stalled."""
    io = _connection_io(flow.client_conn, flow.client_conn)
    transport = getattr(getattr(io, "writer", None), "transport", None)
    try:
        return transport is not None and transport.get_write_buffer_size() > 0
    except Exception:  # another transport type: assume the upstream is the one to watch
        return False


def abort_server_connection(flow: http.HTTPFlow) -> bool:
    """Cut the flow's upstream connection at once (the client then sees its transfer end short);
    False when mitmproxy has no such connection open."""
    writer = getattr(_connection_io(flow.client_conn, flow.server_conn), "writer", None)
    if writer is None:
        return False
    writer.transport.abort()
    return True


# --- the addon chain --------------------------------------------------------------------------


#: mitmdump's default addons that a registry mirror in reverse mode never uses: playback, the
#: onboarding app, DNS, header and body rewriting, cookies, HAR, export and the commands of the
#: console. Each addon in the chain costs time on every event of every request (mitmproxy walks
#: the whole chain for each of the ~11 events of a request): without these a warm manifest HEAD
#: costs about 1 ms less CPU. Their options are gone with them, so `--set anticache=true` is an
#: unknown option rather than a setting that silently does nothing.
UNUSED_DEFAULT_ADDONS = frozenset({
    "Browser", "StripDnsHttpsRecords", "AntiCache", "AntiComp", "ClientPlayback", "ServerPlayback",
    "CommandHistory", "Comment", "Cut", "Export", "Onboarding", "DnsResolver", "MapRemote", "MapLocal",
    "ModifyBody", "ModifyHeaders", "StickyAuth", "StickyCookie", "SaveHar", "UpstreamAuth",
})


def mirror_master(options: Any) -> Any:
    """mitmdump's master (`DumpMaster` without its flow printer) with only the addons a
    registry mirror uses; also without `--rfile` and `--keepserving`, which are about replays."""
    from mitmproxy import addons as builtin
    from mitmproxy.addons import errorcheck
    from mitmproxy.master import Master

    master = Master(options, with_termlog=True)
    # Every log record would also walk the addon chain as the `add_log` event, deprecated since
    # mitmproxy 9, that no addon of the mirror handles: about 0.2 ms per record.
    master._legacy_log_events.uninstall()
    master.addons.add(*[a for a in builtin.default_addons() if type(a).__name__ not in UNUSED_DEFAULT_ADDONS])
    master.addons.add(errorcheck.ErrorCheck())
    return master


def put_first_in_chain(master: Any, addon: Any, after: str = "") -> bool:
    """
    Put `addon` first in the master's addon chain, or second when the addon named `after` is
    first: hooks run in chain order, so it then sees every flow before the built-in addons that
    save or show it. Idempotent by name; no `load` is run (the addon must need none).
    """
    manager = master.addons
    if manager.get(addon.name) is not None:
        return False
    manager.lookup[addon.name] = addon
    at = 1 if after and manager.chain and getattr(manager.chain[0], "name", "") == after else 0
    manager.chain.insert(at, addon)
    return True


def swap_addon_class(master: Any, name: str, cls: type) -> bool:
    """
    Make the addon `name` an instance of `cls`, a subclass of its own class, in place: its place
    in the chain, its open files and its option state stay; only the methods `cls` overrides
    change. Its commands are bound methods, so they are collected again. False when there is no
    such addon, it already is a `cls`, or `cls` does not extend its class.
    """
    addon = master.addons.get(name)
    if addon is None or isinstance(addon, cls) or not issubclass(cls, type(addon)):
        return False
    addon.__class__ = cls
    master.commands.collect_commands(addon)
    return True


def flows_the_writer_holds(master: Any) -> list[http.HTTPFlow]:
    """The flows the built-in flow writer (`save`) has not written yet: it writes them in its
    own `done`, so a scrubber's `done` that runs first must reach them there."""
    save = master.addons.get("save")
    return [f for f in list(getattr(save, "active_flows", ())) if isinstance(f, http.HTTPFlow)]


class SaveCopies(Save):
    """
    mitmproxy's flow writer (the built-in `save` addon: `-w`, mitmweb's and the console's
    save), writing `copy_for_file(flow)` instead of each flow, so that the flow itself, which
    mitmproxy may still send, is never changed for the file's sake. Install it with
    `swap_addon_class(master, "save", Subclass)`.
    """

    def copy_for_file(self, f: flow.Flow) -> flow.Flow:
        """What the file gets for `f`; subclasses make their copy here."""
        return f

    def save_flow(self, flow: flow.Flow) -> None:  # type: ignore[override]
        if not self.stream:
            return
        copy = self.copy_for_file(flow)
        try:
            self.maybe_rotate_to_new_file()
            self.stream.add(copy)
        except OSError as e:
            # As Save: crash visibly rather than let traffic through unrecorded.
            import sys

            sys.stderr.write(f"Error while writing to {self.current_path}: {e}")
            sys.exit(1)
        else:
            self.active_flows.discard(flow)

    def done(self) -> None:
        if self.stream:
            for f in self.active_flows:
                self.stream.add(self.copy_for_file(f))
            self.active_flows.clear()
            self.current_path = None
            self.stream.fo.close()
            self.stream = None

    @command.command("save.file")
    def save(self, flows: Sequence[flow.Flow], path: mitmproxy.types.Path) -> None:
        """Save flows to a file, as the flow writer writes them. A leading + appends."""
        super().save([self.copy_for_file(f) for f in flows], path)


# --- mitmweb -------------------------------------------------------------------------------------

#: Served by the web UI and loaded by its page: tells the server which flow the UI shows when a
#: command runs, so `@focus` means the selected flow (mitmweb 11's page never tells it otherwise;
#: its URL fragment `#/flows/<id>/<tab>` is the selection, and fragments are never sent).
FOCUS_SCRIPT = """(function () {
  var send = window.fetch;
  window.fetch = function (input, init) {
    var url = typeof input === "string" ? input : (input && input.url) || "";
    var m = /^#\\/flows\\/([0-9a-f-]+)\\//.exec(window.location.hash);
    if (m && init && init.method === "POST" && /\\/commands\\/[a-z.]+$/.test(url)) {
      init.headers = Object.assign({}, init.headers, {"X-Acr-Focus": m[1]});
    }
    return send.call(this, input, init);
  };
})();
"""
FOCUS_SCRIPT_PATH = "/acr-focus.js"
FOCUS_HEADER = "X-Acr-Focus"


def streamed_note(flow: Any) -> str:
    """What Download answers for a body that was streamed (mitmproxy keeps no copy of it)."""
    streamed = ((getattr(flow, "metadata", {}) or {}).get("acr") or {}).get("streamed") or {}
    detail = ""
    if streamed:
        detail = f" ({streamed.get('bytes')} bytes in {streamed.get('seconds')} s from {streamed.get('source')})"
    return (f"This body was streamed to the client{detail} and was not kept: mitmproxy stores no copy of a "
            "streamed body, so there is nothing to download.\n")


def web_handlers(app: Any) -> int:
    """Adjust mitmweb 11's tornado routes for the mirror; returns how many routes were changed.

    - Download of a streamed body (no content kept) answers a plain note instead of a 500.
    - The page loads FOCUS_SCRIPT, and `POST /commands/<name>` moves the view's focus to the flow
      the page shows before the command runs, so `acr.why @focus` explains the selected flow.
    """
    import tornado.routing
    import tornado.web
    from mitmproxy.tools.web import app as webapp

    class StreamedContent(webapp.FlowContent):
        def get(self, flow_id: str, message: str) -> None:
            part = getattr(self.flow, message, None)
            streamed = ((getattr(self.flow, "metadata", {}) or {}).get("acr") or {}).get("streamed")
            # A body mitmproxy streamed is None; one written past its layers is empty here.
            if part is not None and (getattr(part, "raw_content", b"") is None
                                     or (message == "response" and streamed and not part.raw_content)):
                name = self.flow.request.path.split("?")[0].split("/")[-1] or "body"
                self.set_header("Content-Disposition", f"attachment; filename={re_name(name)}.streamed.txt")
                self.set_header("Content-Type", "text/plain; charset=utf-8")
                self.set_header("X-Content-Type-Options", "nosniff")
                self.write(streamed_note(self.flow))
                return
            super().get(flow_id, message)

    class FocusedCommand(webapp.ExecuteCommand):
        def post(self, cmd: str) -> None:
            flow_id = self.request.headers.get(FOCUS_HEADER)
            found = self.view.get_by_id(flow_id) if flow_id else None
            if found is not None:
                self.view.focus.flow = found
            super().post(cmd)

    class Index(webapp.IndexHandler):
        def get(self) -> None:
            assert self.xsrf_token  # sets the XSRF cookie, as mitmweb's own index does
            page = self.render_string("index.html").decode()
            tag = '<script src="static/app.js"></script>'
            self.write(page.replace(tag, f'<script src=".{FOCUS_SCRIPT_PATH}"></script>{tag}', 1))

    class FocusScript(webapp.RequestHandler):
        def get(self) -> None:
            self.set_header("Content-Type", "application/javascript")
            self.write(FOCUS_SCRIPT)

    replace = {webapp.FlowContent: StreamedContent, webapp.ExecuteCommand: FocusedCommand,
               webapp.IndexHandler: Index}
    changed = 0
    for host_rule in app.default_router.rules:
        router = host_rule.target
        if not isinstance(router, tornado.routing.RuleRouter):
            continue
        if any(rule.target is webapp.IndexHandler for rule in router.rules):
            router.add_rules([(FOCUS_SCRIPT_PATH, FocusScript)])
            changed += 1
        for rule in router.rules:
            if rule.target in replace:
                rule.target = replace[rule.target]
                changed += 1
    return changed


def re_name(name: str) -> str:
    """A file name safe in a Content-Disposition header."""
    import re

    return re.sub(r"[^-\w.]", "_", name)[:120]


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
