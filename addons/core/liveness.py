"""Whether the mirror's event loop and its worker threads still answer: what `/livez` and the
systemd watchdog report.

A health endpoint that answers while every lookup hangs says nothing. The mirror does its
work in two places: the event loop (every connection, every hook) and the loop's default
executor (the steps that block, run through `asyncio.to_thread`). `Heartbeat` runs on the loop
and, every `interval`, notes that the loop ran and hands the executor an empty job, one at a
time; `problems()` then says which of the two has not answered for longer than `limit`. Asking
never blocks: a job stuck behind busy workers is simply still pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def _nothing() -> None:
    """The job handed to the workers: answering is all it has to do."""


class Heartbeat:
    """Beats on the running loop from `start()` until `stop()`."""

    def __init__(self, interval: float = 1.0, limit: float = 5.0, clock: Callable[[], float] | None = None) -> None:
        self.interval = interval
        self.limit = limit
        self._clock = clock
        self.loop_seen: float | None = None
        #: When the job now waiting for a worker was handed over (None: no job waits).
        self.job_since: float | None = None
        self._task: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def start(self) -> None:
        if self._task is None:
            self.loop_seen = self.now()
            self._task = asyncio.get_running_loop().create_task(self._beat())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.loop_seen = self.now()
            if self.job_since is None:
                self.job_since = self.now()
                loop.run_in_executor(None, _nothing).add_done_callback(self._answered)
            await asyncio.sleep(self.interval)

    def _answered(self, _: object) -> None:
        self.job_since = None

    def problems(self) -> list[str]:
        """What has not answered within `limit` seconds; empty when both do (or before `start`)."""
        now = self.now()
        out = []
        if self.loop_seen is not None and now - self.loop_seen > self.limit:
            out.append(f"the event loop did not run for {now - self.loop_seen:.1f}s")
        if self.job_since is not None and now - self.job_since > self.limit:
            out.append(f"no worker thread answered for {now - self.job_since:.1f}s")
        return out
