"""Who is on the other end of a loopback connection: the kernel's socket table and /proc.

`/auth` hands out the node's registry credential, so "a client on this machine" is not enough:
any local process, a host-network pod running as nobody for one, can connect to loopback. The
kernel knows more. `/proc/net/tcp` and `/proc/net/tcp6` list every TCP socket of the network
namespace with its local and remote address, the uid that owns it and its inode; the client's
own socket is the row whose local end is the client's address and whose remote end is the
mirror's. Where the mirror sees the host's processes (a systemd service, a `hostPID` pod) the
inode also leads, through `/proc/<pid>/fd`, to the processes holding the socket and to their
executables (`/proc/<pid>/exe`).

Addresses in those tables are hex: an IPv4 address is one 32-bit word and an IPv6 address four,
each printed as the number the host's memory holds (so little-endian bytes on x86), and the
port is a plain 16-bit number. An IPv4 client of a dual-stack IPv6 socket appears as
`::ffff:a.b.c.d`: addresses are compared with that mapping undone.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions

logger = logging.getLogger(__name__)

TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> tuple[IP, int]:
    """`0100007F:1F90` -> (127.0.0.1, 8080); 32 hex digits before the colon for IPv6."""
    host, _, port = text.partition(":")
    words = [int(host[i:i + 8], 16) for i in range(0, len(host), 8)]
    if len(words) not in (1, 4):
        raise ValueError(f"not an address of the socket table: '{text}'")
    packed = b"".join(struct.pack("=I", w) for w in words)
    return unmapped(ipaddress.ip_address(packed)), int(port, 16)


def unmapped(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def endpoint(address: Sequence[Any]) -> tuple[IP, int]:
    """(ip, port) of a socket address as mitmproxy keeps it (`("::1", 40000, 0, 0)`)."""
    return unmapped(ipaddress.ip_address(str(address[0]).split("%", 1)[0])), int(address[1])


@dataclass(frozen=True)
class SocketOwner:
    uid: int
    inode: int


def find_owner(lines: Iterable[str], local: tuple[IP, int], remote: tuple[IP, int]) -> SocketOwner | None:
    """The row of a socket table whose local and remote ends are these."""
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[0] == "sl":
            continue
        try:
            if parse_address(fields[1]) == local and parse_address(fields[2]) == remote:
                return SocketOwner(uid=int(fields[7]), inode=int(fields[9]))
        except ValueError:
            continue
    return None


def socket_owner(client: Sequence[Any], server: Sequence[Any], tables: Sequence[str] = TABLES) -> SocketOwner | None:
    """Blocking: the owner of the client's end of the connection client -> server, if listed."""
    local, remote = endpoint(client), endpoint(server)
    for table in tables:
        try:
            with open(table) as f:
                found = find_owner(f, local, remote)
        except OSError:
            continue
        if found is not None:
            return found
    return None


def holders(inode: int, proc: Path = Path("/proc")) -> list[Path]:
    """Blocking: the executables of the processes that hold socket `inode` (those this
    process can see; a process that ends meanwhile is skipped)."""
    target = f"socket:[{inode}]"
    out: list[Path] = []
    for pid in os.listdir(proc):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(proc / pid / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(proc / pid / "fd" / fd) == target:
                    out.append(Path(os.readlink(proc / pid / "exe")))
                    break
            except OSError:
                continue
    return out


class LocalClients:
    """Decides whether a loopback client may have the credential: root only, and with
    `acr_auth_executables` set, only processes running one of those programs."""

    name = "acr-local-clients"

    def __init__(self) -> None:
        self.executables: frozenset[str] = frozenset()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_auth_executables", Sequence[str], [],
            "Absolute paths of the programs that /auth gives the credential to (e.g. "
            "/opt/overlaybd/bin/overlaybd-tcmu); empty: any process of root. Needs the host's "
            "processes in view (a systemd service, or a pod with hostPID).",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_auth_executables" in updated:
            paths = list(ctx.options.acr_auth_executables)
            for path in paths:
                if not os.path.isabs(path):
                    raise exceptions.OptionsError(f"acr_auth_executables: '{path}' is not an absolute path")
            self.executables = frozenset(os.path.realpath(p) for p in paths)

    def refusal(self, client: Sequence[Any], server: Sequence[Any]) -> str | None:
        """Blocking: why this client may not have the credential, or None when it may."""
        try:
            owner = socket_owner(client, server)
        except ValueError:
            owner = None
        if owner is None:
            return "the client's socket is not in the kernel's socket table"
        if owner.uid != 0:
            return f"the client runs as uid {owner.uid}, not root"
        if not self.executables:
            return None
        programs = holders(owner.inode)
        if not programs:
            return "the process holding the client's socket cannot be seen"
        strangers = sorted({str(p) for p in programs if str(p) not in self.executables})
        if strangers:
            return f"{strangers[0]} is not in acr_auth_executables"
        return None
