"""containerd's hosts.toml for the mirror: what the runmd asks for, rendered, installed, removed.

The runtime steps `.mirror`, `.server`, `.host` (with its attribute lines) and `.https` together
decide the files; `plan` reads them from the whole document, so their order in the runmd only
matters for `.server`, which belongs to the `.mirror` above it. Files are first written under
`<home>/.work/etc/containerd/certs.d/` (what `acr hosts show` prints), then installed into
containerd's hosts folder. Where no file is there, ours is installed whole (its first line is
`MARKER`). Where another tool (Spegel, Dragonfly) or a person wrote the file, our `[host]`
tables are added to it (first, unless `.host ..., position` says otherwise) and the rest is kept
byte for byte (see addons.node.hostsmerge); `remove` takes out only our tables. A whole file of
ours that replaced someone's file in an older version is still put back from its
`hosts.toml.acr-backup` by `remove`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import tomlkit

from addons.core.files import atomic_write
from addons.node import hostsmerge
from addons.node.https import HttpsError, ca_path, write_ca
from addons.runmd.compile import Compiled
from addons.registry.oci import Upstream

logger = logging.getLogger(__name__)

#: containerd's catch-all folder: registries without a folder of their own use it.
DEFAULT_FOLDER = "_default"
FILE_NAME = "hosts.toml"
BACKUP_NAME = FILE_NAME + ".acr-backup"
#: First line of every file we write: how `install` and `remove` tell ours from a person's.
MARKER = "# Written by lifec-registry (acr) from its runmd file."
_MARKER_NOTE = "# 'acr hosts remove' deletes this file or puts back the one it replaced."
#: Where `.host` files are generated, relative to the work folder.
WORK_SUBDIR = Path("etc/containerd/certs.d")

#: Go's time.ParseDuration grammar, which containerd uses for dial_timeout.
_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: Attribute lines `.host` accepts, in the order they are documented.
HOST_ATTRIBUTES = ("dial_timeout", "header", "skip_verify", "ca", "default")


class HostsError(Exception):
    """A hosts.toml that cannot be planned, written or removed; one line for the operator."""


# --- what one [host."URL"] entry says ----------------------------------------------------


@dataclass(frozen=True)
class HostOptions:
    """The hosts.toml keys of one mirror entry, from the attribute lines under its `.host`."""

    dial_timeout: str | None = None
    headers: tuple[tuple[str, tuple[str, ...]], ...] = ()
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    #: Also list this entry in `_default/hosts.toml` (every registry tries it first).
    default: bool = False


def parse_host_attribute(name: str, text: str) -> object:
    """Check one attribute line of `.host`; return its value (ValueError says what was expected)."""
    text = text.strip()
    if name == "dial_timeout":
        if not _DURATION_RE.match(text):
            raise ValueError(f"expected a duration like 2s or 500ms, got '{text}'")
        return text
    if name == "header":
        header, _, value = text.partition(" ")
        value = value.strip()
        if not header or not value:
            raise ValueError(f"expected 'NAME VALUE', e.g. '.header X-Mirror node-1', got '{text}'")
        if not _HEADER_NAME_RE.match(header):
            raise ValueError(f"invalid header name '{header}'")
        return header, value
    if name in ("skip_verify", "default"):
        if text.lower() in ("", "true", "yes", "on"):
            return True
        if text.lower() in ("false", "no", "off"):
            return False
        raise ValueError(f"expected no input (or true/false), got '{text}'")
    if name == "ca":
        if not text or any(c.isspace() for c in text):
            raise ValueError(f"expected the path of a CA certificate file, got '{text}'")
        return text
    raise ValueError(f"unknown attribute '.{name}' (known: {', '.join(HOST_ATTRIBUTES)})")


def host_options(attributes: Iterable[tuple[str, str]]) -> HostOptions:
    """Fold a step's attribute lines into its options; repeated `.header`/`.ca` lines add up."""
    dial_timeout: str | None = None
    headers: dict[str, list[str]] = {}
    skip_verify = default = False
    ca: list[str] = []
    for name, text in attributes:
        value = parse_host_attribute(name, text)
        if name == "dial_timeout":
            dial_timeout = value  # type: ignore[assignment]
        elif name == "header":
            key, val = value  # type: ignore[misc]
            headers.setdefault(key, []).append(val)
        elif name == "skip_verify":
            skip_verify = bool(value)
        elif name == "default":
            default = bool(value)
        elif name == "ca":
            ca.append(value)  # type: ignore[arg-type]
    return HostOptions(
        dial_timeout=dial_timeout,
        headers=tuple((k, tuple(v)) for k, v in headers.items()),
        skip_verify=skip_verify,
        ca=tuple(ca),
        default=default,
    )


