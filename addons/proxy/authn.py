"""`.authn MODE`: authorize the flow's upstream requests for its repository's pull scope.

`oauth2` answers whatever the registry's 401 challenge asks for: an OAuth2 POST (ACR's
refresh-token grant), the Docker token GET, Basic, or nothing for an anonymous registry.
Tokens are cached per (upstream, scope) by the shared token client; the header itself stays
in the private per-flow table so no token reaches a log line or a flow file.
"""

from __future__ import annotations

import asyncio
import logging

from mitmproxy import http

from addons.registry import oci
from addons.proxy.plugin import ProxyPlugin
from addons.proxy.state import info, note
from addons.proxy.upstream import Authorizer, UpstreamError, token_client

logger = logging.getLogger(__name__)

MODES = ("oauth2", "anonymous")


class Authn(ProxyPlugin):
    plugin = "authn"
    summary = "authenticate upstream as the 401 challenge asks; 'anonymous' never sends credentials"

    @classmethod
    def parse(cls, text: str) -> str:
        mode = (text or "oauth2").lower()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{text}' (expected: {', '.join(MODES)})")
        return mode

    async def request(self, flow: http.HTTPFlow) -> None:
        if not self.claims(flow):
            return
        meta = info(flow)
        private = self.state.private_of(flow)
        authorizer = Authorizer(
            tokens=token_client(self.state),
            upstream=self.state.upstreams[meta["ns"].lower()],
            scope=oci.scope_for(meta["name"]),
            credentials=private.get("credentials"),
            mode=self.config,
        )
        try:
            header = await asyncio.to_thread(authorizer.header)
        except UpstreamError as e:
            flow.response = e.response(flow.request.method)
            note(flow, "authn", e.message)
            logger.debug("%s %s: %s", flow.request.method, meta["name"], e.message)
            return
        private["authorizer"] = authorizer
        scheme = header.split(" ", 1)[0].lower() if header else "anonymous"
        meta["auth"] = scheme
        note(flow, "authn", f"{scheme} for {authorizer.scope}")
