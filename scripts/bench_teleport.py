#!/usr/bin/env python3
"""Teleport's cost, measured on loopback against the real registry.

1. Decision time with warm caches: p50 latency of `HEAD /v2/<name>/manifests/<tag>` through
   a mirror whose runmd teleports (the tag has a streaming.v1 referrer) against the same HEAD
   through a mirror without `.discover`/`.teleport` (a plain resolve). Both mirrors fetch the tag
   upstream on every request; with warm caches teleport adds no upstream call, so the difference
   is the decision itself. Target: < 5 ms.
2. Upstream calls per tag pull, cold and warm: containerd's requests for a tag pull (HEAD tag,
   GET manifest by digest, GET config and layers; DESIGN §3) sent through the teleporting
   mirror, counting what reached the registry via the referrers front. Target: 1 referrers
   call cold (once the mirror knows the API), 0 warm.

Usage: .venv/bin/python scripts/bench_teleport.py [--requests 200] [--api oci|none] [--json]
Needs docker-registry (scripts/setup installs it); no root, no containerd.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.harness.overlaybd import StreamingNode  # noqa: E402
from tests.harness.images import (OCI_MANIFEST, make_image, push_image,  # noqa: E402
                                  push_referrer)
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.referrers import ReferrersFront  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402

STREAMING = "application/vnd.azure.artifact.streaming.v1"
ACCEPT = ", ".join((OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json",
                    "application/vnd.docker.distribution.manifest.list.v2+json", "*/*"))

RUNMD = """\
``` start mirror
+ .runtime
: .mirror       {upstream}
+ .proxy          127.0.0.1:{port}
: .manifests      head, get
:   .authn        oauth2
:   .resolve      application/vnd.oci.image.index.v1+json
{teleport}: .blobs          head, get
:   .authn        oauth2
:   .pull
```
"""
TELEPORT = f""":   .discover     {STREAMING}
:   .teleport     overlaybd, always
"""


def percentile(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def head_latencies(session: requests.Session, urls: dict[str, str], n: int, warmup: int = 20) -> dict[str, list[float]]:
    """HEAD each URL in turn, n times (after a warm-up), so load drift hits every case alike."""
    out: dict[str, list[float]] = {k: [] for k in urls}
    for i in range(warmup + n):
        for label, url in urls.items():
            t = time.perf_counter()
            r = session.head(url, headers={"Accept": ACCEPT}, timeout=30)
            dt = (time.perf_counter() - t) * 1000
            if r.status_code != 200:
                raise RuntimeError(f"HEAD {url}: {r.status_code}")
            if i >= warmup:
                out[label].append(dt)
    return out


def pull_like_containerd(session: requests.Session, mirror: Mirror, ns: str, name: str, tag: str) -> str:
    """HEAD the tag, GET the manifest by the digest it reported, GET config and layers."""
    q = f"?ns={ns}"
    r = session.head(f"{mirror.url}/v2/{name}/manifests/{tag}{q}", headers={"Accept": ACCEPT}, timeout=30)
    r.raise_for_status()
    digest = r.headers["Docker-Content-Digest"]
    r = session.get(f"{mirror.url}/v2/{name}/manifests/{digest}{q}", headers={"Accept": ACCEPT}, timeout=30)
    r.raise_for_status()
    manifest = r.json()
    for blob in [manifest["config"], *manifest["layers"]]:
        session.get(f"{mirror.url}/v2/{name}/blobs/{blob['digest']}{q}", timeout=30).raise_for_status()
    return digest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="timed HEADs per case (default 200)")
    parser.add_argument("--api", choices=("oci", "none"), default="oci",
                        help="the registry's referrers API: oci (1.1 API) or none (tag schema)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    parser.add_argument("--mode", choices=("always", "auto"), default="always",
                        help="teleport's mode; auto checks a node that streams (a config.toml declaring "
                             "overlaybd and a listening socket standing in for its snapshotter)")
    args = parser.parse_args()

    s = requests.Session()
    s.trust_env = False
    with tempfile.TemporaryDirectory(prefix="bench-teleport-") as tmp, StreamingNode() as node, \
            Registry("anonymous", workdir=Path(tmp) / "registry") as reg, \
            ReferrersFront(reg.url, mode=args.api) as front:
        name = "bench/teleport"
        tags = {}
        for tag in ("v1", "v2", "warm", "plain"):
            image = make_image({"f": f"original {tag}".encode()})
            push_image(reg, name, tag, image)
            if tag != "plain":
                fast = make_image({"f": f"streamable {tag}".encode()}, overlaybd=True)
                push_referrer(reg, name, image, STREAMING, {"streaming.format": "overlaybd"},
                              config=fast.config, layers=list(fast.layers))
            tags[tag] = image.digest

        mirrors = {}
        for label, teleport in (("teleport", TELEPORT.replace("always", args.mode)), ("plain", "")):
            home = Path(tmp) / label
            mirrors[label] = Mirror(home, [front.url],
                                    runmd=RUNMD.replace("{upstream}", front.url).replace("{teleport}", teleport),
                                    args=["--hosts-dir", str(home / "certs.d")],
                                    sets=[f"acr_containerd_config={node.config}"] if teleport else [])
        try:
            m = mirrors["teleport"]
            # --- upstream calls per tag pull ---
            pull_like_containerd(s, m, front.host, name, "v1")  # the mirror learns the API
            calls = {}
            for label, tag in (("cold", "v2"), ("warm", "v2"), ("cold_no_referrer", "plain"),
                               ("warm_no_referrer", "plain")):
                front.clear_log()
                got = pull_like_containerd(s, m, front.host, name, tag)
                if tag != "plain" and got == tags[tag]:
                    raise RuntimeError(f"{tag} was not teleported")
                calls[label] = {"referrers": front.referrers_calls(), "upstream": len(front.seen())}
            # --- decision time with warm caches ---
            url = lambda mirror: f"{mirror.url}/v2/{name}/manifests/warm?ns={front.host}"  # noqa: E731
            s.head(url(m), headers={"Accept": ACCEPT}).raise_for_status()  # the one cold lookup
            front.clear_log()
            lat = head_latencies(s, {"teleported": url(m), "plain_resolve": url(mirrors["plain"])}, args.requests)
            warm_referrers = front.referrers_calls()
            t_head = s.head(url(m), headers={"Accept": ACCEPT}).headers["Docker-Content-Digest"]
            if t_head == tags["warm"]:
                raise RuntimeError("the warm tag was not teleported")
        finally:
            for mirror in mirrors.values():
                mirror.stop()

    p50 = {k: statistics.median(v) for k, v in lat.items()}
    figures = {
        "requests": args.requests,
        "api": args.api,
        "head_p50_ms": {k: round(v, 3) for k, v in p50.items()},
        "head_p90_ms": {k: round(percentile(v, 90), 3) for k, v in lat.items()},
        "teleport_overhead_p50_ms": round(p50["teleported"] - p50["plain_resolve"], 3),
        "teleport_overhead_paired_median_ms": round(statistics.median(
            a - b for a, b in zip(lat["teleported"], lat["plain_resolve"])), 3),
        "referrers_calls_during_warm_heads": warm_referrers,
        "calls_per_tag_pull": calls,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"teleport bench (referrers API: {args.api}, {args.requests} HEADs per case, warm caches)")
    for k in lat:
        print(f"  HEAD {k:18s} p50 {p50[k]:7.2f} ms   p90 {percentile(lat[k], 90):7.2f} ms")
    print(f"  teleport decision over a plain resolve: {figures['teleport_overhead_p50_ms']:+.2f} ms p50 difference, "
          f"{figures['teleport_overhead_paired_median_ms']:+.2f} ms median paired difference (target < 5 ms)")
    print(f"  referrers calls during {args.requests} warm HEADs: {warm_referrers}")
    print("upstream calls per tag pull (HEAD tag, GET manifest, GET blobs), API already learned:")
    for k, v in calls.items():
        print(f"  {k:18s} referrers {v['referrers']}   all upstream requests {v['upstream']}")
    print("  target: 1 referrers call cold, 0 warm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
