"""A private containerd 1.6 daemon (root, own dirs and socket) and a ``ctr`` client for it.

End-to-end tests pull through the mirror with the real client, so what containerd really sends
(HEAD/GET, ``?ns=``, no credentials to mirrors, fallbacks) is what the mirror is tested against.

Sandbox findings (Debian 12, containerd 1.6.20): the CRI plugin loads fine without CNI (it only
logs that no network config was found), so it stays enabled: its ``registry.config_path`` is what
a Kubernetes node uses and later tests may want it. overlayfs works here; ``native`` is the
fallback when the overlayfs plugin does not load. ``content_sharing_policy = "isolated"`` makes
each namespace fetch its own blobs, so a test's namespace really pulls instead of reusing content
that another test already downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

from .procs import kill_group

CONTAINERD_BIN = "containerd"
CTR_BIN = "ctr"


def _ctr_env() -> dict[str, str]:
    """The caller's environment without proxies: pulls go to loopback only."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


class Ctr:
    """``ctr`` bound to one daemon address and one namespace.

    Namespaces are cheap isolation: each test can pull into its own and drop it afterwards.
    """

    def __init__(self, address: str, namespace: str = "lifec-test",
                 snapshotter: Optional[str] = None) -> None:
        self.address = address
        self.namespace = namespace
        self.snapshotter = snapshotter

    def ctr(self, *args: str, timeout: float = 60.0, check: bool = False,
            namespace: Optional[str] = None) -> "subprocess.CompletedProcess[str]":
        """Run ``ctr -a ADDRESS -n NS ARGS``; output is captured as text."""
        cmd = [CTR_BIN, "-a", self.address, "-n", namespace or self.namespace, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=check,
                              env=_ctr_env(), stdin=subprocess.DEVNULL)

    def pull(
        self,
        ref: str,
        hosts_dir: Optional[os.PathLike[str] | str] = None,
        user: Optional[str] = None,
        plain_http: bool = False,
        platform: Optional[str] = None,
        all_platforms: bool = False,
        timeout: float = 120.0,
        extra_args: Sequence[str] = (),
        check: bool = False,
    ) -> "subprocess.CompletedProcess[str]":
        """``ctr images pull`` (fetch and unpack); returns the CompletedProcess, never raises
        unless ``check`` so tests can assert on failures too. ``user`` is ``name[:password]``."""
        args = ["images", "pull"]
        if hosts_dir is not None:
            args += ["--hosts-dir", str(hosts_dir)]
        if user is not None:
            args += ["--user", user]
        if plain_http:
            args.append("--plain-http")
        if platform is not None:
            args += ["--platform", platform]
        if all_platforms:
            args.append("--all-platforms")
        if self.snapshotter:
            args += ["--snapshotter", self.snapshotter]
        args += [*extra_args, ref]
        return self.ctr(*args, timeout=timeout, check=check)

    def images(self) -> dict[str, str]:
        """{ref: target digest} of every image in the namespace."""
        out = self.ctr("images", "ls", check=True).stdout.splitlines()
        result: dict[str, str] = {}
        for line in out[1:]:
            fields = line.split()
            digest = next((f for f in fields[1:] if f.startswith("sha256:")), None)
            if fields and digest:
                result[fields[0]] = digest
        return result

    def image_target(self, ref: str) -> Optional[str]:
        """The digest the image's name points at (what tag resolution returned), or None."""
        return self.images().get(ref)

    def remove_image(self, ref: str) -> "subprocess.CompletedProcess[str]":
        """Delete the image and let GC drop its content synchronously."""
        return self.ctr("images", "rm", "--sync", ref)

    def content_digests(self) -> set[str]:
        """Digests in this namespace's content store (what was really fetched)."""
        out = self.ctr("content", "ls", "-q", check=True).stdout
        return {line.strip() for line in out.splitlines() if line.strip()}

    def clear(self) -> None:
        """Remove every image, lease and leftover blob in the namespace, best effort."""
        refs = list(self.images())
        if refs:
            self.ctr("images", "rm", "--sync", *refs)
        leases = self.ctr("leases", "ls", "-q").stdout.split()
        for lease in leases:
            self.ctr("leases", "rm", "--sync", lease)
        digests = sorted(self.content_digests())
        if digests:
            self.ctr("content", "rm", *digests)

    def drop_namespace(self) -> None:
        """Clear the namespace and delete it, so a long session does not pile up state."""
        self.clear()
        self.ctr("namespaces", "rm", self.namespace, namespace="default")


