"""The streamed path: a blob body that mitmproxy streams (a client on TLS or HTTP/2, or a
`client`-mode redirect), counted as it passes, checked against its digest, and cut when its
upstream stalls.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

from mitmproxy import http

from addons.core.mitm import handoff
from addons.proxy.context import RequestContext, Streamed, size_text
from addons.proxy.state import MirrorState

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
        if streamed is not None:
            streamed.last = self.last
        self._on_done = done
        self.digest = digest
        self.hasher = hashlib.new(digest.split(":", 1)[0]) if digest else None
        self.held = b""
        self.cut = cut
        self.mismatch = False

    def __call__(self, chunk: bytes) -> bytes | list[bytes]:
        self.last = time.monotonic()
        if self.streamed is not None:
            self.streamed.last = self.last
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
    early, and the client sees a broken transfer (never a short blob with success). The
    streams it watches are the requests in flight whose context says their body is being
    forwarded and has not ended; when the last chunk passed is in the context too.
    """

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Watch the streams in flight until none is left."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not serving (hooks called directly, e.g. offline replay)
                return
            self._task = loop.create_task(self._run())

    def streams(self) -> list[tuple[http.HTTPFlow, RequestContext, Streamed]]:
        """The live forwarded bodies that are still moving (or should be)."""
        return [(flow, ctx, ctx.streamed) for flow, ctx in list(self.state.contexts.items())
                if flow.live and ctx.forward is not None and ctx.streamed is not None
                and not ctx.streamed.ended and not ctx.stalled]

    async def _run(self) -> None:
        settings = self.state.settings
        while self.streams():
            await asyncio.sleep(min(1.0, settings.upstream_timeout / 4))
            limit = settings.upstream_timeout
            now = time.monotonic()
            for flow, ctx, streamed in self.streams():
                if now - streamed.last <= limit:
                    continue
                if handoff.client_has_unsent_bytes(flow):
                    streamed.last = now  # the client is slow, not the upstream (backpressure)
                    continue
                ctx.stalled = True
                ctx.note("pull", f"upstream stalled for {limit:g} s mid-body: connection closed")
                ctx.publish(flow)
                handoff.abort_server_connection(flow)
