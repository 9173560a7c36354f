"""overlaybd's own config (`/etc/overlaybd/overlaybd.json`): credentials from the mirror.

A streamed image is read by overlaybd itself, blob by blob, straight from the registry, so it
needs the registry's credentials too. By default it reads them from a file of its own; with
`credentialConfig` in HTTP mode it asks a URL instead (`<path>?remote_url=<blob url>`), and the
mirror's `/auth` answers with the credentials the mirror already holds for that registry. So
one login (the mirror's) serves both containerd and overlaybd.

The field names are overlaybd's own (`GlobalConfig` and `CredentialConfig` in its
src/config.h: `credentialConfig` with `mode`, `path`, `timeout`). The file is the operator's:
only those two values change and every other byte stays (core/jsonedit), the first original is
kept beside it as a backup, and the new file replaces the old one atomically, as `acr containerd
configure` does. A JSON file that
is not overlaybd's config is refused and left alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from addons.core import jsonedit
from addons.node.containerd_config import ConfigError, read, write
from addons.node.containerd_config import FileEdit as Edit
from addons.node.https import cert_file
from addons.runmd.compile import Compiled

DEFAULT_CONFIG = Path("/etc/overlaybd/overlaybd.json")
#: The top-level keys of overlaybd's `GlobalConfig`: a file with none of them is not its config.
GLOBAL_KEYS = frozenset({
    "registryCacheDir", "credentialFilePath", "credentialConfig", "registryCacheSizeGB", "ioEngine",
    "cacheType", "logLevel", "logPath", "download", "enableAudit", "enableThread", "p2pConfig",
    "exporterConfig", "auditPath", "registryFsVersion", "cacheConfig", "gzipCacheConfig", "logConfig",
    "prefetchConfig", "certConfig", "userAgent",
})
RESTART_NOTE = "restart overlaybd to apply this (e.g. 'systemctl restart overlaybd-tcmu'): it reads its config when it starts"


def parse(text: str) -> dict[str, Any]:
    """overlaybd's config as data; ConfigError (one line) for anything else."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError("not overlaybd's config: not a JSON object")
    if not GLOBAL_KEYS & doc.keys():
        hint = " (it looks like a credentials file)" if "auths" in doc else ""
        raise ConfigError(f"not overlaybd's config{hint}: none of its keys (credentialConfig, cacheConfig, logConfig, ...)")
    cred = doc.get("credentialConfig")
    if cred is not None and not isinstance(cred, dict):
        raise ConfigError("credentialConfig is not a JSON object")
    return doc


def credential_url(doc: dict[str, Any]) -> str | None:
    """The URL overlaybd asks for credentials, or None when it reads them from a file."""
    cred = doc.get("credentialConfig") or {}
    return cred.get("path") if cred.get("mode") == "http" else None


def configure_text(text: str, auth_url: str) -> Edit:
    """Point `credentialConfig` at `auth_url` in HTTP mode; every other byte of the file stays."""
    doc = parse(text)
    cred = doc.get("credentialConfig") or {}
    before = (cred.get("mode"), cred.get("path"))
    if before == ("http", auth_url):
        return Edit(text, text)
    new = jsonedit.set_members(text, ("credentialConfig",), {"mode": "http", "path": auth_url})
    was = f"{before[0]} {before[1]}" if before[0] else "not set (credentialFilePath)"
    return Edit(text, new, [f"credentialConfig: {was} -> http {auth_url}"])


def configure(path: Path, auth_url: str, *, dry_run: bool = False) -> tuple[Edit, Path | None]:
    """Read, edit and (unless dry_run or unchanged) write one overlaybd.json."""
    text = read(path)
    if text is None:
        raise ConfigError(f"no {path}: install overlaybd first (its package writes this file)")
    try:
        edit = configure_text(text, auth_url)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    backup = write(path, edit) if edit.changed and not dry_run else None
    return edit, backup


def report(path: Path, edit: Edit, backup: Path | None, dry_run: bool) -> list[str]:
    """What `acr overlaybd configure` prints: the diff (dry run) or what changed."""
    return edit.report(path, backup, dry_run, "credentialConfig already asks the mirror", RESTART_NOTE)


def auth_url(compiled: Compiled) -> str | None:
    """The mirror's `/auth` as overlaybd must call it: the `+ .proxy` address, https with `.https`."""
    roots = list(compiled.document.roots("proxy"))
    if not roots:
        return None
    address = compiled.config(roots[0])
    host = address.bind_host
    host = f"[{host}]" if ":" in host else host
    scheme = "https" if cert_file(compiled) else "http"
    return f"{scheme}://{host}:{address.port}/auth"


def check_credentials(path: Path, url: str) -> tuple[bool, str] | None:
    """Whether overlaybd asks this mirror for credentials (ok, message); None without overlaybd.json."""
    fix = f"run 'acr overlaybd configure --config {path}'"
    try:
        text = read(path)
        if text is None:
            return None
        doc = parse(text)
    except ConfigError as e:
        return False, f"{path}: {e}"
    current = credential_url(doc)
    if current == url:
        return True, f"overlaybd asks this mirror for credentials ({url})"
    if current is None:
        mode = (doc.get("credentialConfig") or {}).get("mode") or "file"
        return False, (f"overlaybd reads credentials from a file ({path}: credentialConfig mode {mode!r}), "
                       f"not from this mirror, so streamed pulls of private images fail: {fix}")
    return False, f"overlaybd asks {current} for credentials, not this mirror ({url}): {fix}"