@dataclass(frozen=True)
class MirrorHost:
    """One `[host."URL"]` entry: where containerd tries first, and how."""

    url: str
    capabilities: tuple[str, ...]
    options: HostOptions = field(default_factory=HostOptions)
    #: Where it goes in someone else's file: 0 first, n before their n-th table (0-based), None last.
    position: int | None = 0
    #: When another tool rewrites the file while the mirror runs, leave it out (log only).
    keep_out: bool = False


def entry_table(host: MirrorHost) -> Any:
    """The tomlkit table of one `[host."URL"]` entry, keys in the order containerd documents them."""
    entry = tomlkit.table()
    entry.add("capabilities", list(host.capabilities))
    opts = host.options
    if opts.dial_timeout:
        entry.add("dial_timeout", opts.dial_timeout)
    if opts.skip_verify:
        entry.add("skip_verify", True)
    if opts.ca:
        entry.add("ca", opts.ca[0] if len(opts.ca) == 1 else list(opts.ca))
    if opts.headers:
        headers = tomlkit.table()
        for name, values in opts.headers:
            headers.add(name, list(values))
        entry.add("header", headers)
    return entry


def block(host: MirrorHost) -> hostsmerge.Block:
    """The entry as it is added to someone else's file: marked as ours, no blank line inside."""
    doc = tomlkit.document()
    table = tomlkit.table(is_super_table=True)
    entry = entry_table(host)
    entry.comment(hostsmerge.MARK)
    table.add(host.url, entry)
    doc.add("host", table)
    text = "".join(line for line in tomlkit.dumps(doc).splitlines(keepends=True) if line.strip())
    return hostsmerge.Block(host.url, text, host.position)


@dataclass(frozen=True)
class HostsFile:
    """One hosts.toml: its folder (`host[:port]` or `_default`), `server`, and the mirror entries."""

    folder: str
    server: str | None
    hosts: tuple[MirrorHost, ...]

    @property
    def mode(self) -> int:
        """Owner-only when a header could carry a secret, else readable like any config."""
        return 0o600 if any(h.options.headers for h in self.hosts) else 0o644

    def render(self) -> str:
        doc = tomlkit.document()
        doc.add(tomlkit.comment(MARKER[2:]))
        doc.add(tomlkit.comment(_MARKER_NOTE[2:]))
        if self.server:
            doc.add("server", self.server)
        table = tomlkit.table(is_super_table=True)
        for host in self.hosts:
            table.add(host.url, entry_table(host))
        if self.hosts:
            doc.add(tomlkit.nl())
            doc.add("host", table)
        return tomlkit.dumps(doc)


# --- the plan: which files the runmd asks for ---------------------------------------------


