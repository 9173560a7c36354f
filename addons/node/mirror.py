"""`.mirror HOST|URL`: an upstream registry this mirror serves (several allowed)."""

from __future__ import annotations

import logging

from addons.registry.oci import Upstream
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime

logger = logging.getLogger(__name__)


class Mirror(RuntimePlugin):
    plugin = "mirror"

    @classmethod
    def parse(cls, text: str) -> Upstream:
        if not text:
            raise ValueError("expected a registry host or URL, e.g. '.mirror example.azurecr.io'")
        return Upstream.from_spec(text)

    def run(self, runtime: Runtime) -> None:
        logger.info("mirroring %s (ns=%s)", self.config.base_url, self.config.ns)
