"""Listen addresses written in runmd (`localhost:8578`, `127.0.0.1:8578`, `[::1]:8578`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def bind_host(self) -> str:
        """`localhost` binds the IPv4 loopback: resolving it could pick a non-loopback address."""
        return "127.0.0.1" if self.host == "localhost" else self.host

    @property
    def loopback(self) -> bool:
        return is_loopback(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_address(text: str) -> Address:
    """Parse `HOST:PORT` or a bare `PORT` (which means loopback); raise ValueError otherwise."""
    text = text.strip()
    if not text:
        raise ValueError("expected an address HOST:PORT, e.g. localhost:8578")
    if text.isdigit():
        host, port_text = "127.0.0.1", text
    elif text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [IPv6]:PORT, got '{text}'")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got '{text}'")
    if "/" in host or "@" in host or " " in host:
        raise ValueError(f"expected HOST:PORT, got '{text}'")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"port must be a number from 1 to 65535, got '{port_text}'")
    return Address(host, int(port_text))
