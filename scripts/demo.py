"""The demo behind ./scripts/demo: a real containerd pull through the mirror, teleported, and a
container started from the streamed copy before the image is downloaded.

It starts everything on loopback in a temporary folder and stops it all at the end: a Debian
`docker-registry` holding `demo/hello:v1` (one layer: a file to print and 32 MiB the container
never reads) and its eStargz copy (made by `ctr-remote image convert --estargz --oci`, linked as
an ACR Artifact Streaming style referrer), the mirror as `acr init` writes it (teleport `auto`),
and a node: the stargz snapshotter (built from Debian's Go packages on the first run) with FUSE
and a private containerd. containerd pulls the original on overlayfs and the tag on stargz, both
through the mirror, and runs each; the demo prints pull time, bytes fetched against the image's
size and the time to the container's first output. Where FUSE is missing it says why in one
line and shows the digest swap alone, to an overlaybd-style copy, with `acr_teleport=always`.
Whatever happens, the temporary folder is removed (unless --keep) and the logs of the
registry, the mirror and containerd are copied to LOGS first, which the last lines name.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import requests  # noqa: E402

from tests.harness import images  # noqa: E402
from tests.harness.coldstart import cold_start  # noqa: E402
from tests.harness.containerd import Containerd, write_hosts_toml  # noqa: E402
from tests.harness.estargz import log_since, log_size, push_pair  # noqa: E402
from tests.harness.mirror import Mirror  # noqa: E402
from tests.harness.ports import ClosedPort, free_port  # noqa: E402
from tests.harness.registry import Registry  # noqa: E402
from tests.harness.stargz import StargzNode, estargz_mirror, fuse_missing  # noqa: E402

STREAMING = "application/vnd.azure.artifact.streaming.v1"
REPO = "demo/hello"
STARGZ_HELLO = b"hello from demo/hello:v1\n"
#: Incompressible data in the demo image that the container never reads.
FILLER = 32 << 20
#: Where the logs of the last run stay after the demo folder is gone.
LOGS = ROOT / ".demo-logs"
#: The last lines of ./scripts/demo and ./scripts/test: the commands are in the venv.
ACTIVATE_HINT = "acr and mitmdump are in .venv/bin: run '. .venv/bin/activate' to have them on PATH"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def push_demo_images(reg: Registry) -> tuple[images.Image, images.Image]:
    """The original image and its streamable copy, linked as an ACR streaming referrer."""
    plat = images.host_platform()
    original = images.make_image({"hello.txt": b"hello from the original image\n"})
    images.push_image(reg, REPO, "v1", original)
    streamable = images.make_image({"hello.txt": b"hello from the streamable (overlaybd) image\n"}, overlaybd=True)
    images.push_referrer(
        reg, REPO, original, STREAMING,
        {
            "streaming.format": "overlaybd",
            "streaming.version": "v1",
            "streaming.platform.os": plat["os"],
            "streaming.platform.arch": plat["architecture"],
        },
        layers=streamable.layers, config=streamable.config,
    )
    return original, streamable


def keep_logs(logs: dict[str, Path]) -> None:
    """Copy each log that exists to LOGS, before the folder that holds it goes away."""
    LOGS.mkdir(parents=True, exist_ok=True)
    for name, path in logs.items():
        if path.is_file():
            shutil.copyfile(path, LOGS / name)


def run(work: Path, logs: dict[str, Path]) -> int:
    """The demo itself; every server it starts is stopped when this returns or raises."""
    reason = fuse_missing()
    if reason:
        say(f"no stargz snapshotter here ({reason}): showing the digest swap with an overlaybd-style copy instead")
        return run_swap_only(work, logs)
    return run_stargz(work, logs)


def run_stargz(work: Path, logs: dict[str, Path]) -> int:
    """A real lazy start: the tag pulled through the mirror in `auto` on a stargz node, against
    the original on overlayfs."""
    with Registry("anonymous", workdir=work / "registry") as reg, ClosedPort() as closed:
        logs["registry.log"] = reg.log_path
        say(f"registry (CNCF distribution) on {reg.url}")
        port = free_port()
        with StargzNode({reg.host: f"127.0.0.1:{port}"}, say=say) as node:
            logs["stargz.log"] = node.snapshotter.log_path
            logs["containerd.log"] = node.containerd.log_path
            say("containerd with the stargz snapshotter (FUSE) as CRI's snapshotter; "
                "the snapshotter reads blobs through the mirror")
            pair = push_pair(reg, node.containerd.client("conversion"), REPO, "v1", hello=STARGZ_HELLO,
                             filler_bytes=FILLER)
            say(f"pushed {REPO}:v1 = {pair.original} ({mib(pair.original_size)} layer)")
            say(f"pushed its eStargz copy (ctr-remote image convert --estargz --oci) as its streaming referrer = {pair.copy}")
            mirror = estargz_mirror(work / "mirror", reg.url, node.containerd.config_path, port=port)
            logs["mirror.log"] = mirror.log_path
            say(f"acr init --upstream {reg.url} --teleport-format estargz wrote {mirror.runmd_path}; its teleport step:")
            print("    " + next(line for line in mirror.runmd_path.read_text().splitlines() if ".teleport" in line.split()[1:2]))
            mirror.start(timeout=60)
            keep_logs(logs)
            try:
                hosts = work / "certs.d"
                write_hosts_toml(hosts, reg.host, closed.url, hosts=[(mirror.url, ["pull", "resolve"])])
                ctr = node.containerd.client("demo")
                say("containerd pulls the original by digest on overlayfs through the mirror, and runs it")
                original = cold_start(ctr, reg, f"{reg.host}/{REPO}@{pair.original}", hosts, pair.original_layer, lazy=False)
                say(f"containerd pulls the tag {reg.host}/{REPO}:v1 on stargz through the mirror "
                    "(ctr-remote image rpull; CRI pulls alike), and runs it")
                mark = log_size(mirror.log_path)
                copy = cold_start(ctr, reg, f"{reg.host}/{REPO}:v1", hosts, pair.copy_layer, lazy=True)
            finally:
                mirror.stop()
                keep_logs(logs)
        say("the mirror's log of the tag pull and the snapshotter's reads:")
        for line in log_since(mirror.log_path, mark).splitlines():
            if " -> " in line:
                print("    " + line)
        say(f"each container printed: {original.output.decode().strip()!r}, {copy.output.decode().strip()!r}")
        say(f"{'':<24}{'pull':>8}  {'fetched before the output':<31}{'first output':>12}")
        for what, c, size in (("original on overlayfs", original, pair.original_size),
                              ("eStargz on stargz", copy, pair.copy_size)):
            fetched = f"{mib(c.fetched_bytes)} of {mib(size)} ({100 * c.fetched_bytes / size:.1f}%)"
            say(f"{what:<24}{c.pull_s:>6.2f} s  {fetched:<31}{c.first_output_s:>6.2f} s later")
        teleported = copy.target == pair.copy
        if teleported:
            say(f"TELEPORTED: {REPO}:v1 {pair.original} -> {pair.copy}: "
                f"first output after {copy.total_s:.2f} s instead of {original.total_s:.2f} s")
        else:
            say(f"not teleported: containerd has {copy.target}")
    return 0 if teleported else 1


def mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def run_swap_only(work: Path, logs: dict[str, Path]) -> int:
    """Where the stargz snapshotter cannot run: the digest swap alone, to an overlaybd-style copy."""
    with Registry("anonymous", workdir=work / "registry") as reg, ClosedPort() as closed:
        logs["registry.log"] = reg.log_path
        say(f"registry (CNCF distribution) on {reg.url}")
        original, streamable = push_demo_images(reg)
        say(f"pushed {REPO}:v1 = {original.digest}")
        say(f"pushed its streamable referrer ({STREAMING}) = {streamable_digest(reg, original)}")
        mirror = Mirror(work / "mirror", [reg.url], start=False)
        logs["mirror.log"] = mirror.log_path
        # This machine's containerd has no overlaybd snapshotter, so `acr init`'s `auto` would
        # serve the original: the demo vouches for the node instead.
        mirror.sets.append("acr_teleport=always")
        say(f"acr init --upstream {reg.url} wrote {mirror.runmd_path}; acr dump:")
        print(subprocess.run([sys.executable.replace("python", "acr"), "--runmd", str(mirror.runmd_path), "dump"],
                             capture_output=True, text=True).stdout)
        say("no overlaybd snapshotter here: the mirror starts with --set acr_teleport=always (acr init writes auto)")
        mirror.start()
        try:
            ping = requests.get(mirror.url + "/v2/", timeout=5)
            say(f"mirror up on {mirror.url}: GET /v2/ -> {ping.status_code} {ping.text}")
            with Containerd() as cd:
                hosts = work / "certs.d"
                write_hosts_toml(hosts, reg.host, closed.url, hosts=[(mirror.url, ["pull", "resolve"])])
                say(f"containerd pulls {reg.host}/{REPO}:v1 through the mirror")
                started = time.monotonic()
                result = cd.pull(f"{reg.host}/{REPO}:v1", hosts_dir=hosts)
                seconds = time.monotonic() - started
                keep_logs({"containerd.log": cd.log_path})
                if result.returncode != 0:
                    print(result.stdout[-2000:], result.stderr[-2000:], sep="\n")
                    say("pull FAILED")
                    return 1
                target = cd.image_target(f"{reg.host}/{REPO}:v1")
                pulled = sum(b.size for b in streamable.blobs) + len(streamable.manifest)
        finally:
            mirror.stop()
        say("the mirror's log of that pull:")
        for line in mirror.log_text().splitlines():
            if " -> " in line:
                print("    " + line)
        teleported = target != original.digest
        say(f"pulled in {seconds:.2f} s, about {pulled} bytes of manifests and blobs")
        if teleported:
            say(f"TELEPORTED: {REPO}:v1 {original.digest} -> {target}")
        else:
            say(f"not teleported: containerd has {target}")
    return 0 if teleported else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the demo folder (runmd, hosts.toml, logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lifec-demo-"))
    say(f"working in {work}")
    logs: dict[str, Path] = {}
    code = 1

    shutil.rmtree(LOGS, ignore_errors=True)  # only this run's logs
    try:
        code = run(work, logs)
    except Exception as e:  # a server that would not start, a missing package: one line, then clean up
        say(f"demo FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    finally:
        keep_logs(logs)
        if args.keep:
            say(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        say("stopped everything the demo started")
        say(f"logs of this run: {LOGS.relative_to(ROOT)}/ ({', '.join(sorted(p.name for p in LOGS.iterdir())) or 'none'})")
        say(ACTIVATE_HINT)
    return code


def streamable_digest(reg: Registry, original: images.Image) -> str:
    r = images.get_manifest(reg, REPO, images.referrers_tag(original.digest), accept=images.OCI_INDEX)
    return r.json()["manifests"][0]["digest"]


if __name__ == "__main__":
    sys.exit(main())
