"""The streamed path: a blob body that mitmproxy streams (a client on TLS or HTTP/2, or a
`client`-mode redirect), counted as it passes, checked against its digest, and cut when its
upstream stalls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import weakref
from collections.abc import Callable

from mitmproxy import http

from addons.core.mitm import handoff
from addons.proxy.context import RequestContext, Streamed, size_text
from addons.proxy.state import Settings

logger = logging.getLogger(__name__)


class Activity:
    """A pass-through stream function that counts the bytes and remembers when data last moved.

    With a `digest`, it also checks a whole blob streamed by mitmproxy (a client on TLS or
    HTTP/2): each chunk is held back until the next one arrives, and at the end the last one
    goes out only if the bytes matched; otherwise `cut` breaks the client's connection.
    """

    def __init__(self, streamed: Streamed | None = None, done: Callable[[], None] | None = None,
                 digest: str | None = None, cut: Callable[[], object] | None = None) -> None:
        self.last = time.monotonic()
        self.done = False
        self.streamed = streamed
        self._on_done = done
        self.digest = digest
        self.hasher = hashlib.new(digest.split(":", 1)[0]) if digest else None
        self.held = b""
        self.cut = cut
        self.mismatch = False

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.last = time.monotonic()
        if self.streamed is not None:
            self.streamed.bytes += len(chunk)
        if not chunk and not self.done:
            self.done = True  # mitmproxy calls it with b"" at the end of the body
            if self.streamed is not None:
                self.streamed.ended = self.last
        if self.hasher is None:
            if self.done and self._on_done is not None and not chunk:
                self._finish()
            return chunk
        if chunk:
            self.hasher.update(chunk)
            out, self.held = self.held, chunk
            return [out] if out else []
        out, self.held = self.held, b""
        if f"{self.hasher.name}:{self.hasher.hexdigest()}" != self.digest:
            self.mismatch = True
            if self.streamed is not None:
                self.streamed.cut = True
            logger.warning("blob %s: upstream bytes do not match: transfer cut", self.digest)
            if self.cut is not None:
                self.cut()
            self._finish()
            return []
        self._finish()
        return [out] if out else []

    def _finish(self) -> None:
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()


def streamed_note(s: Streamed) -> str:
    """The pull step's last note for a blob body, however it was streamed."""
    return f"streamed {s.bytes} B ({size_text(s.bytes)}) in {s.seconds:.3f} s from {s.source}"


def scrub(flow: http.HTTPFlow) -> None:
    """Remove the upstream token from a forwarded request once it is on the wire."""
    flow.request.headers.pop("Authorization", None)


class StallWatch:
    """Cuts the upstream connection of a streamed body that has not moved for the upstream timeout.

    mitmproxy itself waits 10 minutes; closing the connection makes it end the response
    early, and the client sees a broken transfer (never a short blob with success).
    """

    def __init__(self, settings: Settings, context: Callable[[http.HTTPFlow], RequestContext | None]) -> None:
        self.settings = settings
        self.context = context
        self._watched: weakref.WeakKeyDictionary[http.HTTPFlow, Activity] = weakref.WeakKeyDictionary()
        self._task: asyncio.Task[None] | None = None

    def add(self, flow: http.HTTPFlow, activity: Activity) -> None:
        """Watch `activity`, the stream function of `flow`'s body, until it is done."""
        self._watched[flow] = activity
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not serving (hooks called directly, e.g. offline replay)
                return
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        while self._watched:
            await asyncio.sleep(min(1.0, self.settings.upstream_timeout / 4))
            limit = self.settings.upstream_timeout
            now = time.monotonic()
            for flow, activity in list(self._watched.items()):
                if activity.done or not flow.live:
                    self._watched.pop(flow, None)
                elif now - activity.last > limit and handoff.client_has_unsent_bytes(flow):
                    activity.last = now  # the client is slow, not the upstream (backpressure)
                elif now - activity.last > limit:
                    self._watched.pop(flow, None)
                    ctx = self.context(flow)
                    if ctx is not None:
                        ctx.stalled = True
                        ctx.note("pull", f"upstream stalled for {limit:g} s mid-body: connection closed")
                        ctx.publish(flow)
                    handoff.abort_server_connection(flow)
