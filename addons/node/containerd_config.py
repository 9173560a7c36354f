"""containerd's config.toml, edited so that CRI reads the mirror's hosts.toml files.

containerd only looks for `hosts.toml` files when its CRI registry `config_path` names their
folder, and it reads `config_path` when it starts: the edit needs a restart of containerd once;
the hosts.toml files under that folder are re-read on every pull and need none. Optionally the
streaming snapshotter teleported images need (overlaybd or stargz) is declared as a proxy plugin
and made CRI's snapshotter.

The file belongs to the operator: it is edited with tomlkit so that comments, order and every
unrelated setting stay byte for byte; the first original is kept beside it as a backup that is
never overwritten; the new file replaces the old one atomically; a second run changes nothing.
Where the settings live depends on the file's `version` (containerd migrates older versions):
1 (or none) and 2 are containerd 1.x schemas, 3 is containerd 2.x's.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import tomlkit
from tomlkit.container import OutOfOrderTableProxy
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Item, String, StringType, Table

from addons.core.files import atomic_write
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/containerd/config.toml")
#: containerd's hosts folder (its CRI `config_path`) when nothing else is said; a str, as config.toml holds it.
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
OVERLAYBD = "overlaybd"
OVERLAYBD_SOCKET = "/run/overlaybd-snapshotter/overlaybd.sock"
STARGZ = "stargz"
#: Where upstream's containerd-stargz-grpc listens by default.
STARGZ_SOCKET = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
#: The streaming snapshotters `--snapshotter` declares, with their default sockets.
SNAPSHOTTER_SOCKETS = {OVERLAYBD: OVERLAYBD_SOCKET, STARGZ: STARGZ_SOCKET}
SNAPSHOTTERS = tuple(SNAPSHOTTER_SOCKETS)
BACKUP_SUFFIX = ".acr-backup"
#: What a missing config.toml becomes: containerd's defaults plus what we set.
NEW_FILE = "# Written by 'acr containerd configure'; containerd's defaults apply to everything not set here.\nversion = 2\n"
RESTART_NOTE = (
    "restart containerd to apply this (e.g. 'systemctl restart containerd'): it reads config_path only "
    "when it starts; the hosts.toml files in that folder are re-read on every pull and need no restart"
)


class ConfigError(Exception):
    """The file cannot be edited safely; one line for the operator."""


@dataclass(frozen=True)
class Schema:
    version: int
    containerd: str
    #: The CRI plugin's ids in `disabled_plugins` (the short one is containerd 1.x's v1 name).
    cri_ids: tuple[str, ...]
    registry: tuple[str, ...]
    snapshotter: tuple[str, ...]

    def dotted(self, path: tuple[str, ...]) -> str:
        return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in path)


SCHEMAS = {
    1: Schema(1, "1.x", ("cri", "io.containerd.grpc.v1.cri"), ("plugins", "cri", "registry"), ("plugins", "cri", "containerd")),
    2: Schema(
        2, "1.x", ("cri", "io.containerd.grpc.v1.cri"),
        ("plugins", "io.containerd.grpc.v1.cri", "registry"),
        ("plugins", "io.containerd.grpc.v1.cri", "containerd"),
    ),
    3: Schema(
        3, "2.x", ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images"),
        ("plugins", "io.containerd.cri.v1.images", "registry"),
        ("plugins", "io.containerd.cri.v1.images"),
    ),
}


@dataclass
class Edit:
    """The result of editing one config.toml text."""

    old: str | None
    new: str
    schema: Schema
    #: The folders containerd will search for hosts.toml, as config_path now says.
    hosts_dirs: tuple[str, ...]
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self, path: str) -> str:
        return unified_diff(self.old, self.new, path)


class TextEdit(Protocol):
    """A file's text before (None: no file yet) and after an edit: what `write` needs."""

    old: str | None
    new: str


@dataclass
class FileEdit:
    """A config file's text before (None: no file yet) and after an edit, and what changed: what
    the `configure` commands of the other programs the mirror sets up (overlaybd, stargz) return."""

    old: str | None
    new: str
    changes: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.old != self.new

    def diff(self, path: str) -> str:
        return unified_diff(self.old, self.new, path)

    def report(self, path: Path, backup: Path | None, dry_run: bool, unchanged: str, restart: str) -> list[str]:
        """What a `configure` command prints: the diff (dry run) or what changed, then `restart`;
        `unchanged` says why nothing had to change."""
        if not self.changed:
            return [f"{path}: no change ({unchanged})"]
        if dry_run:
            lines = [self.diff(str(path)).rstrip("\n"), f"{path}: dry run, nothing written"]
        else:
            made = "created" if self.old is None else "updated"
            lines = [f"{path}: {made}" + (f"; the original is kept in {backup}" if backup else "")]
            lines.extend(f"  {c}" for c in self.changes)
        lines.append(f"{'then ' if dry_run else ''}{restart}")
        return lines