def plan(compiled: Compiled, work: Path | None = None) -> list[HostsFile]:
    """The hosts.toml files of a runmd: one per `.mirror` (plus `_default` when asked for).

    `work` is the work folder, where `.https` puts the certificate containerd must trust; it
    defaults to the runmd's `.work`. Raises HostsError on a `.server` without a `.mirror` above.
    """

    work = work or compiled.home / ".work"
    servers: dict[str, str] = {}
    upstreams: list[Upstream] = []
    entries: list[tuple[object, HostOptions]] = []
    https = False
    current: Upstream | None = None
    for root in compiled.document.roots("runtime"):
        for step in root.steps:
            config = compiled.config(step)
            if step.plugin == "mirror":
                current = config
                if all(u.ns != config.ns for u in upstreams):
                    upstreams.append(config)
                    servers[config.ns] = config.base_url
            elif step.plugin == "server":
                if current is None:
                    raise HostsError(
                        f"{compiled.path}:{step.line}: '.server' must follow the '.mirror' whose server it sets"
                    )
                servers[current.ns] = config
            elif step.plugin == "host":
                options = host_options((a.name, a.input) for a in step.attributes)
                entries.append((config, options))
            elif step.plugin == "https":
                https = True
    if not entries:
        return []
    scheme = "https" if https else "http"
    hosts: list[MirrorHost] = []
    for config, options in entries:
        if https and not options.ca:
            options = HostOptions(
                dial_timeout=options.dial_timeout,
                headers=options.headers,
                skip_verify=options.skip_verify,
                ca=(str(ca_path(work)),),
                default=options.default,
            )
        hosts.append(MirrorHost(
            f"{scheme}://{config.address}", tuple(config.capabilities), options,
            position=config.position, keep_out=config.keep_out,
        ))
    files = [HostsFile(u.ns, servers[u.ns], tuple(hosts)) for u in upstreams]
    defaults = tuple(h for h in hosts if h.options.default)
    if defaults:
        # No server: containerd falls back to the registry the image names.
        files.append(HostsFile(DEFAULT_FOLDER, None, defaults))
    return files


def work_path(work: Path, folder: str) -> Path:
    return work / WORK_SUBDIR / folder / FILE_NAME


# --- files on disk ----------------------------------------------------------------------


def is_ours(text: str | bytes) -> bool:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return text.startswith(MARKER)


def backups(folder: Path) -> list[Path]:
    """The backups in a hosts folder, oldest first (`.acr-backup`, then `.acr-backup.1`, ...)."""
    found: list[tuple[int, Path]] = []
    for p in folder.glob(BACKUP_NAME + "*"):
        suffix = p.name[len(BACKUP_NAME):]
        if suffix == "":
            found.append((0, p))
        elif suffix.startswith(".") and suffix[1:].isdigit():
            found.append((int(suffix[1:]), p))
    return [p for _, p in sorted(found)]


def _keep(target: Path) -> Path:
    """Keep a link a person's tools manage under a backup name that is not taken."""
    folder = target.parent
    name = folder / BACKUP_NAME
    n = 0
    while True:
        try:
            os.link(target, name, follow_symlinks=False)  # the link itself, under a second name
            return name
        except FileExistsError:
            n += 1
            name = folder / f"{BACKUP_NAME}.{n}"


def _read(target: Path) -> bytes | None:
    try:
        return target.read_bytes()
    except FileNotFoundError:
        return None


def _rewrite(target: Path, data: bytes, mode: int | None = None) -> None:
    """Replace a file someone else owns: same mode (or stricter) and, as root, same owner."""
    st = target.stat()
    keep = st.st_mode & 0o777
    atomic_write(target, data, keep & mode if mode is not None else keep, owner=(st.st_uid, st.st_gid))


def install(f: HostsFile, hosts_dir: Path) -> str:
    """Install one hosts.toml into `hosts_dir/f.folder`; return what happened, for the log."""
    target = Path(hosts_dir) / f.folder / FILE_NAME
    data = f.render().encode()
    try:
        current = _read(target)
        if current is None or is_ours(current):
            if current == data:
                return f"{target}: unchanged"
            atomic_write(target, data, f.mode)
            return f"{target}: installed"
        try:
            merged = hostsmerge.merge(current.decode("utf-8"), [block(h) for h in f.hosts]).encode()
        except (hostsmerge.MergeError, UnicodeDecodeError) as e:
            raise HostsError(f"cannot add the mirror to {target}: {e}") from None
        if merged == current:
            return f"{target}: unchanged (the mirror's table is in it)"
        # A link (configuration management's) is never written through: it is kept aside and
        # comes back when the mirror is removed.
        kept = _keep(target) if target.is_symlink() else None
        _rewrite(target, merged, 0o600 if f.mode == 0o600 else None)
    except OSError as e:
        raise HostsError(f"cannot install {target}: {e.strerror or e}") from None
    if kept is not None:
        return f"{target}: the mirror's table added to a copy of the linked file (the link is kept as {kept.name})"
    return f"{target}: the mirror's table added, the other entries kept as they were"


