"""A stand-in for Microsoft Entra ID (AAD) and Azure IMDS on loopback, for `.login-acr` tests.

It speaks the wire formats MSAL speaks to the real services, so the mirror's login code is
tested through MSAL itself, pointed here by MSAL's documented settings:

* AAD (HTTPS, a self-signed certificate in ``ca_path``; trust it with ``REQUESTS_CA_BUNDLE``;
  point MSAL at it with ``authority_host``, e.g. through ``AZURE_AUTHORITY_HOST``):
  ``GET /{tenant}/v2.0/.well-known/openid-configuration`` (unknown tenant: 400 AADSTS90002),
  ``POST /{tenant}/oauth2/v2.0/token`` with ``client_credentials`` (a client secret, or a
  certificate's signed ``client_assertion`` JWT, verified here), the device-code grant and the
  ``refresh_token`` grant; ``POST /{tenant}/oauth2/v2.0/devicecode``.
* IMDS (plain HTTP, ``imds_url``; MSAL reads ``AZURE_POD_IDENTITY_AUTHORITY_HOST``):
  ``GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...[&client_id=...]``
  with ``Metadata: true``.

Access tokens are RS256 JWTs with ``tid``/``oid``/``aud`` claims, like AAD's. ``on_issue`` is
called with every access token handed out and its subject: tests hand it to the ACR exchange
stand-in (``TokenServer.aad_tokens``), which then trades it for a refresh token.
"""

from __future__ import annotations

import base64
import copy
import datetime
import hashlib
import ipaddress
import json
import secrets
import shutil
import ssl
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from .ports import LOOPBACK

ACR_RESOURCE = "https://containerregistry.azure.net"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
SECRET_FIELDS = frozenset({"client_secret", "client_assertion", "device_code", "refresh_token", "access_token"})


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def self_signed(common_name: str, *, ip: Optional[str] = None, dns: Optional[list[str]] = None,
                days: int = 2) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A fresh RSA key and a self-signed certificate (with SANs when given)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns or []]
    if ip:
        sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(key, hashes.SHA256())


def pem_of(key: rsa.RSAPrivateKey, cert: x509.Certificate) -> str:
    """Key and certificate in one PEM text (what MSAL and mitmproxy's `certs` want)."""
    return (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()).decode()
        + cert.public_bytes(serialization.Encoding.PEM).decode()
    )


class AadRequest(NamedTuple):
    """One request as the stand-in saw it, secrets replaced by ``<redacted>``."""

    service: str  # "aad" or "imds"
    method: str
    path: str
    params: dict[str, list[str]]


@dataclass
class ServicePrincipal:
    tenant: str
    secret: Optional[str] = None
    certificate: Optional[x509.Certificate] = None


@dataclass
class Knobs:
    """What a test may change; ``reset()`` restores the constructor's."""

    tenants: set[str] = field(default_factory=set)
    service_principals: dict[str, ServicePrincipal] = field(default_factory=dict)
    #: IMDS: whether the VM has a system-assigned identity, and its user-assigned client ids.
    system_identity: bool = True
    user_identities: set[str] = field(default_factory=set)
    #: Device code: how many polls answer authorization_pending before the person "signs in".
    device_pending_polls: int = 1
    device_user: str = "person@example.com"
    device_tenant: Optional[str] = None
    #: Lifetime of access tokens handed out.
    expires_in: int = 3599


