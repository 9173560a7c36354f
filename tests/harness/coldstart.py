"""Cold start on a node, measured: pull an image, `ctr run` it, and time the container's first
line of output; the registry's access log says how many blob bytes that took.

The original goes the ordinary way (containerd downloads and unpacks it on overlayfs), the eStargz
copy the lazy way (`ctr-remote image rpull`: the stargz snapshotter mounts its layer and reads
only what the container opens). The benchmark and the demo both measure with these.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .containerd import CTR_BIN, Ctr
from .estargz import HELLO, blob_reads, log_since, log_size
from .registry import Registry
from .stargz import CTR_REMOTE


@dataclass(frozen=True)
class ColdStart:
    """One image's cold start: what it pulled, how long each part took, what it fetched."""

    target: str
    pull_s: float
    first_output_s: float
    fetched_bytes: int
    output: bytes

    @property
    def total_s(self) -> float:
        return self.pull_s + self.first_output_s


def _timed(cmd: list[str]) -> float:
    started = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[5:])} failed: {result.stderr.strip()[-800:]}")
    return time.monotonic() - started


def first_output(ctr: Ctr, ref: str, snapshotter: str) -> tuple[float, bytes]:
    """Seconds from `ctr run` until the container's first line, and that line."""
    cmd = [CTR_BIN, "-a", ctr.address, "-n", ctr.namespace, "run", "--rm", "--snapshotter", snapshotter,
           ref, f"cold-{secrets.token_hex(4)}", "/bin/cat", f"/{HELLO}"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    seconds = time.monotonic() - started
    _, err = proc.communicate(timeout=120)
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"ctr run {ref} failed ({proc.returncode}): {err.decode(errors='replace').strip()[-800:]}")
    return seconds, line


def cold_start(ctr: Ctr, reg: Registry, ref: str, hosts: Path, layer: str, *, lazy: bool) -> ColdStart:
    """Pull ``ref`` through ``hosts`` (lazily on stargz, or whole on overlayfs), run it, and count
    the bytes of blob ``layer`` the registry sent until the first output."""
    start = log_size(reg.log_path)
    if lazy:
        pull = _timed([CTR_REMOTE, "-a", ctr.address, "-n", ctr.namespace, "image", "rpull",
                       "--hosts-dir", str(hosts), ref])
    else:
        pull = _timed([CTR_BIN, "-a", ctr.address, "-n", ctr.namespace, "images", "pull",
                       "--snapshotter", "overlayfs", "--hosts-dir", str(hosts), ref])
    target = ctr.image_target(ref) or ""
    run, line = first_output(ctr, ref, "stargz" if lazy else "overlayfs")
    fetched = sum(r.bytes for r in blob_reads(log_since(reg.log_path, start), layer))
    return ColdStart(target, pull, run, fetched, line)
