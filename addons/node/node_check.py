"""`.node-check [CONFIG]`: what this node still lacks for the mirror to be used, as warnings.

A mirror that containerd never asks is silently useless, and a teleported image without the
overlaybd snapshotter is pulled like any other: the check says so at start, in the mirror's
log, and never fails the event (a node without overlaybd still gets a working mirror).
Installing overlaybd stays a manual step; the template's Install section says how.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

from addons.node import overlaybd_config
from addons.node.containerd_config import (DEFAULT_CONFIG, DEFAULT_HOSTS_DIR, OVERLAYBD, OVERLAYBD_SOCKET, SCHEMAS, STARGZ,
                                           Schema, parse_config_path)
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime

logger = logging.getLogger(__name__)

#: containerd reads hosts.toml through CRI's config_path since 1.5.
MIN_CONTAINERD = (1, 5)
#: containerd 2.x's config_path when the file does not set it.
DEFAULT_CONFIG_PATH_2X = "/etc/containerd/certs.d:/etc/docker/certs.d"
OVERLAYBD_BINARIES = ("/opt/overlaybd/snapshotter/overlaybd-snapshotter", "/opt/overlaybd/bin/overlaybd-tcmu")
_VERSION_RE = re.compile(r"\bv?(\d+)\.(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class Finding:
    ok: bool
    message: str


def parse_containerd_version(output: str) -> tuple[int, ...] | None:
    """(1, 6, 20) from `containerd github.com/containerd/containerd 1.6.20~ds1 ...`."""
    words = output.split()
    for word in words[1:] if len(words) > 1 else words:
        m = _VERSION_RE.match(word)
        if m:
            return tuple(int(g) for g in m.groups() if g is not None)
    return None


def check_containerd(binary: str = "containerd") -> tuple[Finding, tuple[int, ...] | None]:
    path = shutil.which(binary)
    if path is None:
        return Finding(False, f"containerd is not installed (no '{binary}' on PATH): nothing will pull through this mirror"), None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Finding(False, f"'{path} --version' failed: {e.__class__.__name__}"), None
    version = parse_containerd_version(out.stdout)
    if out.returncode != 0 or version is None:
        return Finding(False, f"'{path} --version' did not say its version: {out.stdout.strip()[:100]!r}"), None
    text = ".".join(map(str, version))
    if version[:2] < MIN_CONTAINERD:
        return Finding(False, f"containerd {text} is too old: hosts.toml (config_path) needs 1.5 or newer"), version
    return Finding(True, f"containerd {text}"), version


class Unreadable(Exception):
    """config.toml exists but cannot be read as containerd would; one line."""


def load_config(config: Path) -> dict:
    """containerd's config.toml as data (FileNotFoundError when there is none)."""
    try:
        return tomllib.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise Unreadable(f"cannot read {config}: {e}") from None


def schema_of(data: dict) -> Schema | None:
    """The schema of the file's `version` (None for one containerd does not know)."""
    version = data.get("version", 1)
    return SCHEMAS.get(version) if isinstance(version, int) and not isinstance(version, bool) else None


def table(data: dict, path: tuple[str, ...]) -> dict:
    """The table at `path`, or an empty one."""
    node: object = data
    for key in path:
        node = node.get(key, {}) if isinstance(node, dict) else {}
    return node if isinstance(node, dict) else {}


#: The CRI snapshotters that stream images, and the format each streams.
STREAMING_SNAPSHOTTERS = {OVERLAYBD: "overlaybd", STARGZ: "estargz"}


def cri_snapshotter(data: dict, schema: Schema) -> str:
    """The snapshotter CRI unpacks images with (containerd's default: overlayfs)."""
    value = table(data, schema.snapshotter).get("snapshotter")
    return value if isinstance(value, str) and value else "overlayfs"


def streaming_missing(data: dict, schema: Schema, snapshotter: str) -> tuple[list[str], str | None]:
    """What this config.toml lacks for CRI to run images with the streaming `snapshotter`
    (overlaybd or stargz), and that snapshotter's socket as declared (`[proxy_plugins.NAME] address`)."""
    missing: list[str] = []
    cri = table(data, schema.snapshotter)
    where = schema.dotted(schema.snapshotter)
    current = cri_snapshotter(data, schema)
    if current != snapshotter:
        missing.append(f"CRI's snapshotter is {current!r}, not {snapshotter!r} ({where})")
    # containerd 1.x leaves the layer annotations out by default; 2.x passes them.
    annotations_off = cri.get("disable_snapshot_annotations", schema.version < 3)
    if annotations_off is not False:
        missing.append(f"{where}.disable_snapshot_annotations is not false ({snapshotter} needs the layer annotations)")
    plugin = table(data, ("proxy_plugins", snapshotter))
    address = plugin.get("address") if isinstance(plugin.get("address"), str) else None
    if not plugin:
        missing.append(f"no [proxy_plugins.{snapshotter}] declares the {snapshotter} snapshotter")
    elif plugin.get("type") != "snapshot" or not address:
        missing.append(f"[proxy_plugins.{snapshotter}] is not a snapshot plugin with an address")
        address = None
    return missing, address


