"""CPU per request of what observes it: the /metrics hook and the one log line, text and JSON.

The baseline, measured in the same run on the same flows, is the log line as mitmproxy's own
formatter wrote it before the mirror had a format of its own; the figures are microseconds of
CPU per request (best of 5 rounds), and each format's ratio to that baseline. A manifest HEAD
through the mirror costs about 5 ms of CPU (README, Performance), so tens of microseconds here
are well under 1% of it.

    .venv/bin/python scripts/bench_observe.py [N]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mitmproxy import http  # noqa: E402
from mitmproxy.log import MitmFormatter  # noqa: E402
from mitmproxy.test import tflow, tutils  # noqa: E402

from addons import catalog  # noqa: E402
from addons.chain import build_state  # noqa: E402
from addons.core.logformat import JsonFormatter, TextFormatter  # noqa: E402
from addons.observe.metrics import Metrics  # noqa: E402
from addons.proxy.logfields import log_extra  # noqa: E402
from addons.proxy.tail import summary  # noqa: E402
from tests.harness.replay import replay_runmd  # noqa: E402


def teleported_heads(n: int) -> list[http.HTTPFlow]:
    """Answered tag HEADs, as the chain leaves them for the metrics hook and the log line."""
    flows = []
    for _ in range(n):
        f = tflow.tflow(req=tutils.treq(method=b"HEAD"), resp=tutils.tresp(status_code=200))
        f.metadata["acr"] = {"route": "manifests", "name": "demo/hello", "reference": "v1", "upstream": True,
                             "ns": "127.0.0.1:5000", "teleport": {"from": "sha256:a", "to": "sha256:b"},
                             "resolved": {"digest": "sha256:a"}}
        f.live = True
        flows.append(f)
    return flows


def cpu_us(flows: list[http.HTTPFlow], fn: Callable[[http.HTTPFlow], object], rounds: int = 5) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.process_time()
        for f in flows:
            fn(f)
        best = min(best, (time.process_time() - start) / len(flows) * 1e6)
    return best


class Formats(logging.Handler):
    """Formats every record and drops it: what a handler costs, without the write."""

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)


def main(n: int) -> None:
    flows = teleported_heads(n)
    with tempfile.TemporaryDirectory() as home:
        compiled = catalog.parse_text(replay_runmd("http://127.0.0.1:5000", "127.0.0.1:8578"), f"{home}/mirror.runmd")
        metrics = Metrics(build_state(compiled))
    log = logging.getLogger("bench-observe")
    log.propagate, handler = False, Formats()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    handler.setFormatter(MitmFormatter(False))
    base = cpu_us(flows, lambda f: log.info(summary(f)))
    print(f"log line, mitmproxy's formatter (baseline): {base:6.1f} us/request")
    for name, fmt in (("text", TextFormatter()), ("json", JsonFormatter())):
        handler.setFormatter(fmt)
        us = cpu_us(flows, lambda f: log.info(summary(f), extra=log_extra(f)))
        print(f"log line, acr_log_format={name}:          {us:6.1f} us/request ({us / base:.2f}x the baseline)")
    us = cpu_us(flows, metrics.response)
    print(f"metrics hook (prometheus_client):         {us:6.1f} us/request ({us / base:.2f}x the baseline)")
    start = time.process_time()
    for _ in range(100):
        metrics.exposition()
    print(f"a scrape after {n * 5} requests:        {(time.process_time() - start) * 10:6.2f} ms")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
