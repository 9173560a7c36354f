"""A blob's body, copied from the mirror's own upstream response to the client's socket.

`.pull` makes the one upstream GET of a blob itself (following a storage redirect, renewing a
stale token), answers the flow with the upstream's status and headers, and hands the body to
`BlobBody.write`, which addons.core.mitm runs in a thread on a copy of the client socket: a
loop of `readinto` a reused buffer, `sha256.update`, `sendall`, with no event-loop work per
chunk. A whole blob (200 to a GET without Range) is checked against the digest it was asked
for: the last chunk is written only after the digest matched, so a registry that sends other
bytes (or fewer or more than it announced) never gives the client a success. Range answers
(206) are passed unchecked: a part cannot be checked against the digest of the whole.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import requests

logger = logging.getLogger(__name__)

#: Bytes per read: large enough that per-call costs vanish, small enough that 64 parallel
#: pulls hold 16 MiB of buffers.
CHUNK = 256 * 1024


#: Digest algorithms a blob reference may use (the OCI distribution spec's registered ones).
CHECKED = frozenset({"sha256", "sha512"})


def checkable(reference: str) -> str | None:
    """The digest to check a whole blob against, or None for an algorithm not checked here."""
    algorithm, _, hexdigest = reference.partition(":")
    return reference if algorithm in CHECKED and hexdigest else None


class BodyError(Exception):
    """The upstream's body is not the blob: the client's transfer is cut."""


def body_reader(resp: requests.Response) -> Any:
    """The object to `readinto` from: http.client's response under urllib3 (no extra copy of
    each chunk), else urllib3's own response (its `readinto` copies once more)."""
    fp = getattr(resp.raw, "_fp", None)
    return fp if fp is not None and hasattr(fp, "readinto") else resp.raw


@dataclass
class BlobBody:
    """One blob body to copy; what happened is kept for the flow's record."""

    resp: requests.Response = field(repr=False)
    #: Bytes announced by the upstream (Content-Length), or None for a chunked body.
    length: int | None
    #: The digest the bytes must match (e.g. sha256:<hex>), or None to pass them unchecked.
    digest: str | None
    redirected: bool = False
    sent: int = 0
    seconds: float = 0.0
    error: str = ""

    def write(self, sock: socket.socket) -> bool:
        """Blocking: copy the body to `sock`; True when the whole, matching body was written."""
        start = time.monotonic()
        try:
            self._copy(sock)
            return True
        except BodyError as e:
            self.error = str(e)
            logger.warning("blob %s: %s: transfer cut", self.digest or "range", e)
            return False
        except TimeoutError:
            self.error = "upstream stalled mid-body"
            return False
        except Exception as e:  # the client went away, the upstream broke off: cut either way
            self.error = f"transfer broke off ({e.__class__.__name__})"
            return False
        finally:
            self.seconds = time.monotonic() - start
            self.close(reuse=not self.error)

    def _copy(self, sock: socket.socket) -> None:
        reader = body_reader(self.resp)
        hasher = hashlib.new(self.digest.split(":", 1)[0]) if self.digest else None
        chunked = self.length is None
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        remaining = self.length if self.length is not None else -1
        pending: memoryview | None = None  # a chunked body's chunk, held until the next one is read
        while remaining:
            n = reader.readinto(view if remaining < 0 or remaining >= CHUNK else view[:remaining])
            if not n:
                if not chunked:
                    raise BodyError(f"upstream sent {self.sent} of {self.length} bytes")
                break
            if remaining > 0:
                remaining -= n
            data = view[:n]
            if hasher is not None:
                hasher.update(data)
            if chunked:
                if pending is not None:
                    self._send_chunk(sock, pending)
                pending = memoryview(bytes(data))
                continue
            if remaining == 0:
                self._check(hasher)
            sock.sendall(data)
            self.sent += n
        if chunked:
            self._check(hasher)
            if pending is not None:
                self._send_chunk(sock, pending)

    def _send_chunk(self, sock: socket.socket, data: memoryview) -> None:
        sock.sendall(b"%x\r\n" % len(data))
        sock.sendall(data)
        sock.sendall(b"\r\n")
        self.sent += len(data)

    def _check(self, hasher: Any) -> None:
        if hasher is not None and f"{hasher.name}:{hasher.hexdigest()}" != self.digest:
            raise BodyError(f"upstream bytes do not match {self.digest}")

    def close(self, reuse: bool = False) -> None:
        """Give the upstream connection back to the pool when the body was read whole, else drop it."""
        try:
            if reuse:
                self.resp.raw.release_conn()
            else:
                self.resp.close()
        except Exception:  # closing must never raise into the hand-off
            pass

    def summary(self) -> str:
        if self.error:
            return f"{self.error} after {self.sent} bytes"
        rate = self.sent / self.seconds / 1e6 if self.seconds > 0 else 0.0
        check = "digest checked" if self.digest else "unchecked (range)"
        return f"{self.sent} bytes in {self.seconds:.2f} s ({rate:.0f} MB/s), {check}"
