"""systemd's notification protocol (sd_notify(3)): one datagram to `$NOTIFY_SOCKET`.

A service of `Type=notify` tells systemd `READY=1` once it serves, `STATUS=...` with what it
is doing, `WATCHDOG=1` at least every `WatchdogSec` (systemd passes it as `$WATCHDOG_USEC`,
and `$WATCHDOG_PID` names the process it expects the pings from), and `STOPPING=1` when it
begins to stop. The socket is an AF_UNIX datagram socket: a path, or an abstract name when
it starts with `@`. A few lines of our own rather than a dependency; sending never raises,
since a service must not fail because its supervisor went away.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

logger = logging.getLogger(__name__)


def socket_address(value: str) -> str | bytes | None:
    """The address to send to: a path, or the bytes of an abstract name (`@name`); None when unusable."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Seconds between two `WATCHDOG=1`: half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3)
    advises; None when no watchdog is asked of this process (unset, not a number, or
    `$WATCHDOG_PID` names another process)."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    return usec / 2e6


class Notifier:
    """Sends notifications to one socket."""

    def __init__(self, address: str | bytes) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier | None:
        """The notifier systemd (or a supervising engine) asked for, else None."""
        address = socket_address((os.environ if env is None else env).get("NOTIFY_SOCKET", ""))
        return cls(address) if address is not None else None

    def send(self, *fields: str) -> bool:
        """One datagram of `KEY=VALUE` lines; False when it could not be sent."""
        data = "\n".join(f.replace("\n", " ") for f in fields).encode()
        try:
            self._sock.sendto(data, self.address)
        except OSError as e:
            logger.debug("systemd notification not sent: %s", e)
            return False
        return True

    def close(self) -> None:
        self._sock.close()
