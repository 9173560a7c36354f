"""Loopback port helpers: every server the tests start binds 127.0.0.1 on a port chosen here."""

from __future__ import annotations

import socket
import time

import requests

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it for us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on host:port right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until host:port accepts connections; raise TimeoutError so a dead server fails fast."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(host, port):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.1f}s")


class ClosedPort:
    """A loopback port that refuses connections and that nobody else can take while held.

    The socket is bound but never listens, so connects get RST at once: the right target for
    hosts.toml ``server`` lines, which must never reach a real registry.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((LOOPBACK, 0))
        self.port: int = int(self._sock.getsockname()[1])
        self.host: str = f"{LOOPBACK}:{self.port}"
        self.url: str = f"http://{self.host}"

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ClosedPort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def direct_session() -> requests.Session:
    """A requests session that ignores proxy settings from the environment: tests talk to loopback."""
    s = requests.Session()
    s.trust_env = False
    return s