def unified_diff(old: str | None, new: str, path: str) -> str:
    """The edit as `diff -u` shows it (a missing file is /dev/null), for `--dry-run`."""
    return "".join(
        difflib.unified_diff(
            (old or "").splitlines(keepends=True),
            new.splitlines(keepends=True),
            fromfile=path if old is not None else "/dev/null",
            tofile=path,
        )
    )


def schema_for(doc: tomlkit.TOMLDocument) -> Schema:
    version = doc.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version not in SCHEMAS:
        raise ConfigError(f"unsupported config version {version!r} (known: 1 and 2 for containerd 1.x, 3 for 2.x)")
    return SCHEMAS[version]


@dataclass
class Style:
    """How the file indents table headers and keys, by table depth (`[a.b]` is depth 2), so
    that what we add looks like what is there: containerd's `config default` indents both,
    hand-written files often neither."""

    headers: dict[int, int] = field(default_factory=dict)
    bodies: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, doc: tomlkit.TOMLDocument) -> "Style":
        style = cls()

        def width(indent: str) -> int:
            return len(indent.rsplit("\n", 1)[-1].expandtabs(2))

        def walk(container: Any, depth: int) -> None:
            for key, item in container.body:
                if isinstance(item, Table):
                    if not item.is_super_table():
                        style.headers.setdefault(depth + 1, width(item.trivia.indent))
                    walk(item.value, depth + 1)
                elif key is not None and depth > 0 and isinstance(item, Item):
                    style.bodies.setdefault(depth, width(item.trivia.indent))

        walk(doc, 0)
        return style

    def header(self, depth: int) -> str:
        if depth in self.headers:
            return " " * self.headers[depth]
        if not self.headers:
            return ""
        step = 2 if any(self.headers.values()) else 0
        below = [d for d in self.headers if d < depth]
        known = max(below) if below else min(self.headers)
        return " " * max(0, self.headers[known] + step * (depth - known))

    def body(self, depth: int) -> str:
        if depth in self.bodies:
            return " " * self.bodies[depth]
        nested = any(width > self.headers.get(d, 0) for d, width in self.bodies.items())
        return self.header(depth) + ("  " if nested else "")


def _table(
    doc: tomlkit.TOMLDocument, path: tuple[str, ...], schema: Schema, style: Style, created: list[Any] | None = None
) -> Any:
    """The table at path; with a `created` list, made (indented like the file's other tables)
    when missing and recorded there."""
    node: Any = doc
    for depth, key in enumerate(path, start=1):
        child = node.get(key)
        if child is None:
            if created is None:
                return None
            if node is doc and not tomlkit.dumps(doc).endswith(("\n\n", "\n\r\n")):
                doc.add(tomlkit.nl())  # a new top-level table starts after a blank line
            node[key] = tomlkit.table(is_super_table=depth < len(path))
            child = node[key]
            child.trivia.indent = style.header(depth)
            if depth == len(path):
                created.append(child)
        elif not isinstance(child, (Table, OutOfOrderTableProxy)):
            raise ConfigError(f"{schema.dotted(path[:depth])} is not a table")
        node = child
    return node


def _set(table: Any, key: str, value: Any, depth: int, style: Style) -> None:
    """Set one key: an existing one keeps its place, indentation, quoting and comment."""
    if key in table:
        old = table.item(key) if hasattr(table, "item") else None
        if isinstance(value, str) and isinstance(old, String) and old.type in (StringType.SLL, StringType.MLL):
            value = tomlkit.string(value, literal=True)
        table[key] = value
        return
    super_table = isinstance(table, Table) and table.is_super_table()
    table[key] = value
    if hasattr(table, "item"):
        table.item(key).trivia.indent = style.body(depth)
    if super_table:  # an implicit table gets its own header line now: indent it like its peers
        table.trivia.indent = style.header(depth)