class Containerd(Ctr):
    """A containerd daemon with private root/state/socket under a temp folder.

    ``hosts_dir`` (``<tmp>/certs.d``) is the CRI ``registry.config_path``; ``ctr`` pulls need
    ``--hosts-dir`` given explicitly (ctr does not read the daemon's CRI config).
    ``proxy_snapshotters`` ({name: socket}) become ``[proxy_plugins.NAME]`` entries; naming one as
    ``snapshotter`` makes it CRI's snapshotter, with snapshot annotations passed on to it.
    """

    def __init__(self, *, snapshotter: Optional[str] = None, namespace: str = "lifec-test",
                 timeout: float = 20.0, proxy_snapshotters: Mapping[str, str] = {}) -> None:
        if os.geteuid() != 0:
            raise PermissionError("containerd needs root")
        for binary in (CONTAINERD_BIN, CTR_BIN):
            if shutil.which(binary) is None:
                raise FileNotFoundError(f"{binary} not found: install the Debian package "
                                        "containerd (scripts/test does)")
        # Short path: the socket must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="lifec-ctd-", dir="/tmp"))
        self.root = self.dir / "root"
        self.state = self.dir / "state"
        self.hosts_dir = self.dir / "certs.d"
        self.hosts_dir.mkdir()
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "containerd.log"
        address = str(self.dir / "containerd.sock")
        wanted = snapshotter or os.environ.get("LIFEC_TEST_SNAPSHOTTER") or "overlayfs"
        super().__init__(address, namespace, snapshotter=None)
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.proxy_snapshotters = dict(proxy_snapshotters)
        self._log = open(self.log_path, "ab")
        try:
            self._start(wanted, timeout)
            if wanted not in self.proxy_snapshotters and self._plugin_status("io.containerd.snapshotter.v1", wanted) != "ok":
                # e.g. overlayfs on a root that does not support it: restart on native.
                self._kill()
                self._start("native", timeout)
                wanted = "native"
            self.snapshotter = wanted
        except BaseException:
            self.stop()
            raise

    def _write_config(self, snapshotter: str) -> None:
        d = self.dir
        proxies = "".join(f'  [proxy_plugins.{name}]\n    type = "snapshot"\n    address = "{socket}"\n'
                          for name, socket in self.proxy_snapshotters.items())
        self.config_path.write_text(f"""\
version = 2
root = "{self.root}"
state = "{self.state}"

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[proxy_plugins]
{proxies}
[plugins]
  [plugins."io.containerd.metadata.v1.bolt"]
    content_sharing_policy = "isolated"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{d}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{d}/cni/bin"
      conf_dir = "{d}/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{snapshotter}"
      disable_snapshot_annotations = {"false" if snapshotter in self.proxy_snapshotters else "true"}
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "{self.hosts_dir}"
""")

    def _start(self, snapshotter: str, timeout: float) -> None:
        self._write_config(snapshotter)
        self.proc = subprocess.Popen(
            [CONTAINERD_BIN, "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            cwd=self.dir, start_new_session=True, env=_ctr_env(),
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n"
                                   f"{self.log_text()[-4000:]}")
            if os.path.exists(self.address):
                try:
                    if self.ctr("version", timeout=5).returncode == 0:
                        return
                except subprocess.TimeoutExpired:
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"containerd not ready after {timeout}s:\n{self.log_text()[-4000:]}")

    def _plugin_status(self, type_: str, plugin_id: str) -> Optional[str]:
        out = self.ctr("plugins", "ls", check=True).stdout
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 4 and fields[0] == type_ and fields[1] == plugin_id:
                return fields[-1]
        return None

    def client(self, namespace: str) -> Ctr:
        """A ``ctr`` client for this daemon in another namespace."""
        return Ctr(self.address, namespace, snapshotter=self.snapshotter)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_group(proc, grace=10.0)

    def _unmount_all(self) -> None:
        """Unmount anything left under our folder (snapshot mounts), deepest first."""
        prefix = str(self.dir) + "/"
        try:
            lines = Path("/proc/self/mountinfo").read_text().splitlines()
        except OSError:
            return
        points = [f.split()[4] for f in lines if len(f.split()) > 4]
        for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)

    def stop(self) -> None:
        """Kill the daemon, unmount, delete the folder; safe to call twice."""
        self._kill()
        if not self._log.closed:
            self._log.close()
        self._unmount_all()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Containerd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_hosts_toml(
    hosts_dir: os.PathLike[str] | str,
    upstream: str,
    server: str,
    hosts: Sequence[tuple[str, Sequence[str]]] = (),
    extra: str = "",
) -> Path:
    """Write ``<hosts_dir>/<upstream>/hosts.toml`` with ``server`` and ``[host."URL"]`` entries.

    ``hosts`` is [(url, capabilities)], tried in order before ``server``. Tests point ``server`` at
    a closed loopback port so a fallback never leaves the machine.
    """
    folder = Path(hosts_dir) / upstream
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f'server = "{server}"', ""]
    for url, caps in hosts:
        lines.append(f'[host."{url}"]')
        lines.append("  capabilities = [" + ", ".join(f'"{c}"' for c in caps) + "]")
        lines.append("")
    if extra:
        lines.append(extra)
    path = folder / "hosts.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
