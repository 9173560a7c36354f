"""Tag lists through the mirror: the next-page `Link` keeps the way the client reached the upstream."""

from __future__ import annotations

import re
from urllib.parse import quote


def link_with_prefix(link: str, prefix: str) -> str:
    """Keep the `/v2/<registry-host>/` prefix on a tag list's next-page link, for a client that
    chose the upstream by its path."""

    def add(m: re.Match[str]) -> str:
        target = m.group(1)
        if target.startswith("/v2/"):
            target = f"/v2/{prefix}/{target[4:]}"
        return f"<{target}>"

    return re.sub(r"<([^>]*)>", add, link, count=1)


def link_with_ns(link: str, ns: str) -> str:
    """Keep containerd's `ns` on a tag list's next-page link, so the next page reaches the same upstream."""

    def add(m: re.Match[str]) -> str:
        target = m.group(1)
        sep = "&" if "?" in target else "?"
        return f"<{target}{sep}ns={quote(ns, safe='')}>"

    return re.sub(r"<([^>]*)>", add, link, count=1)
