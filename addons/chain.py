"""The mitmproxy addon that turns a runmd file into the chain of plugin addons.

`acr_addons.py` (for `mitmdump -s`) and `acr mirror start` both use this one class, so a
pipeline behaves the same however it is started. The children are ordinary addons: mitmweb
lists them, and mitmproxy calls their hooks in runmd order.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from collections.abc import Sequence

from mitmproxy import command, ctx, exceptions, flow, hooks

from addons import catalog
from addons.core.optioncheck import unknown_option
from addons.core.mitm.master import put_first_in_chain
from addons.runmd.compile import Compiled
from addons.proxy.context import read_record
from addons.proxy.plugin import ProxyPlugin
from addons.observe.endpoints import Endpoints
from addons.proxy.credentials_endpoint import CredentialsEndpoint
from addons.node.login_acr import LoginRefresh
from addons.node import hostswatch
from addons.node.listen import upstream_listens
from addons.observe import record  # flow files scrubbed of credentials
from addons.observe.logs import LogFormat  # acr_log_format: text or JSON lines
from addons.observe.metrics import Metrics  # GET /metrics
from addons.observe.replay import ReplayCheck  # decisions re-made offline over read flows
from addons.observe.probes import Probes  # GET /livez, /readyz
from addons.observe.service_notify import ServiceNotify  # READY, WATCHDOG, STOPPING to systemd
from addons.observe.tokenscrub import TokenScrub
from addons.proxy.front import Proxy
from addons.proxy.tail import ProxyTail
from addons.proxy.routes import Route
from addons.runmd.syntax import RunmdError, Step
from addons.proxy.stale import StaleStore
from addons.proxy.state import MirrorState, Settings
from addons.teleport.discover import TeleportShared

logger = logging.getLogger(__name__)


def build_state(compiled: Compiled, settings: Settings | None = None) -> MirrorState:
    """The shared state of one loaded runmd: its upstreams, in the order `.mirror` lists them."""
    upstreams = {}
    for _, step in compiled.document.steps("mirror"):
        upstream = compiled.config(step)
        upstreams.setdefault(upstream.ns.lower(), upstream)
    listens = {u.address.port: u.upstream.ns.lower() for u in upstream_listens(compiled)}
    state = MirrorState(home=compiled.home, upstreams=upstreams, settings=settings or Settings(), listen_upstreams=listens)
    state.teleport = TeleportShared.of(state, teleports=any(True for _ in compiled.document.steps("teleport")))
    return state


def build_addons(compiled: Compiled, state: MirrorState) -> list[Any]:
    """The proxy root's addon, each step's addon in runmd order, and the tail guard."""
    roots = list(compiled.document.roots("proxy"))
    if not roots:
        return []
    root = roots[0]
    if not state.upstreams:
        raise RunmdError(compiled.path, root.line, "no upstream: add ': .mirror HOST' under '+ .runtime'")
    routes: dict[str, tuple[Step, frozenset[str]]] = {}
    steps: list[Any] = []
    route: Step | None = None
    route_addon: Route | None = None
    for step in root.steps:
        cls = compiled.classes[step.id]
        assert issubclass(cls, ProxyPlugin)
        addon = cls(step, compiled.config(step), route if not issubclass(cls, Route) else step, state)
        if isinstance(addon, Route):
            route, route_addon = step, addon
            # The first route of a kind wins; a later duplicate would never see a flow.
            routes.setdefault(cls.route_kind, (step, compiled.config(step)))
        elif route_addon is not None:
            route_addon.steps.append(addon)
        steps.append(addon)
    # /auth and /status are answered ahead of the proxy root (which 404s non-/v2 paths);
    # `.login-acr` steps are refreshed while the mirror runs.
    probes = Probes(compiled, state)
    front: list[Any] = [CredentialsEndpoint(compiled, state), Endpoints(compiled, state), probes,
                        ServiceNotify(probes.heartbeat, root.input)]
    front += [LogFormat(), Metrics(state), ReplayCheck(compiled, state, offline_request_path)]
    if any(True for _ in compiled.document.steps("login-acr")):
        front.append(LoginRefresh(compiled))
    if any(True for _ in compiled.document.steps("host")):
        watch = hostswatch.HostsWatch(compiled)
        state.hosts_routing = watch.routing
        front.append(watch)
    return [*front, Proxy(root, compiled.config(root), routes, state), *steps, ProxyTail(state)]


class _Declared:
    """A loader that only notes the names of the options an addon declares."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def add_option(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.names.add(name)

    def add_command(self, *args: Any, **kwargs: Any) -> None:
        pass


