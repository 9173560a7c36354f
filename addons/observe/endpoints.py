"""`GET /status`: the mirror's health as JSON, answered before the `+ .proxy` root routes anything.

Upstreams, the credentials files and the ACR login with their expiry, cached upstream tokens by
scope and expiry, the mirror's counters, and teleport's mode with whether (and why not) this node
streams overlaybd images. No secret, but it maps what this node may pull: loopback clients only,
like `/auth` (addons.proxy.credentials_endpoint) and `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from collections.abc import Coroutine
from typing import Any

from mitmproxy import http

from addons import __version__
from addons.registry.auth import Credentials, jwt_expiry
from addons.runmd.compile import Compiled
from addons.node.login_acr import read_meta
from addons.proxy.context import info
from addons.proxy.credentials_endpoint import failure, json_answer, login_files, loopback_peer, method_allowed, own_path
from addons.proxy.state import MirrorState
from addons.teleport.discover import teleport_shared

logger = logging.getLogger(__name__)

PATH = "/status"


class Endpoints:
    """Answers `/status`; everything else passes on to the `+ .proxy` root."""

    name = "acr-endpoints"

    def __init__(self, compiled: Compiled, state: MirrorState) -> None:
        self.compiled = compiled
        self.state = state
        self.work = compiled.home / ".work"
        #: The credentials files of the `.login` steps, as the routes use them.
        self.login_files = login_files(compiled)

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Only `/status` is answered here (a plain call for every other request)."""
        if own_path(flow, (PATH,)) is None:
            return None
        return self._answer(flow)

    async def _answer(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        info(flow)["endpoint"] = "status"
        self.state.counters["status_requests"] += 1
        if not method_allowed(flow, ("GET", "HEAD")):
            return
        if not loopback_peer(flow):
            # Health names the upstreams, the credential files and token expiry: this machine only.
            self.state.counters["status_refused"] += 1
            flow.response = json_answer(403, failure("health is only served to clients on this machine"), req.method)
            info(flow)["refused"] = "403 not loopback"
            return
        body = await asyncio.to_thread(self.status)
        flow.response = json_answer(200, body, req.method)

    def status(self) -> dict[str, Any]:
        """Blocking: the health document. Expiry times are POSIX seconds; nothing secret."""
        now = time.time()
        files = []
        for name in self.login_files:
            path = self.compiled.home / name
            entry: dict[str, Any] = {"file": name, "present": path.is_file()}
            if entry["present"]:
                try:
                    creds = Credentials.from_file(path)
                    entry["kind"] = "acr-refresh-token" if creds.is_refresh_token else "user-password"
                    entry["modified_at"] = round(os.stat(path).st_mtime, 3)
                    exp = jwt_expiry(creds.password) if creds.is_refresh_token else None
                    if exp is not None:
                        entry["expires_at"] = exp
                        entry["expires_in"] = round(exp - now, 1)
                except (OSError, ValueError):
                    entry["kind"] = "unusable"
            files.append(entry)
        login = read_meta(self.work)
        if login and isinstance(login.get("expires_at"), (int, float)):
            login["expires_in"] = round(login["expires_at"] - now, 1)
        hosts = self.state.hosts_routing
        gate = teleport_shared(self.state).gate
        return {
            "status": "ok",
            "version": __version__,
            "runmd": str(Path(self.compiled.path).resolve()),
            "upstreams": [{"ns": u.ns, "url": u.base_url} for u in self.state.upstreams.values()],
            "credentials": files,
            "acr_login": login,
            "tokens": self.state.tokens.tokens(),
            # Per hosts.toml the runmd asks for: does containerd go through the mirror (first)?
            "hosts_toml": hosts() if hosts is not None else [],
            "counters": dict(sorted(self.state.counters.items())),
            **({"teleport": gate.public()} if gate is not None else {}),
        }
