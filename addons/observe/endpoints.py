"""The mirror's own two endpoints, answered before the `+ .proxy` root routes anything.

* `GET /auth?remote_url=URL`: overlaybd's `credentialConfig.mode = "http"` asks here for the
  credentials of the blob URL it is about to read. The answer is the JSON overlaybd's
  `ImageAuthResponse` parses: `{"traceId", "success", "data": {"auths": {HOST: {"username",
  "password"}}}}`, HOST being the host[:port] of `remote_url` exactly as overlaybd wrote it (it
  matches keys against `host`, `host/ns`, ... of the URL). Only registries this mirror serves
  get an answer, and only clients on loopback: the answer is the node's registry credential.
* `GET /status`: health as JSON: upstreams, the credentials files and the ACR login with their
  expiry, cached upstream tokens by scope and expiry, the mirror's counters, and teleport's mode
  with whether (and why not) this node streams overlaybd images. No secret, but
  it maps what this node may pull: loopback clients only, like `/auth` and `/metrics`.

The credential in an `/auth` answer is put into the response only in this addon's `response`
hook, which runs after mitmproxy's flow writer and mitmweb's view have taken the flow, and it is
replaced by `<redacted>` again right after being sent: flow files never hold it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import time
import uuid
import weakref
from pathlib import Path
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from addons import __version__
from addons.core.peer import LocalClients
from addons.registry import oci
from addons.registry.auth import Credentials, jwt_expiry
from addons.runmd.compile import Compiled
from addons.node.login_acr import read_meta
from addons.proxy.context import info
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
_DEFAULT_PORTS = {"https": "443", "http": "80"}


def loopback_peer(flow: http.HTTPFlow) -> bool:
    """Whether the client connected from this machine (IPv4-mapped IPv6 addresses included)."""
    peer = flow.client_conn.peername
    if not peer:
        return False
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def remote_host(remote_url: str) -> tuple[str, str] | None:
    """(host[:port] as written, the same normalized) of overlaybd's `remote_url`, or None."""
    url = remote_url.strip()
    if "://" not in url:
        url = "https://" + url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc:
        return None
    host = netloc.lower()
    default = _DEFAULT_PORTS.get(parts.scheme.lower())
    if default and host.endswith(":" + default):
        host = host[: -len(default) - 1]
    return netloc, host


def _json(status: int, body: dict[str, Any], method: str = "GET") -> http.Response:
    data = json.dumps(body, indent=1, sort_keys=False).encode() + b"\n"
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    return oci.make_response(status, data, headers, method)


