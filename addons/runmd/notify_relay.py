"""systemd notifications under an engine: the proxy child reports, the engine passes it on.

systemd takes notifications from the unit's main process (`NotifyAccess=main`), which under
`+ .engine` is the engine, while the proxy that serves (and whose health the watchdog must
reflect) is its child. So the engine gives the child a notification socket of its own (in a
fresh owner-only folder) as `$NOTIFY_SOCKET`, with the unit's `$WATCHDOG_USEC`, and passes
on what arrives there: `READY=1` once the proxy serves, its `STATUS=` lines and its
`WATCHDOG=1`, which the child sends only while its loop and workers answer. A child's
`STOPPING=1` is not passed on: the engine restarts a proxy that stopped, and says `STOPPING=1`
itself when it is asked to stop. While no proxy serves (runtime steps, the back-off before a
restart) the engine feeds the watchdog itself: it is working, and a restart by systemd would
only start the same steps over.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Mapping

from addons.core.sdnotify import Notifier, watchdog_interval

#: The lines of a child's notification that the engine passes on.
PASSED_ON = ("READY=", "STATUS=", "WATCHDOG=")


class NotifyRelay:
    def __init__(self, upstream: Notifier, interval: float | None) -> None:
        self.upstream = upstream
        self.interval = interval
        self.folder = tempfile.mkdtemp(prefix="acr-notify-")
        self.path = os.path.join(self.folder, "notify")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.bind(self.path)
        self._sock.settimeout(min(interval, 1.0) if interval else 1.0)
        #: Whether the running proxy said READY=1 (from then on its pings feed the watchdog).
        self.proxy_ready = False
        self._closed = False
        #: Once the engine said STOPPING=1, nothing more is passed on.
        self._stopping = False
        self._last_ping = 0.0
        self._thread = threading.Thread(target=self._run, name="acr-notify-relay", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> NotifyRelay | None:
        """A relay when this process was asked for notifications (`$NOTIFY_SOCKET`), else None."""
        env = os.environ if env is None else env
        upstream = Notifier.from_env(env)
        if upstream is None:
            return None
        return cls(upstream, watchdog_interval(env, os.getpid()))

    def child_env(self) -> dict[str, str]:
        """The proxy child's environment: this relay as its socket, the same watchdog period."""
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["NOTIFY_SOCKET"] = self.path
        if self.interval is not None:
            env["WATCHDOG_USEC"] = str(int(self.interval * 2e6))
        return env

    def status(self, text: str) -> None:
        if not self._stopping:
            self.upstream.send(f"STATUS={text}")

    def ready(self) -> None:
        """The engine serves without a proxy child (an engine of runtime steps only)."""
        self.upstream.send("READY=1")

    def proxy_exited(self, text: str) -> None:
        self.proxy_ready = False
        self.status(text)

    def stopping(self) -> None:
        self._stopping = True
        self.upstream.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        self.upstream.close()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                data = b""
            except OSError:
                return
            if self._stopping:
                continue
            lines = [line for line in data.decode("utf-8", "replace").split("\n") if line.startswith(PASSED_ON)]
            if "READY=1" in lines:
                self.proxy_ready = True
            if lines:
                self.upstream.send(*lines)
            now = time.monotonic()
            if self.interval is not None and not self.proxy_ready and now - self._last_ping >= self.interval:
                self._last_ping = now
                self.upstream.send("WATCHDOG=1")
