"""Manifest HEAD latency by tag: direct, through plain mitmdump in reverse mode, through the mirror.

Plain mitmdump is the floor for any mitmproxy addon: what the mirror adds over it is the cost of
its own steps (routing, the one worker thread, the upstream GET of the manifest). The three sides
are measured in rounds, each round a block of HEADs per side over its own keep-alive connection,
so that all three see the same machine load. Used by scripts/bench_datapath.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.ports import LOOPBACK, free_port, wait_port  # noqa: E402


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class PlainMitmdump:
    """`mitmdump --mode reverse:UPSTREAM@PORT` with no addon of ours: the floor to compare with."""

    def __init__(self, upstream: str) -> None:
        self.port = free_port()
        mitmdump = str(Path(sys.executable).with_name("mitmdump"))
        self.proc = subprocess.Popen(
            [mitmdump, "-q", "--mode", f"reverse:{upstream}@{LOOPBACK}:{self.port}",
             "--set", "connection_strategy=lazy"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(LOOPBACK, self.port, timeout=30)
        except BaseException:
            self.stop()
            raise
        self.url = f"http://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, from /proc (clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(sides: dict[str, tuple[str, dict[str, str]]], n: int, rounds: int = 10, warmup: int = 20,
            pids: dict[str, int] | None = None) -> dict[str, Any]:
    """p50/p99 in ms per side; `sides` maps a name to (URL, headers). With `pids` (side -> the
    process serving it), also that process's CPU ms per HEAD, which machine load barely moves."""
    pids = pids or {}
    cpu = {name: 0.0 for name in pids}
    sessions = {name: requests.Session() for name in sides}
    times: dict[str, list[float]] = {name: [] for name in sides}
    try:
        for name, (url, headers) in sides.items():
            sessions[name].trust_env = False
            for _ in range(warmup):
                sessions[name].head(url, headers=headers, timeout=30)
        per_round = max(1, n // rounds)
        for _ in range(rounds):
            for name, (url, headers) in sides.items():
                s = sessions[name]
                cpu0 = cpu_seconds(pids[name]) if name in pids else 0.0
                for _ in range(per_round):
                    t = time.perf_counter()
                    r = s.head(url, headers=headers, timeout=30)
                    took = time.perf_counter() - t
                    if r.status_code != 200:
                        raise RuntimeError(f"HEAD {url} ({name}) -> {r.status_code}")
                    times[name].append(took * 1000)
                if name in pids:
                    cpu[name] += cpu_seconds(pids[name]) - cpu0
    finally:
        for s in sessions.values():
            s.close()
    out: dict[str, Any] = {}
    for name, values in times.items():
        out[f"head_{name}_p50_ms"] = round(percentile(values, 50), 2)
        out[f"head_{name}_p99_ms"] = round(percentile(values, 99), 2)
        if name in cpu:
            out[f"head_{name}_cpu_ms"] = round(cpu[name] * 1000 / len(values), 2)
    return out
