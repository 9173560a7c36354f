"""Requests the mirror itself makes upstream, and how their failures reach containerd.

Every plugin that talks to a registry (resolve, pull's redirect probe, discover) goes through
`send`, so timeouts, the one retry after a 401 and the mapping of failures to statuses that
make containerd fall back to its next host are decided once. `send` blocks: steps call it from
`run`, in the route's worker thread; `asend` is its event-loop twin for `fetch`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import requests
from mitmproxy import http
from requests.hooks import dispatch_hook
from requests.structures import CaseInsensitiveDict

from addons.core.wire import WireAdapter
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
    session: requests.Session


class NeedsIO(Exception):
    """A non-blocking attempt (a step's `ready` or `fetch`) found that it must wait for blocking I/O."""


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

    def forget(self, www_authenticate: str | None = None) -> None:
        """Non-blocking: drop the cached token, and learn the challenge the 401 carried if any."""
        self.tokens.invalidate(self.upstream, self.scope)
        if www_authenticate:
            try:
                self.tokens.set_challenge(self.upstream, www_authenticate)
            except AuthError as e:
                raise UpstreamError.from_auth(e) from None
        else:
            self.tokens.invalidate_challenge(self.upstream)

    def renew(self, www_authenticate: str | None = None) -> str | None:
        """Drop the cached token and fetch anew, under the challenge the 401 carried if any."""
        self.forget(www_authenticate)
        return self.header()


def new_session() -> requests.Session:
    """The mirror's pooled session (one per mirror); redirects are never followed implicitly."""
    s = requests.Session()
    adapter = WireAdapter(pool_connections=16, pool_maxsize=64, max_retries=0)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.trust_env = False  # a node's proxy variables must not reroute registry traffic
    return s


def _prepare(s: requests.Session, method: str, url: str, headers: Mapping[str, str | None],
             own_url: bool = False) -> requests.PreparedRequest:
    """What `Session.request` prepares for the mirror's requests, without what they never use
    (bodies, cookies, auth objects, proxies from the environment, redirects): a third of its CPU.
    `own_url`: a URL the mirror built from a checked name and reference, which needs neither
    IDNA nor requoting, and headers the transport checks itself (addons.core.wire.LoopWire).

    Cookies are neither kept nor sent, as containerd does not."""
    merged = CaseInsensitiveDict(s.headers)
    merged.update(headers)
    for name in [k for k, v in merged.items() if v is None]:
        del merged[name]
    prepared = requests.PreparedRequest()
    prepared.prepare_method(method)
    if own_url:
        prepared.url, prepared.headers = url, merged
    else:
        prepared.prepare_url(url, None)
        prepared.prepare_headers(merged)
    return prepared


def _answered(state: Shared, s: requests.Session, resp: requests.Response, start: float) -> requests.Response:
    """What `Session.send` does with an answer: its time, and the response hooks (/metrics)."""
    state.counters["upstream_requests"] += 1
    resp.elapsed = datetime.timedelta(seconds=time.perf_counter() - start)
    return dispatch_hook("response", s.hooks, resp)


@contextlib.contextmanager
def upstream_errors(what: str) -> Iterator[None]:
    """A transport failure as the answer the client gets: 504 for a timeout, else 502."""
    try:
        yield
    except requests.Timeout:
        raise UpstreamError(504, "UPSTREAM_TIMEOUT", f"{what}: upstream timed out") from None
    except requests.ConnectionError:
        raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: upstream unreachable") from None
    except requests.RequestException as e:
        raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: {e.__class__.__name__}") from None


def _timeouts(state: Shared, timeout: float | None) -> tuple[float, float]:
    read_timeout = timeout if timeout is not None else state.settings.upstream_timeout
    return min(state.settings.connect_timeout, read_timeout), read_timeout


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

    `stream=True` for a body that may be large (a blob): it is read as it arrives. Otherwise the
    answer is read whole before this returns (at most addons.core.wire.WHOLE_BODY_LIMIT bytes),
    and `resp.raw` reads it from memory.

    Raises UpstreamError for anything but an HTTP answer; the caller decides about statuses.
    """
    timeouts = _timeouts(state, timeout)
    base = dict(headers or {})
    attempts = 2 if auth is not None else 1
    challenge: str | None = None
    s = state.session
    for attempt in range(attempts):
        req_headers = dict(base)
        if auth is not None:
            value = auth.header() if attempt == 0 else auth.renew(challenge)
            if value:
                req_headers["Authorization"] = value
        prepared = _prepare(s, method, url, req_headers)
        start = time.perf_counter()
        with upstream_errors(what):
            resp = s.get_adapter(url).send(prepared, stream=stream, timeout=timeouts, verify=s.verify, cert=s.cert)
        resp = _answered(state, s, resp, start)
        if resp.status_code == 401 and attempt + 1 < attempts:
            challenge = resp.headers.get("WWW-Authenticate")
            resp.close()
            state.counters["upstream_401_retries"] += 1
            continue
        return resp
    raise AssertionError("unreachable")


async def asend(
    state: Shared,
    method: str,
    url: str,  # built by the mirror: see `_prepare`'s own_url
    *,
    headers: Mapping[str, str | None] | None = None,
    auth: Authorizer | None = None,
    what: str = "upstream",
    timeout: float | None = None,
) -> requests.Response:
    """`send` of a small answer on the event loop, when nothing on the way blocks: the token is
    in the cache and the transport can answer on the loop (`asend`). Otherwise, and after a 401
    (a new token is fetched blocking), it raises NeedsIO and the caller `send`s from its worker
    thread; the 401's challenge is learned first, so that the retry fetches the new token at once.
    """
    s = state.session
    adapter = s.get_adapter(url)
    answer_on_loop = getattr(adapter, "asend", None)
    if answer_on_loop is None:
        raise NeedsIO(url)
    req_headers = dict(headers or {})
    if auth is not None:
        found, value = auth.cached_header()
        if not found:
            raise NeedsIO(url)
        if value:
            req_headers["Authorization"] = value
    prepared = _prepare(s, method, url, req_headers, own_url=True)
    start = time.perf_counter()
    with upstream_errors(what):
        resp = await answer_on_loop(prepared, timeout=_timeouts(state, timeout), verify=s.verify)
    resp = _answered(state, s, resp, start)
    if resp.status_code == 401 and auth is not None:
        resp.close()
        state.counters["upstream_401_retries"] += 1
        auth.forget(resp.headers.get("WWW-Authenticate"))
        raise NeedsIO(url)
    return resp
