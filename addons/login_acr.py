"""`.login-acr NAME`: obtain an ACR refresh token for the node's identity."""

from __future__ import annotations

import logging
import re

from addons.plugin import RuntimePlugin
from addons.runtime import Runtime

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,49}$")


class LoginAcr(RuntimePlugin):
    plugin = "login-acr"
    summary = "log in to Azure Container Registry NAME and write its refresh token to access_token"

    @classmethod
    def parse(cls, text: str) -> str:
        if not text:
            raise ValueError("expected a registry name, e.g. '.login-acr example'")
        if not _NAME_RE.match(text):
            raise ValueError(f"expected a registry name (letters, digits, '-'), got '{text}'")
        return text.lower()

    def run(self, runtime: Runtime) -> None:
        logger.warning(
            "step %d: .login-acr is not implemented yet; provide %s/access_token yourself "
            "(e.g. az acr login --name %s --expose-token --query accessToken -o tsv)",
            self.step.id, runtime.home, self.config,
        )
