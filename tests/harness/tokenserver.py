"""A stand-in for ACR's token endpoints and the Docker token spec, on loopback.

It speaks the wire formats that the mirror must handle against real registries:

* ACR: ``POST /oauth2/exchange`` (AAD access token -> refresh token) and ``POST /oauth2/token``
  with ``grant_type=refresh_token``; refresh tokens also work as the Basic password of user
  ``00000000-0000-0000-0000-000000000000`` on ``GET /oauth2/token``, like real ACR.
* Docker token spec: ``GET /oauth2/token?service=&scope=`` (anonymous or Basic) answering
  ``{"token", "access_token", "expires_in", "issued_at"}``, and the OAuth2 ``POST`` with
  ``grant_type=password``.

Access tokens are RS256 JWTs with an ``x5c`` header holding the self-signed certificate that is
also written as the registry's ``rootcertbundle``: docker-registry 2.8 verifies the chain from
``x5c`` against that bundle (a ``kid`` would also work, but must be libtrust's key id format; the
x5c path needs no such encoding).

docker-registry accepts a token up to 60 s after its ``exp`` (its clock-skew leeway), so tests of
expiry should look at what the client does (when it asks for a new token), not expect the
registry to refuse a just-expired token.
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime
import json
import secrets
import shutil
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from .ports import LOOPBACK

ACR_REFRESH_USER = "00000000-0000-0000-0000-000000000000"
SECRET_FIELDS = frozenset({"password", "refresh_token", "access_token"})
REDACTED = "<redacted>"

#: decides which actions a caller gets: (user or None, scope type, name, requested) -> granted
Authorizer = Callable[[Optional[str], str, str, list[str]], list[str]]


class TokenRequest(NamedTuple):
    """One request as the token server saw it, with every secret replaced by ``<redacted>``."""

    method: str
    path: str
    params: dict[str, list[str]]
    has_authorization: bool


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def decode_jwt(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(header, claims) of a JWT without checking the signature: for assertions in tests."""
    header, claims, _sig = token.split(".")
    return json.loads(b64url_decode(header)), json.loads(b64url_decode(claims))


def parse_scope(scope: str) -> Optional[tuple[str, str, list[str]]]:
    """``repository:a/b:pull,push`` -> ("repository", "a/b", ["pull", "push"]); None if malformed.

    The name sits between the first and the last colon, so names may hold colons (ports).
    """
    parts = scope.split(":")
    if len(parts) < 3 or not parts[0] or not parts[-1]:
        return None
    return parts[0], ":".join(parts[1:-1]), [a for a in parts[-1].split(",") if a]


def split_scopes(values: list[str]) -> list[str]:
    """Scopes may come as repeated parameters or space-joined in one (OAuth2 POST)."""
    return [s for v in values for s in v.split(" ") if s]


@dataclass
class Knobs:
    """Behaviour switches a test may flip; ``TokenServer.reset()`` restores the constructor's."""

    users: dict[str, str] = field(default_factory=dict)
    aad_tokens: dict[str, str] = field(default_factory=dict)  # aad token -> user (subject)
    expires_in: int = 300
    refresh_expires_in: int = 3 * 3600
    anonymous_pull: bool = False
    post_not_found: bool = False
    authorize: Optional[Authorizer] = None
    #: The clock tokens are checked against (tests move it instead of waiting for an expiry).
    clock: Callable[[], float] = time.time


