"""`.pull [follow|client]`: stream blobs from upstream, following storage redirects."""

from __future__ import annotations

import logging

from addons.plugin import ProxyPlugin

logger = logging.getLogger(__name__)

REDIRECTS = ("follow", "client")


class Pull(ProxyPlugin):
    plugin = "pull"
    routes = frozenset({"blobs", "tags"})
    summary = "stream the blob (or tag list) from upstream; 'client' hands storage redirects to the client"

    @classmethod
    def parse(cls, text: str) -> str:
        mode = (text or "follow").lower()
        if mode not in REDIRECTS:
            raise ValueError(f"unknown redirect mode '{text}' (expected: {', '.join(REDIRECTS)})")
        return mode
