"""What the addons/core/mitm package assumes of mitmproxy's internals, pinned against the installed mitmproxy.

Each assumption is checked twice where it can be: in mitmproxy's own source or objects (so an
upgrade that changes it fails here, naming what to revisit) and through the function of
addons/core/mitm/ that relies on it (so the function does what its name says).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Sequence
from typing import Any

import mitmproxy.types
from mitmproxy import addonmanager, command, flow, http
from mitmproxy.addons import proxyserver as mproxyserver
from mitmproxy.addons.save import Save
from mitmproxy.proxy import layers, mode_servers
from mitmproxy.proxy import server as mserver
from mitmproxy.proxy import server_hooks
from mitmproxy.test import taddons, tflow

from addons.core.mitm.handoff import abort_server_connection, client_has_unsent_bytes
from addons.core.mitm.loop import BUFFER_LIMIT, ReadSize, enlarge_reads, run
from addons.core.mitm.master import (
    UNUSED_DEFAULT_ADDONS, SaveCopies, flows_the_writer_holds, mirror_master, put_first_in_chain, swap_addon_class,
)

# --- the connection table: proxyserver.connections[client.id].transports[connection] --------------


class _Handler:
    def __init__(self, transports: dict[Any, Any]) -> None:
        self.transports = transports


class _ProxyServer:
    name = "proxyserver"

    def __init__(self) -> None:
        self.connections: dict[Any, Any] = {}


def test_mitmproxy_keeps_each_connection_reader_and_writer_in_a_table_by_client_id() -> None:
    """If an upgrade changes these, ReadSize, the stall cut and its backlog check stop working."""
    assert "register_connection(handler.layer.context.client.id" in inspect.getsource(mode_servers)
    assert "self.connections[connection_id] = handler" in inspect.getsource(mproxyserver.Proxyserver.register_connection)
    source = inspect.getsource(mserver.ConnectionHandler.open_connection)
    assert "self.transports[command.connection] = ConnectionIO(" in source
    client_side = inspect.getsource(mserver.LiveConnectionHandler.__init__)
    assert "self.transports[client] = ConnectionIO(" in client_side
    assert {f for f in mserver.ConnectionIO.__dataclass_fields__} == {"handler", "reader", "writer"}


def test_mitmproxy_reads_64k_per_event_and_calls_server_connected_before_reading() -> None:
    """If an upgrade changes these, ReadSize may stop working: revisit addons/core/mitm/loop.py."""
    assert "reader.read(65535)" in inspect.getsource(mserver.ConnectionHandler.handle_connection)
    source = inspect.getsource(mserver.ConnectionHandler.open_connection)
    assert source.index("ServerConnectedHook") < source.index("await self.handle_connection(")


def test_mitmproxy_reads_upstream_only_once_its_writers_drained() -> None:
    """Why a quiet upstream is not stalled while the client still has bytes queued."""
    source = inspect.getsource(mserver.ConnectionHandler.handle_connection)
    assert source.index("reader.read(65535)") < source.index("await self.drain_writers()")


def test_enlarged_reader_returns_the_whole_buffer_up_to_the_read_size() -> None:
    async def go() -> tuple[int, int, int]:
        reader = asyncio.StreamReader()
        assert enlarge_reads(reader, size=1 << 20, limit=256 * 1024)
        assert not enlarge_reads(reader)  # once per reader
        reader.feed_data(b"x" * (700 * 1024))
        first = len(await reader.read(65535))
        reader.feed_data(b"y" * (3 << 20))
        second = len(await reader.read(65535))
        return first, second, reader._limit  # type: ignore[attr-defined]

    assert asyncio.run(go()) == (700 * 1024, 1 << 20, 256 * 1024)


def test_read_size_addon_enlarges_the_upstream_reader_of_a_live_connection() -> None:
    async def go() -> tuple[bool, bool]:
        ps, addon = _ProxyServer(), ReadSize()
        with taddons.context(ps, addon):
            data = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
            reader = asyncio.StreamReader()
            ps.connections[data.client.id] = _Handler({data.server: mserver.ConnectionIO(reader=reader)})
            addon.server_connected(data)
            # Unknown connections (e.g. already gone) are left alone.
            other = server_hooks.ServerConnectionHookData(server=tflow.tserver_conn(), client=tflow.tclient_conn())
            addon.server_connected(other)
            return "read" in vars(reader), reader._limit == BUFFER_LIMIT  # type: ignore[attr-defined]

    assert asyncio.run(go()) == (True, True)


def test_run_uses_uvloop_when_it_is_installed() -> None:
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = run(loop_module())
    try:
        import uvloop  # noqa: F401
    except ImportError:
        assert module.startswith("asyncio")
    else:
        assert module.startswith("uvloop")


def test_a_client_backlog_and_an_upstream_cut_are_found_through_the_connection_table() -> None:
    """Real loopback sockets stand for the client's and the upstream's connection."""

    async def go() -> tuple[bool, bool, bool, bool, bool]:
        peers: list[asyncio.StreamWriter] = []

        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peers.append(writer)  # never reads: what is sent to it stays queued

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, to_client = await asyncio.open_connection("127.0.0.1", port)
        _, to_upstream = await asyncio.open_connection("127.0.0.1", port)
        flow = tflow.tflow()
        ps = _ProxyServer()
        with taddons.context(ps):
            unknown = client_has_unsent_bytes(flow), abort_server_connection(flow)
            ps.connections[flow.client_conn.id] = _Handler({
                flow.client_conn: mserver.ConnectionIO(writer=to_client),
                flow.server_conn: mserver.ConnectionIO(writer=to_upstream),
            })
            idle = client_has_unsent_bytes(flow)
            to_client.write(b"x" * (64 << 20))  # more than the socket buffers take
            backlogged = client_has_unsent_bytes(flow)
            cut = abort_server_connection(flow) and to_upstream.transport.is_closing()
        to_client.transport.abort()
        for w in peers:
            w.close()
        server.close()
        await server.wait_closed()
        return unknown[0], unknown[1], idle, backlogged, cut

    assert asyncio.run(go()) == (False, False, False, True, True)


# --- the addon chain: hooks run in AddonManager.chain order --------------------------------------


class _Probe:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    def response(self, flow: http.HTTPFlow) -> None:
        self.calls.append(self.name)


def test_mitmproxy_runs_hooks_in_chain_order_and_add_only_appends() -> None:
    """If an upgrade changes these, put_first_in_chain no longer puts the scrubbers ahead of save."""
    assert "for i in self.chain:" in inspect.getsource(addonmanager.AddonManager.trigger_event)
    assert "self.chain.append(" in inspect.getsource(addonmanager.AddonManager.add)
    assert "self.lookup.get(name" in inspect.getsource(addonmanager.AddonManager.get)


def test_put_first_in_chain_runs_the_addon_before_the_built_in_ones_once() -> None:
    calls: list[str] = []
    builtin = _Probe("builtin", calls)
    with taddons.context(builtin) as tctx:
        assert put_first_in_chain(tctx.master, _Probe("token", calls))
        assert put_first_in_chain(tctx.master, _Probe("record", calls), after="token")
        assert not put_first_in_chain(tctx.master, _Probe("token", calls))  # once by name
        tctx.master.addons.trigger(layers.http.HttpResponseHook(tflow.tflow(resp=True)))
    assert calls[-3:] == ["token", "record", "builtin"] and calls.count("token") == 1


def test_mitmproxy_save_holds_unfinished_flows_and_writes_them_in_done() -> None:
    """If an upgrade changes these, the token scrubber's `done` no longer reaches unfinished flows."""
    assert "self.active_flows" in inspect.getsource(Save.__init__)
    assert "for f in self.active_flows" in inspect.getsource(Save.done)
    flow = tflow.tflow()
    save = Save()
    with taddons.context(save) as tctx:
        save.active_flows.add(flow)
        assert flows_the_writer_holds(tctx.master) == [flow]
    with taddons.context() as tctx:
        assert flows_the_writer_holds(tctx.master) == []  # no writer at all


