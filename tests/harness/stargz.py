"""The real stargz snapshotter daemon: built from Debian's Go packages with our small main, run
beside a private containerd as its proxy snapshotter, with FUSE.

Debian ships the snapshotter's library and ``ctr-remote`` but no daemon, so ``build``
compiles ``tests/stargz/main.go`` in GOPATH mode (``tests/stargz/gopath`` holds the one import
Debian lacks) and keeps the binary in ``.cache/stargz/<hash>/``, where the hash covers our sources,
the build flags and the installed Go packages' versions: a clean clone builds it once, a changed
source or Debian upgrade builds it again (with a static ``cat`` for test images, from
``tests/stargz/cat``). ``python -m tests.harness.stargz`` builds them and prints their folder.

The daemon's config uses upstream's keys only; ``no_background_fetch = true`` keeps registry reads
on demand, so what a lazy start fetches can be measured, and each registry's ``mirrors`` entry
sends the snapshotter's Range GETs to the mirror.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from .containerd import Containerd, Ctr
from .mirror import Mirror, acr_init
from .ports import free_port
from .procs import kill_group

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCES = ROOT / "tests" / "stargz"
CACHE = ROOT / ".cache" / "stargz"
BINARY = "containerd-stargz-grpc"
#: A static ``cat``: test images have no libc, and a container must print a file from its image.
CAT = "cat"
#: Debian's Go library of the snapshotter and everything it imports live here.
DEBIAN_GOPATH = "/usr/share/gocode"
#: What the daemon and the tests need from Debian (scripts/setup installs them).
DEBIAN_PACKAGES = ("golang-go", "golang-github-containerd-stargz-snapshotter-dev", "stargz-snapshotter", "fuse3")
CTR_REMOTE = "ctr-remote"
#: ``go build`` flags: no symbols, build paths or build ids, so a checkout anywhere builds the
#: same ``cat`` (built from its file, not its folder, whose path GOPATH mode would name): the
#: test images carry it, and their digests stay the same on every machine.
BUILD_FLAGS = ("-trimpath", "-ldflags", "-s -w -buildid=")


def fuse_missing() -> Optional[str]:
    """Why the snapshotter cannot run here, in one line, or None when it can."""
    if os.geteuid() != 0:
        return "the stargz snapshotter needs root (FUSE mounts, containerd)"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as e:
        return f"no usable /dev/fuse ({e.strerror}): the stargz snapshotter mounts layers with FUSE"
    os.close(fd)
    if shutil.which("fusermount3") is None and shutil.which("fusermount") is None:
        return "fusermount3 not found: install the Debian package fuse3"
    return None


def _go_packages() -> str:
    """Installed Go toolchain and library packages with their versions, one per line."""
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version}\n", "golang-*"],
                         capture_output=True, text=True).stdout
    return "".join(sorted(out.splitlines(keepends=True)))


def source_hash() -> str:
    """sha256 over our Go sources (paths and bytes), the build flags and the installed Go
    packages' versions."""
    h = hashlib.sha256("\0".join(BUILD_FLAGS).encode() + b"\0")
    for path in sorted(p for p in SOURCES.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(SOURCES)).encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(_go_packages().encode())
    return h.hexdigest()


def cache_dir() -> Path:
    """Where the binaries for today's sources and packages are (or will be) cached."""
    return CACHE / source_hash()[:16]


def build(say: Callable[[str], None] = lambda _: None) -> Path:
    """The cache folder holding the daemon and the static ``cat`` for test images, built first
    when missing (one build at a time per machine)."""
    folder = cache_dir()
    if (folder / BINARY).is_file() and (folder / CAT).is_file():
        return folder
    missing = [tool for tool in ("go", CTR_REMOTE) if shutil.which(tool) is None]
    if missing or not Path(DEBIAN_GOPATH, "src/github.com/containerd/stargz-snapshotter").is_dir():
        raise FileNotFoundError("cannot build the stargz snapshotter: install the Debian packages "
                                + " ".join(DEBIAN_PACKAGES) + " (scripts/setup does)")
    folder.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a parallel worker builds it: wait, then use its binaries
        gocache = CACHE / "gocache"
        env = {**os.environ, "GO111MODULE": "off", "GOFLAGS": "",
               "GOPATH": f"{SOURCES / 'gopath'}:{DEBIAN_GOPATH}", "GOCACHE": str(gocache)}
        for name, package, extra in ((BINARY, ".", {"CGO_ENABLED": "1"}),
                                     (CAT, "cat/main.go", {"CGO_ENABLED": "0"})):
            if (folder / name).is_file():
                continue
            if name == BINARY:
                say("building the stargz snapshotter daemon from Debian's Go packages (once, a minute or two)")
            partial = folder / (name + ".partial")
            result = subprocess.run(["go", "build", *BUILD_FLAGS, "-o", str(partial), package],
                                    cwd=SOURCES, env={**env, **extra}, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"go build {package} in {SOURCES} failed:\n{result.stderr[-4000:]}")
            partial.replace(folder / name)
        shutil.rmtree(gocache, ignore_errors=True)  # 200+ MB that no later build reuses
    return folder


def mounts_under(folder: Path) -> list[str]:
    """Mount points at or below ``folder``, deepest first."""
    prefix = str(folder).rstrip("/") + "/"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    points = [line.split()[4] for line in lines if len(line.split()) > 4]
    return sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True)


def config_toml(mirrors: Mapping[str, str], *, insecure: bool = True) -> str:
    """The daemon's config: lazy reads only, and each registry's reads sent to its mirror."""
    lines = ["# Upstream containerd-stargz-grpc keys only.", "no_background_fetch = true", ""]
    for registry, mirror in mirrors.items():
        lines += [f'[[resolver.host."{registry}".mirrors]]', f'host = "{mirror}"']
        if insecure:
            lines.append("insecure = true")
        lines.append("")
    return "\n".join(lines)


