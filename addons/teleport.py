"""`.teleport FORMAT`: answer a tag pull with the streamable image its referrers name."""

from __future__ import annotations

import logging

from addons.plugin import ProxyPlugin

logger = logging.getLogger(__name__)

FORMATS = ("overlaybd",)


class Teleport(ProxyPlugin):
    plugin = "teleport"
    routes = frozenset({"manifests"})
    summary = "answer tag resolution with the streamable (overlaybd) manifest"

    @classmethod
    def parse(cls, text: str) -> str:
        fmt = (text or "overlaybd").lower()
        if fmt not in FORMATS:
            raise ValueError(f"unknown format '{text}' (expected: {', '.join(FORMATS)})")
        return fmt
