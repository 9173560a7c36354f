"""Record pulls through the mirror, with every credential scrubbed before anything is written.

Two recordings per session, both mitmproxy flow files:

* `client.mitm`: what the client (containerd) asked the mirror and what the mirror answered,
  with the mirror's decisions in `flow.metadata["acr"]`, its comments and marks: the mirror runs
  with `--set save_stream_file=...`, and its flow writer writes scrubbed copies (addons/observe/record.py).
* `upstream.mitm`: what the mirror's own requests sent the registry and got back (the challenge,
  the token grant, manifests, referrers, blob redirects): a second mitmdump, a recording reverse
  proxy with the same scrubber, stands in front of the registry, and `acr_rehost` keeps the
  registry's token realm (and, for the fixture, its storage redirects) pointed at it.

Streamed bodies (large blobs) are not stored, so recordings stay small.

    scripts/record --fixture [--out tests/replay]
        The ACR-shaped session the replay tests use: a token registry with a multi-arch image,
        its streamable copies as `streaming.v1` and `streaming.link.v1` referrers, ACR's shape
        in front (same-host token endpoint, blob 307 to a storage host with SAS URLs), a real
        containerd pull (an HTTP client when not root), then hosts renamed to
        lifecacr.azurecr.io and lifecacr.blob.core.windows.net.

    scripts/record --runmd mirror.runmd --image demo/hello:v1 [--ns example.azurecr.io] --out DIR
        A pull through your own mirror's pipeline (its first `.mirror`), recorded into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from addons import catalog  # noqa: E402
from addons.observe.record import JWT_RE  # noqa: E402
from addons.observe.replay import Origin, read_flows, rehost_flow, write_flows  # noqa: E402
from tests.harness import images  # noqa: E402
from tests.harness.ports import free_port, wait_port  # noqa: E402
from tests.harness.procs import kill_group  # noqa: E402
from tests.harness.replay import (ACCEPT, CLIENT_FLOWS, MITMDUMP, REPLAY_DIR, RUNMD, RUNMD_ADDRESS, SESSION,  # noqa: E402
                                  UPSTREAM_FLOWS, http_pull, replay_runmd)

REGISTRY = "lifecacr.azurecr.io"
STORAGE = "lifecacr.blob.core.windows.net"
REPO = "demo/hello"
TAG = "v1"
PLATFORM = "linux/amd64"
STREAMING = "application/vnd.azure.artifact.streaming.v1"
STREAMING_LINK = "application/vnd.azure.artifact.streaming.link.v1"
#: Known secrets of the fixture run: the replay tests check that none of them is in a flow file.
PASSWORD = "lifec-record-password-4f7d1c"
STORAGE_KEY = b"lifec-record-storage-account-key-9b2e"


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


class Recorder:
    """The recording reverse proxy: `mitmdump --mode reverse:TARGET@PORT ... -s addons/observe/record.py -w FILE`."""

    def __init__(self, out: Path, targets: dict[int, str], rehost: str = "", log: Optional[Path] = None) -> None:
        self.out = out
        self.targets = targets
        self.rehost = rehost
        self.log_path = log or out.with_suffix(".log")
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self) -> "Recorder":
        cmd = [MITMDUMP, "-q", "--set", "connection_strategy=lazy", "-w", str(self.out),
               "--set", "stream_large_bodies=256k", "-s", str(ROOT / "addons" / "observe" / "record.py")]
        for port, target in self.targets.items():
            cmd += ["--mode", f"reverse:{target}@127.0.0.1:{port}"]
        if self.rehost:
            cmd += ["-s", str(ROOT / "scripts" / "rehost.py"), "--set", f"acr_rehost={self.rehost}"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "HOME": str(self.log_path.parent)})
        for port in self.targets:
            wait_port("127.0.0.1", port, 20)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
            self._log.close()


def rehost_file(src: Path, dst: Path, mapping: list[tuple[Origin, Origin]]) -> int:
    flows = [rehost_flow(f, mapping) for f in read_flows(str(src))]
    write_flows(str(dst), flows)
    return len(flows)


def leftovers(path: Path, needles: list[str]) -> list[str]:
    data = path.read_bytes().decode("latin-1")
    found = [n for n in needles if n in data]
    if JWT_RE.search(data):
        found.append("a JWT")
    return found


# --- the fixture -------------------------------------------------------------------------------


def streamable(text: str, platform: str) -> images.Image:
    """A streamable copy whose layers are overlaybd blobs, as the converter writes them
    (tests/harness/images.make_overlaybd_layer)."""
    return images.make_image({"streamable.txt": text.encode()}, platform=platform, overlaybd=True)


def push_fixture(reg: Any) -> dict[str, Any]:
    """`demo/hello:v1` (amd64 + arm64) and its streamable copies, as ACR Artifact Streaming has them:
    the index carries a `streaming.v1` referrer for arm64; the amd64 manifest a `streaming.link.v1`."""
    amd64 = images.make_image({"hello.txt": b"hello from the original amd64 image\n"}, platform="linux/amd64")
    arm64 = images.make_image({"hello.txt": b"hello from the original arm64 image\n"}, platform="linux/arm64")
    index = images.make_index([(None, amd64), (None, arm64)])
    images.push_index(reg, REPO, TAG, index)
    s_amd64 = streamable("streamable amd64\n", "linux/amd64")
    s_arm64 = streamable("streamable arm64\n", "linux/arm64")
    base = {"streaming.format": "overlaybd", "streaming.version": "v1"}
    arm = images.push_referrer(reg, REPO, index, STREAMING,
                               {**base, "streaming.platform.os": "linux", "streaming.platform.arch": "arm64"},
                               config=s_arm64.config, layers=list(s_arm64.layers))
    images.push_image(reg, REPO, None, s_amd64)
    images.push_referrer(reg, REPO, amd64, STREAMING_LINK, {
        **base, "streaming.platform.os": "linux", "streaming.platform.arch": "amd64",
        "streaming.mediaType": s_amd64.media_type, "streaming.digest": s_amd64.digest,
        "streaming.size": str(s_amd64.size),
    })
    return {
        "index": index.digest,
        "original": amd64.digest,
        "teleport": {"from": index.digest, "to": s_amd64.digest, "via": STREAMING_LINK},
        "arm64": {"original": arm64.digest, "streamable": arm["digest"], "via": STREAMING},
        "blobs": {b.digest: len(b.data) for b in s_amd64.blobs},
    }


def containerd_pull(ns_host: str, mirror_url: str, work: Path) -> Optional[str]:
    """ctr pull through the mirror (root only); the digest the image points at, or None."""
    from tests.harness.containerd import Containerd, write_hosts_toml
    from tests.harness.ports import ClosedPort

    with ClosedPort() as closed, Containerd() as cd:
        hosts = work / "certs.d"
        write_hosts_toml(hosts, ns_host, closed.url, hosts=[(mirror_url, ["pull", "resolve"])])
        ref = f"{ns_host}/{REPO}:{TAG}"
        result = cd.pull(ref, hosts_dir=hosts, platform=PLATFORM)
        if result.returncode != 0:
            raise RuntimeError(f"ctr pull failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        return cd.image_target(ref)


def record_fixture(out: Path, client: str, keep: bool) -> int:
    from tests.harness.acr_front import AcrFront, StorageFront
    from tests.harness.mirror import Mirror
    from tests.harness.referrers import ReferrersFront
    from tests.harness.registry import Registry
    from tests.harness.tokenserver import TokenServer

    if client == "auto":
        client = "containerd" if os.geteuid() == 0 and shutil.which("containerd") and shutil.which("ctr") else "http"
    work = Path(tempfile.mkdtemp(prefix="lifec-record-"))
    say(f"working in {work}")
    r1, r2 = free_port(), free_port()
    with TokenServer(service=REGISTRY, users={"lifec": PASSWORD}) as ts, \
            Registry("token", token_server=ts, workdir=work / "registry") as reg:
        say(f"token registry {reg.url} (service {REGISTRY}), token server {ts.url}")
        expect = push_fixture(reg)
        say(f"pushed {REPO}:{TAG} = {expect['index']} and its streamable referrers")
        with StorageFront(reg, STORAGE_KEY, public_url=f"http://127.0.0.1:{r2}") as storage, \
                ReferrersFront(reg.url, credentials=reg.credentials) as rf, \
                AcrFront(rf.url, ts, storage, public_url=f"http://127.0.0.1:{r1}") as acr:
            recorder = Recorder(work / "upstream.mitm", {r1: acr.url, r2: storage.url}).start()
            say(f"recording proxy: {r1} -> ACR front {acr.url}, {r2} -> storage {storage.url}")
            mirror = None
            try:
                port = free_port()
                runmd = replay_runmd(f"http://127.0.0.1:{r1}", f"127.0.0.1:{port}")
                mirror = Mirror(work / "mirror", [], runmd=runmd, port=port,
                                credentials=ts.issue_refresh_token(user="lifec"),
                                sets=[f"save_stream_file={work / 'client.mitm'}", f"acr_platform={PLATFORM}"])
                say(f"mirror on {mirror.url}, pulling with {client}")
                if client == "containerd":
                    target = containerd_pull(f"127.0.0.1:{r1}", mirror.url, work)
                else:
                    result = http_pull(mirror.url, f"127.0.0.1:{r1}", REPO, TAG, PLATFORM)
                    if result.errors:
                        raise RuntimeError(f"pull failed: {result.errors}")
                    target = result.resolved
                say(f"the tag resolved to {target}")
                if target != expect["teleport"]["to"]:
                    print(mirror.log_text()[-3000:])
                    raise RuntimeError(f"not teleported: {target} != {expect['teleport']['to']}")
                # The upstream side of an arm64 node's tag resolution too (its client side is not
                # kept): replaying with acr_platform=linux/arm64 then teleports elsewhere.
                arm = Mirror(work / "mirror-arm64", [], runmd=replay_runmd(f"http://127.0.0.1:{r1}", "127.0.0.1:{port}"),
                             credentials=ts.issue_refresh_token(user="lifec"), sets=["acr_platform=linux/arm64"])
                try:
                    head = arm.head(f"/v2/{REPO}/manifests/{TAG}?ns=127.0.0.1:{r1}", headers={"Accept": ACCEPT})
                finally:
                    arm.stop()
                if head.headers.get("Docker-Content-Digest") != expect["arm64"]["streamable"]:
                    raise RuntimeError(f"arm64: not teleported: {head.status_code} {head.headers}")
            finally:
                if mirror is not None:
                    mirror.stop()
                recorder.stop()
            mapping = [
                (Origin.parse(f"http://127.0.0.1:{r1}"), Origin.parse(f"https://{REGISTRY}")),
                (Origin.parse(acr.url), Origin.parse(f"https://{REGISTRY}")),
                (Origin.parse(rf.url), Origin.parse(f"https://{REGISTRY}")),
                (Origin.parse(ts.url), Origin.parse(f"https://{REGISTRY}")),
                (Origin.parse(reg.url), Origin.parse(f"https://{REGISTRY}")),
                (Origin.parse(f"http://127.0.0.1:{r2}"), Origin.parse(f"https://{STORAGE}")),
                (Origin.parse(storage.url), Origin.parse(f"https://{STORAGE}")),
                (Origin.parse(mirror.url), Origin.parse(f"http://{RUNMD_ADDRESS}")),
            ]
            out.mkdir(parents=True, exist_ok=True)
            n_client = rehost_file(work / "client.mitm", out / CLIENT_FLOWS, mapping)
            n_up = rehost_file(work / "upstream.mitm", out / UPSTREAM_FLOWS, mapping)
            needles = [f"127.0.0.1:{p}" for p in (r1, r2, port, acr.port, storage.port, rf.port, ts.port, reg.port)]
            needles += [PASSWORD, STORAGE_KEY.decode()]
            for name in (CLIENT_FLOWS, UPSTREAM_FLOWS):
                bad = leftovers(out / name, needles)
                if bad:
                    raise RuntimeError(f"{out / name} still holds {bad}")
    session = {
        "registry": REGISTRY, "registry_origin": f"https://{REGISTRY}", "storage_origin": f"https://{STORAGE}",
        "service": REGISTRY, "repository": REPO, "tag": TAG, "platform": PLATFORM, "client": client,
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "flows": {"client": n_client, "upstream": n_up}, **expect,
    }
    (out / SESSION).write_text(json.dumps(session, indent=1) + "\n")
    if out.resolve() != REPLAY_DIR.resolve():
        shutil.copy(REPLAY_DIR / RUNMD, out / RUNMD)
    say(f"wrote {out / CLIENT_FLOWS} ({n_client} flows), {out / UPSTREAM_FLOWS} ({n_up} flows), {out / SESSION}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


# --- your own mirror ---------------------------------------------------------------------------


def record_runmd(runmd: Path, image: str, ns: Optional[str], out: Path, platform: Optional[str]) -> int:
    """`acr mirror serve` (no runtime steps: nothing is installed or logged in anew) on a free
    port, its `.mirror` pointed at a recording proxy in front of the real upstream."""
    compiled = catalog.load(runmd)
    steps = [s for _, s in compiled.document.steps("mirror")]
    step = next((s for s in steps if ns is None or compiled.config(s).ns == ns), None)
    if step is None:
        raise SystemExit(f"{runmd}: no '.mirror' step{' for ' + ns if ns else ''}")
    upstream = compiled.config(step)
    root = next(compiled.document.roots("proxy"))
    original_address = str(compiled.config(root))
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lifec-record-"))
    r1, port = free_port(), free_port()
    lines = runmd.read_text().splitlines()
    lines[step.line - 1] = lines[step.line - 1].replace(step.input, f"http://127.0.0.1:{r1}", 1)
    lines[root.line - 1] = lines[root.line - 1].replace(root.input, f"127.0.0.1:{port}", 1)
    # Beside the original, so that its credentials files are found; removed afterwards.
    temp_runmd = runmd.resolve().parent / f".acr-record-{secrets.token_hex(4)}.runmd"
    temp_runmd.write_text("\n".join(lines) + "\n")
    recorder = Recorder(work / "upstream.mitm", {r1: upstream.base_url},
                        rehost=f"{upstream.base_url}=http://127.0.0.1:{r1}").start()
    acr = str(Path(sys.executable).with_name("acr"))
    cmd = [acr, "--runmd", str(temp_runmd), "mirror", "serve", "--set", f"save_stream_file={work / 'client.mitm'}"]
    cmd += ["--set", f"acr_platform={platform}"] if platform else []
    log = open(work / "mirror.log", "ab")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port("127.0.0.1", port, 20)
        result = http_pull(f"http://127.0.0.1:{port}", f"127.0.0.1:{r1}", name, tag, platform or "linux/amd64")
        say(f"{image}: resolved {result.resolved or '-'}; {len(result.blobs)} blob(s); errors: {result.errors or 'none'}")
    finally:
        kill_group(proc)
        log.close()
        recorder.stop()
        temp_runmd.unlink(missing_ok=True)
    mapping = [(Origin.parse(f"http://127.0.0.1:{r1}"), Origin.parse(upstream.base_url)),
               (Origin.parse(f"http://127.0.0.1:{port}"), Origin.parse(f"http://{original_address}"))]
    n_client = rehost_file(work / "client.mitm", out / "client.mitm", mapping)
    n_up = rehost_file(work / "upstream.mitm", out / "upstream.mitm", mapping)
    say(f"wrote {out / 'client.mitm'} ({n_client} flows) and {out / 'upstream.mitm'} ({n_up} flows)")
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", action="store_true", help="record the ACR-shaped session of tests/replay")
    parser.add_argument("--out", type=Path, help="where the recordings go (default: tests/replay for --fixture)")
    parser.add_argument("--client", choices=("auto", "containerd", "http"), default="auto",
                        help="who pulls: containerd (root), a plain HTTP client, or auto")
    parser.add_argument("--keep", action="store_true", help="keep the working folder (logs, raw recordings)")
    parser.add_argument("--runmd", type=Path, help="record a pull through this mirror.runmd's pipeline")
    parser.add_argument("--image", help="REPO:TAG to pull, e.g. library/busybox:latest (with --runmd)")
    parser.add_argument("--ns", help="the upstream to pull from, as containerd names it (default: the first .mirror)")
    parser.add_argument("--platform", help="os/arch teleport picks (default: this machine's)")
    args = parser.parse_args()
    if args.fixture:
        return record_fixture(args.out or REPLAY_DIR, args.client, args.keep)
    if not (args.runmd and args.image and args.out):
        parser.error("either --fixture, or --runmd, --image and --out")
    return record_runmd(args.runmd, args.image, args.ns, args.out, args.platform)


if __name__ == "__main__":
    sys.exit(main())