def test_swap_addon_class_keeps_the_object_and_its_commands_follow() -> None:
    calls: list[str] = []

    class LoudSave(Save):
        @command.command("save.file")
        def save(self, flows: Sequence[flow.Flow], path: mitmproxy.types.Path) -> None:
            calls.append(path)

    assert not hasattr(Save, "__slots__")  # an instance's class can be assigned
    save = Save()
    with taddons.context(save) as tctx:
        assert swap_addon_class(tctx.master, "save", LoudSave)
        assert not swap_addon_class(tctx.master, "save", LoudSave)  # already one
        assert not swap_addon_class(tctx.master, "nothing", LoudSave)
        assert tctx.master.addons.get("save") is save and type(save) is LoudSave
        tctx.master.commands.call("save.file", [], "x.mitm")  # the command is the new method
    assert calls == ["x.mitm"]


def test_save_copies_rewrites_only_what_save_does_with_the_state_it_reads() -> None:
    """SaveCopies re-implements Save.save_flow and Save.done over Save's own attributes: if an
    upgrade changes those methods, revisit SaveCopies in addons/core/mitm/master.py."""
    save_flow = inspect.getsource(Save.save_flow)
    for line in ("if not self.stream:", "self.maybe_rotate_to_new_file()", "self.stream.add(flow)",
                 "self.active_flows.discard(flow)", "sys.exit(1)"):
        assert line in save_flow, line
    done = inspect.getsource(Save.done)
    for line in ("for f in self.active_flows:", "self.stream.add(f)", "self.active_flows.clear()",
                 "self.current_path = None", "self.stream.fo.close()", "self.stream = None"):
        assert line in done, line
    assert "def save_flow(self, flow: flow.Flow) -> None:" in save_flow


