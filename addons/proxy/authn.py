"""`.authn MODE`: authorize the flow's upstream requests for its repository's pull scope.

`oauth2` answers whatever the registry's 401 challenge asks for: an OAuth2 POST (ACR's
refresh-token grant), the Docker token GET, Basic, or nothing for an anonymous registry.
Tokens are cached per (upstream, scope) by the shared token client; the request's context
keeps the Authorizer, which gives the header only to the requests sent upstream, so no token
reaches a log line or a flow file.
"""

from __future__ import annotations

import logging

from addons.proxy.context import RequestContext
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import parse_choice
from addons.proxy.upstream import Authorizer, UpstreamError
from addons.registry import oci

logger = logging.getLogger(__name__)

MODES = ("oauth2", "anonymous")


class Authn(ProxyPlugin):
    plugin = "authn"

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_choice(text, MODES, "mode", default="oauth2")

    def authorizer(self, ctx: RequestContext) -> Authorizer:
        return Authorizer(
            tokens=self.state.tokens,
            upstream=ctx.upstream,
            scope=oci.scope_for(ctx.name),
            credentials=ctx.credentials,
            mode=self.config,
        )

    def ready(self, ctx: RequestContext) -> bool:
        """A token (or the knowledge that none is needed) already in the cache."""
        authorizer = self.authorizer(ctx)
        found, header = authorizer.cached_header()
        if found:
            self._use(ctx, authorizer, header)
        return found

    def run(self, ctx: RequestContext) -> None:
        authorizer = self.authorizer(ctx)
        try:
            header = authorizer.header()
        except UpstreamError as e:
            ctx.fail("authn", e)
            logger.debug("%s %s: %s", ctx.method, ctx.name, e.message)
            return
        self._use(ctx, authorizer, header)

    @staticmethod
    def _use(ctx: RequestContext, authorizer: Authorizer, header: str | None) -> None:
        ctx.authorizer = authorizer
        ctx.auth_scheme = header.split(" ", 1)[0].lower() if header else "anonymous"
        ctx.note("authn", f"{ctx.auth_scheme} for {authorizer.scope}")
