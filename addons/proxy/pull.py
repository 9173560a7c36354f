"""`.pull [follow|client]`: blobs from upstream at the speed of the wire; tag lists passed through.

A blob GET costs one upstream request (two where the registry redirects to storage): the
mirror makes the GET itself in the route's worker thread (renewing a stale token once,
following a storage redirect without the registry's token, or in `client` mode handing it to
the client), answers the flow with the upstream's status and headers, and hands the body to
addons.proxy.relay, which a thread writes straight to the client socket (addons.core.mitm.handoff
`hand_off`), checking a whole blob against its digest and cutting the transfer before its
last byte when it does not match. The flow stays a mitmproxy flow (status, headers, real
duration in mitmweb; counted by /metrics; saved without a token).

A client connection that cannot be handed off (TLS or HTTP/2 to the mirror) is streamed by
mitmproxy: probed first, then forwarded, chunk by chunk, never held whole (addons.proxy.stream
counts, checks and watches it). HEAD requests and tag lists are small: the mirror answers them
itself (addons.proxy.tags keeps a tag list's next-page link on the mirror).
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from mitmproxy import ctx, http
from mitmproxy.flow import Error as flow_error

from addons.core.mitm import handoff
from addons.registry import oci
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import parse_choice
from addons.proxy.context import Forward, RequestContext, Streamed
from addons.proxy.tail import summary
from addons.proxy.relay import BlobBody, checkable
from addons.proxy.stream import Activity, StallWatch, scrub, streamed_note
from addons.proxy.tags import link_with_ns, link_with_prefix
from addons.proxy.upstream import Authorizer, UpstreamError, passed_headers, send

logger = logging.getLogger(__name__)

REDIRECTS = ("follow", "client")
MAX_REDIRECTS = 5
#: A redirect's own body up to this size is read so that its connection goes back to the pool.
SMALL_BODY = 64 * 1024


def same_origin(a: str, b: str) -> bool:
    x, y = urlsplit(a), urlsplit(b)
    return (x.scheme, x.hostname, x.port) == (y.scheme, y.hostname, y.port)


class Pull(ProxyPlugin):
    plugin = "pull"
    routes = frozenset({"blobs", "tags"})
    answers = frozenset({"blobs", "tags"})

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_choice(text, REDIRECTS, "redirect mode", default="follow")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.stalls = StallWatch(self.state.settings, self.context)

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_follow_redirects", bool, True,
            "Follow blob redirects to storage in the mirror (Authorization is dropped when the host "
            "changes); off hands the redirect to the client.",
        )

        loader.add_option(
            "acr_verify_blobs", bool, True,
            "Check each whole blob against its digest as it passes and cut the client's transfer "
            "before the last byte when it does not match (costs one sha256 pass over the bytes).",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_follow_redirects" in updated:
            self.state.settings.follow_redirects = ctx.options.acr_follow_redirects
        if "acr_verify_blobs" in updated:
            self.state.settings.verify_blobs = ctx.options.acr_verify_blobs

    @property
    def follow(self) -> bool:
        return self.config == "follow" and self.state.settings.follow_redirects

    # -- blocking helpers (run in a thread) ---------------------------------------------

    def probe(self, url: str, method: str, extra: dict[str, str], auth: Authorizer | None, what: str,
              stop_at_storage: bool = False) -> tuple[str, requests.Response | None]:
        """Follow registry redirects; return the URL to stream from and, for HEAD, the answer
        (with `stop_at_storage`, the storage URL without asking storage)."""
        current, current_auth = url, auth
        for _ in range(MAX_REDIRECTS + 1):
            resp = send(self.state, method, current, headers=extra, auth=current_auth, stream=method != "HEAD", what=what)
            if resp.is_redirect and "Location" in resp.headers:
                resp.close()
                target = urljoin(current, resp.headers["Location"])
                if not same_origin(target, current):
                    current_auth = None  # a storage host never gets the registry's token
                current = target
                if current_auth is None and (method == "GET" or stop_at_storage):
                    return current, None  # storage: let mitmproxy stream it
                continue
            if resp.status_code >= 400:
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
        what = f"tags of {ctx.name}" if ctx.route == "tags" else f"blob {ctx.reference}"
        return ctx.upstream_url(), what

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        ctx = self.context(flow)
        if ctx is not None and ctx.route == "blobs" and ctx.method == "GET":
            ctx.hand_off = handoff.can_hand_off(flow)

    def ready(self, ctx: RequestContext) -> bool:
        """A streamed blob GET that needs no probe (`client` mode) and whose token is cached."""
        if self.follow or ctx.route != "blobs" or ctx.method != "GET" or ctx.hand_off:
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
                if ctx.prefix and "Link" in ctx.answer.headers:
                    ctx.answer.headers["Link"] = link_with_prefix(ctx.answer.headers["Link"], ctx.prefix)
                ctx.note("pull", f"{ctx.method} answered by the mirror ({ctx.answer.status_code})")
                return
            if ctx.hand_off:
                self.open_blob(ctx, url, what)
            else:
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
            resp = send(self.state, method, url, headers=extra, auth=auth, what=what)
            if resp.status_code >= 400:
                raise UpstreamError.from_status(resp, what)
        try:
            body = b"" if method == "HEAD" else resp.raw.read(4 * 1024 * 1024 + 1, decode_content=True)
        except (requests.RequestException, OSError):
            raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: upstream body cut short") from None
        finally:
            resp.close()
        if len(body) > 4 * 1024 * 1024:
            raise UpstreamError(502, "UNSUPPORTED", f"{what}: upstream answer is larger than 4 MiB")
        headers = passed_headers(resp)
        if method != "HEAD":
            headers.pop("Content-Length", None)  # the body may have been decoded
        if ns and "Link" in headers:
            headers["Link"] = link_with_ns(headers["Link"], ns)
        out = http.Response.make(resp.status_code, body, headers)
        if method == "HEAD" and "Content-Length" in headers:
            out.headers["Content-Length"] = headers["Content-Length"]
        return out

    def open_blob(self, ctx: RequestContext, url: str, what: str) -> None:
        """Blocking: the blob's one upstream GET; its body is written by the hand-off.

        A redirect to another host is followed without the registry's token (or, in `client`
        mode, handed to the client); a 401 renews the token once (in `send`).
        """
        headers = {**ctx.pass_headers, "Accept-Encoding": "identity"}
        current, auth, redirected = url, ctx.authorizer, False
        for _ in range(MAX_REDIRECTS + 1):
            resp = send(self.state, "GET", current, headers=headers, auth=auth, stream=True, what=what)
            if not (resp.is_redirect and "Location" in resp.headers):
                break
            target = urljoin(current, resp.headers["Location"])
            self._drain(resp)
            if not same_origin(target, current):
                auth = None  # a storage host never gets the registry's token
                self.state.blob_modes[ctx.upstream.ns] = "redirect"
                if not self.follow:
                    ctx.answer = http.Response.make(resp.status_code, b"", {
                        "Location": target, oci.API_VERSION_HEADER: oci.API_VERSION})
                    ctx.note("pull", f"redirect to storage {urlsplit(target).netloc} handed to the client")
                    return
            current, redirected = target, redirected or not same_origin(target, url)
        else:
            raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: too many redirects upstream")
        if resp.status_code >= 300:
            raise UpstreamError.from_status(resp, what)  # reads the error body the client gets
        if not redirected:
            self.state.blob_modes[ctx.upstream.ns] = "direct"
        length = resp.headers.get("Content-Length")
        whole = resp.status_code == 200 and "Range" not in ctx.pass_headers
        digest = checkable(ctx.reference) if whole and self.state.settings.verify_blobs else None
        body = BlobBody(resp, int(length) if length and length.isdigit() else None, digest, redirected, current)
        answer = http.Response.make(resp.status_code, b"", passed_headers(resp))
        if body.length is None:
            del answer.headers["Content-Length"]
            answer.headers["Transfer-Encoding"] = "chunked"
        else:
            answer.headers["Content-Length"] = str(body.length)  # make() set that of the empty body
        ctx.answer, ctx.body = answer, body
        ctx.upstream_status = resp.status_code
        host = urlsplit(current).netloc
        ctx.note("pull", f"one GET from {'storage ' + host if redirected else 'the registry'}, body handed off")

    @staticmethod
    def _drain(resp: requests.Response) -> None:
        """Read a small answer's body so its connection is reused; drop a large one's connection."""
        try:
            length = int(resp.headers.get("Content-Length", "-1"))
            if 0 <= length <= SMALL_BODY:
                resp.content
        except (requests.RequestException, OSError, ValueError):
            pass
        finally:
            resp.close()

    def forward_blob(self, ctx: RequestContext, url: str, extra: dict[str, str], what: str) -> None:
        """Blocking: find the URL to stream from; mitmproxy streams it to the client."""
        auth = ctx.authorizer
        modes = self.state.blob_modes
        ns = ctx.upstream.ns
        try:
            if not self.follow:
                target = url
            elif modes.get(ns) == "direct":
                # Known to serve blobs itself: a HEAD checks reachability and renews a stale token.
                self.probe(url, "HEAD", extra, auth, what)
                target = url
            else:
                # A HEAD learns where the bytes are: a GET's body would be dropped and fetched again.
                target, resp = self.probe(url, "HEAD", extra, auth, what, stop_at_storage=True)
                if resp is not None:
                    resp.close()
                modes[ns] = "direct" if target == url else "redirect"
        except UpstreamError as e:
            if e.body is None:
                raise
            target = url  # an error the client gets as it is (404): the GET streams the registry's body
        header = auth.header() if same_origin(target, url) and auth is not None else None
        self._forward(ctx, url, target, header)

    @staticmethod
    def _forward(ctx: RequestContext, url: str, target: str, header: str | None) -> None:
        ctx.forward = Forward(target, redirected=target != url, authorization=header or None)
        host = urlsplit(target).netloc
        ctx.note("pull", f"streaming from {'storage ' + host if target != url else 'the registry'}")

    def watch(self, flow: http.HTTPFlow, ctx: RequestContext | None = None, digest: str | None = None) -> "Activity":
        """Stream the body, counting it and noting when each chunk passes, so a stalled upstream
        can be cut off and the flow tells how many bytes passed, how fast and from where (and
        checking it against `digest` when given)."""
        cut = lambda: handoff.abort_client(flow)  # noqa: E731
        if ctx is not None and ctx.forward is not None:
            ctx.streamed = Streamed(started=time.monotonic(),
                                    source="storage" if ctx.forward.redirected else "registry")

            def done() -> None:
                assert ctx.streamed is not None
                ctx.note("pull", streamed_note(ctx.streamed))
                ctx.publish(flow)

            activity = Activity(ctx.streamed, done, digest, cut)
        else:
            activity = Activity(None, None, digest, cut)
        self.stalls.add(flow, activity)
        return activity

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        ctx = self.context(flow)
        if ctx is None or flow.response is None:
            return
        if ctx.body is not None:
            return self.hand_off(flow, ctx, ctx.body)
        if ctx.forward is None:
            return
        scrub(flow)
        resp = flow.response
        self.state.counters["blobs_streamed"] += 1
        whole = resp.status_code == 200 and "Range" not in ctx.pass_headers and self.state.settings.verify_blobs
        digest = checkable(ctx.reference) if whole and ctx.route == "blobs" else None
        resp.stream = self.watch(flow, ctx, digest)
        ctx.upstream_status = resp.status_code
        if resp.status_code >= 400:
            ctx.why = f"upstream answered {resp.status_code}"
        if 300 <= resp.status_code < 400 and "Location" in resp.headers:
            # Redirected where the probe was not: hand the redirect on; learn for next time.
            self.state.blob_modes[ctx.upstream.ns] = "redirect"
        elif resp.status_code in (401, 403, 429):
            # The client must not be sent to the upstream's token realm: make it fall back.
            mapped = {401: 502, 403: 502, 429: 503}[resp.status_code]
            ctx.why = f"upstream refused the mirror ({resp.status_code})"
            resp.status_code = mapped
            resp.headers.pop("WWW-Authenticate", None)
            auth = ctx.authorizer
            if auth is not None:
                auth.tokens.invalidate(auth.upstream, auth.scope)
        for name in ("Set-Cookie",):
            resp.headers.pop(name, None)
        ctx.publish(flow)

    def hand_off(self, flow: http.HTTPFlow, ctx: RequestContext, body: BlobBody) -> None:
        """Have the blob's body written past mitmproxy's layers once the head is out."""

        def done(ok: bool) -> None:
            # mitmweb's size column counts stored bodies only: the headline says what went out.
            ctx.streamed = Streamed(bytes=body.sent, started=0.0, ended=body.seconds,
                                    source="storage" if body.redirected else "registry", cut=not ok)
            ctx.note("pull", streamed_note(ctx.streamed) + (f", {body.error}" if body.error else
                                                           ", digest checked" if body.digest else ", unchecked (range)"))
            if body.error == "upstream stalled mid-body":
                ctx.stalled = True
            if not ok:
                self.state.counters["blobs_cut"] += 1
                flow.error = flow_error(f"blob body cut: {body.error}")
                logger.warning("%s", summary(flow))  # the request's line was written with the head
            ctx.publish(flow)
            logger.debug("GET %s: %s", ctx.reference, body.summary())

        self.state.counters["blobs_streamed"] += 1
        # The flow shows where the bytes came from, as a forwarded flow does (flow files
        # scrub a storage URL's signature); the request is never sent by mitmproxy.
        flow.request.url = body.url or flow.request.url
        if handoff.hand_off(flow, body.write, done):
            return
        # The connection changed under us (closed meanwhile): never leave a client waiting for a body.
        body.close()
        ctx.body = None
        err = UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"blob {ctx.reference}: the client connection cannot take the body")
        ctx.fail("pull", err)
        flow.response = ctx.answer
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
