#!/usr/bin/env python3
"""Cold start with teleport on a real lazy-pulling node: the eStargz copy on the stargz
snapshotter against the original on overlayfs, both pulled through the mirror.

Cold start = pull + the first output of `ctr run` (the container prints a small file of the
image). The image has one layer: a static `cat`, that file, and --filler-mib of incompressible
data the container never reads. One node (the stargz snapshotter with FUSE and a containerd,
tests/harness/stargz.py); before each run the snapshotter restarts with an empty root and the run
gets a namespace of its own, so nothing is cached. Each run measures:

* the original on overlayfs: `ctr images pull --snapshotter overlayfs` by digest, then
  `ctr run --snapshotter overlayfs`;
* the eStargz copy (made by `ctr-remote image convert --estargz --oci`, the streaming referrer of
  the original) on stargz: `ctr-remote image rpull` of the tag, which the mirror (`.teleport
  estargz` in `auto`) teleports to the copy; then `ctr run --snapshotter stargz`;

through a stand-in for a registry behind a --mbit link (a throttling TCP relay of ours on loopback
in front of docker-registry) and on loopback; plus the blob bytes the registry sent before the
first output (from its access log). Medians of --repeat runs. Prints a table, then the figures as
one JSON object on the last line of stdout. Everything it starts is stopped when it ends, also
on SIGTERM.
Run it as `scripts/bench_stargz` (which makes sure the prerequisites are installed).
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.coldstart import cold_start  # noqa: E402
from tests.harness.containerd import write_hosts_toml  # noqa: E402
from tests.harness.estargz import StargzPair, push_pair  # noqa: E402
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.ports import LOOPBACK, ClosedPort, free_port  # noqa: E402
from tests.harness.referrers import ReferrersFront  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.stargz import StargzNode, estargz_mirror, fuse_missing  # noqa: E402
from tests.harness.throttle import ThrottledRelay  # noqa: E402

REPO = "bench/stargz"
HELLO_TEXT = b"first output\n"


def note(msg: str) -> None:
    print(f"bench_stargz: {msg}", file=sys.stderr, flush=True)


def one_run(node: StargzNode, reg: Registry, host: str, hosts: Path, pair: StargzPair) -> dict[str, dict[str, float]]:
    """Both cold starts through the mirror that serves ``host``, in a namespace of their own."""
    ctr = node.containerd.client(f"bench-{secrets.token_hex(4)}")
    try:
        original = cold_start(ctr, reg, f"{host}/{REPO}@{pair.original}", hosts, pair.original_layer, lazy=False)
        ref = f"{host}/{REPO}:{pair.tag}"
        copy = cold_start(ctr, reg, ref, hosts, pair.copy_layer, lazy=True)
        if copy.target != pair.copy:
            raise RuntimeError(f"{ref} resolved to {copy.target}, not to the eStargz copy {pair.copy}")
    finally:
        ctr.drop_namespace()
    return {side: {"pull_s": c.pull_s, "first_output_s": c.first_output_s, "cold_start_s": c.total_s,
                   "fetched_bytes": c.fetched_bytes} for side, c in (("original", original), ("estargz", copy))}


def median_of(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    return {side: {k: statistics.median(r[side][k] for r in runs) for k in runs[0][side]} for side in runs[0]}


def table(results: dict[str, Any]) -> str:
    lines = [f"image: one layer, {results['original_layer_bytes'] / 2**20:.1f} MiB "
             f"(eStargz copy {results['estargz_layer_bytes'] / 2**20:.1f} MiB); medians of {results['repeat']} cold runs",
             f"{'link':<12} {'image':<9} {'pull s':>8} {'run s':>8} {'cold s':>8} {'fetched':>12}"]
    for link, figures in results["links"].items():
        for side in ("original", "estargz"):
            f = figures[side]
            lines.append(f"{link:<12} {side:<9} {f['pull_s']:>8.2f} {f['first_output_s']:>8.2f} "
                         f"{f['cold_start_s']:>8.2f} {f['fetched_bytes'] / 1024:>9.0f} KiB")
        lines.append(f"{link:<12} eStargz starts {figures['speedup']:.1f}x faster, fetching "
                     f"{figures['fetched_percent']:.2f}% of the image before its first output")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filler-mib", type=float, default=64, help="incompressible MiB in the image (default 64)")
    parser.add_argument("--mbit", type=float, default=100, help="the slow link's rate in Mbit/s (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="cold runs per link (default 3)")
    args = parser.parse_args()
    reason = fuse_missing()
    if reason:
        note(reason)
        return 2
    # SIGTERM unwinds like Ctrl-C: every server stops and every FUSE layer is unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[str, Any] = {"repeat": args.repeat, "mbit": args.mbit, "links": {}}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="lifec-bench-stargz-") as tmp:
        work = Path(tmp)
        reg = stack.enter_context(Registry("anonymous", workdir=work / "registry"))
        front = stack.enter_context(ReferrersFront(reg.url))
        relay = stack.enter_context(ThrottledRelay((LOOPBACK, front.port), args.mbit * 1e6))
        closed = stack.enter_context(ClosedPort())
        # The node's snapshotter reads each upstream through the mirror of it.
        links = {f"{args.mbit:g} Mbit/s": (relay, "slow"), "loopback": (front, "loopback")}
        ports = {link: free_port() for link in links}
        node = stack.enter_context(StargzNode({up.host: f"127.0.0.1:{ports[link]}" for link, (up, _) in links.items()},
                                              say=note))
        hosts = work / "certs.d"
        mirrors: dict[str, tuple[str, Mirror]] = {}
        for link, (upstream, name) in links.items():
            m = estargz_mirror(work / f"mirror-{name}", upstream.url, node.containerd.config_path, port=ports[link])
            stack.callback(m.stop)  # before start: a start cut short leaves nothing running
            m.start(timeout=60)
            write_hosts_toml(hosts, upstream.host, closed.url, hosts=[(m.url, ["pull", "resolve"])])
            mirrors[link] = (upstream.host, m)

        note(f"making the image ({args.filler_mib:g} MiB of filler) and its eStargz copy")
        pair = push_pair(front, node.containerd.client("conversion"), REPO, "v1", hello=HELLO_TEXT,
                         filler_bytes=int(args.filler_mib * 2**20))
        results["original_layer_bytes"] = pair.original_size
        results["estargz_layer_bytes"] = pair.copy_size
        for link, (host, m) in mirrors.items():
            runs = []
            for i in range(args.repeat):
                note(f"{link}: cold run {i + 1} of {args.repeat}")
                node.restart_cold()
                runs.append(one_run(node, reg, host, hosts, pair))
            figures: dict[str, Any] = median_of(runs)
            figures["speedup"] = figures["original"]["cold_start_s"] / figures["estargz"]["cold_start_s"]
            figures["fetched_percent"] = 100 * figures["estargz"]["fetched_bytes"] / pair.copy_size
            results["links"][link] = figures
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
