"""
The blocking token client behind the `.authn` plugin.

It runs in the route's worker thread (the event loop only reads its cache), so it is
written with `requests` and is thread-safe: tokens are cached per (upstream, scope, credentials) and
concurrent misses for one key share a single fetch. No token, password or
Authorization value is ever logged or put into an exception message.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import requests

from addons.core.address import is_loopback
from addons.registry.oci import Challenge, Upstream, parse_challenge

logger = logging.getLogger(__name__)

#: The user name ACR expects with a refresh token (`az acr login --expose-token`).
ACR_REFRESH_TOKEN_USER = "00000000-0000-0000-0000-000000000000"
CLIENT_ID = "lifec-registry"
#: Docker token spec: a token without `expires_in` lives 60 seconds.
DEFAULT_EXPIRES_IN = 60.0

_JWT_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


# --- credentials -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Credentials:
    username: str
    password: str = dataclasses.field(repr=False)

    @classmethod
    def refresh_token(cls, token: str) -> Credentials:
        return cls(ACR_REFRESH_TOKEN_USER, token)

    @property
    def is_refresh_token(self) -> bool:
        return self.username == ACR_REFRESH_TOKEN_USER

    @property
    def identity(self) -> str:
        """A cache key that tells credentials apart without holding the secret in clear."""
        return hashlib.sha256(f"{self.username}\0{self.password}".encode()).hexdigest()

    def basic(self) -> str:
        """The `Authorization` value for HTTP Basic."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Credentials:
        """
        Read credentials written by `acr login` or by a person: a bare (refresh)
        token, `user:password`, two lines user and password, or JSON with
        `username`/`password` or `refresh_token`. Errors never quote the file.
        """
        path = Path(path)
        expected = (
            "expected a token, 'user:password', two lines (user, password) or JSON "
            'with "username" and "password" or "refresh_token"'
        )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path}: credentials file is not UTF-8 text; {expected}") from None
        text = text.strip().lstrip("\ufeff")
        if not text:
            raise ValueError(f"{path}: credentials file is empty; {expected}")
        if text.startswith(("{", "[")):
            return cls._from_json(path, text, expected)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if len(lines) == 2:
            username, password = lines
            if ":" in username or any(c.isspace() for c in username):
                raise ValueError(f"{path}: malformed user name on line 1; {expected}")
            return cls(username, password)
        if len(lines) > 2:
            raise ValueError(f"{path}: {len(lines)} lines in credentials file; {expected}")
        line = lines[0]
        if _JWT_RE.fullmatch(line) or ":" not in line:
            if any(c.isspace() for c in line):
                raise ValueError(f"{path}: a bare token must not contain spaces; {expected}")
            return cls.refresh_token(line)
        username, _, password = line.partition(":")
        if not username or not password:
            raise ValueError(f"{path}: empty user name or password; {expected}")
        return cls(username, password)

    @classmethod
    def _from_json(cls, path: Path, text: str, expected: str) -> Credentials:
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError(f"{path}: credentials file is not valid JSON; {expected}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: credentials JSON is not an object; {expected}")
        username, password = data.get("username"), data.get("password")
        if isinstance(username, str) and isinstance(password, str) and username and password:
            return cls(username, password)
        token = data.get("refresh_token")
        if isinstance(token, str) and token:
            return cls.refresh_token(token)
        raise ValueError(f"{path}: credentials JSON lacks usable fields; {expected}")


def insecure_permissions(path: str | os.PathLike[str]) -> bool:
    """A credentials file that group or others may access (the caller warns)."""
    return bool(os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO))


# --- errors ------------------------------------------------------------------


class AuthError(Exception):
    """
    Why no token could be had. `kind` is one of `unreachable`, `timeout`,
    `unavailable`, `denied`, `bad-response`, `refused`, `unsupported`; `status`
    is the HTTP status when there was one.
    """

    _GATEWAY_STATUS = {"timeout": 504, "unavailable": 503}

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    @property
    def gateway_status(self) -> int:
        """The status the mirror answers with so that containerd falls back to the next host."""
        return self._GATEWAY_STATUS.get(self.kind, 502)

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def __repr__(self) -> str:
        return f"AuthError({self.kind!r}, {self.message!r}, status={self.status!r})"