def declared_options() -> set[str]:
    """The options the steps and the chain's own addons declare, whether a runmd has them or not:
    their `load` only declares options, so it runs on a bare instance."""
    declared = _Declared()
    classes = {cls for kind in catalog.plugins().values() for cls in kind.values()} | set(catalog.roots().values())
    classes |= {Endpoints, Metrics, ReplayCheck, LoginRefresh, hostswatch.HostsWatch}
    for cls in classes:
        if callable(getattr(cls, "load", None)):
            try:
                cls.load(cls.__new__(cls), declared)
            except AttributeError:
                pass
    return declared.names


def offline_request_path(compiled: Compiled, settings: Settings, session: Any, full: bool) -> list[Any]:
    """The request path again, for re-running recorded flows offline with a state of its own."""
    state = build_state(compiled, settings)
    state.use_session(session)
    chain = [a for a in build_addons(compiled, state) if isinstance(a, (Proxy, ProxyPlugin, ProxyTail))]
    return chain if full else [a for a in chain if isinstance(a, Proxy)]


class AcrMirror:
    """Declares the mirror's options and holds the plugin addons built from the runmd."""

    name = "acr"

    def __init__(self, compiled: Compiled | None = None) -> None:
        self.compiled = compiled
        self.loaded_path: str | None = None
        self.state: MirrorState | None = None
        self.addons: list[Any] = []
        #: Loaded by `mitmdump -s acr_addons.py` (no runmd given up front), not by `acr mirror start`.
        self.script = compiled is None
        self._refused = False
        if compiled is not None:
            self.state = build_state(compiled)
            self.addons = build_addons(compiled, self.state)
            self.loaded_path = str(Path(compiled.path).resolve())

    def load(self, loader) -> None:
        # First in the master's chain, ahead of the flow writer and mitmweb (see TokenScrub).
        if ctx.master.addons.get(TokenScrub.name) is None:
            put_first_in_chain(ctx.master, TokenScrub())
        record.install(ctx.master)  # `-w` and mitmweb's save write scrubbed copies
        loader.add_option("acr_runmd", str, "", "The mirror.runmd file whose pipeline this mirror runs.")

    def configure(self, updated: set[str]) -> None:
        if "acr_runmd" in updated and ctx.options.acr_runmd:
            path = str(Path(ctx.options.acr_runmd).resolve())
            if path != self.loaded_path:
                try:
                    self._load(path)
                except (RunmdError, exceptions.OptionsError) as e:  # a bad file, or a bad value of a step's option
                    if not self._refuse_at_start(str(e)):
                        raise exceptions.OptionsError(str(e)) from None
                    return
                self._check_deferred()

    def _replace(self, children: list[Any]) -> None:
        """Swap the plugin addons, the way mitmproxy's script loader swaps a script's addons."""
        manager = ctx.master.addons
        for old in self.addons:
            manager.remove(old)
        self.addons = []
        for child in children:
            manager.register(child)
        self.addons = children
        for child in children:
            manager.invoke_addon_sync(child, hooks.ConfigureHook(set(ctx.options.keys())))
        if getattr(self, "_running", False):
            for child in children:
                manager.invoke_addon_sync(child, hooks.RunningHook())

    def _load(self, path: str) -> None:
        compiled = catalog.load(path)
        state = build_state(compiled)
        if self.state is not None and self.state.home == compiled.home:
            state.stale = self.state.stale  # a reloaded runmd keeps the tags' last answers
        children = build_addons(compiled, state)
        self._replace(children)
        self.compiled, self.state, self.loaded_path = compiled, state, path
        logger.info("loaded %s: %d proxy steps", path, len(children))

    def _refuse_at_start(self, message: str) -> bool:
        """Under `mitmdump -s`, a runmd that cannot be served is one error line before serving
        (mitmproxy then exits), not a traceback; later (`:set` in mitmweb) it is an option error."""
        if not self.script or getattr(self, "_running", False):
            return False
        self._refused = True
        logger.error("%s", message)
        # mitmproxy's error check exits (status 1) when `running` starts after an error was
        # logged; from `running` itself that check may have passed already.
        if getattr(self, "_starting", False):
            ctx.master.shutdown()
        return True

    def _default_runmd(self) -> None:
        """`mitmdump -s acr_addons.py` without acr_runmd: ./mirror.runmd, or refuse to serve.

        Without a chain every request would go to reverse mode's one target as it came."""
        path = Path("mirror.runmd")
        if not path.is_file():
            self._refuse_at_start(
                "no runmd to serve: pass --set acr_runmd=FILE, or start where ./mirror.runmd is (acr init writes one)"
            )
            return
        logger.info("acr_runmd is not set: serving ./mirror.runmd")
        try:
            self._load(str(path.resolve()))
        except (RunmdError, exceptions.OptionsError) as e:
            self._refuse_at_start(str(e))

    def _check_deferred(self) -> None:
        """Under `mitmdump -s`, once the runmd's steps are loaded: mitmproxy keeps an unknown
        `--set` aside for an addon still to come; every addon has declared its options by now,
        so what is left is a step this runmd lacks (a warning), or a typo (refused)."""
        if not self.script or self._refused or getattr(self, "_running", False) or not ctx.options.deferred:
            return
        steps = declared_options()
        for name in sorted(ctx.options.deferred):
            if name not in steps:
                self._refuse_at_start(f"bad option: {unknown_option(name, set(ctx.options.keys()) | steps)}")
                return
            logger.warning("option %s: no step of %s uses it", name, ctx.options.acr_runmd or "mirror.runmd")

    async def running(self) -> None:
        self._starting = True
        if self.script and self.compiled is None and not self._refused:
            self._default_runmd()
            self._check_deferred()
        if self._refused:
            return  # mitmproxy exits after `running`, on the error logged: nothing to start
        self._running = True
        state, compiled = self.state, self.compiled
        if state is not None and compiled is not None and state.stale is None:
            # Only a serving mirror keeps answers (not a chain built for tests or offline
            # re-runs); what a previous run kept is read off the event loop.
            state.stale = await asyncio.to_thread(StaleStore, compiled.home / ".work" / "stale")

    @command.command("acr.teleports")
    def teleports(self, flows: Sequence[flow.Flow]) -> Sequence[str]:
        """One line per tag: teleported from -> to (with the client's follow-up GET of the target
        under it), or why not; pulls by digest; and the manifest requests the mirror refused."""
        return teleport_lines(flows)

    @command.command("acr.why")
    def why(self, flows: Sequence[flow.Flow]) -> Sequence[str]:
        """Each step's decision for the chosen flows, in chain order: why a pull did what it did.
        In mitmweb, `@focus` is the flow selected in the page."""
        out = []
        for f in flows:
            meta = read_record(f)
            req = getattr(f, "request", None)
            client = meta.get("client")
            path = (client["path"] if client else "") or (req.path if req else "")
            out.append(f"{req.method if req else ''} {path}".strip())
            out.extend(f"  {line}" for line in meta.get("steps", ["(no decisions: not a registry request)"]))
        return out

    @command.command("acr.tokens")
    def tokens(self) -> Sequence[str]:
        """The cached upstream tokens: scope and expiry only, never a token."""
        if self.state is None:
            return []
        return [
            f"{t.get('upstream')} {t.get('scope')} expires in {int(t.get('expires_in', 0))} s"
            for t in self.state.tokens.tokens()
        ]



