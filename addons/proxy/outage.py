"""What a route does when its registry cannot answer or asks it to wait.

Before the steps run: while the upstream is backed off (addons.proxy.backoff), nothing goes
upstream: a tag the mirror answered before gets that answer (stale), anything else 503
TOOMANYREQUESTS at once with the remaining `Retry-After` (containerd then tries its next host,
or fails the pull quickly instead of adding to the registry's load).

After the steps ran, on the event loop, for a tag (never a digest: containerd has those bytes
or must fetch them): a 200 is kept as the tag's last answer (addons.proxy.stale); a 404 from
a registry that answers drops it (a deleted tag stays deleted); a failure because the
upstream is unreachable, timed out, answered 5xx or 429 is replaced by the last answer if it
is younger than `acr_stale_max`. A 401/403, a bad digest or a tag never seen keeps its error.
Every stale answer is marked: `Warning: 110`, the log line, mitmweb's comment, /metrics, /status.
"""

from __future__ import annotations

import logging

from addons.proxy.backoff import retry_after_header
from addons.proxy.context import ROCKET, RequestContext, StaleAnswer, TeleportDecision
from addons.proxy.resolve import etag_match, http_date, not_modified
from addons.proxy.stale import Entry, Key, accept_class
from addons.proxy.state import MirrorState
from addons.proxy.upstream import UpstreamError, passed_response
from addons.registry import oci
from addons.registry.oci import Manifest

logger = logging.getLogger(__name__)

#: RFC 7234's warning for an answer served although it could not be revalidated.
WARNING = '110 - "Response is Stale"'
#: Headers of an answer that are the moment's, not the answer's: never kept.
_NOT_KEPT = frozenset({"date", "content-length", "warning", "connection", "transfer-encoding"})


def key_of(ctx: RequestContext) -> Key:
    return ctx.upstream.ns, ctx.name, ctx.reference, accept_class(ctx.accept)


def is_tag(ctx: RequestContext) -> bool:
    return ctx.route == "manifests" and not oci.is_digest(ctx.reference)


def outage_reason(e: UpstreamError) -> tuple[str, int | None] | None:
    """Why the upstream could not answer (`refused`, `timeout`, `5xx`, `429`, `backoff`), or None
    when it did answer (a 404, 401, 403) or answered wrongly (a bad digest)."""
    status = e.upstream_status
    if e.code == "TOOMANYREQUESTS":
        return ("429", 429) if status == 429 else ("backoff", None)
    if e.code == "UPSTREAM_TIMEOUT":
        return "timeout", status
    if e.code == "UPSTREAM_UNAVAILABLE":
        return ("5xx", status) if status is not None and status >= 500 else ("refused", None)
    return None


def before(ctx: RequestContext, state: MirrorState) -> bool:
    """True when the route is answered without asking upstream (the upstream is backed off)."""
    left = state.backoff.remaining(ctx.upstream.host) if state.backoff.active else 0.0
    if left <= 0:
        return False
    ctx.backoff = left
    state.backoff.refused(ctx.upstream.host)
    if is_tag(ctx) and answer_stale(ctx, state, "backoff", None):
        return True
    wait = retry_after_header(left)
    ctx.fail("backoff", UpstreamError(503, "TOOMANYREQUESTS", f"{ctx.upstream.ns} asked the mirror to wait: {wait}s left", wait))
    return True


def after(ctx: RequestContext, state: MirrorState) -> None:
    """Keep, drop or use the tag's last answer, by what the steps decided."""
    store = state.stale
    if store is None or state.settings.stale_max <= 0 or not is_tag(ctx) or ctx.stale is not None:
        return
    e = ctx.error
    if e is None:
        remember(ctx, state)
        return
    if e.upstream_status == 404 and ctx.manifest is None:
        if store.drop(ctx.upstream.ns, ctx.name, ctx.reference):
            ctx.note("stale", "the registry says the tag is gone: its kept answers are dropped")
        return
    reason = outage_reason(e)
    if reason is not None:
        answer_stale(ctx, state, *reason)


def remember(ctx: RequestContext, state: MirrorState) -> None:
    """Keep a 200 for a tag as its last answer, with the body a GET gets."""
    answer, manifest = ctx.answer, ctx.manifest
    if state.stale is None or answer is None or answer.status_code != 200 or manifest is None:
        return
    if ctx.passed_through:
        if ctx.method != "GET":
            return  # the registry's own HEAD answer has no body to keep
        body = answer.content or b""
    elif ctx.served is not None:
        body = ctx.served.body
    else:
        return
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in _NOT_KEPT}
    teleport = ctx.teleport.public() if ctx.teleport is not None else None
    resolved = (manifest.media_type, manifest.digest, manifest.body)
    state.stale.put(Entry(key_of(ctx), state.stale.clock(), headers, body, resolved, teleport))


def answer_stale(ctx: RequestContext, state: MirrorState, reason: str, status: int | None) -> bool:
    """Answer with the tag's last answer if there is one young enough; True when it did."""
    store = state.stale
    if store is None or state.settings.stale_max <= 0:
        return False
    entry = store.get(key_of(ctx))
    if entry is None:
        return False
    age = max(0.0, store.clock() - entry.saved)
    if age > state.settings.stale_max:
        ctx.note("stale", f"the last answer is too old ({int(age)}s > acr_stale_max)")
        return False
    stale = StaleAnswer(age, reason, status)
    headers = {**entry.headers, "Date": http_date(), "Warning": WARNING}
    digest = headers.get(oci.CONTENT_DIGEST_HEADER, "")
    if digest and etag_match(ctx.if_none_match, digest):
        answer = not_modified()
        answer.headers["Warning"] = WARNING
    else:
        headers["Content-Length"] = str(len(entry.body))
        answer = passed_response(ctx.method, 200, entry.body, headers)
    media_type, resolved_digest, resolved_body = entry.resolved
    ctx.error, ctx.why, ctx.answer, ctx.stale = None, "", answer, stale
    ctx.manifest = Manifest(media_type, resolved_digest, resolved_body)
    ctx.served = Manifest(headers.get("Content-Type", media_type), digest or resolved_digest, entry.body)
    t = entry.teleport
    if t is not None and "to" in t:
        ctx.teleport = TeleportDecision(str(t["from"]), ctx.served, str(t.get("format", "")), str(t.get("artifact_type", "")))
        ctx.marked = ROCKET
    elif t is not None:
        ctx.teleport = TeleportDecision(resolved_digest, skipped=str(t.get("skipped")), message=str(t.get("message", "")))
    ctx.note("stale", f"{stale.text()}: the answer given then, {digest or resolved_digest}")
    store.count(ctx.upstream.ns, reason, {"upstream": ctx.upstream.ns, "name": ctx.name, "tag": ctx.reference,
                                          "digest": digest or resolved_digest, **stale.public()})
    return True

