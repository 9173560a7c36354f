"""Benchmark of storage redirects: `.pull` (the mirror follows ACR's 307) vs `.pull client`.

ACR answers a blob GET with `307` to a SAS URL on blob storage. The mirror can follow it
itself (the bytes pass through the mirror) or hand the redirect to containerd (containerd
fetches from storage; the mirror sees one small request). Measured with the ACR-shaped fixture
(tests/harness/acr_front.py: token endpoints and blob redirects on the registry's host, a
storage host that checks SAS signatures) in front of docker-registry with token auth, and
containerd 1.6 pulling an image of --layers x --layer-mib through each mirror, alternately.

Prints a table, then the figures as one JSON object on the last line of stdout. Run as
`.venv/bin/python scripts/bench_redirects.py` after `scripts/bench` installed the prerequisites
(needs root for containerd).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_datapath import cpu_seconds, log, push_big_image, serving_pid  # noqa: E402
from tests.harness.acr_front import AcrFront, StorageFront  # noqa: E402
from tests.harness.containerd import Containerd, write_hosts_toml  # noqa: E402
from tests.harness.images import RegistryClient  # noqa: E402
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.ports import ClosedPort  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.tokenserver import TokenServer  # noqa: E402

MiB = 1 << 20


def bench(args: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="acr-bench-redirects-")))
    password = os.urandom(9).hex()
    ts = stack.enter_context(TokenServer(service="bench.azurecr.io", users={"bench": password}))
    reg = stack.enter_context(Registry("token", token_server=ts, workdir=tmp / "registry"))
    client = RegistryClient(reg.url, ("bench", password), timeout=600)
    stack.callback(client.close)
    repo = "bench/redirects"
    log(f"pushing an image of {args.layers} x {args.layer_mib} MiB layers")
    image = push_big_image(client, repo, "big", args.layers, args.layer_mib * MiB)
    storage = stack.enter_context(StorageFront(reg, os.urandom(32)))
    acr = stack.enter_context(AcrFront(reg.url, ts, storage))
    acr_host = acr.url.split("//", 1)[1]

    mirrors: dict[str, Mirror] = {}
    for mode, sets in (("follow", []), ("client", ["--set", "acr_follow_redirects=false"])):
        m = Mirror(tmp / f"mirror-{mode}", [acr.url], credentials=ts.issue_refresh_token(user="bench"),
                   args=["--hosts-dir", str(tmp / f"hosts-{mode}-runtime"), *sets])
        stack.callback(m.stop)
        mirrors[mode] = m

    ctd = stack.enter_context(Containerd())
    closed = stack.enter_context(ClosedPort())
    hosts = {}
    for mode, m in mirrors.items():
        hosts[mode] = tmp / f"hosts-{mode}"
        write_hosts_toml(hosts[mode], acr_host, closed.url, [(m.url, ("pull", "resolve"))])
    ref = f"{acr_host}/{repo}:big"
    runs = iter(range(10_000))

    def pull(mode: str) -> tuple[float, float]:
        pid = serving_pid(mirrors[mode].proc.pid)  # type: ignore[union-attr]
        c = ctd.client(f"bench-{next(runs)}")
        try:
            cpu0, t = cpu_seconds(pid), time.monotonic()
            r = c.pull(ref, hosts_dir=hosts[mode], timeout=600)
            took, cpu = time.monotonic() - t, cpu_seconds(pid) - cpu0
            if r.returncode != 0:
                raise RuntimeError(f"ctr pull ({mode}) failed: {r.stderr[-2000:]}")
            if c.image_target(ref) != image:
                raise RuntimeError("ctr pulled another digest")
            return took, cpu
        finally:
            c.drop_namespace()

    log("warming: one pull each (storage caches the blobs)")
    pull("follow")
    pull("client")
    results: dict[str, Any] = {"image_mib": args.layers * args.layer_mib, "repeat": args.repeat}
    measured: dict[str, list[tuple[float, float]]] = {"follow": [], "client": []}
    for i in range(args.repeat):
        for mode in (("follow", "client") if i % 2 == 0 else ("client", "follow")):
            measured[mode].append(pull(mode))
        log("  follow {:.2f} s, client {:.2f} s".format(measured["follow"][-1][0], measured["client"][-1][0]))
    for mode, values in measured.items():
        results[f"{mode}_s"] = round(statistics.median(t for t, _ in values), 2)
        results[f"{mode}_mirror_cpu_s"] = round(statistics.median(c for _, c in values), 2)
        results[f"{mode}_runs_s"] = [round(t, 2) for t, _ in values]
    results["client_over_follow"] = round(results["client_s"] / results["follow_s"], 2)
    results["storage_requests"] = len(storage.requests)
    return results


def table(r: dict[str, Any]) -> str:
    lines = [
        f"ctr images pull of {r['image_mib']} MiB from an ACR-shaped registry, medians of {r['repeat']} runs",
        f"{'':28}  {'seconds':>8}  {'mirror CPU s':>12}  runs (s)",
    ]
    for mode, name in (("follow", ".pull (mirror follows)"), ("client", ".pull client (containerd)")):
        lines.append(f"{name:28}  {r[mode + '_s']:>8}  {r[mode + '_mirror_cpu_s']:>12}  {r[mode + '_runs_s']}")
    lines.append(f"client / follow time: {r['client_over_follow']}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="layers of the image (default 2)")
    p.add_argument("--layer-mib", type=int, default=64, help="size of each layer (default 64)")
    p.add_argument("--repeat", type=int, default=5, help="pulls per mode; medians are reported (default 5)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_redirects: containerd needs root", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        results = bench(args, stack)
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