def teleport_lines(flows: Sequence[flow.Flow]) -> list[str]:
    """`acr.teleports`: each tag with its decision and, under it, the client's follow-up GET of
    the manifest it was served (the streamable one after a teleport); other pulls by digest; the
    manifest requests the mirror refused."""
    out: list[str] = []
    follow_ups: dict[tuple[str, str], list[str]] = {}
    for f in flows:
        meta = read_record(f)
        if (meta.get("teleport") or {}).get("skipped") == "digest-pinned":
            status = f.response.status_code if getattr(f, "response", None) else "error"
            what = "the streamable manifest" if meta.get("teleport_target_of") else "the manifest it was served"
            line = f"  {f.request.method} {meta.get('name')}@{meta.get('reference')} -> {status} (the client fetching {what})"
            follow_ups.setdefault((meta.get("name"), meta.get("reference")), []).append(line)
    for f in flows:
        meta = read_record(f)
        req = getattr(f, "request", None)
        if meta.get("refused") and req is not None and "/manifests/" in req.path:
            steps = meta.get("steps") or [""]
            reason = steps[-1].split(": ", 1)[-1].removeprefix(f"refused {meta['refused']}: ")
            out.append(f"refused: {req.method} {req.path.partition('?')[0]} {meta['refused']}: {reason}")
            continue
        t = meta.get("teleport")
        if not t or t.get("skipped") == "digest-pinned":
            continue
        name = meta.get("name")
        where = f"{name}:{meta.get('reference')}"
        if "to" in t:
            out.append(f"{where} teleported {t['from']} -> {t['to']} ({t['format']})")
            served = t["to"]
        else:
            out.append(f"{where} not teleported: {t['skipped']}: {t.get('message', '')}")
            served = (meta.get("resolved") or {}).get("digest", "")
        out.extend(follow_ups.pop((name, served), []))
    for (name, digest), lines in follow_ups.items():  # pulled by digest, no tag among the flows
        out.append(f"{name}@{digest} pulled by digest: served as asked")
        out.extend(lines)
    return out
