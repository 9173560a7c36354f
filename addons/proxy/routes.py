"""`.manifests`, `.blobs`, `.tags`: the routes of `+ .proxy` and the HTTP methods each serves.

A route step opens a chain: the plugins indented under it act on that route's flows only.
Matching a request to a route is the `.proxy` root's job (addons.proxy.front), because it must also
answer what no route serves; the route steps carry which methods they accept.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, ClassVar

from mitmproxy import http

from addons.proxy.context import RequestContext, show_served_from
from addons.proxy.plugin import ProxyPlugin, run_steps
from addons.proxy.state import MirrorState
from addons.runmd.plugin import split_list
from addons.runmd.syntax import Step


def deliver(flow: http.HTTPFlow, ctx: RequestContext) -> None:
    """Put the steps' decision on the flow: the answer, or where mitmproxy streams it from."""
    if ctx.forward is not None:
        flow.request.url = ctx.forward.url
        flow.request.headers.pop("Authorization", None)
        if ctx.forward.authorization:
            flow.request.headers["Authorization"] = ctx.forward.authorization
    elif ctx.answer is not None:
        flow.response = ctx.answer
        show_served_from(flow, ctx.upstream_url())
    ctx.publish(flow)


class Route(ProxyPlugin):
    route_kind: ClassVar[str] = ""
    methods: ClassVar[tuple[str, ...]] = ()

    def __init__(self, step: Step, config: Any, route: Step | None, state: MirrorState) -> None:
        super().__init__(step, config, route, state)
        #: The steps indented under this route, in runmd order (set by addons.chain).
        self.steps: list[ProxyPlugin] = []

    def request(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """The route's steps, for its own flows only (a plain call for the others: every
        route sees every request, and mitmproxy awaits only what is awaitable)."""
        ctx = self.claims(flow)
        if ctx is None:
            return None
        return self._serve(flow, ctx)

    async def _serve(self, flow: http.HTTPFlow, ctx: RequestContext) -> None:
        try:
            await run_steps(ctx, self.steps, self.state)
        finally:
            if flow.live and not flow.response:
                deliver(flow, ctx)

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


class Blobs(Route):
    plugin = "blobs"
    route_kind = "blobs"
    methods = ("GET", "HEAD")


class Tags(Route):
    plugin = "tags"
    route_kind = "tags"
    methods = ("GET",)