def remove(hosts_dir: Path, folder: str) -> str:
    """Take the mirror out of `hosts_dir/folder`: our tables only, or our whole file."""
    directory = Path(hosts_dir) / folder
    target = directory / FILE_NAME
    try:
        current = _read(target)
        if current is not None and not is_ours(current):
            try:
                text = current.decode("utf-8")
                if not hostsmerge.marked_urls(text):
                    return f"{target}: no table of the mirror in it, left alone"
                rest = hostsmerge.unmerge(text).encode()
            except (hostsmerge.MergeError, UnicodeDecodeError) as e:
                raise HostsError(f"cannot take the mirror out of {target}: {e}") from None
            kept = backups(directory)
            if kept and _read(kept[-1]) == rest:
                os.replace(kept[-1], target)  # the link we kept aside, as it was
                return f"{target}: the mirror's table taken out, {kept[-1].name} put back"
            _rewrite(target, rest)
            return f"{target}: the mirror's table taken out, the rest is as it was"
        kept = backups(directory) if directory.is_dir() else []
        if kept:
            os.replace(kept[-1], target)
            return f"{target}: restored from {kept[-1].name}"
        if current is None:
            return f"{target}: not installed"
        target.unlink()
        try:
            directory.rmdir()
        except OSError:
            pass  # other files live there: not ours to delete
        return f"{target}: removed"
    except OSError as e:
        raise HostsError(f"cannot remove {target}: {e.strerror or e}") from None


def routing(f: HostsFile, hosts_dir: Path) -> dict[str, Any]:
    """Blocking: whether the installed file sends containerd to the mirror, and in which order."""
    target = Path(hosts_dir) / f.folder / FILE_NAME
    ours = [h.url for h in f.hosts]
    out: dict[str, Any] = {"file": str(target), "mirror": ours}
    try:
        current = target.read_bytes()
    except FileNotFoundError:
        return {**out, "routes_through_mirror": False, "state": "missing"}
    except OSError as e:
        return {**out, "routes_through_mirror": False, "state": f"unreadable: {e.strerror}"}
    try:
        hosts = hostsmerge.host_urls(current.decode("utf-8"))
    except (hostsmerge.MergeError, UnicodeDecodeError):
        return {**out, "routes_through_mirror": False, "state": "not valid TOML"}
    listed = [u for u in hosts if u in ours]
    return {
        **out,
        "routes_through_mirror": bool(listed),
        "first": bool(hosts) and hosts[0] in ours,
        "hosts": hosts,
        "state": "ours" if is_ours(current) else "shared",
    }


def state(f: HostsFile, hosts_dir: Path) -> str:
    """How the installed file compares with what the runmd asks for."""
    target = Path(hosts_dir) / f.folder / FILE_NAME
    try:
        current = target.read_bytes()
    except FileNotFoundError:
        return "not installed"
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if current == f.render().encode():
        return "installed"
    if is_ours(current):
        return "installed, out of date"
    try:
        text = current.decode("utf-8")
        if hostsmerge.merge(text, [block(h) for h in f.hosts]) == text:
            return "another tool's file, with the mirror's table in it"
    except (hostsmerge.MergeError, UnicodeDecodeError) as e:
        return f"another tool's file that install cannot change: {e}"
    return "another tool's file: install adds the mirror's table to it"


# --- the runtime side: generate into .work, then install ---------------------------------


