"""A TCP relay on loopback that limits the bandwidth towards the client: a stand-in for a registry
across a slow link (e.g. 100 Mbit/s), in front of the real docker-registry.

Every byte from the server to any client shares one link: each chunk holds the link for
``len(chunk) / rate`` seconds, so parallel connections divide the rate between them, as on a real
link. Requests (client to server) pass unthrottled. Threads, one pair per connection; stops by
itself when the owner calls ``stop`` (or leaves the ``with`` block).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable, Optional

from .ports import LOOPBACK, free_port

CHUNK = 16 * 1024


class Link:
    """The shared downstream link: hands out its time in turn, chunk by chunk."""

    def __init__(self, bits_per_second: float) -> None:
        self.bytes_per_second = bits_per_second / 8
        self._free_at = 0.0
        self._lock = threading.Lock()

    def send_time(self, size: int) -> float:
        """Reserve the link for ``size`` bytes; returns when the last of them has crossed it."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + size / self.bytes_per_second
            return self._free_at


class ThrottledRelay:
    """``127.0.0.1:<port>`` relays to ``target`` (host, port), downstream at ``bits_per_second``."""

    def __init__(self, target: tuple[str, int], bits_per_second: float) -> None:
        self.target = target
        self.link = Link(bits_per_second)
        self.port = free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self._listener: Optional[socket.socket] = None
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> "ThrottledRelay":
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((LOOPBACK, self.port))
        listener.listen(64)
        listener.settimeout(0.1)  # before the thread starts: stop() may close it at once
        self._listener = listener
        self._spawn(self._accept)
        return self

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True, name=f"throttle-{self.port}")
        with self._lock:
            self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._sockets += [client, server]
            self._spawn(self._pump, client, server, False)
            self._spawn(self._pump, server, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        try:
            while not self._stopped.is_set():
                data = src.recv(CHUNK)
                if not data:
                    break
                if throttled:
                    delay = self.link.send_time(len(data)) - time.monotonic()
                    if delay > 0 and self._stopped.wait(delay):
                        break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for s in sockets:
            s.close()
        for t in threads:
            t.join(timeout=5)

    def __enter__(self) -> "ThrottledRelay":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
