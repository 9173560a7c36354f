"""`GET /auth?remote_url=URL`: the node's registry credential, handed to overlaybd on this machine.

overlaybd's `credentialConfig.mode = "http"` asks here for the credentials of the blob URL it is
about to read. The answer is the JSON overlaybd's `ImageAuthResponse` parses: `{"traceId",
"success", "data": {"auths": {HOST: {"username", "password"}}}}`, HOST being the host[:port] of
`remote_url` exactly as overlaybd wrote it (it matches keys against `host`, `host/ns`, ... of the
URL). Only registries this mirror serves get an answer, and only clients on loopback: the answer
is the node's registry credential. Answered ahead of the `+ .proxy` root, like the observers'
`/status` and `/metrics`, which share the loopback check and the JSON answer from here.

The credential in an answer is put into the response only in this addon's `response` hook, which
runs after mitmproxy's flow writer and mitmweb's view have taken the flow, and it is replaced by
`<redacted>` again right after being sent: flow files never hold it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

from mitmproxy import http

from addons.registry import oci
from addons.registry.auth import Credentials
from addons.runmd.compile import Compiled
from addons.proxy.context import info
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)

REDACTED = "<redacted>"
PATH = "/auth"
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


def json_answer(status: int, body: dict[str, Any], method: str = "GET") -> http.Response:
    """An endpoint's JSON answer, never cached."""
    data = json.dumps(body, indent=1, sort_keys=False).encode() + b"\n"
    headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
    return oci.make_response(status, data, headers, method)


def failure(message: str) -> dict[str, Any]:
    """The body of a refused endpoint request, in the shape overlaybd reads."""
    return {"traceId": uuid.uuid4().hex, "success": False, "message": message}


def own_path(flow: http.HTTPFlow, paths: tuple[str, ...]) -> str | None:
    """The path of a live, unanswered origin-form request when it is one of `paths`."""
    if flow.response or flow.error or not flow.live:
        return None
    req = flow.request
    if req.first_line_format != "relative":
        return None  # the proxy root refuses forward-proxy requests
    path = req.path.partition("?")[0]
    return path if path in paths else None


def method_allowed(flow: http.HTTPFlow, allowed: tuple[str, ...]) -> bool:
    """False (with a 405 answer naming `allowed`) when the request's method is not one of them."""
    method = flow.request.method
    if method in allowed:
        return True
    flow.response = json_answer(405, failure(f"{method} is not allowed here"), method)
    flow.response.headers["Allow"] = ", ".join(allowed)
    return False


def login_files(compiled: Compiled) -> list[str]:
    """The credentials files of the `.login` steps, in runmd order, as the routes use them."""
    files: list[str] = []
    for _, step in compiled.document.steps("login"):
        name = compiled.config(step)
        if name not in files:
            files.append(name)
    return files


class CredentialsEndpoint:
    """Answers `/auth`; everything else passes on."""

    name = "acr-auth"

    def __init__(self, compiled: Compiled, state: MirrorState) -> None:
        self.compiled = compiled
        self.state = state
        self.login_files = login_files(compiled)
        self._secrets: weakref.WeakKeyDictionary[http.HTTPFlow, bytes] = weakref.WeakKeyDictionary()

    def requestheaders(self, flow: http.HTTPFlow) -> Coroutine[Any, Any, None] | None:
        """Only `/auth` is answered here (a plain call for every other request)."""
        if own_path(flow, (PATH,)) is None:
            return None
        return self._answer(flow)

    async def _answer(self, flow: http.HTTPFlow) -> None:
        info(flow)["endpoint"] = "auth"
        self.state.counters["auth_requests"] += 1
        if method_allowed(flow, ("GET",)):
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

    async def _auth(self, flow: http.HTTPFlow) -> None:
        def refuse(status: int, message: str) -> None:
            flow.response = json_answer(status, failure(message))
            info(flow)["refused"] = f"{status} {message}"
            flow.comment = f"/auth refused: {message}"

        if not loopback_peer(flow):
            self.state.counters["auth_refused"] += 1
            return refuse(403, "credentials are only given to clients on this machine")
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
        flow.response = json_answer(200, {"traceId": trace, "success": True, "data": {"auths": redacted}})
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
