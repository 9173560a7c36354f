"""Loopback port helpers: every server the tests start binds 127.0.0.1 on a port chosen here."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import requests

LOOPBACK = "127.0.0.1"


#: Ports handed out by ``free_port``: below the kernel's ephemeral range (32768-60999 on Linux),
#: so no outgoing connection on the machine can take one between the pick and the server's bind,
#: and cut in slices, one per pytest-xdist worker, so parallel workers never pick the same one.
#: ``LIFEC_TEST_PORT_SLICE=N`` moves a whole run N slices on, so that runs in several checkouts of
#: the project on one machine stay apart as well.
PORT_BASE, SLICE, SLICES = 20000, 500, 24
_next = [0]
_lock = threading.Lock()


def _slice_start() -> Optional[int]:
    """First port of this process's slice, or None when the ephemeral range overlaps them all."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if low < PORT_BASE + SLICE * SLICES:
        return None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ... under xdist
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    index += int(os.environ.get("LIFEC_TEST_PORT_SLICE", "0") or 0)
    return PORT_BASE + SLICE * (index % SLICES)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, from this worker's own slice (kernel's
    pick when there is none); each call moves on, so a port just handed out is not handed again."""
    start = _slice_start()
    if start is not None:
        with _lock:
            if not _next[0]:
                _next[0] = secrets.randbelow(SLICE) + 1  # another run's leftovers are elsewhere
            for _ in range(SLICE):
                port = start + _next[0] % SLICE
                _next[0] += 1
                if _bindable(port):
                    return port
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


class LoopbackConnection:
    """A real TCP connection from `client_host` to a server socket on this machine, held open
    until `close()`: for hooks driven in-process over a flow that stands for it, where `/auth`
    looks the client's socket up in the kernel's table (a made-up address is not found there).
    `::ffff:127.0.0.1` makes an IPv4 client of a dual-stack IPv6 server."""

    def __init__(self, client_host: str = LOOPBACK) -> None:
        v6 = ":" in client_host
        mapped = client_host.startswith("::ffff:")
        family = socket.AF_INET6 if v6 else socket.AF_INET
        self._server = socket.socket(family)
        self._server.bind(("::" if mapped else client_host if v6 else LOOPBACK, 0))
        self._server.listen(1)
        self._client = socket.socket(family)
        self._client.bind((client_host, 0))
        port = self._server.getsockname()[1]
        self._client.connect((client_host if mapped else self._server.getsockname()[0], port))
        self._accepted, peer = self._server.accept()
        #: The client's address and the server's, as the server sees them (mitmproxy's peername, sockname).
        self.peername: tuple = peer
        self.sockname: tuple = self._accepted.getsockname()

    def close(self) -> None:
        for s in (self._accepted, self._client, self._server):
            s.close()

    def __enter__(self) -> "LoopbackConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