def configure_text(
    text: str | None,
    *,
    hosts_dir: str | None = None,
    snapshotter: str | None = None,
    snapshotter_address: str | None = None,
) -> Edit:
    """Edit config.toml text (None: no file yet). `hosts_dir` None keeps a config_path that is
    already set and otherwise sets /etc/containerd/certs.d; a folder given replaces it."""
    source = NEW_FILE if text is None else text
    try:
        doc = tomlkit.parse(source)
    except TOMLKitError as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    schema = schema_for(doc)
    style = Style.of(doc)
    created: list[Any] = []
    changes: list[str] = []
    notes: list[str] = []

    disabled = [str(p) for p in doc.get("disabled_plugins", []) or []]
    if any(p in schema.cri_ids for p in disabled):
        notes.append(
            "the CRI plugin is in disabled_plugins: config_path only matters to CRI (kubelet); "
            "'ctr' users pass --hosts-dir themselves"
        )

    registry = _table(doc, schema.registry, schema, style)
    current = str(registry.get("config_path", "")) if registry is not None else ""
    if registry is not None:
        mirrors = registry.get("mirrors")
        if mirrors:
            raise ConfigError(
                f"{schema.dotted(schema.registry + ('mirrors',))} is set, and containerd refuses it together with "
                "config_path: move those mirrors into hosts.toml files first"
            )
        for name, cfg in (registry.get("configs") or {}).items():
            if hasattr(cfg, "get") and cfg.get("tls"):
                raise ConfigError(
                    f"{schema.dotted(schema.registry + ('configs', name, 'tls'))} is set, and containerd refuses it "
                    "together with config_path: move it into that registry's hosts.toml (ca, client, skip_verify) first"
                )
    key = schema.dotted(schema.registry + ("config_path",))
    folders = tuple(p for p in current.split(":") if p)
    if hosts_dir is None and folders:
        notes.append(f"{key} is already {current!r}: kept (pass --hosts-dir to change it)")
        hosts_dirs = folders
    elif hosts_dir is not None and hosts_dir in folders:
        notes.append(f"{key} is already {current!r}")
        hosts_dirs = folders
    else:
        wanted = hosts_dir or DEFAULT_HOSTS_DIR
        registry = _table(doc, schema.registry, schema, style, created)
        _set(registry, "config_path", wanted, len(schema.registry), style)
        changes.append(f"{key}: {current!r} -> {wanted!r}" if current else f"{key} = {wanted!r}")
        hosts_dirs = (wanted,)

    if snapshotter is not None:
        if snapshotter not in SNAPSHOTTERS:
            raise ConfigError(f"unknown snapshotter '{snapshotter}' (known: {', '.join(SNAPSHOTTERS)})")
        snapshotter_address = snapshotter_address or SNAPSHOTTER_SOCKETS[snapshotter]
        plugin_path = ("proxy_plugins", snapshotter)
        plugin = _table(doc, plugin_path, schema, style)
        if plugin is None:
            plugin = _table(doc, plugin_path, schema, style, created)
            _set(plugin, "type", "snapshot", 2, style)
            _set(plugin, "address", snapshotter_address, 2, style)
            changes.append(f"proxy_plugins.{snapshotter}: type 'snapshot', address {snapshotter_address!r}")
        else:
            if str(plugin.get("type", "")) != "snapshot":
                raise ConfigError(f"proxy_plugins.{snapshotter} exists with type {plugin.get('type')!r}, not 'snapshot'")
            if str(plugin.get("address", "")) != snapshotter_address:
                notes.append(f"proxy_plugins.{snapshotter} has address {str(plugin.get('address'))!r}: kept")
        table = _table(doc, schema.snapshotter, schema, style, created)
        depth = len(schema.snapshotter)
        if str(table.get("snapshotter", "")) != snapshotter:
            before = table.get("snapshotter")
            _set(table, "snapshotter", snapshotter, depth, style)
            name = schema.dotted(schema.snapshotter + ("snapshotter",))
            changes.append(f"{name}: {str(before)!r} -> {snapshotter!r}" if before is not None else f"{name} = {snapshotter!r}")
        # Streaming snapshotters need the image annotations that CRI leaves out by default on containerd 1.x.
        if table.get("disable_snapshot_annotations") is not False:
            _set(table, "disable_snapshot_annotations", False, depth, style)
            changes.append(f"{schema.dotted(schema.snapshotter + ('disable_snapshot_annotations',))} = false")

    for table in created:
        table.add(tomlkit.nl())  # a blank line between a new table and whatever follows it
    new = tomlkit.dumps(doc)
    if text is not None and not changes:
        new = text  # nothing to change: not even whitespace may move
    return Edit(old=text, new=new, schema=schema, hosts_dirs=hosts_dirs, changes=changes, notes=notes)


