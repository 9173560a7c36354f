"""Telling systemd (or the engine that supervises this proxy) how the mirror is doing.

With `$NOTIFY_SOCKET` set (a `Type=notify` unit, or an engine's relay): `READY=1` and a
`STATUS=` once mitmproxy's servers listen (the `running` hook comes after they are bound),
`WATCHDOG=1` from the event loop every half `$WATCHDOG_USEC` but only while the heartbeat of
`/livez` finds the loop and the worker threads answering (so systemd restarts a mirror whose
workers hang, not just one whose loop stopped), and `STOPPING=1` when it shuts down (not when a
runmd loaded again replaces this addon: the new one says READY=1 again, which systemd allows).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping

from mitmproxy import ctx

from addons.core.liveness import Heartbeat
from addons.core.sdnotify import Notifier, watchdog_interval

logger = logging.getLogger(__name__)


class ServiceNotify:
    name = "acr-service-notify"

    def __init__(self, heartbeat: Heartbeat, where: str, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.heartbeat = heartbeat
        self.where = where
        self.notifier = Notifier.from_env(env)
        self.interval = watchdog_interval(env, os.getpid()) if self.notifier is not None else None
        self._task: asyncio.Task[None] | None = None

    def running(self) -> None:
        if self.notifier is None:
            return
        self.notifier.send("READY=1", f"STATUS=serving on {self.where}")
        if self.interval is not None:
            self._task = asyncio.get_running_loop().create_task(self._watchdog(self.interval))

    async def _watchdog(self, interval: float) -> None:
        assert self.notifier is not None
        failing = False
        while True:
            problems = self.heartbeat.problems()
            if not problems:
                self.notifier.send("WATCHDOG=1", *([f"STATUS=serving on {self.where}"] if failing else []))
            elif not failing:
                logger.error("not feeding the watchdog: %s", "; ".join(problems))
                self.notifier.send("STATUS=not answering: " + "; ".join(problems))
            failing = bool(problems)
            await asyncio.sleep(interval)

    def done(self) -> None:
        """The mirror stops, or (a runmd loaded again) this addon is replaced by a new one."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self.notifier is None:
            return
        if ctx.master.should_exit.is_set():
            self.notifier.send("STOPPING=1", "STATUS=stopping")
        self.notifier.close()