class StargzSnapshotter:
    """``containerd-stargz-grpc`` with its own root, socket, config and log in a private folder.

    ``mirrors`` maps a registry host to the mirror (host:port) its Range GETs go to. Start it
    before the containerd that names its socket in ``[proxy_plugins.stargz]``.
    """

    def __init__(self, mirrors: Mapping[str, str] = {}, *, timeout: float = 20.0,
                 say: Callable[[str], None] = lambda _: None) -> None:
        reason = fuse_missing()
        if reason:
            raise RuntimeError(reason)
        self.binary = build(say) / BINARY
        # Short path: the socket must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="lifec-sgz-", dir="/tmp"))
        self.root = self.dir / "root"
        self.address = str(self.dir / "stargz.sock")
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "stargz.log"
        self.config_path.write_text(config_toml(mirrors))
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self._timeout = timeout
        self._start()

    def _start(self) -> None:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(self.binary), "--root", str(self.root), "--address", self.address,
             "--config", str(self.config_path), "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir,
            start_new_session=True, env={k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        )
        try:
            self._wait_socket(self._timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_socket(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"stargz snapshotter exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-3000:]}")
            if os.path.exists(self.address):
                return
            time.sleep(0.05)
        raise TimeoutError(f"stargz snapshotter has no socket after {timeout}s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _halt(self) -> list[str]:
        """SIGTERM by PID (the daemon unmounts its layers), then unmount whatever it left;
        returns the mount points that had to be unmounted."""
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_group(proc, grace=15.0)
        if not self._log.closed:
            self._log.close()
        left = mounts_under(self.dir)
        for point in left:
            subprocess.run(["umount", "-l", point], capture_output=True)
        return left

    def restart_cold(self) -> None:
        """Stop, forget every layer and cached chunk (its root), and start again on the same
        socket: the next pull is a cold one. containerd needs ``wait_ready`` after this."""
        self._halt()
        shutil.rmtree(self.root, ignore_errors=True)
        self._start()

    def stop(self) -> list[str]:
        """Stop (see ``_halt``) and delete the folder; returns what had to be unmounted. Safe twice."""
        left = self._halt()
        shutil.rmtree(self.dir, ignore_errors=True)
        return left

    def __enter__(self) -> "StargzSnapshotter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(ctr: Ctr, snapshotter: str = "stargz", timeout: float = 30.0) -> None:
    """Block until containerd reaches the proxy snapshotter: after the daemon (re)starts,
    containerd's gRPC connection to it backs off for a moment, and ``snapshot ls`` would not tell."""
    key = f"lifec-ready-{os.getpid()}"
    deadline = time.monotonic() + timeout
    while True:
        prepared = ctr.ctr("snapshot", "--snapshotter", snapshotter, "prepare", key, timeout=10)
        if prepared.returncode == 0:
            ctr.ctr("snapshot", "--snapshotter", snapshotter, "rm", key, timeout=10)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"containerd cannot reach the {snapshotter} snapshotter: {prepared.stderr.strip()}")
        time.sleep(0.2)


class StargzNode:
    """A node that streams: the stargz snapshotter and a containerd whose CRI snapshotter it is.

    Stopping stops containerd first, then the snapshotter (which unmounts its layers).
    """

    def __init__(self, mirrors: Mapping[str, str] = {}, *, namespace: str = "lifec-test",
                 say: Callable[[str], None] = lambda _: None) -> None:
        self.snapshotter = StargzSnapshotter(mirrors, say=say)
        try:
            self.containerd = Containerd(snapshotter="stargz", namespace=namespace,
                                         proxy_snapshotters={"stargz": self.snapshotter.address})
        except BaseException:
            self.snapshotter.stop()
            raise
        try:
            wait_ready(self.containerd)
        except BaseException:
            self.stop()
            raise

    def restart_cold(self) -> None:
        """A snapshotter that has never seen a layer, for the next pull (containerd stays)."""
        self.snapshotter.restart_cold()
        wait_ready(self.containerd)

    def stop(self) -> list[str]:
        """Stop both; returns what the snapshotter left mounted (and was unmounted for it)."""
        self.containerd.stop()
        return self.snapshotter.stop()

    def __enter__(self) -> "StargzNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def estargz_mirror(home: Path, upstream: str, node_config: Path, *, port: Optional[int] = None,
                   sets: Sequence[str] = ()) -> Mirror:
    """A mirror of ``upstream`` as `acr init --teleport-format estargz` writes it (teleport
    `auto`), judging the node that ``node_config`` (containerd's config.toml) describes; not
    started yet (``start``), so its port can go into the node's snapshotter config first."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    runmd = home / "init.runmd"
    acr_init("--runmd", str(runmd), "init", "--upstream", upstream, "--mirror-address", f"127.0.0.1:{port}",
             "--teleport-format", "estargz", "--force")
    return Mirror(home, [upstream], runmd=runmd.read_text(), port=port, start=False,
                  sets=[f"acr_containerd_config={node_config}", *sets], env={"PYTHONUNBUFFERED": "1"},
                  args=["--hosts-dir", str(home / "runtime-certs.d")])


def main() -> int:
    if sys.argv[1:] not in ([], ["build"]):
        print("usage: python -m tests.harness.stargz [build]", file=sys.stderr)
        return 2
    try:
        print(build(lambda text: print(text, file=sys.stderr, flush=True)))
    except (OSError, RuntimeError) as e:
        print(f"stargz snapshotter: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