class Endpoints:
    """Answers `/auth` and `/status`; everything else passes on to the `+ .proxy` root."""

    name = "acr-endpoints"
    PATHS = ("/auth", "/status")

    def __init__(self, compiled: Compiled, state: MirrorState, clients: LocalClients | None = None) -> None:
        self.compiled = compiled
        self.state = state
        #: Who may have the credential (root; with `acr_auth_executables`, those programs).
        self.clients = clients or LocalClients()
        self.addons = [self.clients]
        self.work = compiled.home / ".work"
        files: list[str] = []
        for _, step in compiled.document.steps("login"):
            name = compiled.config(step)
            if name not in files:
                files.append(name)
        #: The credentials files of the `.login` steps, as the routes use them.
        self.login_files = files
        self._secrets: weakref.WeakKeyDictionary[http.HTTPFlow, bytes] = weakref.WeakKeyDictionary()

    # -- hooks ----------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Only `/auth` and `/status` are answered here (a plain call for every other request)."""
        if flow.response or flow.error or not flow.live:
            return None
        req = flow.request
        if req.first_line_format != "relative":
            return None  # the proxy root refuses forward-proxy requests
        path = req.path.partition("?")[0]
        if path not in self.PATHS:
            return None
        return self._answer(flow, path)

    async def _answer(self, flow: http.HTTPFlow, path: str) -> None:
        req = flow.request
        endpoint = path[1:]
        info(flow)["endpoint"] = endpoint
        self.state.counters[f"{endpoint}_requests"] += 1
        allowed = ("GET", "HEAD") if endpoint == "status" else ("GET",)
        if req.method not in allowed:
            flow.response = _json(405, self._failure(f"{req.method} is not allowed here"), req.method)
            flow.response.headers["Allow"] = ", ".join(allowed)
            return
        if endpoint == "status":
            if not loopback_peer(flow):
                # Health names the upstreams, the credential files and token expiry: this machine only.
                self.state.counters["status_refused"] += 1
                flow.response = _json(403, self._failure("health is only served to clients on this machine"), req.method)
                info(flow)["refused"] = "403 not loopback"
                return
            body = await asyncio.to_thread(self.status)
            flow.response = _json(200, body, req.method)
            return
        await self._auth(flow)

    def response(self, flow: http.HTTPFlow) -> None:
        """Put the credential in just before sending; the flow writer already saved the redacted one."""
        secret = self._secrets.get(flow)
        if secret is None or flow.response is None:
            return
        redacted = flow.response.content
        flow.response.content = secret
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        # The response is written to the client before the loop runs callbacks again.
        loop.call_soon(self._redact, flow, redacted)

    def _redact(self, flow: http.HTTPFlow, redacted: bytes | None) -> None:
        self._secrets.pop(flow, None)
        if flow.response is not None and redacted is not None:
            flow.response.content = redacted

    # -- /auth ------------------------------------------------------------------------

    @staticmethod
    def _failure(message: str) -> dict[str, Any]:
        return {"traceId": uuid.uuid4().hex, "success": False, "message": message}

    async def _auth(self, flow: http.HTTPFlow) -> None:
        def refuse(status: int, message: str) -> None:
            flow.response = _json(status, self._failure(message))
            info(flow)["refused"] = f"{status} {message}"
            flow.comment = f"/auth refused: {message}"

        if not loopback_peer(flow):
            self.state.counters["auth_refused"] += 1
            return refuse(403, "credentials are only given to clients on this machine")
        conn = flow.client_conn
        refusal = await asyncio.to_thread(self.clients.refusal, conn.peername, conn.sockname)
        if refusal is not None:
            self.state.counters["auth_refused"] += 1
            logger.warning("/auth refused to %s:%s: %s", conn.peername[0], conn.peername[1], refusal)
            flow.response = oci.error_response(403, "DENIED", "credentials are only given to root on this machine")
            info(flow)["refused"] = f"403 {refusal}"
            flow.comment = f"/auth refused: {refusal}"
            return
        remote_url = flow.request.query.get("remote_url", "")
        if not remote_url:
            return refuse(400, "expected ?remote_url=URL")
        parsed = remote_host(remote_url)
        if parsed is None:
            return refuse(400, "remote_url is not a URL")
        written, host = parsed
        upstream = self.state.upstreams.get(host)
        if upstream is None:
            self.state.counters["auth_refused"] += 1
            return refuse(404, f"registry '{host[:100]}' is not mirrored here")
        try:
            creds = await asyncio.to_thread(self.credentials)
        except ValueError:
            return refuse(502, "the mirror's credentials file is unusable")
        trace = uuid.uuid4().hex
        auths: dict[str, Any] = {}
        redacted: dict[str, Any] = {}
        if creds is not None:
            auths[written] = {"username": creds.username, "password": creds.password}
            redacted[written] = {"username": creds.username, "password": REDACTED}
        body = {"traceId": trace, "success": True, "data": {"auths": auths}}
        flow.response = _json(200, {"traceId": trace, "success": True, "data": {"auths": redacted}})
        if creds is not None:
            self._secrets[flow] = json.dumps(body, indent=1).encode() + b"\n"
        flow.comment = f"/auth for {upstream.ns}: {'credentials' if creds else 'anonymous'}"
        info(flow)["auth"] = "credentials" if creds else "anonymous"

    def credentials(self) -> Credentials | None:
        """Blocking: the first `.login` file that exists; None means anonymous."""
        for name in self.login_files:
            path = self.compiled.home / name
            if path.is_file():
                return Credentials.from_file(path)
        return None

    # -- /status ---------------------------------------------------------------------

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
        tokens = self.state.services.get("tokens")
        hosts = self.state.services.get("hosts_routing")
        gate = self.state.services.get("teleport_gate")
        return {
            "status": "ok",
            "version": __version__,
            "runmd": str(Path(self.compiled.path).resolve()),
            "upstreams": [{"ns": u.ns, "url": u.base_url} for u in self.state.upstreams.values()],
            "credentials": files,
            "acr_login": login,
            "tokens": tokens.tokens() if tokens is not None else [],
            # Per hosts.toml the runmd asks for: does containerd go through the mirror (first)?
            "hosts_toml": hosts() if hosts is not None else [],
            "counters": dict(sorted(self.state.counters.items())),
            **({"teleport": gate.public()} if gate is not None else {}),
        }
