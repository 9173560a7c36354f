"""`.pull [follow|client]`: blobs streamed from upstream; tag lists passed through.

A blob GET is probed first by the mirror itself (bounded by the upstream timeout, renewing
an expired token once): a registry that redirects to blob storage answers the probe with
the storage URL, which mitmproxy then streams from *without* the registry token; a
registry that serves blobs itself is remembered, probed with a cheap HEAD from then on, and
streamed with the token. Bodies are streamed chunk by chunk, never held whole. HEAD
requests and tag lists are small: the mirror answers them itself. The probe and the small
answers are made in the route's worker thread (`run`); `ready` sends a blob on at once
when `.pull client` hands redirects to the client and the token is cached.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import weakref
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import requests
from mitmproxy import ctx, http

from addons.core import mitm
from addons.registry import oci
from addons.proxy.plugin import ProxyPlugin
from addons.proxy.context import Forward, RequestContext, Streamed, size_text
from addons.proxy.upstream import Authorizer, UpstreamError, send

logger = logging.getLogger(__name__)

REDIRECTS = ("follow", "client")
MAX_REDIRECTS = 5
#: Upstream headers worth passing on with a blob or tag list.
_PASS_HEADERS = (
    "Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified",
    oci.CONTENT_DIGEST_HEADER, "Link", "Retry-After",
)


def _pass_headers(resp: requests.Response) -> dict[str, str]:
    out = {k: resp.headers[k] for k in _PASS_HEADERS if k in resp.headers}
    out[oci.API_VERSION_HEADER] = oci.API_VERSION
    return out


def same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


class Activity:
    """A pass-through stream function that counts the bytes and remembers when data last moved."""

    def __init__(self, streamed: Streamed | None = None, done: Callable[[], None] | None = None) -> None:
        self.last = time.monotonic()
        self.done = False
        self.streamed = streamed
        self._on_done = done

    def __call__(self, chunk: bytes) -> bytes:
        self.last = time.monotonic()
        if self.streamed is not None:
            self.streamed.bytes += len(chunk)
        if not chunk and not self.done:
            self.done = True  # mitmproxy calls it with b"" at the end of the body
            if self.streamed is not None:
                self.streamed.ended = self.last
            if self._on_done is not None:
                self._on_done()
        return chunk


def link_with_ns(link: str, ns: str) -> str:
    """Keep containerd's `ns` on a tag list's next-page link, so the next page reaches the same upstream."""

    def add(m: re.Match[str]) -> str:
        target = m.group(1)
        sep = "&" if "?" in target else "?"
        return f"<{target}{sep}ns={quote(ns, safe='')}>"

    return re.sub(r"<([^>]*)>", add, link, count=1)


def scrub(flow: http.HTTPFlow) -> None:
    """Remove the upstream token from a forwarded request once it is on the wire."""
    flow.request.headers.pop("Authorization", None)


class Pull(ProxyPlugin):
    plugin = "pull"
    routes = frozenset({"blobs", "tags"})
    summary = "stream blobs (follow storage redirects; 'client' hands them to the client) and pass tag lists"

    @classmethod
    def parse(cls, text: str) -> str:
        mode = (text or "follow").lower()
        if mode not in REDIRECTS:
            raise ValueError(f"unknown redirect mode '{text}' (expected: {', '.join(REDIRECTS)})")
        return mode

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._watched: weakref.WeakKeyDictionary[http.HTTPFlow, Activity] = weakref.WeakKeyDictionary()
        self._watchdog: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_follow_redirects", bool, True,
            "Follow blob redirects to storage in the mirror (Authorization is dropped when the host "
            "changes); off hands the redirect to the client.",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_follow_redirects" in updated:
            self.state.settings.follow_redirects = ctx.options.acr_follow_redirects

    @property
    def follow(self) -> bool:
        return self.config == "follow" and self.state.settings.follow_redirects

    def blob_modes(self) -> dict[str, str]:
        """upstream ns -> 'direct' or 'redirect', as learned from the probes."""
        return self.state.service("blob_modes", dict)

    # -- blocking helpers (run in a thread) ---------------------------------------------

    def probe(self, url: str, method: str, extra: dict[str, str], auth: Authorizer | None, what: str) -> tuple[str, requests.Response | None]:
        """Follow registry redirects; return the URL to stream from and, for HEAD, the answer."""
        current, current_auth = url, auth
        for _ in range(MAX_REDIRECTS + 1):
            resp = send(self.state, method, current, headers=extra, auth=current_auth, stream=True, what=what)
            if resp.is_redirect and "Location" in resp.headers:
                resp.close()
                target = urljoin(current, resp.headers["Location"])
                if not same_origin(target, current):
                    current_auth = None  # a storage host never gets the registry's token
                current = target
                if current_auth is None and method == "GET":
                    return current, None  # storage: let mitmproxy stream it
                continue
            if resp.status_code >= 400:
                resp.close()
                raise UpstreamError.from_status(resp, what)
            if method == "GET":
                resp.close()
                return current, None
            return current, resp
        raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: too many redirects upstream")

    # -- hooks --------------------------------------------------------------------------

    @staticmethod
    def target(ctx: RequestContext) -> tuple[str, str]:
        """The upstream URL of the request, and what it is (for messages)."""
        if ctx.route == "tags":
            path, what = f"/v2/{ctx.name}/tags/list", f"tags of {ctx.name}"
        else:
            path, what = f"/v2/{ctx.name}/blobs/{ctx.reference}", f"blob {ctx.reference}"
        url = ctx.upstream.url(path)
        if ctx.query:
            url += "?" + "&".join(f"{k}={v}" for k, v in ctx.query)
        return url, what

    def ready(self, ctx: RequestContext) -> bool:
        """A blob GET that needs no probe (`client` mode) and whose token is cached."""
        if self.follow or ctx.route != "blobs" or ctx.method != "GET":
            return False
        header: str | None = None
        if ctx.authorizer is not None:
            found, header = ctx.authorizer.cached_header()
            if not found:
                return False
        url, _ = self.target(ctx)
        self._forward(ctx, url, url, header)
        return True

    def run(self, ctx: RequestContext) -> None:
        url, what = self.target(ctx)
        try:
            if ctx.method == "HEAD" or ctx.route == "tags":
                ctx.answer = self.answer_small(ctx.method, url, ctx.pass_headers, ctx.authorizer, what, ctx.ns_sent)
                ctx.note("pull", f"{ctx.method} answered by the mirror ({ctx.answer.status_code})")
                return
            self.forward_blob(ctx, url, ctx.pass_headers, what)
        except UpstreamError as e:
            ctx.fail("pull", e)
            logger.debug("%s %s -> %d (%s)", ctx.method, what, e.status, e.message)

    def answer_small(
        self, method: str, url: str, extra: dict[str, str], auth: Authorizer | None, what: str,
        ns: str | None = None,
    ) -> http.Response:
        """Blocking: HEAD of a blob, or a tag list: the mirror answers from its own request."""
        _, resp = self.probe(url, method, extra, auth, what) if method == "HEAD" else (url, None)
        if resp is None:
            resp = send(self.state, method, url, headers=extra, auth=auth, stream=True, what=what)
            if resp.status_code >= 400:
                resp.close()
                raise UpstreamError.from_status(resp, what)
        try:
            body = b"" if method == "HEAD" else resp.raw.read(4 * 1024 * 1024 + 1, decode_content=True)
        except (requests.RequestException, OSError):
            raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: upstream body cut short") from None
        finally:
            resp.close()
        if len(body) > 4 * 1024 * 1024:
            raise UpstreamError(502, "UNSUPPORTED", f"{what}: upstream answer is larger than 4 MiB")
        headers = _pass_headers(resp)
        if method != "HEAD":
            headers.pop("Content-Length", None)  # the body may have been decoded
        if ns and "Link" in headers:
            headers["Link"] = link_with_ns(headers["Link"], ns)
        out = http.Response.make(resp.status_code, body, headers)
        if method == "HEAD" and "Content-Length" in headers:
            out.headers["Content-Length"] = headers["Content-Length"]
        return out

    def forward_blob(self, ctx: RequestContext, url: str, extra: dict[str, str], what: str) -> None:
        """Blocking: find the URL to stream from; mitmproxy streams it to the client."""
        auth = ctx.authorizer
        modes = self.blob_modes()
        ns = ctx.upstream.ns
        if not self.follow:
            target = url
        elif modes.get(ns) == "direct":
            # Known to serve blobs itself: a HEAD checks reachability and renews a stale token.
            self.probe(url, "HEAD", extra, auth, what)
            target = url
        else:
            target, _ = self.probe(url, "GET", extra, auth, what)
            modes[ns] = "direct" if target == url else "redirect"
        header = auth.header() if same_origin(target, url) and auth is not None else None
        self._forward(ctx, url, target, header)

    @staticmethod
    def _forward(ctx: RequestContext, url: str, target: str, header: str | None) -> None:
        ctx.forward = Forward(target, redirected=target != url, authorization=header or None)
        host = urlsplit(target).netloc
        ctx.note("pull", f"streaming from {'storage ' + host if target != url else 'the registry'}")

    def watch(self, flow: http.HTTPFlow, ctx: RequestContext | None = None) -> "Activity":
        """Stream the body, counting it and noting when each chunk passes, so a stalled upstream
        can be cut off and the flow tells how many bytes passed, how fast and from where."""
        if ctx is not None and ctx.forward is not None:
            ctx.streamed = Streamed(started=time.monotonic(),
                                    source="storage" if ctx.forward.redirected else "registry")

            def done() -> None:
                assert ctx.streamed is not None
                ctx.note("pull", f"streamed {ctx.streamed.bytes} B ({size_text(ctx.streamed.bytes)}) in "
                                 f"{ctx.streamed.seconds:.3f} s from {ctx.streamed.source}")
                ctx.publish(flow)

            activity = Activity(ctx.streamed, done)
        else:
            activity = Activity()
        self._watched[flow] = activity
        if self._watchdog is None or self._watchdog.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not serving (hooks called directly, e.g. offline replay)
                return activity
            self._watchdog = loop.create_task(self._watch_stalls())
        return activity

    async def _watch_stalls(self) -> None:
        """Close the upstream connection of a streamed body that has not moved for the upstream timeout.

        mitmproxy itself waits 10 minutes; closing the connection makes it end the response
        early, and the client sees a broken transfer (never a short blob with success).
        """
        while self._watched:
            await asyncio.sleep(min(1.0, self.state.settings.upstream_timeout / 4))
            limit = self.state.settings.upstream_timeout
            now = time.monotonic()
            for flow, activity in list(self._watched.items()):
                if activity.done or not flow.live:
                    self._watched.pop(flow, None)
                elif now - activity.last > limit and mitm.client_has_unsent_bytes(flow):
                    activity.last = now  # the client is slow, not the upstream (backpressure)
                elif now - activity.last > limit:
                    self._watched.pop(flow, None)
                    ctx = self.context(flow)
                    if ctx is not None:
                        ctx.stalled = True
                        ctx.note("pull", f"upstream stalled for {limit:g} s mid-body: connection closed")
                        ctx.publish(flow)
                    mitm.abort_server_connection(flow)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = self.context(flow)
        if ctx is None or ctx.forward is None or flow.response is None:
            return
        scrub(flow)
        resp = flow.response
        self.state.counters["blobs_streamed"] += 1
        resp.stream = self.watch(flow, ctx)
        ctx.upstream_status = resp.status_code
        if 300 <= resp.status_code < 400 and "Location" in resp.headers:
            # Redirected where the probe was not: hand the redirect on; learn for next time.
            self.blob_modes()[ctx.upstream.ns] = "redirect"
        elif resp.status_code in (401, 403, 429):
            # The client must not be sent to the upstream's token realm: make it fall back.
            mapped = {401: 502, 403: 502, 429: 503}[resp.status_code]
            resp.status_code = mapped
            resp.headers.pop("WWW-Authenticate", None)
            auth = ctx.authorizer
            if auth is not None:
                auth.tokens.invalidate(auth.upstream, auth.scope)
        for name in ("Set-Cookie",):
            resp.headers.pop(name, None)
        ctx.publish(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        ctx = self.context(flow)
        if ctx is not None and ctx.forward is not None:
            logger.debug("GET %s -> %d streamed", ctx.reference, flow.response.status_code if flow.response else 0)

    def error(self, flow: http.HTTPFlow) -> None:
        """A stream cut short: the flow says how far it got."""
        ctx = self.context(flow)
        if ctx is None or ctx.streamed is None or ctx.streamed.ended:
            return
        ctx.streamed.ended = time.monotonic()
        ctx.streamed.cut = True
        ctx.note("pull", f"stream cut after {ctx.streamed.bytes} B: {flow.error.msg if flow.error else 'error'}")
        ctx.publish(flow)


class TokenScrub:
    """Removes the upstream token from forwarded requests before mitmproxy's own addons see them.

    mitmproxy's flow writer (`-w`) and mitmweb run before script addons, and the writer saves
    a flow in its `response` and `error` hooks: this addon is placed first in the master's
    chain (by addons.chain) so that no saved or displayed flow ever carries the token.
    """

    name = "acr-token-scrub"

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        if (flow.metadata.get("acr") or {}).get("forward"):
            scrub(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.responseheaders(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        self.responseheaders(flow)

    def done(self) -> None:
        for flow in mitm.flows_the_writer_holds(ctx.master):
            self.responseheaders(flow)
