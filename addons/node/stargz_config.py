"""The stargz snapshotter's own config (`/etc/containerd-stargz-grpc/config.toml`): read through the mirror.

A teleported eStargz image is read by the stargz snapshotter itself, in HTTP Range GETs of
its layers, not by containerd: hosts.toml does not reach it. Its config names mirrors per
registry (`[[resolver.host."<registry>".mirrors]]` with `host`, and `insecure` for plain
HTTP); it tries them in order and the registry itself last. Through the mirror the
snapshotter needs no credentials of its own: the mirror authenticates every read.

Its reads carry no `ns`, and a mirror `host` with a path is refused by the snapshotter, so
each registry must be reachable on an address of its own: the `+ .proxy` address when the
mirror serves one registry, else the registry's `.listen` address (addons.node.listen).

The file is the operator's: it is edited with tomlkit so that comments, order and every other
key stay as they were; the first original is kept beside it as a backup; a second run changes
nothing. The keys are upstream's own (service/resolver's `MirrorConfig`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT

from addons.node.containerd_config import ConfigError, read, write
from addons.node.containerd_config import FileEdit as Edit
from addons.node.https import cert_file
from addons.node.listen import upstream_listens
from addons.runmd.compile import Compiled

DEFAULT_CONFIG = Path("/etc/containerd-stargz-grpc/config.toml")
RESTART_NOTE = ("restart the stargz snapshotter to apply this (e.g. 'systemctl restart stargz-snapshotter'): "
                "it reads its config when it starts")
NEW_FILE = "# Written by 'acr stargz configure'; the stargz snapshotter's defaults apply to everything not set here.\n"


@dataclass(frozen=True)
class MirrorEntry:
    """One registry and the mirror address the snapshotter reads it through."""

    registry: str
    host: str
    insecure: bool


def entries(compiled: Compiled) -> list[MirrorEntry]:
    """The mirror host for each registry the runmd serves; ConfigError when a registry has no
    address the snapshotter could use (several registries, one without `.listen`)."""
    roots = list(compiled.document.roots("proxy"))
    if not roots:
        raise ConfigError(f"{compiled.path}: no '+ .proxy ADDR' block: nothing for the snapshotter to read through")
    main = compiled.config(roots[0])
    insecure = cert_file(compiled) is None
    upstreams = []
    for _, step in compiled.document.steps("mirror"):
        u = compiled.config(step)
        if all(x.ns != u.ns for x in upstreams):
            upstreams.append(u)
    listens = {u.upstream.ns: u.address for u in upstream_listens(compiled)}
    if len(upstreams) > 1:
        lacking = [u.ns for u in upstreams if u.ns not in listens]
        if lacking:
            raise ConfigError(
                f"{compiled.path} serves {len(upstreams)} registries and the stargz snapshotter's reads name none "
                f"(no ns): add ': .listen HOST:PORT' under the '.mirror' of {', '.join(lacking)}")
    return [MirrorEntry(u.ns, str(listens.get(u.ns, main)), insecure) for u in upstreams]


def _mirrors(doc: tomlkit.TOMLDocument, registry: str) -> AoT | None:
    """The registry's `mirrors` array, None when the file has none; ConfigError for another shape."""
    node: Any = doc
    where = f'resolver.host."{registry}"'
    for key in ("resolver", "host", registry):
        node = node.get(key)
        if node is None:
            return None
        if not hasattr(node, "get"):
            raise ConfigError(f"{where} is not a table")
    found = node.get("mirrors")
    if found is not None and not isinstance(found, AoT):
        raise ConfigError(f"{where}.mirrors is not an array of tables")
    return found


def configure_text(text: str | None, wanted: list[MirrorEntry]) -> Edit:
    """Make each registry's first mirror the mirror's address; other mirrors and keys stay."""
    source = NEW_FILE if text is None else text
    try:
        tomllib.loads(source)
        doc = tomlkit.parse(source)
    except (tomllib.TOMLDecodeError, TOMLKitError) as e:
        raise ConfigError(f"not valid TOML: {e}") from None
    changes: list[str] = []
    for entry in wanted:
        mirrors = _mirrors(doc, entry.registry)
        ours = next((m for m in mirrors or [] if str(m.get("host", "")) == entry.host), None)
        if ours is not None:
            if bool(ours.get("insecure", False)) != entry.insecure:
                ours["insecure"] = entry.insecure
                changes.append(f'resolver.host."{entry.registry}": mirror {entry.host} insecure = {str(entry.insecure).lower()}')
            continue
        table = tomlkit.table()
        table["host"] = entry.host
        if entry.insecure:
            table["insecure"] = True
        if mirrors is None:
            resolver = doc.setdefault("resolver", tomlkit.table(is_super_table=True))
            hosts = resolver.setdefault("host", tomlkit.table(is_super_table=True))
            registry = hosts.setdefault(entry.registry, tomlkit.table(is_super_table=True))
            registry["mirrors"] = tomlkit.aot()
            registry["mirrors"].append(table)
        else:
            table.add(tomlkit.nl())  # a blank line before the mirror that was first until now
            mirrors.insert(0, table)  # tried in order: the mirror first, the registry itself last
        changes.append(f'resolver.host."{entry.registry}": mirror {entry.host}'
                       + (" (insecure: plain HTTP)" if entry.insecure else ""))
    new = tomlkit.dumps(doc) if changes or text is None else text
    return Edit(text, new, changes)


def configure(path: Path, wanted: list[MirrorEntry], *, dry_run: bool = False) -> tuple[Edit, Path | None]:
    """Read, edit and (unless dry_run or unchanged) write the snapshotter's config.toml."""
    text = read(path)
    try:
        edit = configure_text(text, wanted)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    backup = write(path, edit) if edit.changed and not dry_run else None
    return edit, backup


def report(path: Path, edit: Edit, backup: Path | None, dry_run: bool) -> list[str]:
    """What `acr stargz configure` prints: the diff (dry run) or what changed."""
    return edit.report(path, backup, dry_run, "the stargz snapshotter reads through the mirror", RESTART_NOTE)


def missing_mirrors(path: Path, wanted: list[MirrorEntry]) -> list[str] | None:
    """The registries whose reads do not go through the mirror (None without a config file)."""
    text = read(path)
    if text is None:
        return None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    hosts = (data.get("resolver") or {}).get("host") or {}
    out = []
    for entry in wanted:
        mirrors = (hosts.get(entry.registry) or {}).get("mirrors") or []
        if not any(isinstance(m, dict) and m.get("host") == entry.host for m in mirrors):
            out.append(entry.registry)
    return out
