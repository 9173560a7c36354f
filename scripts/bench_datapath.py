"""Benchmark of the mirror's data path: direct from the registry vs through `acr mirror start`.

One run, same registry (docker-registry with token auth, on loopback), measured alternately so
that both sides see the same machine load:

* blob throughput with curl (MB/s): each run measures direct, the mirror, and a second mirror
  that does not check digests (what checking costs), back to back; medians of --repeat runs,
  and the spread of the per-run ratios;
* the mirror's CPU seconds per GiB (a figure that machine load moves less than MB/s on a
  shared 2-core box), and upstream requests per blob GET (from the registry's access log);
* mirror peak RSS while a large blob streams through it (VmRSS sampled, and VmHWM), and while
  --parallel pulls of a smaller blob run at once;
* `ctr images pull` time of an image with large layers (fetch and unpack), containerd with
  credentials direct vs containerd with none through the mirror;
* manifest HEAD latency by tag, p50/p99 over a keep-alive connection, with warm tokens.

Prints a table, then the figures as one JSON object on the last line of stdout. Everything it
starts (token server, registry, mirror, containerd) is stopped when it ends, also on SIGTERM.
Run it as `scripts/bench` (which makes sure the test prerequisites are installed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from tests.harness.containerd import Containerd, write_hosts_toml  # noqa: E402
from tests.harness.images import (  # noqa: E402
    ACCEPT_ALL_MANIFESTS,
    DOCKER_CONFIG,
    DOCKER_LAYER_GZIP,
    DOCKER_MANIFEST,
    RegistryClient,
    canonical_json,
    host_platform,
    push_random_blob,
    random_chunks,
)
from tests.harness.mirror import Mirror  # noqa: E402

import bench_head  # noqa: E402  (scripts/ is on sys.path when run as a script)
from bench_head import PlainMitmdump  # noqa: E402
from tests.harness.ports import ClosedPort, free_port  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.tokenserver import TokenServer  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
TARGETS = {"rss_mb": 150, "containerd_ratio": 1.05, "curl_ratio": 0.7, "curl_ratio_min": 0.6, "cpu_s_per_gib": 0.6,
           "check_cost": 0.05, "head_over_mitmdump_ms": 1.0}


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- /proc ------------------------------------------------------------------------------


def proc_status(pid: int, key: str) -> int:
    """A kB figure from /proc/PID/status (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serving_pid(root: int) -> int:
    """The process running mitmproxy: `acr mirror start` itself, or the `acr mirror serve` child
    its engine supervises (a runmd with `+ .engine`)."""
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    for pid in seen:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"mirror" in argv and b"serve" in argv:
            return pid
    return root


class RssSampler:
    """Samples a process's VmRSS every 20 ms while active; `peak_kb` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, proc_status(self.pid, "VmRSS"))
            except OSError:
                return
            time.sleep(0.02)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- content ----------------------------------------------------------------------------


def layer_stream(size: int, seed: int, diff: "hashlib._Hash") -> Iterator[bytes]:
    """A gzip (stored blocks: random data does not compress) tar of one `size`-byte random file,
    produced chunk by chunk; `diff` is fed the uncompressed tar for the config's diff_id."""
    info = tarfile.TarInfo("bench.bin")
    info.size, info.mode, info.mtime = size, 0o644, 0
    gz = zlib.compressobj(0, zlib.DEFLATED, 31)

    def emit(raw: bytes) -> bytes:
        diff.update(raw)
        return gz.compress(raw)

    yield emit(info.tobuf(format=tarfile.GNU_FORMAT))
    for chunk in random_chunks(seed, size):
        out = emit(chunk)
        if out:
            yield out
    pad = (-size) % 512
    yield emit(b"\0" * (pad + 1024)) + gz.flush()


def push_big_image(client: RegistryClient, repo: str, tag: str, layers: int, layer_size: int) -> str:
    """An image of `layers` random layers of `layer_size` bytes each; returns its digest."""
    descriptors, diff_ids = [], []
    for i in range(layers):
        diff = hashlib.sha256()
        digest, size = client.push_stream(repo, layer_stream(layer_size, 100 + i, diff))
        descriptors.append({"mediaType": DOCKER_LAYER_GZIP, "digest": digest, "size": size})
        diff_ids.append("sha256:" + diff.hexdigest())
    plat = host_platform()
    config = canonical_json({
        "architecture": plat["architecture"], "os": plat["os"], "created": "1970-01-01T00:00:00Z",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    config_digest = client.push_blob(repo, config)
    manifest = canonical_json({
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": DOCKER_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": descriptors,
    })
    return client.put_manifest(repo, tag, manifest, DOCKER_MANIFEST)


# --- measurements -----------------------------------------------------------------------


def curl_mbps(url: str, headers: dict[str, str]) -> tuple[float, int]:
    cmd = ["curl", "-sS", "--fail", "--noproxy", "*", "-o", "/dev/null", "-w", "%{size_download} %{time_total}"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    out = subprocess.run(cmd + [url], capture_output=True, text=True, check=True, timeout=300).stdout.split()
    size, seconds = int(out[0]), float(out[1])
    return size / seconds / 1e6, size


def children_cpu() -> float:
    """User + system CPU of the finished children of this process (each curl run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sha256_cpu_per_gib(mib: int = 256) -> float:
    """CPU seconds sha256 takes per GiB here, over 1 MiB buffers (the mirror's own chunk)."""
    buf = memoryview(os.urandom(MiB))
    h = hashlib.sha256()
    start = time.process_time()
    for _ in range(mib):
        h.update(buf)
    return (time.process_time() - start) * 1024 / mib


def registry_requests(log_path: Path, since: int, path: str) -> int:
    """Requests for `path` in the registry's access log after byte offset `since` (a blob GET
    that mitmproxy forwards carries the client's user agent: count them all)."""
    text = log_path.read_bytes()[since:].decode(errors="replace")
    return len(re.findall(rf'"(?:GET|HEAD) {re.escape(path)}\S* HTTP/1\.1" ', text))


def alternate(repeat: int, direct: Callable[[], Any], mirror: Callable[[], Any]) -> tuple[list[Any], list[Any]]:
    d, m = [], []
    for _ in range(repeat):
        d.append(direct())
        m.append(mirror())
    return d, m


# --- the run ----------------------------------------------------------------------------


def bench(args: argparse.Namespace, stack: ExitStack) -> dict[str, Any]:
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="acr-bench-")))
    port = free_port()
    password = os.urandom(9).hex()
    ts = stack.enter_context(TokenServer(service=f"127.0.0.1:{port}", users={"bench": password}))
    reg = stack.enter_context(Registry("token", token_server=ts, port=port, workdir=tmp / "registry"))
    client = RegistryClient(reg.url, ("bench", password), timeout=600)
    stack.callback(client.close)
    repo = "bench/datapath"

    blob_size = args.blob_mib * MiB
    log(f"pushing a {args.blob_mib} MiB blob and an image of {args.layers} x {args.layer_mib} MiB layers")
    blob, _ = push_random_blob(client, repo, blob_size, seed=1)
    image = push_big_image(client, repo, "big", args.layers, args.layer_mib * MiB)
    token = client._auth[repo]  # the harness client's Bearer header, for direct requests

    mirror = Mirror(tmp / "mirror", [reg.url], credentials=ts.issue_refresh_token(),
                    args=["--hosts-dir", str(tmp / "mirror-hosts")])
    stack.callback(mirror.stop)
    assert mirror.proc is not None
    pid = serving_pid(mirror.proc.pid)
    ns = f"ns={reg.host}"
    results: dict[str, Any] = {"blob_mib": args.blob_mib, "repeat": args.repeat}

    # Blob throughput with curl: each run measures direct, the mirror and (unless --no-unchecked)
    # a second mirror that does not check digests, back to back; the mirror's CPU per run.
    direct_url = f"{reg.url}/v2/{repo}/blobs/{blob}"
    mirror_url = f"{mirror.url}/v2/{repo}/blobs/{blob}?{ns}"
    unchecked = None
    if not args.no_unchecked:
        unchecked = Mirror(tmp / "mirror-unchecked", [reg.url], credentials=ts.issue_refresh_token(),
                           args=["--hosts-dir", str(tmp / "mirror-hosts-unchecked"), "--set", "acr_verify_blobs=false"])
        stack.callback(unchecked.stop)
        assert unchecked.proc is not None
        unchecked_pid = serving_pid(unchecked.proc.pid)
        unchecked_url = f"{unchecked.url}/v2/{repo}/blobs/{blob}?{ns}"
        curl_mbps(unchecked_url, {})
    curl_mbps(mirror_url, {})  # warm: token, blob mode, connection
    assert reg.proc is not None
    reg_pid = reg.proc.pid
    log(f"curl: blob direct vs through the mirror, {args.repeat} runs")
    runs: list[dict[str, float]] = []
    log_from = reg.log_path.stat().st_size
    with RssSampler(pid) as rss:
        for _ in range(args.repeat):
            run: dict[str, float] = {}
            reg0, curl0 = cpu_seconds(reg_pid), children_cpu()
            run["direct"], size_d = curl_mbps(direct_url, {"Authorization": token})
            run["direct_cpu"] = (cpu_seconds(reg_pid) - reg0 + children_cpu() - curl0) / (blob_size / GiB)
            cpu0 = cpu_seconds(pid)
            run["mirror"], size_m = curl_mbps(mirror_url, {})
            run["cpu"] = (cpu_seconds(pid) - cpu0) / (blob_size / GiB)
            assert size_d == size_m == blob_size, "a blob arrived short"
            if unchecked is not None:
                cpu0 = cpu_seconds(unchecked_pid)
                run["unchecked"], size_u = curl_mbps(unchecked_url, {})
                run["unchecked_cpu"] = (cpu_seconds(unchecked_pid) - cpu0) / (blob_size / GiB)
                assert size_u == blob_size, "a blob arrived short"
            runs.append(run)
            log("  direct {direct:.0f} MB/s, mirror {mirror:.0f} MB/s ({ratio:.2f}), {cpu:.2f} s CPU/GiB".format(
                ratio=run["mirror"] / run["direct"], **run))
    time.sleep(0.3)
    blob_gets = registry_requests(reg.log_path, log_from, f"/v2/{repo}/blobs/{blob}")
    ratios = [r["mirror"] / r["direct"] for r in runs]
    results["curl_direct_mbps"] = round(statistics.median(r["direct"] for r in runs))
    results["curl_mirror_mbps"] = round(statistics.median(r["mirror"] for r in runs))
    results["curl_ratio"] = round(statistics.median(ratios), 2)
    results["curl_ratio_runs"] = [round(x, 2) for x in ratios]
    results["mirror_cpu_s_per_gib"] = round(statistics.median(r["cpu"] for r in runs), 2)
    # Where the ratio can go on this machine: the registry and curl need `direct_cpu` per GiB,
    # the mirror adds its own; when every core is busy (a 2-core box), the bytes through the
    # mirror can flow at most direct / (direct + mirror) as fast. A checked blob's CPU cannot go
    # below what sha256 alone costs on this CPU.
    direct_cpu = statistics.median(r["direct_cpu"] for r in runs)
    results["direct_cpu_s_per_gib"] = round(direct_cpu, 2)
    results["curl_ratio_cpu_bound"] = round(direct_cpu / (direct_cpu + results["mirror_cpu_s_per_gib"]), 2)
    results["sha256_cpu_s_per_gib"] = round(sha256_cpu_per_gib(), 2)
    mirror_gets = args.repeat * (1 if unchecked is None else 2)
    results["upstream_requests_per_blob"] = round((blob_gets - args.repeat) / mirror_gets, 2)  # less curl's direct GETs
    if unchecked is not None:
        results["curl_ratio_cpu_bound_unchecked"] = round(
            direct_cpu / (direct_cpu + statistics.median(r["unchecked_cpu"] for r in runs)), 2)
        results["curl_unchecked_mbps"] = round(statistics.median(r["unchecked"] for r in runs))
        results["unchecked_cpu_s_per_gib"] = round(statistics.median(r["unchecked_cpu"] for r in runs), 2)
        # What checking digests costs: per run, the checked mirror against the unchecked one.
        results["check_cost"] = round(1 - statistics.median(r["mirror"] / r["unchecked"] for r in runs), 2)
    results["mirror_peak_rss_mb"] = round(rss.peak_kb / 1024)
    results["mirror_vmhwm_mb"] = round(proc_status(pid, "VmHWM") / 1024)

    # Memory with many blobs at once: --parallel curls of a smaller blob through the mirror.
    if args.parallel:
        small, _ = push_random_blob(client, repo, args.parallel_mib * MiB, seed=2)
        url = f"{mirror.url}/v2/{repo}/blobs/{small}?{ns}"
        log(f"{args.parallel} parallel pulls of a {args.parallel_mib} MiB blob")
        with RssSampler(pid) as prss, ThreadPoolExecutor(args.parallel) as pool:
            sizes = list(pool.map(lambda _: curl_mbps(url, {})[1], range(args.parallel)))
        assert all(x == args.parallel_mib * MiB for x in sizes), "a blob arrived short"
        results["parallel"] = args.parallel
        results["parallel_peak_rss_mb"] = round(prss.peak_kb / 1024)

    # Manifest HEAD latency with warm tokens and caches: direct, plain mitmdump, the mirror.
    log("HEAD latency: direct, plain mitmdump (reverse mode), mirror")
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    plain = PlainMitmdump(reg.url)
    stack.callback(plain.stop)
    results.update(bench_head.measure({
        "direct": (f"{reg.url}/v2/{repo}/manifests/big", {**accept, "Authorization": token}),
        "mitmdump": (f"{plain.url}/v2/{repo}/manifests/big", {**accept, "Authorization": token}),
        "mirror": (f"{mirror.url}/v2/{repo}/manifests/big?{ns}", accept),
    }, args.heads, pids={"mitmdump": plain.proc.pid, "mirror": pid}))
    results["head_mirror_over_mitmdump_p50_ms"] = round(results["head_mirror_p50_ms"] - results["head_mitmdump_p50_ms"], 2)

    # containerd: credentials direct vs none through the mirror (server on a closed port).
    if os.geteuid() != 0 or args.no_containerd:
        log("containerd: skipped (needs root)" if os.geteuid() != 0 else "containerd: skipped")
    else:
        log("containerd: ctr images pull direct vs through the mirror")
        ctd = stack.enter_context(Containerd())
        closed = stack.enter_context(ClosedPort())
        direct_hosts, mirror_hosts = tmp / "hosts-direct", tmp / "hosts-mirror"
        write_hosts_toml(direct_hosts, reg.host, reg.url)
        write_hosts_toml(mirror_hosts, reg.host, closed.url, [(mirror.url, ("pull", "resolve"))])
        ref = f"{reg.host}/{repo}:big"
        runs = iter(range(10_000))

        def pull(hosts: Path, user: Optional[str]) -> float:
            c = ctd.client(f"bench-{next(runs)}")
            try:
                t = time.monotonic()
                r = c.pull(ref, hosts_dir=hosts, user=user, timeout=600)
                took = time.monotonic() - t
                if r.returncode != 0:
                    raise RuntimeError(f"ctr pull failed: {r.stderr[-2000:]}")
                if c.image_target(ref) != image:
                    raise RuntimeError("ctr pulled another digest")
                return took
            finally:
                c.drop_namespace()

        if unchecked is None:
            d, m = alternate(args.repeat, lambda: pull(direct_hosts, f"bench:{password}"), lambda: pull(mirror_hosts, None))
        else:
            # Each run also pulls through the mirror that does not check digests: what checking
            # costs a containerd pull, measured rather than estimated from the curl figures.
            unchecked_hosts = tmp / "hosts-mirror-unchecked"
            write_hosts_toml(unchecked_hosts, reg.host, closed.url, [(unchecked.url, ("pull", "resolve"))])
            u: list[float] = []

            def both() -> float:
                took = pull(mirror_hosts, None)
                u.append(pull(unchecked_hosts, None))
                return took

            d, m = alternate(args.repeat, lambda: pull(direct_hosts, f"bench:{password}"), both)
            results["containerd_unchecked_ratio"] = round(statistics.median(y / x for x, y in zip(d, u)), 2)
        results["image_mib"] = args.layers * args.layer_mib
        results["containerd_direct_s"] = round(statistics.median(d), 2)
        results["containerd_mirror_s"] = round(statistics.median(m), 2)
        results["containerd_ratio"] = round(statistics.median(y / x for x, y in zip(d, m)), 2)
        results["containerd_ratio_runs"] = [round(y / x, 2) for x, y in zip(d, m)]
    results["mirror_peak_rss_mb"] = max(results["mirror_peak_rss_mb"], round(proc_status(pid, "VmHWM") / 1024))
    try:
        import uvloop  # noqa: F401

        results["uvloop_installed"] = True
    except ImportError:
        results["uvloop_installed"] = False
    return results


def table(r: dict[str, Any]) -> str:
    runs = r["curl_ratio_runs"]
    rows = [
        ("blob via curl (MB/s)", r["curl_direct_mbps"], r["curl_mirror_mbps"],
         f"{r['curl_ratio']:.2f} (runs {min(runs):.2f}-{max(runs):.2f}; target median >= {TARGETS['curl_ratio']}, "
         f"each >= {TARGETS['curl_ratio_min']})"),
        ("mirror CPU per GiB (s)", r["direct_cpu_s_per_gib"], r["mirror_cpu_s_per_gib"],
         f"(target <= {TARGETS['cpu_s_per_gib']}; sha256 alone {r['sha256_cpu_s_per_gib']} here)"),
        ("ratio if the cores are the limit", "", r["curl_ratio_cpu_bound"],
         "direct CPU / (direct CPU + mirror CPU)" + (
             f"; unchecked {r['curl_ratio_cpu_bound_unchecked']}" if "curl_ratio_cpu_bound_unchecked" in r else "")),
    ]
    if "curl_unchecked_mbps" in r:
        rows += [
            ("blob via curl, digest unchecked (MB/s)", "", r["curl_unchecked_mbps"],
             f"checking costs {r['check_cost'] * 100:.0f}% (target <= {TARGETS['check_cost'] * 100:.0f}%)"),
            ("mirror CPU per GiB, unchecked (s)", "", r["unchecked_cpu_s_per_gib"], ""),
        ]
    rows += [
        ("upstream requests per blob GET", 1, r["upstream_requests_per_blob"], ""),
        (f"mirror peak RSS, {r['blob_mib']} MiB blob (MB)", "", r["mirror_peak_rss_mb"], f"(target < {TARGETS['rss_mb']})"),
    ]
    if "parallel" in r:
        rows.append((f"mirror peak RSS, {r['parallel']} parallel pulls (MB)", "", r["parallel_peak_rss_mb"],
                     f"(target < {TARGETS['rss_mb']})"))
    rows += [
        ("manifest HEAD p50 (ms)", r["head_direct_p50_ms"], r["head_mirror_p50_ms"],
         f"plain mitmdump {r['head_mitmdump_p50_ms']}: mirror adds {r['head_mirror_over_mitmdump_p50_ms']} "
         f"(target <= {TARGETS['head_over_mitmdump_ms']})"),
        ("manifest HEAD p99 (ms)", r["head_direct_p99_ms"], r["head_mirror_p99_ms"],
         f"plain mitmdump {r['head_mitmdump_p99_ms']}"),
        ("CPU per manifest HEAD (ms)", "", r["head_mirror_cpu_ms"], f"plain mitmdump {r['head_mitmdump_cpu_ms']}"),
    ]
    if "containerd_direct_s" in r:
        cruns = r["containerd_ratio_runs"]
        rows.append((f"ctr images pull, {r['image_mib']} MiB (s)", r["containerd_direct_s"], r["containerd_mirror_s"],
                     f"{r['containerd_ratio']:.2f} (runs {min(cruns):.2f}-{max(cruns):.2f}; "
                     f"target <= {TARGETS['containerd_ratio']})"))
        if "containerd_unchecked_ratio" in r:
            rows.append(("ctr images pull, digest unchecked", "", "", f"{r['containerd_unchecked_ratio']:.2f}"))
    w = max(len(x[0]) for x in rows)
    lines = [f"{'':{w}}  {'direct':>10}  {'mirror':>10}  mirror/direct", "-" * (w + 44)]
    for name, direct, mirror, ratio in rows:
        lines.append(f"{name:{w}}  {direct!s:>10}  {mirror!s:>10}  {ratio}")
    lines.append(f"medians of {r['repeat']} runs, each measuring direct and mirror back to back")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blob-mib", type=int, default=1024, help="blob size for curl and RSS (default 1024)")
    p.add_argument("--layers", type=int, default=2, help="layers of the containerd image (default 2)")
    p.add_argument("--layer-mib", type=int, default=256, help="size of each layer (default 256)")
    p.add_argument("--repeat", type=int, default=5, help="runs of each measurement; medians are reported (default 5)")
    p.add_argument("--parallel", type=int, default=64, help="parallel pulls for the memory figure (default 64; 0 skips)")
    p.add_argument("--parallel-mib", type=int, default=16, help="blob size of the parallel pulls (default 16)")
    p.add_argument("--no-unchecked", action="store_true", help="skip the second mirror that does not check digests")
    p.add_argument("--heads", type=int, default=300, help="manifest HEADs per side (default 300)")
    p.add_argument("--no-containerd", action="store_true", help="skip the containerd pulls")
    args = p.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so everything started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        results = bench(args, stack)
    print(table(results))
    print(json.dumps(results, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
