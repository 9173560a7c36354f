"""`.login FILE`: the upstream credentials this route uses, read from FILE beside the runmd.

The file is re-read when it changes (`.login-acr` refreshes it while the mirror runs), and
its content never leaves memory: it is handed to `.authn` through the mirror's private
per-flow table, not through flow.metadata, which mitmproxy saves to flow files.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from mitmproxy import http

from addons.registry.auth import Credentials, insecure_permissions
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import parse_relative_file
from addons.proxy.state import note
from addons.proxy.upstream import UpstreamError

logger = logging.getLogger(__name__)


class Login(ProxyPlugin):
    plugin = "login"
    summary = "use the credentials in FILE (an ACR refresh token, or user:password) upstream"

    @classmethod
    def parse(cls, text: str) -> str:
        return parse_relative_file(text, cls.plugin)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stamp: tuple[int, int] | None = None
        self._credentials: Credentials | None = None
        self._warned_missing = False
        #: The version of the file last found unusable: said once in the log, not once per request.
        self._bad_stamp: tuple[int, int] | None = None

    @property
    def path(self) -> Path:
        return self.state.home / self.config

    def credentials(self) -> Credentials | None:
        """Blocking: stat the file and re-read it when it changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if not self._warned_missing:
                logger.warning("step %d: %s does not exist: pulling anonymously", self.step.id, self.path)
                self._warned_missing = True
            self._stamp, self._credentials = None, None
            return None
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                creds = Credentials.from_file(self.path)
            except (ValueError, OSError) as e:
                if stamp != self._bad_stamp:
                    logger.error("step %d: %s", self.step.id, e)
                    self._bad_stamp = stamp
                raise UpstreamError(502, "UNAUTHORIZED", f"the mirror's credentials file {self.config} is unusable") from None
            if insecure_permissions(self.path):
                logger.warning("%s is readable by group or others: chmod 600 it", self.path)
            self._stamp, self._credentials, self._warned_missing = stamp, creds, False
            logger.info("step %d: loaded %s", self.step.id, self.describe(creds))
        return self._credentials

    @staticmethod
    def describe(creds: Credentials | None) -> str:
        if creds is None:
            return "anonymous"
        return "an ACR refresh token" if creds.is_refresh_token else f"user {creds.username}"

    async def request(self, flow: http.HTTPFlow) -> None:
        if not self.claims(flow):
            return
        try:
            creds = await asyncio.to_thread(self.credentials)
        except UpstreamError as e:
            flow.response = e.response(flow.request.method)
            note(flow, "login", e.message)
            return
        self.state.private_of(flow)["credentials"] = creds
        note(flow, "login", self.describe(creds))