def read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {getattr(e, 'strerror', None) or e.__class__.__name__}") from None


def backup_path(path: Path) -> Path:
    return path.with_name(path.name + BACKUP_SUFFIX)


def write(path: Path, edit: TextEdit) -> Path | None:
    """Keep a backup of the first original (never overwritten), then replace the file
    atomically with the same mode and owner. Returns the backup, if there is one."""
    backup: Path | None = None
    try:
        if edit.old is not None:
            backup = backup_path(path)
            if not backup.exists():
                _exclusive_copy(path, backup)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = path.stat()
            mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
        except FileNotFoundError:
            mode, owner = 0o644, None
        atomic_write(path, edit.new, mode, owner=owner)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    return backup


def _exclusive_copy(src: Path, dst: Path) -> None:
    """Copy src to dst unless dst appears meanwhile: a backup is made once, never replaced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        try:
            os.link(tmp, dst)
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def configure(
    path: Path,
    *,
    hosts_dir: str | None = None,
    snapshotter: str | None = None,
    dry_run: bool = False,
) -> tuple[Edit, Path | None]:
    """Read, edit and (unless dry_run or unchanged) write one config.toml."""
    text = read(path)
    try:
        edit = configure_text(text, hosts_dir=hosts_dir, snapshotter=snapshotter)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    backup = None
    if edit.changed and not dry_run:
        backup = write(path, edit)
    return edit, backup


def report(path: Path, edit: Edit, backup: Path | None, dry_run: bool) -> list[str]:
    """What `acr containerd configure` prints: the diff (dry run) or what changed, and why a
    restart is needed."""
    lines: list[str] = []
    kind = f"version {edit.schema.version}, containerd {edit.schema.containerd} schema"
    if not edit.changed:
        lines.append(f"{path}: no change ({kind})")
    elif dry_run:
        lines.append(edit.diff(str(path)).rstrip("\n"))
        lines.append(f"{path}: dry run, nothing written ({kind})")
    else:
        made = "created" if edit.old is None else "updated"
        lines.append(f"{path}: {made} ({kind})" + (f"; the original is kept in {backup}" if backup else ""))
        lines.extend(f"  {c}" for c in edit.changes)
    lines.extend(f"note: {n}" for n in edit.notes)
    if edit.changed:
        lines.append(f"{'then ' if dry_run else ''}{RESTART_NOTE}")
    hosts = ":".join(edit.hosts_dirs)
    if edit.hosts_dirs and DEFAULT_HOSTS_DIR not in edit.hosts_dirs:
        lines.append(f"containerd looks for hosts.toml in {hosts}: start the mirror with --hosts-dir {edit.hosts_dirs[0]}")
    return lines


def parse_config_path(text: str) -> Path:
    """The config.toml a step names (default: containerd's own); one path, no spaces."""
    if len(text.split()) > 1:
        raise ValueError(f"expected one config.toml path, got '{text}'")
    return Path(text) if text else DEFAULT_CONFIG


class ContainerdConfig(RuntimePlugin):
    """`.containerd-config [PATH]` with `: .snapshotter overlaybd|stargz`: the same edit as
    `acr containerd configure`, pointing config_path at the mirror's `--hosts-dir`."""

    plugin = "containerd-config"
    attributes = ("snapshotter",)

    @classmethod
    def parse(cls, text: str) -> Path:
        return parse_config_path(text)

    @classmethod
    def parse_attribute(cls, name: str, text: str) -> str:
        if name == "snapshotter":
            if text not in SNAPSHOTTERS:
                raise ValueError(f"unknown snapshotter '{text}' (known: {', '.join(SNAPSHOTTERS)})")
            return text
        raise ValueError(f"'.{cls.plugin}' has no attribute '.{name}'")

    def run(self, runtime: Runtime) -> None:
        snapshotter = None
        for attr in self.step.attributes:
            snapshotter = self.parse_attribute(attr.name, attr.input)
        path = self.config if self.config.is_absolute() else runtime.home / self.config
        hosts_dir = str(runtime.hosts_dir) if runtime.hosts_dir else DEFAULT_HOSTS_DIR
        try:
            edit, backup = configure(path, hosts_dir=hosts_dir, snapshotter=snapshotter)
        except ConfigError as e:
            raise StepError(str(e)) from None
        for line in report(path, edit, backup, dry_run=False):
            (logger.warning if line.startswith("restart") else logger.info)("%s", line)