# --- token client ------------------------------------------------------------


def jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: only to read when our own tokens expire and their tenant."""
    try:
        return jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return {}


def jwt_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without verifying: only to know when to refresh."""
    exp = jwt_claims(token).get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)):
        return None
    return float(exp)


@dataclasses.dataclass
class _Token:
    upstream: Upstream
    scope: str
    value: str = dataclasses.field(repr=False)
    expires_at: float
    fresh_until: float


class _Flight:
    """One fetch in progress; the callers that arrive meanwhile wait for its result."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Any = None
        self.error: AuthError | None = None


_CacheKey = tuple[Upstream, str, str]


class TokenClient:
    """Authorization for upstream registries; one per mirror, shared by its threads."""

    def __init__(
        self,
        session: requests.Session | None = None,
        timeout: float = 10.0,
        leeway: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.session = session or requests.Session()
        self.timeout = timeout
        self.leeway = leeway
        self.clock = clock
        self._lock = threading.Lock()
        self._flights: dict[Any, _Flight] = {}
        self._challenges: dict[Upstream, list[Challenge]] = {}
        self._tokens: dict[_CacheKey, _Token] = {}
        self.fetches: collections.Counter[tuple[str, str]] = collections.Counter()
        self.pings: collections.Counter[str] = collections.Counter()

    # -- single flight ---------------------------------------------------------

    def _single_flight(self, key: Any, fetch: Callable[[], Any]) -> Any:
        """Run `fetch` once for concurrent callers with the same key; share its result or error."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise AuthError(flight.error.kind, flight.error.message, flight.error.status)
            return flight.result
        try:
            flight.result = fetch()
            return flight.result
        except AuthError as e:
            flight.error = e
            raise
        except Exception as e:
            # A bug, not a protocol failure: the leader sees the real exception.
            flight.error = AuthError("bad-response", f"unexpected {type(e).__name__}")
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()

    # -- challenges ------------------------------------------------------------

    def challenge(self, upstream: Upstream | str) -> list[Challenge]:
        """
        How the registry wants to be authenticated, from one `GET /v2/`
        (200: anonymous, an empty list). Cached per upstream.
        """
        upstream = _upstream(upstream)
        with self._lock:
            cached = self._challenges.get(upstream)
        if cached is None:
            cached = self._single_flight(("challenge", upstream), lambda: self._ping(upstream))
        return list(cached)

    def set_challenge(self, upstream: Upstream | str, www_authenticate: str) -> list[Challenge]:
        """
        Learn the challenge from a 401 on any endpoint, for registries whose
        `/v2/` answers 200 although their repositories need a token.
        """
        upstream = _upstream(upstream)
        try:
            challenges = parse_challenge(www_authenticate)
        except ValueError as e:
            raise AuthError("bad-response", f"{upstream.ns}: malformed WWW-Authenticate ({e})") from None
        with self._lock:
            self._challenges[upstream] = challenges
        return challenges

    def invalidate_challenge(self, upstream: Upstream | str) -> None:
        with self._lock:
            self._challenges.pop(_upstream(upstream), None)

    def _ping(self, upstream: Upstream) -> list[Challenge]:
        with self._lock:
            cached = self._challenges.get(upstream)
            if cached is not None:
                return cached
            self.pings[upstream.ns] += 1
        response = self._request("GET", upstream.url("/v2/"), what=f"{upstream.ns} /v2/")
        response.close()
        if response.status_code == 200:
            challenges: list[Challenge] = []
        elif response.status_code == 401:
            # requests joins repeated header lines with ", ", which parse_challenge reads.
            header = response.headers.get("WWW-Authenticate", "")
            if not header:
                raise AuthError("bad-response", f"{upstream.ns}: 401 without WWW-Authenticate", 401)
            try:
                challenges = parse_challenge(header)
            except ValueError as e:
                raise AuthError(
                    "bad-response", f"{upstream.ns}: malformed WWW-Authenticate ({e})", 401
                ) from None
        else:
            raise _status_error(response.status_code, f"{upstream.ns} /v2/")
        logger.debug(
            "%s authenticates with %s", upstream.ns, ", ".join(c.scheme for c in challenges) or "nothing"
        )
        with self._lock:
            self._challenges[upstream] = challenges
        return challenges

    # -- tokens ------------------------------------------------------------------

    def authorization(
        self, upstream: Upstream | str, scope: str, credentials: Credentials | None
    ) -> str | None:
        """
        The `Authorization` value to send upstream for `scope`, or None where the
        registry is anonymous (or wants Basic and there are no credentials).
        """
        upstream = _upstream(upstream)
        challenges = self.challenge(upstream)
        if not challenges:
            return None
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is None:
            if any(c.scheme == "basic" for c in challenges):
                return credentials.basic() if credentials else None
            raise AuthError(
                "unsupported",
                f"{upstream.ns}: unsupported auth scheme {', '.join(c.scheme for c in challenges)}",
            )
        identity = credentials.identity if credentials else ""
        key: _CacheKey = (upstream, scope, identity)
        token = self._cached(key)
        if token is None:
            token = self._single_flight(
                ("token", key), lambda: self._fetch(upstream, scope, bearer, credentials, key)
            )
        return "Bearer " + token.value

    def cached_authorization(
        self, upstream: Upstream | str, scope: str, credentials: Credentials | None
    ) -> tuple[bool, str | None]:
        """Non-blocking `authorization`: (True, value) when the caches answer, (False, None) when
        the challenge or the token must be fetched first."""
        upstream = _upstream(upstream)
        with self._lock:
            challenges = self._challenges.get(upstream)
        if challenges is None:
            return False, None
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is None:
            if not challenges or any(c.scheme == "basic" for c in challenges):
                return True, (credentials.basic() if credentials and challenges else None)
            return False, None  # unsupported: `authorization` says why
        token = self._cached((upstream, scope, credentials.identity if credentials else ""))
        return (True, "Bearer " + token.value) if token is not None else (False, None)

    def _cached(self, key: _CacheKey) -> _Token | None:
        with self._lock:
            token = self._tokens.get(key)
            if token is not None and self.clock() < token.fresh_until:
                return token
            return None

    def invalidate(self, upstream: Upstream | str, scope: str) -> None:
        """Forget the tokens for a scope, e.g. after upstream refused one with 401."""
        upstream = _upstream(upstream)
        with self._lock:
            for key in [k for k in self._tokens if k[0] == upstream and k[1] == scope]:
                del self._tokens[key]

    def tokens(self) -> list[dict[str, Any]]:
        """The cached tokens' upstreams, scopes and expiry, never the tokens themselves."""
        now = self.clock()
        with self._lock:
            return [
                {
                    "upstream": t.upstream.ns,
                    "scope": t.scope,
                    "anonymous": key[2] == "",
                    "expires_at": t.expires_at,
                    "expires_in": round(t.expires_at - now, 1),
                    "fetches": self.fetches[(t.upstream.ns, t.scope)],
                }
                for key, t in self._tokens.items()
            ]

    def fetch_count(self, upstream: Upstream | str, scope: str) -> int:
        return self.fetches[(_upstream(upstream).ns, scope)]

    def _fetch(
        self,
        upstream: Upstream,
        scope: str,
        challenge: Challenge,
        credentials: Credentials | None,
        key: _CacheKey,
    ) -> _Token:
        # Another caller may have finished a fetch between our cache check and our flight.
        cached = self._cached(key)
        if cached is not None:
            return cached
        realm = self._check_realm(upstream, challenge)
        with self._lock:
            self.fetches[(upstream.ns, scope)] += 1
        started = self.clock()
        params = {"scope": scope}
        if challenge.service:
            params = {"service": challenge.service, **params}
        what = f"token endpoint for {upstream.ns}"
        body: Any = None
        if credentials is not None:
            body = self._post_token(realm, params, credentials, what)
        if body is None:
            body = self._get_token(realm, params, credentials, what)
        value, expires_at = self._read_token(body, started, what)
        lifetime = expires_at - started
        fresh_until = expires_at - min(self.leeway, lifetime / 2)
        token = _Token(upstream, scope, value, expires_at, fresh_until)
        with self._lock:
            self._tokens = {k: t for k, t in self._tokens.items() if t.expires_at > started}
            self._tokens[key] = token
        logger.debug(
            "token for %s %s (%s), valid for %.0f s",
            upstream.ns,
            scope,
            "anonymous" if credentials is None else "with credentials",
            lifetime,
        )
        return token

    def _check_realm(self, upstream: Upstream, challenge: Challenge) -> str:
        realm = challenge.realm
        if not realm:
            raise AuthError("bad-response", f"{upstream.ns}: Bearer challenge without realm")
        parts = urllib.parse.urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise AuthError("bad-response", f"{upstream.ns}: realm is not an HTTP(S) URL")
        if parts.username is not None or parts.password is not None:
            raise AuthError("bad-response", f"{upstream.ns}: realm carries user information")
        if upstream.scheme == "https" and parts.scheme == "http" and not is_loopback(parts.hostname):
            raise AuthError(
                "refused",
                f"{upstream.ns}: refusing plain-HTTP realm {parts.hostname} for an HTTPS registry",
            )
        return realm

    def _post_token(
        self, realm: str, params: dict[str, str], credentials: Credentials, what: str
    ) -> Any | None:
        """OAuth2 (ACR, Docker Hub); None when the endpoint only speaks the GET flavour."""
        form = {"grant_type": "refresh_token" if credentials.is_refresh_token else "password"}
        form.update(params)
        form["client_id"] = CLIENT_ID
        if credentials.is_refresh_token:
            form["refresh_token"] = credentials.password
        else:
            form["username"] = credentials.username
            form["password"] = credentials.password
        response = self._request("POST", realm, what=what, data=form)
        # containerd's list: GCR answers 404, Artifactory 401, ACR 400 for a grant it lacks.
        if response.status_code in (400, 401, 404, 405):
            logger.debug("%s answered POST with %d; trying GET", what, response.status_code)
            response.close()
            return None
        return self._json(response, what)

    def _get_token(
        self, realm: str, params: dict[str, str], credentials: Credentials | None, what: str
    ) -> Any:
        """The Docker token spec's GET, with Basic credentials when there are some."""
        auth = (credentials.username, credentials.password) if credentials else None
        response = self._request("GET", realm, what=what, params=params, auth=auth)
        return self._json(response, what)

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> requests.Response:
        # No redirects: credentials go to the host the registry named and nowhere else.
        try:
            return self.session.request(
                method, url, timeout=self.timeout, allow_redirects=False, **kwargs
            )
        except requests.Timeout:
            raise AuthError("timeout", f"{what} timed out after {self.timeout:g} s") from None
        except requests.ConnectionError as e:
            raise AuthError("unreachable", f"{what} unreachable ({type(e).__name__})") from None
        except requests.RequestException as e:
            raise AuthError("bad-response", f"{what}: {type(e).__name__}") from None

    @staticmethod
    def _json(response: requests.Response, what: str) -> Any:
        if response.status_code != 200:
            response.close()
            raise _status_error(response.status_code, what)
        try:
            return response.json()
        except ValueError:
            raise AuthError("bad-response", f"{what}: response is not JSON", 200) from None

    def _read_token(self, body: Any, started: float, what: str) -> tuple[str, float]:
        if not isinstance(body, dict):
            raise AuthError("bad-response", f"{what}: response is not a JSON object", 200)
        value = body.get("access_token") or body.get("token")
        if not isinstance(value, str) or not value:
            raise AuthError("bad-response", f"{what}: response has no token", 200)
        expires_in = body.get("expires_in")
        if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or expires_in <= 0:
            expires_in = None
        exp = jwt_expiry(value)
        candidates = [started + expires_in] if expires_in is not None else []
        if exp is not None:
            candidates.append(exp)
        expires_at = min(candidates) if candidates else started + DEFAULT_EXPIRES_IN
        return value, expires_at


def _upstream(upstream: Upstream | str) -> Upstream:
    return upstream if isinstance(upstream, Upstream) else Upstream.from_spec(upstream)


def _status_error(status: int, what: str) -> AuthError:
    if status in (401, 403):
        return AuthError("denied", f"{what} denied access ({status})", status)
    if status == 429 or status >= 500:
        return AuthError("unavailable", f"{what} answered {status}", status)
    return AuthError("bad-response", f"{what} answered {status}", status)
