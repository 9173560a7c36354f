"""Requests the mirror itself makes upstream, and how their failures reach containerd.

Every plugin that talks to a registry (resolve, pull's redirect probe, discover) goes through
`send`, so timeouts, the one retry after a 401 and the mapping of failures to statuses that
make containerd fall back to its next host are decided once. `send` blocks: call it through
`asyncio.to_thread`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
from mitmproxy import http

from addons.registry import oci
from addons.registry.auth import AuthError, Credentials, TokenClient
from addons.registry.oci import Upstream

logger = logging.getLogger(__name__)

#: What an upstream status becomes for containerd. 404 passes (containerd tries its next
#: host at once); other client errors of the upstream are the mirror's problem, not the
#: client's, so they become gateway errors that also make containerd fall back.
_GATEWAY = {401: 502, 403: 502, 429: 503}


class Shared(Protocol):
    """What upstream requests need of the mirror's shared state (addons.proxy.state.MirrorState)."""

    #: has `upstream_timeout` and `connect_timeout`, in seconds
    settings: Any
    counters: Any

    def service(self, key: str, factory: Any) -> Any: ...


class UpstreamError(Exception):
    """A failure talking upstream, already turned into the answer the client gets."""

    def __init__(self, status: int, code: str, message: str, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def response(self, method: str) -> http.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return oci.error_response(self.status, self.code, self.message, method=method, headers=headers)

    @classmethod
    def from_auth(cls, e: AuthError) -> UpstreamError:
        code = "UNAUTHORIZED" if e.kind in ("denied", "refused") else "UPSTREAM_TIMEOUT" if e.kind == "timeout" else "UPSTREAM_UNAVAILABLE"
        return cls(e.gateway_status, code, f"upstream auth: {e}")

    @classmethod
    def from_status(cls, resp: requests.Response, what: str) -> UpstreamError:
        status = resp.status_code
        if status == 404:
            code = "MANIFEST_UNKNOWN" if "manifest" in what else "BLOB_UNKNOWN" if "blob" in what else "NAME_UNKNOWN"
            return cls(404, code, f"{what}: not found upstream")
        mapped = _GATEWAY.get(status, status if status >= 500 else 502)
        code = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "UPSTREAM_UNAVAILABLE")
        return cls(mapped, code, f"{what}: upstream answered {status}", resp.headers.get("Retry-After"))


@dataclass
class Authorizer:
    """One flow's way to authorize upstream requests, renewable after a 401."""

    tokens: TokenClient
    upstream: Upstream
    scope: str
    credentials: Credentials | None = field(repr=False)
    mode: str = "oauth2"

    def header(self) -> str | None:
        if self.mode == "anonymous":
            return None
        try:
            return self.tokens.authorization(self.upstream, self.scope, self.credentials)
        except AuthError as e:
            raise UpstreamError.from_auth(e) from None

    def cached_header(self) -> tuple[bool, str | None]:
        """Non-blocking: (True, header) when the token cache can answer, else (False, None)."""
        if self.mode == "anonymous":
            return True, None
        return self.tokens.cached_authorization(self.upstream, self.scope, self.credentials)

    def renew(self, www_authenticate: str | None = None) -> str | None:
        """Drop the cached token and fetch anew, under the challenge the 401 carried if any."""
        self.tokens.invalidate(self.upstream, self.scope)
        if www_authenticate:
            try:
                self.tokens.set_challenge(self.upstream, www_authenticate)
            except AuthError as e:
                raise UpstreamError.from_auth(e) from None
        else:
            self.tokens.invalidate_challenge(self.upstream)
        return self.header()


def session(state: Shared) -> requests.Session:
    """One pooled session per mirror; redirects are never followed implicitly."""

    def make() -> requests.Session:
        s = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
        s.mount("http://", adapter)
        s.mount("https://", adapter)
        s.trust_env = False  # a node's proxy variables must not reroute registry traffic
        return s

    return state.service("session", make)


def token_client(state: Shared) -> TokenClient:
    return state.service(
        "tokens", lambda: TokenClient(session=session(state), timeout=state.settings.upstream_timeout)
    )


def send(
    state: Shared,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: Authorizer | None = None,
    stream: bool = False,
    what: str = "upstream",
    timeout: float | None = None,
) -> requests.Response:
    """One upstream request with the mirror's timeouts, retried once after a 401 with a fresh token.

    Raises UpstreamError for anything but an HTTP answer; the caller decides about statuses.
    """
    read_timeout = timeout if timeout is not None else state.settings.upstream_timeout
    timeouts = (min(state.settings.connect_timeout, read_timeout), read_timeout)
    base = dict(headers or {})
    attempts = 2 if auth is not None else 1
    challenge: str | None = None
    for attempt in range(attempts):
        req_headers = dict(base)
        if auth is not None:
            value = auth.header() if attempt == 0 else auth.renew(challenge)
            if value:
                req_headers["Authorization"] = value
        try:
            resp = session(state).request(
                method, url, headers=req_headers, stream=stream, timeout=timeouts, allow_redirects=False
            )
        except requests.Timeout:
            raise UpstreamError(504, "UPSTREAM_TIMEOUT", f"{what}: upstream timed out") from None
        except requests.ConnectionError:
            raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: upstream unreachable") from None
        except requests.RequestException as e:
            raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: {e.__class__.__name__}") from None
        state.counters["upstream_requests"] += 1
        if resp.status_code == 401 and attempt + 1 < attempts:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            state.counters["upstream_401_retries"] += 1
            continue
        return resp
    raise AssertionError("unreachable")
