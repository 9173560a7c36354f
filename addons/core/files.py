"""Writing files so that a reader never sees half of one: the one atomic write of the mirror.

Every file the mirror writes for someone else (containerd's hosts.toml and config.toml,
credential files, the systemd unit, `acr init`'s runmd) goes through `atomic_write`: a fresh
temporary file in the same folder, created 0600 with O_EXCL (never a file or symlink someone
left there), synced, given its mode, and renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

PRIVATE = 0o600


def atomic_write(
    path: Path,
    data: bytes | str,
    mode: int = 0o644,
    *,
    owner: tuple[int, int] | None = None,
    folder_mode: int = 0o755,
    make_folder: bool = True,
) -> None:
    """Write through a temporary file in the same folder and rename it over `path`.

    `owner` (uid, gid) is kept when running as root; a missing folder is made with
    `folder_mode`, or is an error without `make_folder`.
    """
    if make_folder:
        path.parent.mkdir(parents=True, exist_ok=True, mode=folder_mode)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data.encode("utf-8") if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        if owner is not None and os.geteuid() == 0:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_private(path: Path, text: str | bytes) -> None:
    """Create or replace `path` atomically, owner-only from the first byte (credentials)."""
    atomic_write(path, text, PRIVATE, folder_mode=0o700)
