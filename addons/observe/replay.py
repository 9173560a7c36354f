"""Replaying recorded sessions: moving them between hosts, and re-running the chain offline.

Three tools, each for one job:

* `Rehost` (option `acr_rehost`): rewrites the origins in answers (`WWW-Authenticate` realms,
  `Location`, `Link`) from one origin to another. The recording proxy of `scripts/record` uses
  it to keep a registry's token realm and storage redirects pointed at itself, so that they are
  recorded too; the replay server (`mitmdump --server-replay`) uses it the other way round, so
  that a session recorded as `https://NAME.azurecr.io` is answered on a loopback port.
* `rehost_flow`: the same rewrite, offline, over a whole flow (request origin, headers, text
  bodies, metadata, comment): how `scripts/record` turns a loopback recording into an
  ACR-shaped one.
* `ReplayCheck`: the chain's decisions, re-made offline over flows read with
  `mitmdump -n -r client.mitm -s "$(acr addon-path)" --set acr_runmd=... [--set acr_replay_upstream=upstream.mitm]`.
  Read flows are not live, so the plugins leave them alone; this addon instead sends a live copy
  of each recorded client request through a fresh chain built from the runmd, whose upstream
  requests are answered from the upstream recording (in memory, nothing leaves the machine), and
  compares what the chain decides now (route, resolved digest, teleport target or the reason it
  did not teleport, whether a blob was forwarded and to which kind of host, the status it
  answered) with what was recorded. Without an upstream recording only the front door (the
  `+ .proxy` root's routing) is re-run. `acr_replay_report=FILE` writes the result as JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import requests
from mitmproxy import connection, ctx, exceptions, http
from mitmproxy import io as mio

from addons.core.offline import REQUEST_HOOKS, Answer, answering_session, run_hooks
from addons.runmd.compile import Compiled
from addons.observe.record import SECRET_FIELDS, SECRET_PARAMS
from addons.proxy.context import RequestRecord, read_record, record
from addons.proxy.state import MirrorState, Settings

#: (compiled, settings, HTTP session, whether upstream answers are recorded) -> the request
#: path's addons to re-run: all of them with a recording, only the front door without.
RequestPathBuilder = Callable[[Compiled, Settings, requests.Session, bool], list[Any]]

logger = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_TEXT_TYPES = ("json", "text/", "xml", "x-www-form-urlencoded")
_HOST_HEADERS = ("www-authenticate", "location", "content-location", "link")


# --- origins -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Origin:
        parts = urlsplit(text.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an origin like https://host[:port], got '{text}'")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise ValueError(f"an origin has no path, query or user: '{text}'")
        return cls(parts.scheme, parts.hostname, parts.port or _DEFAULT_PORTS[parts.scheme])

    @property
    def hostport(self) -> str:
        """host[:port] as a client writes it (no default port)."""
        return self.host if self.port == _DEFAULT_PORTS[self.scheme] else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.hostport}"


def parse_rehost(text: str) -> list[tuple[Origin, Origin]]:
    """`FROM=TO[, FROM=TO ...]`, each an origin: `https://x.azurecr.io=http://127.0.0.1:5000`."""
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        src, sep, dst = item.partition("=")
        if not sep:
            raise ValueError(f"expected FROM=TO, got '{item}'")
        out.append((Origin.parse(src), Origin.parse(dst)))
    return out


def _origin_re(origin: Origin) -> re.Pattern[str]:
    forms = [re.escape(origin.url)]
    if origin.port == _DEFAULT_PORTS[origin.scheme]:
        forms.append(re.escape(f"{origin.scheme}://{origin.host}:{origin.port}"))
    return re.compile("(?:" + "|".join(forms) + r")(?![\w.:-])")


def replace_origins(text: str, mapping: Sequence[tuple[Origin, Origin]], names: bool = False) -> str:
    """Origins (and with `names`, bare or percent-encoded host[:port]) from -> to."""
    for src, dst in mapping:
        text = _origin_re(src).sub(dst.url, text)
    if names:
        for src, dst in mapping:
            for a, b in ((src.hostport, dst.hostport), (quote(src.hostport, safe=""), quote(dst.hostport, safe=""))):
                text = re.sub(r"(?<![\w.-])" + re.escape(a) + r"(?![\w.:-]|%3[Aa])", b, text)
    return text


def _rehost_headers(message: http.Message, mapping: Sequence[tuple[Origin, Origin]], names: bool, only: Iterable[str] | None = None) -> None:
    for name in {n.lower() for n in message.headers.keys()}:
        if only is not None and name not in only:
            continue
        values = message.headers.get_all(name)
        new = [replace_origins(v, mapping, names) for v in values]
        if new != values:
            message.headers.set_all(name, new)


def _rehost_body(message: http.Message, mapping: Sequence[tuple[Origin, Origin]]) -> None:
    ctype = message.headers.get("content-type", "").lower()
    if not message.raw_content or not any(t in ctype for t in _TEXT_TYPES):
        return
    try:
        text = message.get_content(strict=True).decode("utf-8")  # type: ignore[union-attr]
    except (ValueError, AttributeError):
        return
    new = replace_origins(text, mapping, names=True)
    if new != text:
        message.content = new.encode("utf-8")


def _rehost_data(value: Any, mapping: Sequence[tuple[Origin, Origin]]) -> Any:
    if isinstance(value, str):
        return replace_origins(value, mapping, names=True)
    if isinstance(value, dict):
        return {k: _rehost_data(v, mapping) for k, v in value.items()}
    if isinstance(value, list):
        return [_rehost_data(v, mapping) for v in value]
    return value


def rehost_flow(f: http.HTTPFlow, mapping: Sequence[tuple[Origin, Origin]]) -> http.HTTPFlow:
    """Move a recorded flow to other origins, in place (see the module docstring)."""
    req = f.request
    for src, dst in mapping:
        if (req.scheme, req.host, req.port) == (src.scheme, src.host, src.port):
            req.scheme, req.host, req.port = dst.scheme, dst.host, dst.port
            if "host" in req.headers:
                req.headers["host"] = dst.hostport
            break
    req.path = replace_origins(req.path, mapping, names=True)
    _rehost_headers(req, mapping, names=True)
    _rehost_body(req, mapping)
    if f.response is not None:
        _rehost_headers(f.response, mapping, names=True)
        _rehost_body(f.response, mapping)
    for conn, attrs in ((f.client_conn, ("peername", "sockname")), (f.server_conn, ("address", "peername", "sockname"))):
        for attr in attrs:
            value = getattr(conn, attr, None)
            for src, dst in mapping:
                if value and tuple(value[:2]) == (src.host, src.port):
                    setattr(conn, attr, (dst.host, dst.port))
    spec = f.client_conn.proxy_mode.full_spec
    head, at, listen = spec.rpartition("@")
    if not at:
        head, listen = spec, ""
    head = replace_origins(head, mapping)
    for src, dst in mapping:
        if listen == f"{src.host}:{src.port}":
            listen = f"{dst.host}:{dst.port}"
    moved = f"{head}@{listen}" if at else head
    if moved != spec:
        from mitmproxy.proxy.mode_specs import ProxyMode

        f.client_conn.proxy_mode = ProxyMode.parse(moved)
    f.metadata = _rehost_data(f.metadata, mapping)
    if f.comment:
        f.comment = replace_origins(f.comment, mapping, names=True)
    return f


class Rehost:
    """Rewrites origins in answers: `--set acr_rehost=FROM=TO,...` (see the module docstring)."""

    name = "acr-rehost"

    def __init__(self) -> None:
        self.mapping: list[tuple[Origin, Origin]] = []

    def load(self, loader) -> None:
        loader.add_option(
            "acr_rehost", str, "",
            "Rewrite these origins in answers (realm, Location, Link): 'FROM=TO, ...', each an "
            "origin such as https://example.azurecr.io or http://127.0.0.1:5000.",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_rehost" in updated:
            try:
                self.mapping = parse_rehost(ctx.options.acr_rehost)
            except ValueError as e:
                raise exceptions.OptionsError(f"acr_rehost: {e}") from None

    def _apply(self, flow: http.HTTPFlow) -> None:
        if self.mapping and flow.response is not None:
            _rehost_headers(flow.response, self.mapping, names=False, only=_HOST_HEADERS)

    def request(self, flow: http.HTTPFlow) -> None:
        # A server-replay answer is set in the request hook, ahead of this addon.
        self._apply(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self._apply(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self._apply(flow)


# --- the upstream, answered from a recording -----------------------------------------------


def _query_key(query: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k.lower() not in SECRET_PARAMS))


class RecordedUpstream:
    """Recorded upstream answers by (method, origin, path, query without secrets)."""

    def __init__(self, flows: Iterable[http.HTTPFlow]) -> None:
        self.answers: dict[tuple[Any, ...], http.HTTPFlow] = {}
        self.tokens: list[http.HTTPFlow] = []
        #: Requests the chain sent that the recording has no answer for ("METHOD /path").
        self.misses: list[str] = []
        for f in flows:
            if not isinstance(f, http.HTTPFlow) or f.response is None:
                continue
            self.answers.setdefault(self._key(f.request.method, f.request.url), f)
            if f.response.status_code == 200 and self._is_token(f.request.path):
                self.tokens.append(f)

    @classmethod
    def from_file(cls, path: str) -> RecordedUpstream:
        with open(path, "rb") as fo:
            return cls(f for f in mio.FlowReader(fo).stream() if isinstance(f, http.HTTPFlow))

    @staticmethod
    def _is_token(path: str) -> bool:
        return urlsplit(path).path.rstrip("/").endswith(("/oauth2/token", "/token"))

    @staticmethod
    def _key(method: str, url: str) -> tuple[Any, ...]:
        p = urlsplit(url)
        port = p.port or _DEFAULT_PORTS.get(p.scheme, 0)
        return (method.upper(), p.scheme, (p.hostname or "").lower(), port, p.path, _query_key(p.query))

    def find(self, method: str, url: str) -> http.HTTPFlow | None:
        hit = self.answers.get(self._key(method, url))
        if hit is None and self._is_token(url):
            # The token grant differs by credentials (POST with a refresh token, GET anonymous):
            # any recorded token answer stands for "the registry gave a token".
            hit = self.tokens[0] if self.tokens else None
        return hit

    def answer(self, request: requests.PreparedRequest) -> Answer:
        """The recorded answer to `request` (an `AnswerAdapter`'s answer); a request not recorded
        is a connection error, and is kept in `misses`."""
        method, url = request.method or "GET", request.url or ""
        recorded = self.find(method, url)
        if recorded is None or recorded.response is None:
            self.misses.append(f"{method} {urlsplit(url).path}")
            raise requests.ConnectionError(f"not in the recording: {method} {urlsplit(url).path}")
        resp = recorded.response
        return resp.status_code, list(resp.headers.items(multi=True)), b"" if method == "HEAD" else (resp.raw_content or b"")


# --- re-running the chain ----------------------------------------------------------------


#: What is compared between the recorded decision and the re-made one.
FIELDS = ("route", "name", "reference", "ns", "refused", "resolved", "teleport", "forward", "redirected")


def decision(meta: RequestRecord, status: int | None) -> dict[str, Any]:
    """The comparable part of a flow's decision record."""
    out: dict[str, Any] = {}
    for key in FIELDS:
        value = meta.get(key)
        if value in (None, False, ""):
            continue
        if key == "resolved":
            value = value.get("digest")
        elif key == "teleport":
            value = f"to {value['to']}" if "to" in value else f"skipped {value.get('skipped')}"
        out[key] = value
    if status is not None:
        out["status"] = status
    return out


def describe(meta: RequestRecord, method: str, path: str) -> str:
    if meta.get("route") and meta.get("route") != "ping":
        ref = meta.get("reference")
        return f"{method} {meta['route']} {meta.get('name')}{':' + ref if ref else ''}"
    return f"{method} {path.partition('?')[0][:120]}"


@dataclass
class Result:
    flow_id: str
    request: str
    recorded: dict[str, Any]
    now: dict[str, Any]
    misses: list[str] = field(default_factory=list)

    @property
    def diffs(self) -> list[str]:
        keys = [k for k in (*FIELDS, "status") if k in self.recorded or k in self.now]
        return [
            f"{k}: recorded {self.recorded.get(k, '-')}, now {self.now.get(k, '-')}"
            for k in keys if self.recorded.get(k) != self.now.get(k)
        ]

    def as_dict(self) -> dict[str, Any]:
        return {"flow": self.flow_id, "request": self.request, "same": not self.diffs, "diffs": self.diffs,
                "recorded": self.recorded, "now": self.now, "not_recorded": self.misses}


class ReplayCheck:
    """Re-makes the chain's decisions for read (not live) flows; see the module docstring."""

    name = "acr-replay-check"

    def __init__(self, compiled: Compiled, state: MirrorState, build: RequestPathBuilder) -> None:
        self.compiled = compiled
        self.live_state = state
        #: Builds the request path again (addons.chain, one layer up) with a state of its own.
        self.build = build
        self.results: list[Result] = []
        self._chain: list[Any] | None = None
        self._upstream: RecordedUpstream | None = None
        self._upstream_path: str | None = None
        self._lock = asyncio.Lock()
        #: The options below, as last configured.
        self.upstream_recording: str | None = None
        self.report_path = ""

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_replay_upstream", str, "",
            "An upstream recording (scripts/record) that answers the chain's upstream requests when "
            "recorded client flows are re-run offline; without it only the routing is re-run.",
        )
        loader.add_option(
            "acr_replay_report", str, "",
            "Write the offline re-run's result (per flow: recorded and re-made decision) as JSON here.",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_replay_upstream" in updated:
            self.upstream_recording = ctx.options.acr_replay_upstream or None
        if "acr_replay_report" in updated:
            self.report_path = ctx.options.acr_replay_report

    # The chain, built on first use from the same runmd with a state of its own.
    def chain(self) -> tuple[list[Any], bool]:
        path = self.upstream_recording
        if self._chain is None or path != self._upstream_path:
            # Without a recording every upstream request is a miss.
            self._upstream = RecordedUpstream.from_file(path) if path else RecordedUpstream(())
            settings = Settings(**vars(self.live_state.settings))
            session, _ = answering_session(self._upstream.answer)
            chain = self.build(self.compiled, settings, session, path is not None)
            self._chain, self._upstream_path = chain, path
        return self._chain, self._upstream_path is not None

    @staticmethod
    def fresh_request(f: http.HTTPFlow) -> http.HTTPFlow:
        """A live flow with the client's request as it arrived (before any step changed it)."""
        client = read_record(f).get("client")
        req = f.request.copy()
        if client and client["path"]:
            req.method = client["method"]
            req.path = client["path"]
            req.authority = client["authority"]
        req.headers.pop("authorization", None)
        conn = connection.Client(
            peername=f.client_conn.peername or ("127.0.0.1", 0),
            sockname=f.client_conn.sockname or ("127.0.0.1", 0),
            timestamp_start=time.time(),
        )
        out = http.HTTPFlow(conn, connection.Server(address=None), live=True)
        out.request = req
        return out

    async def rerun(self, f: http.HTTPFlow) -> tuple[http.HTTPFlow, list[str]]:
        chain, full = self.chain()
        fresh = self.fresh_request(f)
        assert self._upstream is not None
        before = len(self._upstream.misses)
        await run_hooks(chain, fresh, REQUEST_HOOKS if full else ("requestheaders",))
        return fresh, self._upstream.misses[before:]

    def response(self, f: http.HTTPFlow) -> Any:
        """Live flows: nothing (and no coroutine). Read flows: the check, which mitmproxy awaits."""
        if f.live or not isinstance(f, http.HTTPFlow):
            return None
        meta = read_record(f)
        if not meta or meta.get("endpoint"):
            return None
        return self.check(f, meta)

    def error(self, f: http.HTTPFlow) -> Any:
        return self.response(f) if f.response is None else None

    async def check(self, f: http.HTTPFlow, meta: RequestRecord) -> None:
        async with self._lock:  # one flow at a time, in file order, as the caches saw them
            fresh, misses = await self.rerun(f)
        _, full = self.chain()
        now_meta = read_record(fresh)
        recorded = decision(meta, f.response.status_code if f.response and not meta.get("forward") else None)
        now = decision(now_meta, fresh.response.status_code if fresh.response and not now_meta.get("forward") else None)
        if not full:
            # Only the front door ran: compare what it decides.
            keep = ("route", "name", "reference", "ns", "refused")
            recorded = {k: v for k, v in recorded.items() if k in keep}
            now = {k: v for k, v in now.items() if k in keep}
        client = meta.get("client")
        method, path = (client["method"], client["path"]) if client else (f.request.method, f.request.path)
        result = Result(f.id, describe(meta, method, path), recorded, now, misses)
        self.results.append(result)
        record(f)["replay"] = {"same": not result.diffs, "diffs": result.diffs}
        if result.diffs:
            logger.warning("replay: %s: CHANGED: %s", result.request, "; ".join(result.diffs))
        else:
            logger.info("replay: %s: same (%s)", result.request, ", ".join(f"{k}={v}" for k, v in now.items()))

    def report(self) -> dict[str, Any]:
        changed = [r for r in self.results if r.diffs]
        return {
            "runmd": self.compiled.path,
            "upstream_recording": self._upstream_path,
            "checked": len(self.results),
            "same": len(self.results) - len(changed),
            "changed": len(changed),
            "flows": [r.as_dict() for r in self.results],
        }

    def done(self) -> None:
        if not self.results:
            return
        report = self.report()
        logger.info("replay: %d flow(s) checked, %d changed", report["checked"], report["changed"])
        path = self.report_path
        if path:
            with open(path, "w") as fo:
                json.dump(report, fo, indent=1)
                fo.write("\n")


# --- for tests and scripts: reading and writing flow files ---------------------------------


def read_flows(path: str) -> list[http.HTTPFlow]:
    with open(path, "rb") as fo:
        return [f for f in mio.FlowReader(fo).stream() if isinstance(f, http.HTTPFlow)]


def write_flows(path: str, flows: Iterable[http.HTTPFlow]) -> None:
    with open(path, "wb") as fo:
        writer = mio.FlowWriter(fo)
        for f in flows:
            writer.add(f)


__all__ = [
    "Origin", "parse_rehost", "replace_origins", "rehost_flow", "Rehost", "RecordedUpstream",
    "ReplayCheck", "read_flows", "write_flows", "SECRET_FIELDS",
]
