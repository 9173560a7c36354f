"""The chain's last addon: a routed request no step answered goes upstream as is, and every
request gets its one log line once its answer is complete."""

from __future__ import annotations

import logging

from mitmproxy import http

from addons.registry import oci
from addons.proxy.context import Forward, RequestContext, info, listen_origin, show_served_from
from addons.proxy.front import refuse
from addons.proxy.routes import deliver
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)


def _safe_path(flow: http.HTTPFlow) -> str:
    return flow.request.path.partition("?")[0][:200]


def summary(flow: http.HTTPFlow) -> str:
    """The one log line of a request: what was asked, the answer, and the decisions that shaped it."""
    meta = flow.metadata.get("acr") or {}
    req = flow.request
    status = flow.response.status_code if flow.response else "error"
    what = _safe_path(flow)
    if meta.get("route") and meta.get("route") != "ping":
        what = f"{meta['route']} {meta.get('name')}{':' if meta.get('reference') else ''}{meta.get('reference', '')}"
    parts = [f"{req.method} {what} -> {status}"]
    resolved = meta.get("resolved")
    teleport = meta.get("teleport") or {}
    # The digest the client got: the registry's own for an answer passed on (a schema1
    # conversion has another), none for an error, the original one when teleported.
    answered = flow.response.headers.get(oci.CONTENT_DIGEST_HEADER) if flow.response else None
    if resolved and ("to" in teleport or (not answered and flow.response is not None and flow.response.status_code < 400)):
        parts.append(resolved["digest"])
    elif answered and meta.get("route") == "manifests":
        parts.append(answered)
    if "to" in teleport:
        parts.append(f"teleported to {teleport['to']}")
    elif teleport.get("skipped") == "snapshotter":
        parts.append(f"no teleport (snapshotter: {teleport.get('message', '')})")
    elif teleport.get("skipped") and teleport["skipped"] != "digest-pinned":
        parts.append(f"no teleport ({teleport['skipped']})")
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
    this mitmproxy would send the request to reverse mode's placeholder target. It also writes
    each request's one log line, once the answer is complete.
    """

    name = "acr-proxy-tail"

    def __init__(self, state: MirrorState) -> None:
        self.state = state

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response and flow.live and "answered" not in (flow.metadata.get("acr") or {}):
            return self.own_answer(flow)
        if flow.response or flow.error or not flow.live:
            return
        meta = flow.metadata.get("acr") or {}
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
        if flow.response.status_code >= 400 and not ctx.why:
            ctx.why = f"upstream answered {flow.response.status_code}"
            ctx.publish(flow)

    @staticmethod
    def own_answer(flow: http.HTTPFlow) -> None:
        """An endpoint of the mirror's own (/status, /auth, /metrics) answered: show the mirror's
        address rather than reverse mode's placeholder."""
        own = listen_origin(flow)
        if own is not None and flow.request.first_line_format == "relative":
            info(flow)["answered"] = "mirror"
            show_served_from(flow, own)

    def response(self, flow: http.HTTPFlow) -> None:
        if "acr" in flow.metadata:
            logger.info(summary(flow))

    def error(self, flow: http.HTTPFlow) -> None:
        if "acr" in flow.metadata:
            logger.info(summary(flow))
