"""`.resolve [ACCEPT, ...]`: fetch the manifest upstream and answer HEAD and GET consistently."""

from __future__ import annotations

import logging
import re

from addons.plugin import ProxyPlugin, split_list

logger = logging.getLogger(__name__)

_MEDIA_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+$")


def parse_media_types(text: str) -> tuple[str, ...]:
    types = tuple(split_list(text))
    for t in types:
        if not _MEDIA_TYPE_RE.match(t):
            raise ValueError(f"expected media types like 'application/vnd.oci.image.index.v1+json', got '{t}'")
    return types


class Resolve(ProxyPlugin):
    plugin = "resolve"
    routes = frozenset({"manifests"})
    summary = "fetch the manifest upstream, also accepting the listed media types"

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        return parse_media_types(text)
