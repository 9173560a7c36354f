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
    """A failure talking upstream, already turned into the answer the client gets.

    `body` and `headers` hold an upstream error answer that passes to the client unchanged
    (a 404 MANIFEST_UNKNOWN says more than anything the mirror could write instead).
    """

    def __init__(
        self, status: int, code: str, message: str, retry_after: str | None = None,
        *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.body = body
        self.headers = dict(headers or {})

    def response(self, method: str) -> http.Response:
        if self.body is not None:
            return passed_response(method, self.status, self.body, self.headers)
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return oci.error_response(self.status, self.code, self.message, method=method, headers=headers)

    @classmethod
    def from_auth(cls, e: AuthError) -> UpstreamError:
        code = "UNAUTHORIZED" if e.kind in ("denied", "refused") else "UPSTREAM_TIMEOUT" if e.kind == "timeout" else "UPSTREAM_UNAVAILABLE"
        return cls(e.gateway_status, code, f"upstream auth: {e}")

    @classmethod
    def from_status(cls, resp: requests.Response, what: str) -> UpstreamError:
        """The upstream's error answer: a client error passes on as it came (status, body);
        401/403/429 are the mirror's own credentials or quota, so they become gateway errors
        that make containerd fall back, and a 5xx stays a 5xx."""
        status = resp.status_code
        body = read_error_body(resp)
        code, detail = error_summary(body)
        if 400 <= status < 500 and status not in _GATEWAY:
            fallback = "UNKNOWN"  # docker-registry's code for an error it cannot name
            if status == 404:
                fallback = "MANIFEST_UNKNOWN" if "manifest" in what else "BLOB_UNKNOWN" if "blob" in what else "NAME_UNKNOWN"
            words = f"{code}: {detail}" if code else "not found" if status == 404 else "client error"
            return cls(
                status, code or fallback, f"{what}: upstream {status} {words}", resp.headers.get("Retry-After"),
                body=body, headers=passed_headers(resp),
            )
        mapped = _GATEWAY.get(status, status if status >= 500 else 502)
        mine = {401: "UNAUTHORIZED", 403: "DENIED", 429: "TOOMANYREQUESTS"}.get(status, "UPSTREAM_UNAVAILABLE")
        why = f" ({code}: {detail})" if code and detail else ""
        return cls(mapped, mine, f"{what}: upstream answered {status}{why}", resp.headers.get("Retry-After"))


#: An upstream error body larger than this is not an OCI error document: it is not passed on.
MAX_ERROR_BODY = 64 * 1024
#: Upstream headers an answer passed on to the client keeps.
PASSED_HEADERS = (
    "Content-Type", "Content-Length", "Content-Range", "Accept-Ranges", "ETag", "Last-Modified", "Date",
    oci.CONTENT_DIGEST_HEADER, oci.API_VERSION_HEADER, "Link", "Retry-After",
)


def read_error_body(resp: requests.Response) -> bytes | None:
    """An upstream error answer's body (None when too large or cut short); closes the response."""
    try:
        data = resp.raw.read(MAX_ERROR_BODY + 1, decode_content=True) if resp.raw is not None else resp.content
    except (requests.RequestException, OSError):
        return None
    finally:
        resp.close()
    return data if data is not None and len(data) <= MAX_ERROR_BODY else None


def error_summary(body: bytes | None) -> tuple[str, str]:
    """The first error's code and message (with detail) of an OCI error document, for the log."""
    import json

    try:
        first = json.loads(body or b"")["errors"][0]
        code, message = str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return "", ""
    detail = first.get("detail")
    if detail not in (None, "", {}):
        message += f" {json.dumps(detail, separators=(',', ':'))[:120]}"
    return code[:60], message[:200]


def passed_headers(resp: requests.Response) -> dict[str, str]:
    """The upstream headers that describe its answer, as the client gets them."""
    out = {k: resp.headers[k] for k in PASSED_HEADERS if k in resp.headers}
    out.setdefault(oci.API_VERSION_HEADER, oci.API_VERSION)
    return out


def passed_response(method: str, status: int, body: bytes, headers: Mapping[str, str]) -> http.Response:
    """An upstream answer as the client gets it; a HEAD keeps the upstream's Content-Length
    (mitmproxy would write a body for HEAD, so it gets none)."""
    out = http.Response.make(status, b"" if method == "HEAD" else body, dict(headers))
    if method == "HEAD" or status == 304:
        out.headers.pop("Content-Length", None)
        if "Content-Length" in headers:
            out.headers["Content-Length"] = headers["Content-Length"]
    else:
        out.headers["Content-Length"] = str(len(body))
    return out


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