def generate(compiled: Compiled, work: Path) -> list[tuple[HostsFile, str, Path]]:
    """Render every planned file into the work folder (and the `.https` CA file it names)."""
    files = plan(compiled, work)
    out: list[tuple[HostsFile, str, Path]] = []
    if any(h.url.startswith("https://") for f in files for h in f.hosts):
        try:
            write_ca(compiled, work)
        except HttpsError as e:
            raise HostsError(str(e)) from None
    for f in files:
        text = f.render()
        path = work_path(work, f.folder)
        try:
            atomic_write(path, text.encode(), f.mode)
        except OSError as e:
            raise HostsError(f"cannot write {path}: {e.strerror or e}") from None
        out.append((f, text, path))
    return out


def install_all(compiled: Compiled, work: Path, hosts_dir: Path) -> list[str]:
    return [install(f, hosts_dir) for f, _, _ in generate(compiled, work)]


def remove_all(compiled: Compiled, work: Path, hosts_dir: Path) -> list[str]:
    return [remove(hosts_dir, f.folder) for f in plan(compiled, work)]


def show(compiled: Compiled, work: Path, hosts_dir: Path) -> str:
    """The files the runmd asks for, each headed by where it goes and whether it is there."""
    files = plan(compiled, work)
    if not files:
        return f"# {compiled.path}: no '.host' step, so no hosts.toml"
    chunks = []
    for f in files:
        text = f.render()
        target = Path(hosts_dir) / f.folder / FILE_NAME
        chunks.append(f"# --- {target} ({state(f, hosts_dir)})\n{text}")
    return "\n".join(chunks).rstrip("\n")


# --- registries.conf (podman, skopeo, CRI-O) ---------------------------------------------

#: Where containers-registries.conf(5) drop-ins live; later names win over earlier ones.
REGISTRIES_CONF_D = Path("/etc/containers/registries.conf.d")
REGISTRIES_CONF_NAME = "50-lifec-registry.conf"


def _toml_str(text: str) -> str:
    return tomlkit.string(text).as_string()


def registries_conf(compiled: Compiled, work: Path | None = None) -> str:
    """The registries.conf.d drop-in that sends podman, skopeo and CRI-O through the mirror.

    Those clients cannot send containerd's `ns`: each mirror `location` carries the registry's
    host as a path prefix (`HOST:PORT/<registry-host>`), which the mirror maps to that upstream.
    When the mirror fails, the clients pull from the registry itself, as containerd does.
    """
    files = [f for f in plan(compiled, work) if f.folder != DEFAULT_FOLDER]
    if not files:
        return f"# {compiled.path}: no '.host' step, so no mirror entries"
    lines = [
        MARKER,
        f"# Save as {REGISTRIES_CONF_D / REGISTRIES_CONF_NAME} (podman, skopeo and CRI-O read it).",
    ]
    upstreams = [Upstream.from_spec(f.server) if f.server else Upstream.from_spec(f.folder) for f in files]
    for f, server in zip(files, upstreams):
        # A path component cannot hold a port: such a registry is named by its host alone,
        # which the mirror maps back when no other upstream has that host.
        prefix = f.folder
        if ":" in f.folder:
            prefix = Upstream.from_spec(f.folder).hostname
            if sum(1 for u in upstreams if u.hostname == prefix) > 1:
                lines += ["", f"# {f.folder}: no mirror entry (another registry has the host {prefix}; use ?ns=)"]
                continue
        lines += ["", "[[registry]]", f"prefix = {_toml_str(f.folder)}", f"location = {_toml_str(server.host)}"]
        if server.scheme == "http":
            lines.append("insecure = true")
        for host in f.hosts:
            scheme, _, address = host.url.partition("://")
            lines += ["", "[[registry.mirror]]", f"location = {_toml_str(f'{address}/{prefix}')}"]
            if scheme == "http":
                lines.append("insecure = true")
            elif host.options.ca:
                lines.append(f"# trust {host.options.ca[0]}: copy it to /etc/containers/certs.d/{address}/ca.crt")
    return "\n".join(lines)
