"""`.login FILE`: the upstream credentials this route uses, read from FILE beside the runmd.

The file is re-read when it changes (`.login-acr` refreshes it while the mirror runs; looked
at again at most once a second, so a warm request needs no thread), and its content never
leaves memory: it is handed to `.authn` in the request's context, never in flow.metadata,
which mitmproxy saves to flow files.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from addons.registry.auth import Credentials, insecure_permissions
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import parse_relative_file
from addons.proxy.context import RequestContext
from addons.proxy.upstream import UpstreamError

logger = logging.getLogger(__name__)

#: How long a look at the credentials file stays good: a file `.login-acr` rewrites is
#: picked up within this long.
RECHECK = 1.0


class Login(ProxyPlugin):
    plugin = "login"

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
        #: When the file was last looked at (monotonic), for `ready`.
        self._checked = float("-inf")

    @property
    def path(self) -> Path:
        return self.state.home / self.config

    def credentials(self) -> Credentials | None:
        """Blocking: stat the file and re-read it when it changed (an unusable file every time)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._checked = time.monotonic()
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
        self._checked = time.monotonic()
        return self._credentials

    @staticmethod
    def describe(creds: Credentials | None) -> str:
        if creds is None:
            return "anonymous"
        return "an ACR refresh token" if creds.is_refresh_token else f"user {creds.username}"

    def ready(self, ctx: RequestContext) -> bool:
        if time.monotonic() - self._checked >= RECHECK:
            return False
        self._use(ctx, self._credentials)
        return True

    def run(self, ctx: RequestContext) -> None:
        try:
            creds = self.credentials()
        except UpstreamError as e:
            ctx.fail("login", e)
            return
        self._use(ctx, creds)

    def _use(self, ctx: RequestContext, creds: Credentials | None) -> None:
        ctx.credentials = creds
        ctx.note("login", self.describe(creds))