def check_config(config: Path, hosts_dir: str, containerd: tuple[int, ...] | None) -> tuple[list[Finding], dict]:
    """Whether CRI's config_path (as this config.toml sets it) includes the mirror's hosts folder."""
    fix = f"run 'acr containerd configure --config {config} --hosts-dir {hosts_dir}'"
    try:
        data = load_config(config)
    except FileNotFoundError:
        if containerd and containerd[0] >= 2 and hosts_dir in DEFAULT_CONFIG_PATH_2X.split(":"):
            return [Finding(True, f"no {config}: containerd 2.x's default config_path includes {hosts_dir}")], {}
        return [Finding(False, f"no {config}: containerd's CRI does not read hosts.toml files: {fix}")], {}
    except Unreadable as e:
        return [Finding(False, str(e))], {}
    schema = schema_of(data)
    if schema is None:
        return [Finding(False, f"{config}: unknown config version {data.get('version')!r}")], data
    config_path = table(data, schema.registry).get("config_path", "")
    if not config_path and schema.version >= 3:
        config_path = DEFAULT_CONFIG_PATH_2X
    if not config_path:
        return [Finding(False, f"{config}: CRI's config_path is not set, so containerd ignores hosts.toml: {fix}, then restart containerd")], data
    if hosts_dir not in config_path.split(":"):
        return [
            Finding(
                False,
                f"{config}: config_path is {config_path!r} but the mirror writes hosts.toml into {hosts_dir}: "
                f"start the mirror with --hosts-dir {config_path.split(':')[0]}, or {fix}",
            )
        ], data
    return [Finding(True, f"{config}: config_path includes {hosts_dir}")], data


def check_overlaybd(data: dict, socket: Path, binaries: tuple[str, ...]) -> list[Finding]:
    """Whether streamed (teleported) images can be used: the overlaybd snapshotter runs and
    containerd knows it."""
    try:
        running = stat.S_ISSOCK(socket.stat().st_mode)
    except OSError:
        running = False
    installed = [b for b in binaries if Path(b).exists()] or ([w] if (w := shutil.which("overlaybd-snapshotter")) else [])
    out: list[Finding] = []
    if running:
        out.append(Finding(True, f"overlaybd snapshotter is running ({socket})"))
    elif installed:
        out.append(Finding(False, f"overlaybd is installed ({installed[0]}) but its snapshotter is not running (no {socket}): start it"))
    else:
        out.append(
            Finding(
                False,
                "overlaybd is not installed: pulls work, but teleported images are not streamed; "
                "installing it is a manual step (see the Install section of mirror.runmd)",
            )
        )
    plugin = (data.get("proxy_plugins") or {}).get("overlaybd") if data else None
    if (running or installed) and not plugin:
        out.append(Finding(False, "containerd has no proxy_plugins.overlaybd: run 'acr containerd configure --snapshotter overlaybd'"))
    return out


def check_node(
    config: Path = DEFAULT_CONFIG,
    hosts_dir: str = DEFAULT_HOSTS_DIR,
    *,
    containerd: str = "containerd",
    overlaybd_socket: Path = Path(OVERLAYBD_SOCKET),
    overlaybd_binaries: tuple[str, ...] = OVERLAYBD_BINARIES,
    overlaybd_json: Path = overlaybd_config.DEFAULT_CONFIG,
    auth_url: str | None = None,
) -> list[Finding]:
    found, version = check_containerd(containerd)
    findings = [found]
    config_findings, data = check_config(config, hosts_dir, version)
    findings += config_findings
    findings += check_overlaybd(data, overlaybd_socket, overlaybd_binaries)
    if auth_url is not None:
        credentials = overlaybd_config.check_credentials(overlaybd_json, auth_url)
        if credentials is not None:
            findings.append(Finding(*credentials))
    return findings


class NodeCheck(RuntimePlugin):
    """`.node-check [CONFIG]`, with `: .overlaybd PATH` naming overlaybd's config (default
    /etc/overlaybd/overlaybd.json), whose credentials must come from this mirror's `/auth`."""

    plugin = "node-check"
    attributes = ("overlaybd",)

    @classmethod
    def parse_attribute(cls, name: str, text: str) -> Path:
        if name == "overlaybd":
            if not text or len(text.split()) > 1:
                raise ValueError(f"expected the path of overlaybd's config, e.g. '.overlaybd {overlaybd_config.DEFAULT_CONFIG}'")
            return Path(text)
        raise ValueError(f"'.{cls.plugin}' has no attribute '.{name}'")

    @classmethod
    def parse(cls, text: str) -> Path:
        return parse_config_path(text)

    def run(self, runtime: Runtime) -> None:
        path = self.config if self.config.is_absolute() else runtime.home / self.config
        hosts_dir = str(runtime.hosts_dir) if runtime.hosts_dir else DEFAULT_HOSTS_DIR
        obd = overlaybd_config.DEFAULT_CONFIG
        for attr in self.step.attributes:
            obd = self.parse_attribute(attr.name, attr.input)
        obd = obd if obd.is_absolute() else runtime.home / obd
        findings = check_node(path, hosts_dir, overlaybd_json=obd, auth_url=overlaybd_config.auth_url(runtime.compiled))
        for f in findings:
            (logger.info if f.ok else logger.warning)("step %d: %s", self.step.id, f.message)
        missing = sum(not f.ok for f in findings)
        if missing:
            logger.warning("step %d: %d thing(s) missing on this node (the mirror still starts)", self.step.id, missing)
