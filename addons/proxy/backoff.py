"""Back off from a registry that says so: after a 429, or a 503 with `Retry-After`, send it nothing
until the time it asked for has passed.

Registries throttle per registry (ACR counts read operations per minute): every request sent
while throttled is refused again and counts against the next window. So the mirror keeps one
deadline per upstream host and refuses at once while it runs; what it answers instead (a
stale tag, or 503 TOOMANYREQUESTS with the remaining `Retry-After`) is the caller's choice.
Without `Retry-After` it waits DEFAULT seconds; never longer than CAP, whatever it is told.
The clock is injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import collections
import email.utils
import math
import threading
import time
from collections.abc import Callable

#: Seconds of back-off after a 429 without `Retry-After`.
DEFAULT = 10.0
#: The longest back-off a registry can ask for (a bad header must not stop pulls for a day).
CAP = 300.0


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delay-seconds or an HTTP-date (RFC 9110); None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up: a client that waits that long finds the window over."""
    return str(max(1, math.ceil(seconds)))


class Backoff:
    """Per upstream host (`host[:port]`, lower case): until when the mirror sends it nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._until: dict[str, float] = {}
        #: 429s and 503s with Retry-After received, by host.
        self.throttled: collections.Counter[str] = collections.Counter()
        #: Requests the mirror refused (or answered stale) without asking, by host.
        self.refusals: collections.Counter[str] = collections.Counter()

    def observe(self, host: str, status: int, retry_after: str | None) -> float | None:
        """Learn from an upstream answer; the back-off it starts, in seconds, or None."""
        if status != 429 and not (status == 503 and retry_after):
            return None
        asked = retry_after_seconds(retry_after)
        seconds = min(CAP, DEFAULT if asked is None else asked)
        host = host.lower()
        with self._lock:
            self.throttled[host] += 1
            until = self.clock() + seconds
            self._until[host] = max(until, self._until.get(host, 0.0))
        return seconds

    @property
    def active(self) -> bool:
        """Whether any host is (or was, until asked) backed off: one cheap test per request."""
        return bool(self._until)

    def remaining(self, host: str) -> float:
        """Seconds of back-off left for `host` (0.0 when it may be asked)."""
        host = host.lower()
        with self._lock:
            until = self._until.get(host)
            if until is None:
                return 0.0
            left = until - self.clock()
            if left <= 0:
                del self._until[host]
                return 0.0
            return left

    def refused(self, host: str) -> None:
        with self._lock:
            self.refusals[host.lower()] += 1

    def windows(self) -> dict[str, float]:
        """Every host still backed off, with the seconds left."""
        with self._lock:
            now = self.clock()
            return {h: u - now for h, u in self._until.items() if u > now}