class TokenServer:
    """Threaded HTTP token server on 127.0.0.1; see the module docstring for the protocols."""

    def __init__(
        self,
        *,
        service: str = "lifec-test-registry",
        issuer: str = "lifec-test-token-server",
        users: Optional[dict[str, str]] = None,
        aad_tokens: Optional[dict[str, str] | set[str] | list[str]] = None,
        expires_in: int = 300,
        refresh_expires_in: int = 3 * 3600,
        anonymous_pull: bool = False,
        post_not_found: bool = False,
        authorize: Optional[Authorizer] = None,
        port: int = 0,
    ) -> None:
        aad: dict[str, str]
        if aad_tokens is None:
            aad = {}
        elif isinstance(aad_tokens, dict):
            aad = dict(aad_tokens)
        else:
            aad = {t: "aad-user" for t in aad_tokens}
        self._defaults = Knobs(
            users=dict(users or {}),
            aad_tokens=aad,
            expires_in=expires_in,
            refresh_expires_in=refresh_expires_in,
            anonymous_pull=anonymous_pull,
            post_not_found=post_not_found,
            authorize=authorize,
        )
        self.knobs: Knobs = copy.deepcopy(self._defaults)
        self.service = service
        self.issuer = issuer
        self._lock = threading.Lock()
        self.requests: list[TokenRequest] = []
        self.counters: collections.Counter[str] = collections.Counter()
        self.issued: list[dict[str, Any]] = []  # claims of access tokens handed out
        self.refresh_tokens: dict[str, str] = {}  # refresh token -> user
        self._tmp = Path(tempfile.mkdtemp(prefix="lifec-tokensrv-"))
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._cert = self._self_signed_cert()
        self.cert_path: Path = self._tmp / "rootcertbundle.pem"
        self.cert_path.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        self._x5c = base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()

        handler = type("Handler", (_Handler,), {"token_server": self})
        self._httpd = ThreadingHTTPServer((LOOPBACK, port), handler)
        self._httpd.daemon_threads = True
        self.port: int = int(self._httpd.server_address[1])
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self.realm = self.url + "/oauth2/token"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.05,), name="token-server",
            daemon=True
        )
        self._thread.start()

    # --- knobs as attributes, so tests read naturally: token_server.post_not_found = True ---
    @property
    def users(self) -> dict[str, str]:
        return self.knobs.users

    @property
    def aad_tokens(self) -> dict[str, str]:
        return self.knobs.aad_tokens

    @property
    def expires_in(self) -> int:
        return self.knobs.expires_in

    @expires_in.setter
    def expires_in(self, value: int) -> None:
        self.knobs.expires_in = value

    @property
    def anonymous_pull(self) -> bool:
        return self.knobs.anonymous_pull

    @anonymous_pull.setter
    def anonymous_pull(self, value: bool) -> None:
        self.knobs.anonymous_pull = value

    @property
    def post_not_found(self) -> bool:
        return self.knobs.post_not_found

    @post_not_found.setter
    def post_not_found(self, value: bool) -> None:
        self.knobs.post_not_found = value

    # --- lifecycle ---
    def stop(self) -> None:
        """Stop serving and delete the key material; safe to call twice."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "TokenServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget requests, counters and issued tokens and restore the constructor's knobs.

        A session-scoped token server is shared by tests; this keeps one test's knob flips and
        counts out of the next.
        """
        with self._lock:
            self.knobs = copy.deepcopy(self._defaults)
            self.requests.clear()
            self.counters.clear()
            self.issued.clear()
            self.refresh_tokens.clear()

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()
            self.counters.clear()
            self.issued.clear()

    # --- tokens ---
    def _self_signed_cert(self) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lifec test token signer")])
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    def sign(self, claims: dict[str, Any]) -> str:
        """An RS256 JWT over claims, with the x5c header docker-registry verifies."""
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        sig = self._key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + b64url(sig)

    def verify(self, token: str) -> Optional[dict[str, Any]]:
        """Claims of a token this server signed and that has not expired, else None."""
        try:
            header_b64, claims_b64, sig_b64 = token.split(".")
            self._key.public_key().verify(
                b64url_decode(sig_b64),
                f"{header_b64}.{claims_b64}".encode("ascii"),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
            claims: dict[str, Any] = json.loads(b64url_decode(claims_b64))
        except Exception:
            return None
        if int(claims.get("exp", 0)) < self.knobs.clock():
            return None
        return claims

    def access_token(
        self, user: Optional[str], service: str, scopes: list[str]
    ) -> tuple[str, dict[str, Any]]:
        """Mint an access token granting what ``_grant`` allows for each requested scope."""
        now = int(time.time())
        access: list[dict[str, Any]] = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None:
                continue
            typ, name, actions = parsed
            granted = self._grant(user, typ, name, actions)
            if granted:
                access.append({"type": typ, "name": name, "actions": granted})
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service,
            "exp": now + self.knobs.expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": access,
        }
        with self._lock:
            self.issued.append(claims)
        return self.sign(claims), claims

    def _grant(self, user: Optional[str], typ: str, name: str, actions: list[str]) -> list[str]:
        if self.knobs.authorize is not None:
            return list(self.knobs.authorize(user, typ, name, actions))
        if user is not None:
            return list(actions)
        if self.knobs.anonymous_pull and typ == "repository":
            return [a for a in actions if a == "pull"]
        return []

    def issue_refresh_token(self, user: str = "refresh-user", service: Optional[str] = None,
                            tenant: str = "test-tenant") -> str:
        """An ACR-style refresh token (a JWT, like ACR's) that the token endpoints will accept."""
        now = int(time.time())
        claims = {
            "jti": secrets.token_hex(12),
            "sub": user,
            "nbf": now - 5,
            "exp": now + self.knobs.refresh_expires_in,
            "iat": now,
            "iss": self.issuer,
            "aud": service or self.service,
            "version": "1.0",
            "grant_type": "refresh_token",
            "tenant": tenant,
        }
        token = self.sign(claims)
        with self._lock:
            self.refresh_tokens[token] = user
        return token

    def revoke_refresh_token(self, token: str) -> None:
        with self._lock:
            self.refresh_tokens.pop(token, None)

    def refresh_user(self, token: str, service: Optional[str]) -> Optional[str]:
        """User behind a refresh token this server knows, if unexpired and for ``service``.

        Tokens a test put into ``refresh_tokens`` by hand may be opaque strings: those are
        accepted as they are; JWTs must carry our signature, a future ``exp`` and ``aud``.
        """
        with self._lock:
            user = self.refresh_tokens.get(token)
        if user is None:
            return None
        if token.count(".") != 2:
            return user
        claims = self.verify(token)
        if claims is None or (service is not None and claims.get("aud") != service):
            return None
        return user

    def count(self, key: str) -> int:
        with self._lock:
            return self.counters[key]

    def _bump(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def _record(self, req: TokenRequest, counter: str) -> None:
        with self._lock:
            self.requests.append(req)
            self.counters[counter] += 1


class _Handler(BaseHTTPRequestHandler):
    token_server: TokenServer
    protocol_version = "HTTP/1.1"
    server_version = "lifec-test-token-server"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Silence stderr access logs; the request log on the server is what tests read."""

    # --- plumbing ---
    def _send_json(self, status: int, body: dict[str, Any],
                   headers: Optional[dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        """Errors in the registry's ``{"errors": [...]}`` shape, which ACR also uses."""
        extra = {}
        if status == 401:
            extra["WWW-Authenticate"] = 'Basic realm="lifec-test-token-server"'
        self._send_json(status, {"errors": [{"code": code, "message": message, "detail": None}]},
                        extra)

    def _basic(self) -> Optional[tuple[str, str]]:
        header = self.headers.get("Authorization", "")
        if not header.lower().startswith("basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:].strip()).decode().partition(":")
        except Exception:
            return None
        return user, password

    def _read_form(self) -> dict[str, list[str]]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode("utf-8", "replace") if length else ""
        return urllib.parse.parse_qs(raw, keep_blank_values=True)

    def _log(self, params: dict[str, list[str]], counter: str) -> None:
        redacted = {k: ([REDACTED] * len(v) if k in SECRET_FIELDS else list(v))
                    for k, v in params.items()}
        path = urllib.parse.urlsplit(self.path).path
        self.token_server._record(
            TokenRequest(self.command, path, redacted, "Authorization" in self.headers), counter
        )

    # --- routes ---
    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query, keep_blank_values=True)
        if split.path != "/oauth2/token":
            self._log(query, "not_found")
            self._error(404, "NOT_FOUND", "no such endpoint")
            return
        self._log(query, "token_get")
        self._token_get(query)

    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        form = self._read_form()
        if path == "/oauth2/exchange":
            self._log(form, "exchange")
            self._exchange(form)
        elif path == "/oauth2/token":
            self._log(form, "token_post")
            if self.token_server.knobs.post_not_found:
                self._error(404, "NOT_FOUND", "POST is not supported here, use GET")
                return
            self._token_post(form)
        else:
            self._log(form, "not_found")
            self._error(404, "NOT_FOUND", "no such endpoint")

    def _exchange(self, form: dict[str, list[str]]) -> None:
        ts = self.token_server
        first = {k: v[0] for k, v in form.items() if v}
        if first.get("grant_type") != "access_token":
            self._error(400, "UNSUPPORTED_GRANT_TYPE", "grant_type must be access_token")
            return
        if not first.get("service"):
            self._error(400, "BAD_REQUEST", "service is required")
            return
        aad = first.get("access_token", "")
        user = ts.knobs.aad_tokens.get(aad)
        if user is None:
            ts._bump("exchange_denied")
            self._error(401, "UNAUTHORIZED", "invalid AAD access token")
            return
        rt = ts.issue_refresh_token(user=user, service=first["service"],
                                    tenant=first.get("tenant") or "test-tenant")
        self._send_json(200, {"refresh_token": rt})

    def _token_post(self, form: dict[str, list[str]]) -> None:
        ts = self.token_server
        first = {k: v[0] for k, v in form.items() if v}
        service = first.get("service", "")
        scopes = split_scopes(form.get("scope", []))
        grant = first.get("grant_type")
        refresh: Optional[str] = None
        if grant == "refresh_token":
            user = ts.refresh_user(first.get("refresh_token", ""), service or None)
            if user is None:
                ts._bump("token_denied")
                self._error(401, "UNAUTHORIZED", "invalid refresh token")
                return
        elif grant == "password":
            user = first.get("username", "")
            if ts.knobs.users.get(user) != first.get("password") or not user:
                ts._bump("token_denied")
                self._error(401, "UNAUTHORIZED", "invalid username or password")
                return
            if first.get("access_type") == "offline":
                refresh = ts.issue_refresh_token(user=user, service=service or None)
        else:
            self._error(400, "UNSUPPORTED_GRANT_TYPE", f"unsupported grant_type {grant!r}")
            return
        token, claims = ts.access_token(user, service, scopes)
        body: dict[str, Any] = {"access_token": token}
        if grant == "password":
            # Docker's OAuth2 answer; ACR's refresh_token grant answers access_token alone.
            body["expires_in"] = ts.knobs.expires_in
            body["scope"] = " ".join(scopes)
            body["issued_at"] = _iso(claims["iat"])
            if refresh:
                body["refresh_token"] = refresh
        self._send_json(200, body)

    def _token_get(self, query: dict[str, list[str]]) -> None:
        ts = self.token_server
        service = (query.get("service") or [""])[0]
        scopes = split_scopes(query.get("scope", []))
        user: Optional[str] = None
        basic = self._basic()
        if basic is not None:
            name, password = basic
            if name == ACR_REFRESH_USER:
                user = ts.refresh_user(password, service or None)
            elif name and ts.knobs.users.get(name) == password:
                user = name
            if user is None:
                ts._bump("token_denied")
                self._error(401, "UNAUTHORIZED", "invalid credentials")
                return
        token, claims = ts.access_token(user, service, scopes)
        body: dict[str, Any] = {
            "token": token,
            "access_token": token,
            "expires_in": ts.knobs.expires_in,
            "issued_at": _iso(claims["iat"]),
        }
        if user is not None and (query.get("offline_token") or [""])[0] == "true":
            body["refresh_token"] = ts.issue_refresh_token(user=user, service=service or None)
        self._send_json(200, body)


def _iso(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace(
        "+00:00", "Z")
