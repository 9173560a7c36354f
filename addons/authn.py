"""`.authn MODE`: get a token for the flow's repository scope and authorize the upstream request."""

from __future__ import annotations

import logging

from addons.plugin import ProxyPlugin

logger = logging.getLogger(__name__)

MODES = ("oauth2", "token", "basic", "anonymous")


class Authn(ProxyPlugin):
    plugin = "authn"
    summary = "authenticate upstream as the 401 challenge asks (oauth2: prefer the OAuth2 POST)"

    @classmethod
    def parse(cls, text: str) -> str:
        mode = (text or "oauth2").lower()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{text}' (expected: {', '.join(MODES)})")
        return mode