class AadStandIn:
    """AAD (HTTPS) and IMDS (HTTP) on two loopback ports; see the module docstring."""

    def __init__(
        self,
        *,
        tenants: Optional[set[str]] = None,
        on_issue: Optional[Callable[[str, str], None]] = None,
    ) -> None:
        self._defaults = Knobs(tenants=set(tenants or {"test-tenant"}))
        self.knobs = copy.deepcopy(self._defaults)
        self.on_issue = on_issue
        self._lock = threading.Lock()
        self.requests: list[AadRequest] = []
        self.issued: list[dict[str, Any]] = []  # claims of every access token handed out
        self._device: dict[str, dict[str, Any]] = {}  # device_code -> state
        self._refresh: dict[str, dict[str, Any]] = {}  # refresh token -> subject info
        self._tmp = Path(tempfile.mkdtemp(prefix="lifec-aad-"))
        self._signing_key, _ = self_signed("lifec test AAD token signer")
        key, cert = self_signed("lifec test AAD", ip=LOOPBACK, dns=["localhost"])
        self.ca_path: Path = self._tmp / "aad-ca.pem"
        self.ca_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        server_pem = self._tmp / "aad-server.pem"
        server_pem.write_text(pem_of(key, cert))

        aad_handler = type("AadHandler", (_AadHandler,), {"stand_in": self})
        self._aad = ThreadingHTTPServer((LOOPBACK, 0), aad_handler)
        self._aad.daemon_threads = True
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(server_pem)
        self._aad.socket = ctx.wrap_socket(self._aad.socket, server_side=True)
        self.aad_port = int(self._aad.server_address[1])
        self.authority_host = f"https://{LOOPBACK}:{self.aad_port}"

        imds_handler = type("ImdsHandler", (_ImdsHandler,), {"stand_in": self})
        self._imds = ThreadingHTTPServer((LOOPBACK, 0), imds_handler)
        self._imds.daemon_threads = True
        self.imds_port = int(self._imds.server_address[1])
        self.imds_url = f"http://{LOOPBACK}:{self.imds_port}"

        self._threads = [
            threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True, name=n)
            for s, n in ((self._aad, "aad-stand-in"), (self._imds, "imds-stand-in"))
        ]
        for t in self._threads:
            t.start()

    # --- lifecycle ---
    def stop(self) -> None:
        for server, thread in zip((self._aad, self._imds), self._threads):
            if thread.is_alive():
                server.shutdown()
                thread.join(timeout=5)
            server.server_close()
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> "AadStandIn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        with self._lock:
            self.knobs = copy.deepcopy(self._defaults)
            self.requests.clear()
            self.issued.clear()
            self._device.clear()
            self._refresh.clear()

    def env(self) -> dict[str, str]:
        """The environment that points MSAL (and `.login-acr`) here, and trusts our certificate."""
        return {
            "AZURE_AUTHORITY_HOST": self.authority_host,
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": self.imds_url,
            "REQUESTS_CA_BUNDLE": str(self.ca_path),
        }

    # --- identities ---
    def add_secret_principal(self, client_id: str, tenant: str = "test-tenant") -> str:
        secret = secrets.token_urlsafe(24)
        self.knobs.service_principals[client_id] = ServicePrincipal(tenant=tenant, secret=secret)
        return secret

    def add_certificate_principal(self, client_id: str, tenant: str = "test-tenant") -> str:
        """Register a certificate credential; returns the PEM (key + certificate) the client holds."""
        key, cert = self_signed(f"sp {client_id}")
        self.knobs.service_principals[client_id] = ServicePrincipal(tenant=tenant, certificate=cert)
        return pem_of(key, cert)

    def count(self, service: str, path_part: str = "") -> int:
        with self._lock:
            return sum(1 for r in self.requests if r.service == service and path_part in r.path)

    # --- tokens ---
    def mint(self, subject: str, tenant: str, resource: str = ACR_RESOURCE, **extra: Any) -> str:
        """An AAD-like access token (RS256 JWT) for `subject`; reported to ``on_issue``."""
        now = int(time.time())
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{tenant}/",
            "iat": now,
            "nbf": now - 5,
            "exp": now + self.knobs.expires_in,
            "tid": tenant,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_URL, subject)),
            "sub": subject,
            "uti": secrets.token_hex(8),
            **extra,
        }
        header = {"typ": "JWT", "alg": "RS256", "kid": "lifec-test"}
        signing_input = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
        sig = self._signing_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        token = signing_input + "." + b64url(sig)
        with self._lock:
            self.issued.append(claims)
        if self.on_issue is not None:
            self.on_issue(token, subject)
        return token

    def _record(self, req: AadRequest) -> None:
        with self._lock:
            self.requests.append(req)


def _aad_error(status: int, error: str, code: int, description: str) -> tuple[int, dict[str, Any]]:
    trace, correlation = str(uuid.uuid4()), str(uuid.uuid4())
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {description}\r\nTrace ID: {trace}\r\n"
                             f"Correlation ID: {correlation}\r\nTimestamp: {stamp}",
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": correlation,
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }


