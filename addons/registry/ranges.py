"""HTTP Range answers (206 Partial Content) of blobs: which bytes of how many.

The stargz snapshotter reads a teleported eStargz image in Range GETs, a few hundred KB of a
layer at a time; containerd resumes a broken blob transfer the same way. A 206 answer cannot
be checked against the blob's digest (it holds a part), so the mirror passes it unchecked and
shows what it was: `range 850 KiB of 68 MiB` in the log line, mitmweb's comment and /metrics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class RangeRead:
    """The part of a blob a 206 answer carries: bytes `start` to `end` (inclusive) of `total`."""

    start: int
    end: int
    #: The size of the whole blob, None when the server did not say (`*`).
    total: int | None = None

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def public(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "total": self.total}


def parse_content_range(value: str | None) -> RangeRead | None:
    """`bytes 0-1023/4096` -> RangeRead(0, 1023, 4096); None for anything else."""
    m = _CONTENT_RANGE_RE.match(value or "")
    if not m:
        return None
    start, end = int(m[1]), int(m[2])
    total = None if m[3] == "*" else int(m[3])
    if end < start or (total is not None and end >= total):
        return None
    return RangeRead(start, end, total)


def ranged(status: int, content_range: str | None) -> RangeRead | None:
    """The part a blob answer carries when it is a 206; None for a whole blob."""
    return parse_content_range(content_range) if status == 206 else None
