"""`.discover TYPE[, TYPE ...]`: find the referrers of the resolved manifest."""

from __future__ import annotations

import logging
import re

from addons.plugin import ProxyPlugin, split_list

logger = logging.getLogger(__name__)

#: A media type (`application/vnd...+json`) or a bare artifact type name (`dadi.image.v1`).
_ARTIFACT_TYPE_RE = re.compile(r"^[\w.+-]+(/[\w.+-]+)?$")


class Discover(ProxyPlugin):
    plugin = "discover"
    routes = frozenset({"manifests"})
    summary = "look up referrers of these artifact types, in order of preference"

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        types = tuple(split_list(text))
        if not types:
            raise ValueError("expected artifact types, e.g. '.discover application/vnd.azure.artifact.streaming.v1'")
        for t in types:
            if not _ARTIFACT_TYPE_RE.match(t):
                raise ValueError(f"expected an artifact type, got '{t}'")
        return types
