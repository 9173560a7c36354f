"""`.server URL`: the `server` line of the hosts.toml of the `.mirror` above it.

containerd falls back to `server` when every mirror host failed. It defaults to the upstream
itself; tests point it at a closed port so that a pull that bypasses the mirror fails loudly,
and a node may name another endpoint of the same registry.
"""

from __future__ import annotations

import logging

from addons.registry.oci import Upstream
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)


class Server(RuntimePlugin):
    plugin = "server"

    @classmethod
    def parse(cls, text: str) -> str:
        if not text:
            raise ValueError("expected a URL, e.g. '.server https://example.azurecr.io'")
        return Upstream.from_spec(text).base_url

    def run(self, runtime: Runtime) -> None:
        above = [s for _, s in runtime.compiled.document.steps() if s.plugin == "mirror" and s.id < self.step.id]
        if not above:
            raise StepError("'.server' must follow the '.mirror' whose server it sets")
        logger.info("hosts.toml of %s: server = %s", runtime.compiled.config(above[-1]).ns, self.config)
