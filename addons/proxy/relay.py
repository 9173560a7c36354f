"""A blob's body, copied from the mirror's own upstream response to the client's socket.

`.pull` makes the one upstream GET of a blob itself (following a storage redirect, renewing a
stale token), answers the flow with the upstream's status and headers, and hands the body to
`BlobBody.write`, which addons.core.mitm.handoff runs in a thread on a copy of the client socket: a
loop of `readinto` reused buffers, `sha256.update` in a second thread, `sendall`, with no
event-loop work per chunk. A whole blob (200 to a GET without Range) is checked against the digest it was asked
for: the last chunk is written only after the digest matched, so a registry that sends other
bytes (or fewer or more than it announced) never gives the client a success. Range answers
(206) are passed unchecked: a part cannot be checked against the digest of the whole.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import requests

logger = logging.getLogger(__name__)

#: Bytes per read: the largest when few blobs stream (per-chunk costs, the hand-over between the
#: copy and the hashing thread and the GIL, vanish: 1.5 s of mirror CPU per GiB at 1 MiB against
#: 2.3 s at 128 KiB, checked, measured with scripts/bench), the smallest when many do, so that
#: all transfers together hold at most BUFFER_BUDGET of buffers (64 parallel pulls: 16 MiB).
MAX_CHUNK = 1024 * 1024
MIN_CHUNK = 128 * 1024
#: Buffers per checked blob: one being read while the other is hashed and sent.
RING = 2
BUFFER_BUDGET = 16 * 1024 * 1024


class Budget:
    """How many blob bodies are being copied now, and so how large each one's buffers may be."""

    def __init__(self, total: int = BUFFER_BUDGET) -> None:
        self.total = total
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> int:
        """Count one more transfer; its chunk size (a power of two between the bounds)."""
        with self._lock:
            self.active += 1
            share = self.total // (self.active * RING)
        size = MAX_CHUNK
        while size > MIN_CHUNK and size > share:
            size //= 2
        return size

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


BUFFERS = Budget()


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
    if fp is None or not hasattr(fp, "readinto"):
        return resp.raw
    if isinstance(fp, http.client.HTTPResponse) and not fp.chunked and hasattr(fp.fp, "readinto1"):
        return Arrived(fp)
    return fp


class Arrived:
    """`readinto` that returns what has arrived, up to the buffer, as a socket's `recv_into`
    does: http.client's own waits until the whole buffer is full, so with large buffers a slow
    upstream's bytes would reach the client in bursts, and a stalled one's not at all.

    Keeps http.client's count of the bytes left, so that the connection goes back to the pool
    once the body was read whole, as after http.client's own reads.
    """

    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.response = response

    def readinto(self, view: memoryview) -> int:
        r = self.response
        if r.fp is None:
            return 0
        if r.length is not None and len(view) > r.length:
            view = view[: r.length]
        n = r.fp.readinto1(view)
        if not n and len(view):
            r._close_conn()  # the upstream closed early: http.client's own ending
            return 0
        if r.length is not None:
            r.length -= n
            if not r.length:
                r._close_conn()
        return n


class Pipeline:
    """Hashes chunks in a second thread while the copy thread sends them: `hashlib` and socket
    calls release the GIL, so on two cores checking a blob costs little time, only CPU.

    The copy thread `take`s a free buffer, reads into it, `submit`s it and sends it; the hashing
    thread gives the buffer back once hashed, so a buffer is never refilled while being hashed.
    """

    def __init__(self, algorithm: str, count: int = RING, size: int = MAX_CHUNK) -> None:
        self.hasher = hashlib.new(algorithm)
        self.views = [memoryview(bytearray(size)) for _ in range(count)]
        self._free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(count):
            self._free.put(i)
        self._todo: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="acr-digest", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._todo.get()) is not None:
            i, n = item
            self.hasher.update(self.views[i][:n])
            self._free.put(i)

    def take(self) -> int:
        return self._free.get()

    def submit(self, i: int, n: int) -> None:
        self._todo.put((i, n))

    def result(self) -> str:
        """The digest of everything submitted (waits for the hashing thread to finish)."""
        self.close()
        return f"{self.hasher.name}:{self.hasher.hexdigest()}"

    def close(self) -> None:
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()


@dataclass
class BlobBody:
    """One blob body to copy; what happened is kept for the flow's record."""

    resp: requests.Response = field(repr=False)
    #: Bytes announced by the upstream (Content-Length), or None for a chunked body.
    length: int | None
    #: The digest the bytes must match (e.g. sha256:<hex>), or None to pass them unchecked.
    digest: str | None
    redirected: bool = False
    #: Where the bytes come from (the registry's or the storage URL): the flow shows it.
    url: str = ""
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
        chunk = BUFFERS.enter()
        try:
            self._copy_sized(sock, chunk)
        finally:
            BUFFERS.leave()

    def _copy_sized(self, sock: socket.socket, chunk: int) -> None:
        reader = body_reader(self.resp)
        if self.length is None:
            return self._copy_chunked(sock, reader, chunk)
        # Buffers no larger than the body: a small blob does not cost a full chunk.
        chunk = min(chunk, max(self.length, 1))
        pipe = Pipeline(self.digest.split(":", 1)[0], size=chunk) if self.digest else None
        single = memoryview(bytearray(0 if pipe is not None else chunk))
        remaining = self.length
        try:
            while remaining:
                i = pipe.take() if pipe is not None else 0
                view = pipe.views[i] if pipe is not None else single
                n = reader.readinto(view[:remaining] if remaining < chunk else view)
                if not n:
                    raise BodyError(f"upstream sent {self.sent} of {self.length} bytes")
                remaining -= n
                if pipe is not None:
                    pipe.submit(i, n)
                    if remaining == 0:  # the last chunk goes out only once the whole blob matched
                        self._check(pipe.result())
                sock.sendall(view[:n])
                self.sent += n
        finally:
            if pipe is not None:
                pipe.close()

    def _copy_chunked(self, sock: socket.socket, reader: Any, chunk: int) -> None:
        """A body without Content-Length: re-chunked to the client, the last chunk held until checked."""
        hasher = hashlib.new(self.digest.split(":", 1)[0]) if self.digest else None
        view = memoryview(bytearray(chunk))
        pending: bytes | None = None
        while n := reader.readinto(view):
            if hasher is not None:
                hasher.update(view[:n])
            if pending is not None:
                self._send_chunk(sock, pending)
            pending = bytes(view[:n])
        if hasher is not None:
            self._check(f"{hasher.name}:{hasher.hexdigest()}")
        if pending is not None:
            self._send_chunk(sock, pending)

    def _send_chunk(self, sock: socket.socket, data: bytes) -> None:
        sock.sendall(b"%x\r\n" % len(data))
        sock.sendall(data)
        sock.sendall(b"\r\n")
        self.sent += len(data)

    def _check(self, digest: str) -> None:
        if digest != self.digest:
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
