"""`.install FILE`: copy FILE from the runmd's folder into the work folder, owner-only."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from addons.plugin import RuntimePlugin
from addons.runtime import Runtime, StepError

logger = logging.getLogger(__name__)


def parse_relative_file(text: str, plugin: str) -> str:
    """A file name relative to the runmd's folder; absolute paths and '..' are refused."""
    if not text:
        raise ValueError(f"expected a file name, e.g. '.{plugin} access_token'")
    p = PurePosixPath(text)
    if p.is_absolute() or ".." in p.parts or len(text.split()) > 1:
        raise ValueError(f"expected a file name relative to the runmd's folder, got '{text}'")
    return text


class Install(RuntimePlugin):
    plugin = "install"
    summary = "copy FILE from the runmd's folder into the work folder (0600)"

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_relative_file(text, cls.plugin)

    def run(self, runtime: Runtime) -> None:
        src = runtime.home / self.config
        dst = runtime.work / self.config
        if not src.is_file():
            raise StepError(f"no file {src}")
        dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A fresh name, created 0600 with O_EXCL: never a file or symlink someone left there.
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out)
            os.chmod(tmp, 0o600)
            os.replace(tmp, dst)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            raise StepError(f"cannot copy {src} to {dst}: {e.strerror}") from None
        logger.info("installed %s (0600)", dst)
