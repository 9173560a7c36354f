"""`.login FILE`: the upstream credentials this route uses, read from FILE beside the runmd."""

from __future__ import annotations

import logging

from addons.install import parse_relative_file
from addons.plugin import ProxyPlugin

logger = logging.getLogger(__name__)


class Login(ProxyPlugin):
    plugin = "login"
    summary = "use the credentials in FILE (an ACR refresh token, or user:password) upstream"

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_relative_file(text, cls.plugin)