def test_save_copies_writes_the_copy_and_leaves_the_flow(tmp_path: Any) -> None:
    from mitmproxy import io as mio

    class Marked(SaveCopies):
        def copy_for_file(self, f: flow.Flow) -> flow.Flow:
            out = f.copy()
            out.comment = "copy"
            return out

    save = Save()
    with taddons.context(save) as tctx:
        assert swap_addon_class(tctx.master, "save", Marked)
        tctx.configure(save, save_stream_file=str(tmp_path / "a.mitm"))
        done, open_ = tflow.tflow(resp=True), tflow.tflow()
        save.response(done)
        save.request(open_)  # still open at shutdown: written by done()
        tctx.master.commands.call("save.file", [done], str(tmp_path / "b.mitm"))
        save.done()
    assert done.comment == "" and open_.comment == ""
    for name, count in (("a.mitm", 2), ("b.mitm", 1)):
        with open(tmp_path / name, "rb") as fo:
            flows = list(mio.FlowReader(fo).stream())
        assert [f.comment for f in flows] == ["copy"] * count, name


# --- the mirror's master: mitmdump's addons less the ones a registry mirror never uses ----------


def test_the_mirror_master_leaves_out_only_default_addons_that_exist_and_keeps_what_it_needs() -> None:
    from mitmproxy import addons as builtin
    from mitmproxy import options

    defaults = {type(a).__name__ for a in builtin.default_addons()}
    assert UNUSED_DEFAULT_ADDONS <= defaults, UNUSED_DEFAULT_ADDONS - defaults

    async def build() -> set[str]:
        master = mirror_master(options.Options())
        return {type(a).__name__ for a in master.addons.chain}

    chain = asyncio.run(build())
    assert not chain & UNUSED_DEFAULT_ADDONS
    needed = {"Core", "Block", "ProxyAuth", "Proxyserver", "NextLayer", "TlsConfig", "Save", "ScriptLoader",
              "DisableH2C", "UpdateAltSvc", "ErrorCheck", "TermLog"}
    assert needed <= chain, needed - chain


def test_the_mirror_master_sends_log_records_to_the_terminal_but_not_as_add_log_events() -> None:
    """mitmproxy turns every log record into the deprecated `add_log` event through a root
    handler that Master keeps in `_legacy_log_events`; the mirror's master removes it, and no
    addon it runs (mitmproxy's or ours) handles `add_log`."""
    import logging

    from mitmproxy import log, options

    async def build() -> tuple[list[logging.Handler], list[Any]]:
        master = mirror_master(options.Options())
        assert isinstance(master._legacy_log_events, log.LegacyLogEvents)
        handlers = list(logging.getLogger().handlers)
        chain = list(master.addons.chain)
        master._termlog_addon.uninstall()
        return handlers, chain

    handlers, chain = asyncio.run(build())
    assert not any(isinstance(h, log.LegacyLogEvents) for h in handlers)
    assert any(type(h).__name__ == "TermLogHandler" for h in handlers)
    assert not [type(a).__name__ for a in chain if hasattr(a, "add_log")]
