"""`GET /livez` and `GET /readyz`: probes that fail when the mirror cannot do its job.

* `/livez`: 200 while the event loop and the worker threads answer (`core.liveness`); 503 with
  what stopped answering once either has not for `acr_probe_timeout` seconds (default 5). A
  worker stuck on a hung upstream counts: a mirror whose every lookup hangs is not alive. The
  answer is made on the event loop from what the heartbeat noted, so asking never waits; a
  loop that is stuck cannot answer at all, which a prober's own timeout sees.
* `/readyz`: 200 once the proxy serves (mitmproxy's servers listen before `running`) and the
  credential the routes need is loaded: every `.login` file that exists parses and, when it
  is an ACR refresh token, has not expired; a file a `.login-acr` step writes must exist.
  503 before, with the reasons in JSON. A missing file with no `.login-acr` means anonymous
  pulls, which are ready.

Loopback clients only, like `/status`: the mirror listens on loopback, and a kubelet probe on a
host-network pod reaches it with `host: 127.0.0.1`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from typing import Any

from mitmproxy import ctx, http

from addons.core.duration import seconds_option
from addons.core.liveness import Heartbeat
from addons.proxy.context import info
from addons.proxy.credentials_endpoint import json_answer, login_files, loopback_peer, method_allowed, own_path
from addons.proxy.state import MirrorState
from addons.registry.auth import Credentials, jwt_expiry
from addons.runmd.compile import Compiled

DEFAULT_TIMEOUT = 5.0


def credential_problems(compiled: Compiled, now: float) -> list[str]:
    """Blocking: why the credentials the routes need are not usable (empty: they are)."""
    written_by_login = any(True for _ in compiled.document.steps("login-acr"))
    out = []
    for name in login_files(compiled):
        path = compiled.home / name
        if not path.is_file():
            if written_by_login:
                out.append(f"{name} does not exist yet (the ACR login writes it)")
            continue
        try:
            creds = Credentials.from_file(path)
        except (OSError, ValueError):
            out.append(f"{name} is unusable")
            continue
        exp = jwt_expiry(creds.password) if creds.is_refresh_token else None
        if exp is not None and exp <= now:
            out.append(f"the refresh token in {name} expired {round(now - exp)}s ago")
    return out


class Probes:
    """Answers `/livez` and `/readyz` ahead of the `+ .proxy` root; owns the heartbeat."""

    name = "acr-probes"
    PATHS = ("/livez", "/readyz")

    def __init__(self, compiled: Compiled, state: MirrorState, heartbeat: Heartbeat | None = None) -> None:
        self.compiled = compiled
        self.state = state
        self.heartbeat = heartbeat or Heartbeat()
        #: Set by `running`: mitmproxy's servers listen by then.
        self.serving = False

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_probe_timeout", str, str(int(DEFAULT_TIMEOUT)),
            "Seconds the event loop or the worker threads may stay silent before /livez fails "
            "(and the systemd watchdog is no longer fed).",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_probe_timeout" in updated:
            limit = seconds_option(ctx.options.acr_probe_timeout, "acr_probe_timeout")
            self.heartbeat.limit = limit
            self.heartbeat.interval = min(1.0, limit / 4)

    def running(self) -> None:
        self.serving = True
        self.heartbeat.start()

    def done(self) -> None:
        self.serving = False
        self.heartbeat.stop()

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        path = own_path(flow, self.PATHS)
        return self._answer(flow, path[1:]) if path is not None else None

    async def _answer(self, flow: http.HTTPFlow, probe: str) -> None:
        method = flow.request.method
        info(flow)["endpoint"] = probe
        self.state.counters[f"{probe}_requests"] += 1
        if not method_allowed(flow, ("GET", "HEAD")):
            return
        if not loopback_peer(flow):
            flow.response = json_answer(403, {"status": "error", "message": "probes are only served to clients on this machine"}, method)
            info(flow)["refused"] = "403 not loopback"
            return
        problems = self.heartbeat.problems()
        if probe == "readyz":
            problems += [] if self.serving else ["the proxy is not serving yet"]
            if not problems:  # the file check needs a worker thread, and they answer
                problems += await asyncio.to_thread(credential_problems, self.compiled, time.time())
        if problems:
            self.state.counters[f"{probe}_failed"] += 1
            flow.comment = f"/{probe}: " + "; ".join(problems)
        body = {"status": "fail" if problems else "ok", "problems": problems}
        flow.response = json_answer(503 if problems else 200, body, method)
