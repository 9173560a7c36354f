"""`.manifests`, `.blobs`, `.tags`: the routes of `+ .proxy` and the HTTP methods each serves.

A route step opens a chain: the plugins indented under it act on that route's flows only.
Matching a request to a route is the `.proxy` root's job (addons.proxy.front), because it must also
answer what no route serves; the route steps carry which methods they accept.
"""

from __future__ import annotations

from typing import ClassVar

from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import split_list


class Route(ProxyPlugin):
    route_kind: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def parse(cls, text: str) -> frozenset[str]:
        items = [m.upper() for m in split_list(text)]
        if not items:
            raise ValueError(
                f"expected the methods served, e.g. '.{cls.plugin} {', '.join(m.lower() for m in cls.methods)}'"
            )
        for m in items:
            if m not in cls.methods:
                raise ValueError(
                    f"unknown method '{m.lower()}' (expected: {', '.join(m.lower() for m in cls.methods)})"
                )
        return frozenset(items)


class Manifests(Route):
    plugin = "manifests"
    route_kind = "manifests"
    methods = ("GET", "HEAD")
    summary = "serve /v2/<name>/manifests/<reference> for the listed methods"


class Blobs(Route):
    plugin = "blobs"
    route_kind = "blobs"
    methods = ("GET", "HEAD")
    summary = "serve /v2/<name>/blobs/<digest> for the listed methods"


class Tags(Route):
    plugin = "tags"
    route_kind = "tags"
    methods = ("GET",)
    summary = "serve /v2/<name>/tags/list for the listed methods"
