"""`.install FILE`: copy FILE from the runmd's folder into the work folder, owner-only."""

from __future__ import annotations

import logging

from addons.core.files import write_private
from addons.runmd.plugin import parse_relative_file
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)


class Install(RuntimePlugin):
    plugin = "install"

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_relative_file(text, cls.plugin)

    def run(self, runtime: Runtime) -> None:
        src = runtime.home / self.config
        dst = runtime.work / self.config
        if not src.is_file():
            raise StepError(f"no file {src}")
        try:
            write_private(dst, src.read_bytes())
        except OSError as e:
            raise StepError(f"cannot copy {src} to {dst}: {e.strerror}") from None
        logger.info("installed %s (0600)", dst)
