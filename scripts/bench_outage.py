"""What outages cost: a stale tag answer against a warm one, and a warm one against a baseline.

Three mirrors (`acr mirror start`, the runmd `acr init` writes) serve one small image of the
real docker-registry, measured in alternating rounds of manifest HEADs over keep-alive
connections (scripts/bench_head.py), so all see the same machine load:
- `warm`: this checkout, the registry up: the tag is asked for upstream on every HEAD;
- `stale`: this checkout, its upstream (a front of the same registry) stopped after one HEAD:
  every HEAD finds the connection refused and is answered with the kept answer;
- `base`: the same code from another git revision (default `main`, unpacked with `git archive`
  and run first on PYTHONPATH): the CPU per HEAD a warm lookup cost before this change.
Then 64 concurrent cold lookups of one tag through a fresh mirror, counting the registry's GETs.

Targets: stale p50 <= warm p50 + 1 ms; warm CPU per HEAD within noise of the baseline's.
Usage: .venv/bin/python scripts/bench_outage.py [--heads 600] [--baseline main]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_head import measure  # noqa: E402
from tests.harness.images import make_image, push_image  # noqa: E402
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.ports import direct_session  # noqa: E402
from tests.harness.referrers import ReferrersFront  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402

ACCEPT = {"Accept": ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json", "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json", "application/vnd.oci.image.index.v1+json", "*/*"))}
REPO = "bench/outage"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serving(m: Mirror) -> int:
    assert m.proc is not None
    return m.serving_pid()


def baseline_tree(rev: str, into: Path) -> Path:
    """`rev`'s addons, unpacked (never a checkout of ours touched)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "addons", "acr_addons.py"],
                             check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def registry_gets(reg: Registry, since: int, path: str) -> int:
    """GETs of `path` in the registry's access log after byte offset `since`."""
    text = reg.log_path.read_bytes()[since:].decode(errors="replace")
    return len(re.findall(rf'"GET {re.escape(path)}\S* HTTP/1\.1" ', text))


def bench(args: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="acr-bench-outage-")))
    reg = stack.enter_context(Registry(workdir=tmp / "registry"))
    push_image(reg, REPO, "v1", make_image({"bench.txt": b"outage"}))
    front = ReferrersFront(reg.url).start()
    stack.callback(front.stop)
    base_tree = baseline_tree(args.baseline, tmp / "baseline")
    start = dict(args=["--hosts-dir", str(tmp / "hosts")], start=False)
    warm = Mirror(tmp / "warm", [reg.url], **start)  # type: ignore[arg-type]
    stale = Mirror(tmp / "stale", [front.url], **start)  # type: ignore[arg-type]
    base = Mirror(tmp / "base", [reg.url], env={"PYTHONPATH": str(base_tree)}, **start)  # type: ignore[arg-type]
    for m in (warm, stale, base):
        stack.callback(m.stop)
        m.start(timeout=120)
    path = f"/v2/{REPO}/manifests/v1?ns="
    sides = {
        "warm": (f"{warm.url}{path}{reg.host}", ACCEPT),
        "stale": (f"{stale.url}{path}{front.host}", ACCEPT),
        "base": (f"{base.url}{path}{reg.host}", ACCEPT),
    }
    assert direct_session().head(sides["stale"][0], headers=ACCEPT, timeout=30).status_code == 200
    front.stop()
    answer = direct_session().head(sides["stale"][0], headers=ACCEPT, timeout=30)
    assert answer.status_code == 200 and "Warning" in answer.headers, "the stale side is not stale"
    log(f"manifest HEAD: warm, stale and {args.baseline}, {args.heads} each")
    pids = {"warm": serving(warm), "stale": serving(stale), "base": serving(base)}
    results: dict[str, Any] = {"heads": args.heads, "baseline": args.baseline}
    results.update(measure(sides, args.heads, rounds=args.rounds, pids=pids))
    results["stale_minus_warm_p50_ms"] = round(results["head_stale_p50_ms"] - results["head_warm_p50_ms"], 2)
    results["warm_cpu_vs_base"] = round(results["head_warm_cpu_ms"] / results["head_base_cpu_ms"], 2)

    log("64 concurrent cold lookups of one tag")
    for name, cwd in (("cold", None), ("cold_base", base_tree)):
        m = Mirror(tmp / name, [reg.url], env={"PYTHONPATH": str(cwd)} if cwd else None, **start)  # type: ignore[arg-type]
        stack.callback(m.stop)
        m.start(timeout=120)
        since = reg.log_path.stat().st_size
        url = f"{m.url}{path}{reg.host}"
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            answers = list(pool.map(lambda _: direct_session().head(url, headers=ACCEPT, timeout=60), range(64)))
        assert {a.status_code for a in answers} == {200}
        m.stop()  # its log is complete once it stops; the registry's once it answered
        results[f"{name}_upstream_gets"] = registry_gets(reg, since, f"/v2/{REPO}/manifests/v1")
    return results


def table(r: dict[str, Any]) -> str:
    rows = [
        ("manifest HEAD p50, warm (registry up)", f"{r['head_warm_p50_ms']} ms", f"p99 {r['head_warm_p99_ms']} ms"),
        ("manifest HEAD p50, stale (registry down)", f"{r['head_stale_p50_ms']} ms",
         f"{r['stale_minus_warm_p50_ms']:+} ms vs warm (target <= +1 ms)"),
        (f"manifest HEAD p50, {r['baseline']}", f"{r['head_base_p50_ms']} ms", ""),
        ("CPU per HEAD, warm", f"{r['head_warm_cpu_ms']} ms", f"{r['warm_cpu_vs_base']}x {r['baseline']}"),
        ("CPU per HEAD, stale", f"{r['head_stale_cpu_ms']} ms", ""),
        (f"CPU per HEAD, {r['baseline']}", f"{r['head_base_cpu_ms']} ms", ""),
        ("64 cold lookups: registry GETs", str(r["cold_upstream_gets"]), f"{r['baseline']}: {r['cold_base_upstream_gets']}"),
    ]
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>10}  {c}" for a, b, c in rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heads", type=int, default=600, help="manifest HEADs per side (default 600)")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    p.add_argument("--baseline", default="main", help="git revision measured as the baseline (default main)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    with ExitStack() as stack:
        results = bench(args, stack)
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
