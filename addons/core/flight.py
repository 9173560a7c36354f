"""One upstream request for many identical ones, from worker threads and from the event loop alike.

A tag lookup runs on the event loop when its token is cached and in a worker thread when it
is not, so concurrent identical lookups may come from both: they share one
`concurrent.futures.Future`, which a thread waits on and a coroutine awaits. Whoever comes
first leads and does the work; the others join and get the same result or exception. A
joiner that goes away (its client hung up, its task is cancelled) leaves the shared work
running for the rest: the coroutine leader's work runs in its own task and every await on
it is shielded. The work itself is bounded by the upstream timeouts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

T = TypeVar("T")


class Flights:
    """Work in flight by key; `joined` counts the callers that shared one, by kind."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[Hashable, concurrent.futures.Future] = {}
        self.joined: collections.Counter[str] = collections.Counter()

    def _enter(self, kind: str, key: Hashable) -> tuple[concurrent.futures.Future, bool]:
        with self._lock:
            future = self._running.get(key)
            if future is not None:
                self.joined[kind] += 1
                return future, False
            future = self._running[key] = concurrent.futures.Future()
            return future, True

    def _leave(self, key: Hashable) -> None:
        with self._lock:
            self._running.pop(key, None)

    def run(self, kind: str, key: Hashable, work: Callable[[], T]) -> tuple[T, bool]:
        """Blocking: `work()`'s result, and whether this caller joined another's work."""
        future, leader = self._enter(kind, key)
        if not leader:
            return future.result(), True
        try:
            result = work()
        except BaseException as e:
            self._leave(key)
            future.set_exception(e)
            raise
        self._leave(key)
        future.set_result(result)
        return result, False

    async def arun(self, kind: str, key: Hashable, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """On the event loop: the awaited result of `work()`, and whether this caller joined."""
        future, leader = self._enter(kind, key)
        if not leader:
            return await asyncio.shield(asyncio.wrap_future(future)), True
        task = asyncio.ensure_future(work())

        def settle(done: asyncio.Future) -> None:
            self._leave(key)
            if done.cancelled():
                future.cancel()
            elif done.exception() is not None:
                future.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                future.set_result(done.result())

        task.add_done_callback(settle)
        return await asyncio.shield(task), False

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)
