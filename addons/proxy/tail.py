"""The chain's last addon: a routed request no step answered goes upstream as is, and every
request gets its one log line once its answer is complete."""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from mitmproxy import http

from addons.registry import oci
from addons.proxy.context import Forward, RequestContext, has_record, listen_origin, range_text, read_record, record, show_served_from
from addons.proxy.front import refuse
from addons.proxy.logfields import client_digest, log_extra
from addons.proxy.routes import deliver
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)


def _safe_path(flow: http.HTTPFlow) -> str:
    return flow.request.path.partition("?")[0][:200]


def summary(flow: http.HTTPFlow) -> str:
    """The one log line of a request: what was asked, the answer, and the decisions that shaped it."""
    meta = read_record(flow)
    req = flow.request
    status = flow.response.status_code if flow.response else "error"
    what = _safe_path(flow)
    if meta.get("route") and meta.get("route") != "ping":
        what = f"{meta['route']} {meta.get('name')}{':' if meta.get('reference') else ''}{meta.get('reference', '')}"
    parts = [f"{req.method} {what} -> {status}"]
    teleport = meta.get("teleport") or {}
    if digest := client_digest(flow, meta):
        parts.append(digest)
    if "to" in teleport:
        parts.append(f"teleported to {teleport['to']}")
    elif teleport.get("skipped") == "snapshotter":
        parts.append(f"no teleport (snapshotter: {teleport.get('message', '')})")
    elif teleport.get("skipped") and teleport["skipped"] != "digest-pinned":
        parts.append(f"no teleport ({teleport['skipped']})")
    if meta.get("stale"):
        parts.append(f"({meta['stale']['text']})")
    if meta.get("range"):
        parts.append(range_text(meta["range"]))
    if meta.get("redirected"):
        parts.append("via storage")
    if meta.get("refused"):
        parts.append(f"refused {meta['refused']}")
    if flow.error:
        parts.append(f"error: {flow.error.msg}")
    elif flow.response and not 200 <= flow.response.status_code < 300:
        parts.append(f"({meta.get('why') or why_status(flow.response.status_code)})")
    if meta.get("upstream") and not meta.get("refused"):
        parts.append(f"[{meta.get('ns')}]")
    return " ".join(parts)


def forward_as_is(flow: http.HTTPFlow, ctx: RequestContext) -> None:
    """Send a routed request that no step answers to its upstream unchanged (but for `ns`)."""
    url = ctx.upstream_url()
    header = None
    if ctx.authorizer is not None:
        found, header = ctx.authorizer.cached_header()
        header = header if found else None
    ctx.forward = Forward(url, redirected=False, authorization=header)
    ctx.note("proxy", f"no step of .{ctx.route} answers: forwarded to {ctx.upstream.ns} as is")
    deliver(flow, ctx)


def why_status(status: int) -> str:
    """A few words for a non-2xx answer no step explained (a streamed upstream answer)."""
    if status == 304:
        return "not modified"
    if 300 <= status < 400:
        return "redirected"
    return f"upstream answered {status}"


class ProxyTail:
    """The last addon of the chain: a routed flow that no step answered goes to its upstream as is.

    A route with no step that answers (`.tags get` with nothing under it) forwards its requests
    to the upstream unchanged, with the route's upstream token when `.authn` got one, and the
    answer streams back: what a client of the registry expects, rather than an error. Without
    this mitmproxy would send the request to the mode's fixed target (the first upstream). It also writes
    each request's one log line, once the answer is complete.
    """

    name = "acr-proxy-tail"

    def __init__(self, state: MirrorState) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response and flow.live and "answered" not in read_record(flow):
            return self.own_answer(flow)
        if flow.response or flow.error or not flow.live:
            return
        meta = read_record(flow)
        if meta.get("forward"):
            return
        ctx = self.state.contexts.get(flow)
        if ctx is None or not meta.get("route"):
            return refuse(flow, 404, "NOT_FOUND", "not served")
        forward_as_is(flow, ctx)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = self.state.contexts.get(flow)
        if ctx is None or ctx.forward is None or flow.response is None:
            return
        if not flow.response.stream:
            flow.response.stream = True  # a blob never sits in memory whole
        if flow.response.status_code in (429, 503):
            self.state.backoff.observe(urlsplit(ctx.forward.url).netloc, flow.response.status_code,
                                       flow.response.headers.get("Retry-After"))
        if flow.response.status_code >= 400 and not ctx.why:
            ctx.why = f"upstream answered {flow.response.status_code}"
            ctx.publish(flow)

    @staticmethod
    def own_answer(flow: http.HTTPFlow) -> None:
        """An endpoint of the mirror's own (/status, /auth, /metrics) answered: show the mirror's
        address rather than reverse mode's target."""
        own = listen_origin(flow)
        if own is not None and flow.request.first_line_format == "relative":
            record(flow)["answered"] = "mirror"
            show_served_from(flow, own)

    def response(self, flow: http.HTTPFlow) -> None:
        if has_record(flow):
            logger.info(summary(flow), extra=log_extra(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        if has_record(flow):
            logger.info(summary(flow), extra=log_extra(flow))
