"""The upstream token taken off forwarded requests before mitmproxy's flow writer or mitmweb sees them."""

from __future__ import annotations

from mitmproxy import ctx, http

from addons.core.mitm.master import flows_the_writer_holds
from addons.proxy.stream import scrub


class TokenScrub:
    """Removes the upstream token from forwarded requests before mitmproxy's own addons see them.

    mitmproxy's flow writer (`-w`) and mitmweb run before script addons, and the writer saves
    a flow in its `response` and `error` hooks: this addon is placed first in the master's
    chain (by addons.chain, ahead of record's RecordScrub) so that no saved or displayed flow
    ever carries the token.
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
        for flow in flows_the_writer_holds(ctx.master):
            self.responseheaders(flow)