class _Base(BaseHTTPRequestHandler):
    stand_in: AadStandIn
    protocol_version = "HTTP/1.1"
    service = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: tests read ``stand_in.requests``."""

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store, no-cache")
        self.end_headers()
        self.wfile.write(data)

    def _log(self, path: str, params: dict[str, list[str]]) -> None:
        redacted = {k: (["<redacted>"] * len(v) if k in SECRET_FIELDS else list(v)) for k, v in params.items()}
        self.stand_in._record(AadRequest(self.service, self.command, path, redacted))


class _ImdsHandler(_Base):
    service = "imds"

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(split.query)
        self._log(split.path, query)
        si = self.stand_in
        if split.path != "/metadata/identity/oauth2/token":
            self._send_json(404, {"error": "not_found", "error_description": "no such endpoint"})
            return
        if self.headers.get("Metadata", "").lower() != "true":
            self._send_json(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
            return
        if not (query.get("api-version") or [""])[0]:
            self._send_json(400, {"error": "invalid_request", "error_description": "Required query variable 'api-version' is missing"})
            return
        resource = (query.get("resource") or [""])[0]
        if not resource:
            self._send_json(400, {"error": "invalid_request", "error_description": "Required query variable 'resource' is missing"})
            return
        client_id = (query.get("client_id") or [""])[0]
        tenant = next(iter(sorted(si.knobs.tenants)), "test-tenant")
        if client_id:
            if client_id not in si.knobs.user_identities:
                self._send_json(400, {"error": "invalid_request", "error_description": "Identity not found"})
                return
            subject = f"mi:{client_id}"
        else:
            if not si.knobs.system_identity:
                self._send_json(400, {"error": "invalid_request", "error_description": "Identity not found"})
                return
            subject = "mi:system"
        token = si.mint(subject, tenant, resource, appid=client_id or "system-assigned")
        now = int(time.time())
        # IMDS answers numbers as strings.
        self._send_json(200, {
            "access_token": token,
            "client_id": client_id or str(uuid.uuid5(uuid.NAMESPACE_URL, "system")),
            "expires_in": str(si.knobs.expires_in),
            "expires_on": str(now + si.knobs.expires_in),
            "ext_expires_in": str(si.knobs.expires_in),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        })


class _AadHandler(_Base):
    service = "aad"

    def _base(self) -> str:
        return self.stand_in.authority_host

    def _tenant_known(self, tenant: str) -> bool:
        return tenant in self.stand_in.knobs.tenants or tenant in ("organizations", "common")

    def do_GET(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        self._log(split.path, urllib.parse.parse_qs(split.query))
        parts = split.path.strip("/").split("/")
        if len(parts) == 4 and parts[1:] == ["v2.0", ".well-known", "openid-configuration"]:
            tenant = parts[0]
            if not self._tenant_known(tenant):
                status, body = _aad_error(
                    400, "invalid_tenant", 90002,
                    f"Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID "
                    "and are signing into the correct cloud.")
                self._send_json(status, body)
                return
            base = f"{self._base()}/{tenant}"
            issuer_tenant = "{tenantid}" if tenant in ("organizations", "common") else tenant
            self._send_json(200, {
                "token_endpoint": f"{base}/oauth2/v2.0/token",
                "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
                "jwks_uri": f"{base}/discovery/v2.0/keys",
                "response_modes_supported": ["query", "fragment", "form_post"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
                "issuer": f"{self._base()}/{issuer_tenant}/v2.0",
                "request_uri_parameter_supported": False,
                "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
                "end_session_endpoint": f"{base}/oauth2/v2.0/logout",
                "tenant_region_scope": "EU",
                "cloud_instance_name": "microsoftonline.com",
            })
            return
        self._send_json(404, {"error": "not_found", "error_description": "no such endpoint"})

    def do_POST(self) -> None:
        split = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(length).decode() if length else "", keep_blank_values=True)
        self._log(split.path, form)
        first = {k: v[0] for k, v in form.items() if v}
        parts = split.path.strip("/").split("/")
        if len(parts) != 4 or parts[1:3] != ["oauth2", "v2.0"]:
            self._send_json(404, {"error": "not_found", "error_description": "no such endpoint"})
            return
        tenant, endpoint = parts[0], parts[3]
        if not self._tenant_known(tenant):
            status, body = _aad_error(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
            self._send_json(status, body)
            return
        if endpoint == "devicecode":
            self._devicecode(first)
        elif endpoint == "token":
            self._token(tenant, first, f"{self._base()}/{tenant}/oauth2/v2.0/token")
        else:
            self._send_json(404, {"error": "not_found", "error_description": "no such endpoint"})

    # --- token endpoint ---
    def _resource_of(self, scope: str) -> Optional[str]:
        for s in scope.split():
            if s.endswith("/.default"):
                return s[: -len("/.default")]
        return None

    def _token(self, tenant: str, form: dict[str, str], endpoint: str) -> None:
        grant = form.get("grant_type")
        if grant == "client_credentials":
            self._client_credentials(tenant, form, endpoint)
        elif grant == DEVICE_GRANT:
            self._device_token(form)
        elif grant == "refresh_token":
            self._refresh_token(form)
        else:
            status, body = _aad_error(400, "unsupported_grant_type", 70003,
                                      f"The app requested an unsupported grant type '{grant}'.")
            self._send_json(status, body)

    def _client_credentials(self, tenant: str, form: dict[str, str], endpoint: str) -> None:
        si = self.stand_in
        client_id = form.get("client_id", "")
        sp = si.knobs.service_principals.get(client_id)
        if sp is None or sp.tenant != tenant:
            status, body = _aad_error(
                400, "unauthorized_client", 700016,
                f"Application with identifier '{client_id}' was not found in the directory '{tenant}'. "
                "This can happen if the application has not been installed by the administrator of the "
                "tenant or consented to by any user in the tenant.")
            self._send_json(status, body)
            return
        if sp.secret is not None:
            if form.get("client_secret") != sp.secret:
                status, body = _aad_error(401, "invalid_client", 7000215,
                                          "Invalid client secret provided. Ensure the secret being sent in "
                                          "the request is the client secret value, not the client secret ID.")
                self._send_json(status, body)
                return
        else:
            assert sp.certificate is not None
            problem = self._check_assertion(form, client_id, endpoint, sp.certificate)
            if problem:
                status, body = _aad_error(401, "invalid_client", 700027, problem)
                self._send_json(status, body)
                return
        resource = self._resource_of(form.get("scope", ""))
        if resource is None:
            status, body = _aad_error(400, "invalid_scope", 1002012,
                                      "The provided value for scope is not valid. Client credential flows "
                                      "must have a scope value with /.default suffixed to the resource identifier.")
            self._send_json(status, body)
            return
        token = si.mint(f"sp:{client_id}", tenant, resource, appid=client_id)
        self._send_json(200, {"token_type": "Bearer", "expires_in": si.knobs.expires_in,
                              "ext_expires_in": si.knobs.expires_in, "access_token": token})

    @staticmethod
    def _check_assertion(form: dict[str, str], client_id: str, endpoint: str,
                         cert: x509.Certificate) -> Optional[str]:
        """Verify a certificate credential's client_assertion the way AAD does; None if good."""
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            return "Client assertion type is missing or invalid."
        assertion = form.get("client_assertion", "")
        try:
            h64, c64, s64 = assertion.split(".")
            header = json.loads(b64url_decode(h64))
            claims = json.loads(b64url_decode(c64))
            sig = b64url_decode(s64)
        except Exception:
            return "Client assertion is not a JWT."
        der = cert.public_bytes(serialization.Encoding.DER)
        if "x5t#S256" in header:
            # MSAL pads the base64url value; AAD accepts it either way.
            if str(header["x5t#S256"]).rstrip("=") != b64url(hashlib.sha256(der).digest()):
                return "Client assertion contains an invalid thumbprint (x5t#S256)."
        elif str(header.get("x5t")).rstrip("=") != b64url(hashlib.sha1(der).digest()):
            return "Client assertion contains an invalid thumbprint (x5t)."
        alg = header.get("alg")
        key = cert.public_key()
        data = f"{h64}.{c64}".encode()
        try:
            if alg == "PS256":
                key.verify(sig, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
            elif alg == "RS256":
                key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
            else:
                return f"Client assertion algorithm '{alg}' is not supported."
        except InvalidSignature:
            return "Client assertion failed signature validation."
        if claims.get("aud") != endpoint:
            return f"The audience claim value is invalid '{claims.get('aud')}'."
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return "Client assertion issuer and subject must be the client id."
        if float(claims.get("exp", 0)) < time.time():
            return "Client assertion is expired."
        return None

    # --- device code ---
    def _devicecode(self, form: dict[str, str]) -> None:
        si = self.stand_in
        resource = self._resource_of(form.get("scope", ""))
        if not form.get("client_id") or resource is None:
            status, body = _aad_error(400, "invalid_request", 900144, "The request body must contain client_id and scope.")
            self._send_json(status, body)
            return
        device_code = secrets.token_urlsafe(32)
        user_code = "".join(secrets.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(9))
        with si._lock:
            si._device[device_code] = {"client_id": form["client_id"], "resource": resource, "polls": 0,
                                       "user_code": user_code}
        self._send_json(200, {
            "user_code": user_code,
            "device_code": device_code,
            "verification_uri": "https://microsoft.com/devicelogin",
            "expires_in": 900,
            "interval": 1,
            "message": "To sign in, use a web browser to open the page https://microsoft.com/devicelogin "
                       f"and enter the code {user_code} to authenticate.",
        })

    def _device_token(self, form: dict[str, str]) -> None:
        si = self.stand_in
        with si._lock:
            state = si._device.get(form.get("device_code", ""))
            if state is not None:
                state["polls"] += 1
        if state is None or state["client_id"] != form.get("client_id"):
            status, body = _aad_error(400, "invalid_grant", 70000, "The provided value for the 'device_code' is not valid.")
            self._send_json(status, body)
            return
        if state["polls"] <= si.knobs.device_pending_polls:
            status, body = _aad_error(400, "authorization_pending", 70016,
                                      "OAuth 2.0 device flow error. Authorization is pending. Continue polling.")
            self._send_json(status, body)
            return
        with si._lock:
            si._device.pop(form.get("device_code", ""), None)
        self._user_tokens(state["client_id"], state["resource"])

    def _refresh_token(self, form: dict[str, str]) -> None:
        si = self.stand_in
        with si._lock:
            state = si._refresh.get(form.get("refresh_token", ""))
        if state is None or state["client_id"] != form.get("client_id"):
            status, body = _aad_error(400, "invalid_grant", 70008, "The provided refresh token has expired or is invalid.")
            self._send_json(status, body)
            return
        resource = self._resource_of(form.get("scope", "")) or state["resource"]
        self._user_tokens(state["client_id"], resource)

    def _user_tokens(self, client_id: str, resource: str) -> None:
        """Tokens for the person of a device-code sign-in: access, refresh and id token."""
        si = self.stand_in
        tenant = si.knobs.device_tenant or next(iter(sorted(si.knobs.tenants)), "test-tenant")
        user = si.knobs.device_user
        oid = str(uuid.uuid5(uuid.NAMESPACE_URL, user))
        token = si.mint(f"user:{user}", tenant, resource, upn=user)
        refresh = secrets.token_urlsafe(48)
        with si._lock:
            si._refresh[refresh] = {"client_id": client_id, "resource": resource}
        now = int(time.time())
        id_claims = {"aud": client_id, "iss": f"{si.authority_host}/{tenant}/v2.0", "iat": now, "nbf": now,
                     "exp": now + 3600, "name": "Test Person", "oid": oid, "preferred_username": user,
                     "sub": oid, "tid": tenant, "ver": "2.0"}
        id_token = b64url(b'{"typ":"JWT","alg":"none"}') + "." + b64url(json.dumps(id_claims).encode()) + "."
        self._send_json(200, {
            "token_type": "Bearer",
            "scope": f"{resource}/.default",
            "expires_in": si.knobs.expires_in,
            "ext_expires_in": si.knobs.expires_in,
            "access_token": token,
            "refresh_token": refresh,
            "id_token": id_token,
            "client_info": b64url(json.dumps({"uid": oid, "utid": tenant}).encode()),
        })
