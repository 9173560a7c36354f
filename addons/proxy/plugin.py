"""The base class of `+ .proxy` steps, and how a route runs its steps with one thread hop at most.

A step is a stage of its route's chain: `ready` does its job from memory when it can (never
blocking: it runs on the event loop), `run` does it with upstream requests (blocking: it runs
in a worker thread). A step whose upstream request is small and common (`.resolve`'s tag
lookup) also has `fetch`, which makes it on the event loop when nothing on the way blocks
(the token is cached); `.authn`'s `fetch` awaits a missing token on the loop, fetched once in
a worker thread for every request that needs it. The route step (`.manifests`, `.blobs`,
`.tags`) calls each step's `ready`, then `fetch`, in runmd order; the first one that must
wait for blocking I/O hands itself and every later step to *one* worker thread. So a request
whose every decision is cached costs no thread hop, a warm tag lookup none either, and any
other request one (plus the token's, for the requests that start a token fetch).
Steps read and write the request's `RequestContext` only; the route puts the answer on the
flow once, on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, ClassVar

from mitmproxy import http

from addons.proxy.context import RequestContext
from addons.proxy.upstream import NeedsIO
from addons.proxy.state import MirrorState
from addons.runmd.plugin import Plugin
from addons.runmd.syntax import Step

logger = logging.getLogger(__name__)


class ProxyPlugin(Plugin):
    """A step of `+ .proxy`: a mitmproxy addon that acts only on flows of its route."""

    roots = frozenset({"proxy"})
    #: Route kinds this plugin may be placed under.
    routes: ClassVar[frozenset[str]] = frozenset({"manifests", "blobs", "tags"})

    def __init__(self, step: Step, config: Any, route: Step | None, state: MirrorState) -> None:
        super().__init__(step, config)
        self.route = route
        self.state = state
        # mitmproxy requires unique addon names; a plugin may appear under several routes.
        self.name = f"acr-{step.id}-{self.plugin}"

    def context(self, flow: http.HTTPFlow) -> RequestContext | None:
        """The context of a flow of this step's route, whatever its state (for response hooks)."""
        ctx = self.state.contexts.get(flow)
        if ctx is None or self.route is None or ctx.route_id != self.route.id:
            return None
        return ctx

    def claims(self, flow: http.HTTPFlow) -> RequestContext | None:
        """The guard a request hook starts with: the context of a live, unanswered flow of this route."""
        if flow.response or flow.error or not flow.live:
            return None
        return self.context(flow)

    # -- the stage protocol (driven by the route, see the module docstring) ----------------

    def applies(self, ctx: RequestContext) -> bool:
        """Whether this step has work for the request; by default while nothing has answered."""
        return ctx.answer is None and ctx.forward is None

    def ready(self, ctx: RequestContext) -> bool:
        """Non-blocking: do the job from memory and return True, or return False to be `run`."""
        return False

    def run(self, ctx: RequestContext) -> None:
        """Blocking (in a worker thread): do the job with upstream requests."""
        raise NotImplementedError

    #: Whether `fetch` can do the job on the event loop: whether the step has one.
    on_loop: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.on_loop = cls.fetch is not ProxyPlugin.fetch

    async def fetch(self, ctx: RequestContext) -> bool:
        """On the event loop, never blocking: do the job with upstream requests and return
        True, or return False to be `run` in the worker thread."""
        return False


def _run_blocking(ctx: RequestContext, steps: Sequence[ProxyPlugin]) -> None:
    for step in steps:
        if not step.applies(ctx):
            continue
        try:
            done = step.ready(ctx)
        except NeedsIO:
            done = False
        if not done:
            step.run(ctx)


async def run_steps(ctx: RequestContext, steps: Sequence[ProxyPlugin], state: MirrorState) -> None:
    """Each step in order: from memory or with I/O on the event loop, then the rest in one worker thread."""
    for i, step in enumerate(steps):
        if not step.applies(ctx):
            continue
        try:
            if step.ready(ctx):
                continue
        except NeedsIO:
            pass
        if step.on_loop and await step.fetch(ctx):
            continue
        state.counters["worker_hops"] += 1
        await asyncio.to_thread(_run_blocking, ctx, steps[i:])
        return
