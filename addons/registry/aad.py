"""Microsoft Entra ID (AAD) access tokens for ACR (addons.registry.acr_exchange trades one for a refresh token).

Where the node's identity comes from, in the order `.login-acr` tries them when none is named
(`: .identity auto`):

1. a service principal in the environment: AZURE_CLIENT_ID, AZURE_TENANT_ID and
   AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH (azure-identity's names), or in the file
   that `: .credentials FILE` names;
2. AKS's cloud-provider file `/etc/kubernetes/azure.json` (AZURE_CREDENTIAL_FILE or
   `: .azure_json PATH` names another): its managed identity or service principal;
3. the Azure CLI, when `az` is on PATH (`az account get-access-token --resource ...`);
4. the machine's managed identity through IMDS (AZURE_CLIENT_ID or `: .client_id` picks a
   user-assigned one).

Device code (`: .identity device`) is for a person at a terminal and is never chosen by itself.
Everything goes through MSAL with its documented settings: `authority` (AZURE_AUTHORITY_HOST or
`: .authority` overrides login.microsoftonline.com), `instance_discovery=False`, and for IMDS
MSAL's own AZURE_POD_IDENTITY_AUTHORITY_HOST. MSAL's token cache is kept, owner-only, in the
work folder so that a device-code sign-in is refreshed without asking the person again.

No token or secret is ever logged or put into an error message.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msal
import requests

from addons.core.files import write_private
from addons.registry.auth import insecure_permissions, jwt_claims

logger = logging.getLogger(__name__)

ACR_RESOURCE = "https://containerregistry.azure.net"
DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
#: The Azure CLI's public client: what a device-code sign-in uses unless `: .client_id` says else.
AZURE_CLI_CLIENT_ID = "04b07795-8ddb-461a-bbee-02f9e1bf7b46"
AKS_AZURE_JSON = "/etc/kubernetes/azure.json"
DEFAULT_IMDS = "http://169.254.169.254"

IDENTITIES = ("auto", "managed", "aks", "service-principal", "az", "device")
_CLOUD_AUTHORITIES = {
    "azurepubliccloud": "https://login.microsoftonline.com",
    "azurechinacloud": "https://login.chinacloudapi.cn",
    "azureusgovernmentcloud": "https://login.microsoftonline.us",
    "azureusgovernment": "https://login.microsoftonline.us",
}
#: AADSTS codes that mean the identity lives in another tenant (or the tenant does not exist).
_WRONG_TENANT_CODES = {90002, 90023, 900023, 700016}


class LoginError(Exception):
    """Why no ACR refresh token could be had: one line, naming the missing piece."""


class _Unreachable(LoginError):
    """The identity source did not answer at all (no IMDS on this machine)."""


@dataclass(frozen=True)
class Identity:
    """How to find the identity, from `.login-acr`'s attribute lines; None means 'look around'."""

    kind: str = "auto"
    tenant: str | None = None
    client_id: str | None = None
    credentials: Path | None = None
    azure_json: Path | None = None
    authority: str | None = None


@dataclass
class AadToken:
    value: str = field(repr=False)
    expires_at: float
    tenant: str | None
    #: Which identity this is, for the log and /status: never a secret.
    source: str


@dataclass(frozen=True)
class _ServicePrincipal:
    client_id: str
    tenant: str
    secret: str | None = field(default=None, repr=False)
    certificate: Path | None = None
    certificate_password: str | None = field(default=None, repr=False)
    authority: str | None = None
    origin: str = "the environment"


def _first_line(text: Any, limit: int = 200) -> str:
    lines = str(text or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _aad_error(result: Mapping[str, Any]) -> str:
    """`error: first line of error_description` of an AAD/IMDS error answer."""
    desc = _first_line(result.get("error_description"))
    return f"{result.get('error', 'error')}: {desc}" if desc else str(result.get("error", "error"))


def _wrong_tenant(result: Mapping[str, Any]) -> bool:
    codes = result.get("error_codes") or []
    return any(c in _WRONG_TENANT_CODES for c in codes if isinstance(c, int)) or result.get("error") == "invalid_tenant"


def _msal_failure(failure: Exception | Mapping[str, Any], who: str, host: str, tenant: str) -> LoginError:
    """
    One line for what an MSAL sign-in raised (a network or authority error) or answered instead
    of a token; `who` names the identity that signed in. Never carries a secret: AAD's own
    `error_description` names codes, not credentials.
    """
    if isinstance(failure, requests.RequestException):
        return LoginError(f"{who}: cannot reach {host} ({type(failure).__name__})")
    if isinstance(failure, Exception):
        if "authority" in str(failure).lower() or "tenant" in str(failure).lower():
            return LoginError(f"wrong tenant: {host} does not know tenant '{tenant}' ({who})")
        return LoginError(f"{who}: {_first_line(failure)}")
    if _wrong_tenant(failure):
        return LoginError(f"wrong tenant: {who} is not in tenant '{tenant}': {_aad_error(failure)}")
    return LoginError(f"{who}: AAD refused: {_aad_error(failure)}")


class _Session(requests.Session):
    """MSAL's HTTP client with a timeout on every request (MSAL sets none of its own)."""

    def __init__(self, timeout: tuple[float, float]) -> None:
        super().__init__()
        self.default_timeout = timeout

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.default_timeout)
        return super().request(method, url, **kwargs)


class AadClient:
    """Acquires AAD tokens for one `.login-acr` step; kept across refreshes by the mirror."""

    def __init__(
        self,
        identity: Identity,
        *,
        env: Mapping[str, str] | None = None,
        cache_path: Path | None = None,
        prompt: Callable[[str], None] | None = None,
        timeout: tuple[float, float] = (3.0, 30.0),
        resource: str = ACR_RESOURCE,
    ) -> None:
        self.identity = identity
        self.env = os.environ if env is None else env
        self.cache_path = cache_path
        self.prompt = prompt or (lambda message: print(message, file=sys.stderr, flush=True))
        self.timeout = timeout
        self.resource = resource
        self._session: _Session | None = None
        self._cache: msal.SerializableTokenCache | None = None
        self._apps: dict[tuple[str, ...], Any] = {}

    # -- plumbing ---------------------------------------------------------------

    @property
    def session(self) -> _Session:
        if self._session is None:
            self._session = _Session(self.timeout)
        return self._session

    @property
    def scope(self) -> str:
        return self.resource.rstrip("/") + "/.default"

    def _env(self, name: str) -> str | None:
        value = self.env.get(name)
        return value.strip() if value and value.strip() else None

    def authority_host(self, override: str | None = None) -> str:
        host = override or self.identity.authority or self._env("AZURE_AUTHORITY_HOST") or DEFAULT_AUTHORITY_HOST
        host = host.rstrip("/")
        if "://" not in host:
            host = "https://" + host
        return host

    def cache(self) -> msal.SerializableTokenCache:
        if self._cache is None:
            self._cache = msal.SerializableTokenCache()
            if self.cache_path is not None:
                try:
                    self._cache.deserialize(self.cache_path.read_text())
                except FileNotFoundError:
                    pass
                except (OSError, ValueError):
                    logger.warning("ignoring an unreadable MSAL cache %s", self.cache_path)
        return self._cache

    def _save_cache(self) -> None:
        if self._cache is None or self.cache_path is None or not self._cache.has_state_changed:
            return
        try:
            write_private(self.cache_path, self._cache.serialize())
            self._cache.has_state_changed = False
        except OSError as e:
            logger.warning("cannot save the MSAL cache %s: %s", self.cache_path, e.strerror)

    def _token(self, result: Mapping[str, Any], source: str, tenant: str | None) -> AadToken:
        value = result["access_token"]
        claims = jwt_claims(value)
        expires_in = result.get("expires_in")
        expires_at = time.time() + float(expires_in) if expires_in else float(claims.get("exp") or time.time() + 3600)
        tid = claims.get("tid") if isinstance(claims.get("tid"), str) else None
        return AadToken(value, expires_at, tid or tenant, source)

    # -- choosing ---------------------------------------------------------------

    def acquire(self) -> AadToken:
        kind = self.identity.kind
        try:
            if kind == "auto":
                return self._auto()
            if kind == "managed":
                return self._managed(self.identity.client_id or self._env("AZURE_CLIENT_ID"))
            if kind == "aks":
                return self._aks(required=True)  # type: ignore[return-value]
            if kind == "service-principal":
                sp = self._service_principal(required=True)
                assert sp is not None
                return self._client_credentials(sp)
            if kind == "az":
                return self._azure_cli(required=True)  # type: ignore[return-value]
            if kind == "device":
                return self._device_code()
            raise LoginError(f"unknown identity '{kind}' (known: {', '.join(IDENTITIES)})")
        finally:
            self._save_cache()

    def _auto(self) -> AadToken:
        """The first identity this machine has; without any, one line per identity tried and why not."""
        tried: list[str] = []
        try:
            sp = self._service_principal(required=True)
        except LoginError as e:
            if self.identity.credentials is not None:
                raise
            tried.append(f"service principal: {str(e).removeprefix('no service principal: ')}")
        else:
            assert sp is not None
            return self._client_credentials(sp)
        token = self._aks(required=False)
        if token is not None:
            return token
        tried.append(f"AKS: {self._azure_json_path()} does not exist")
        token = self._azure_cli(required=False)
        if token is not None:
            return token
        tried.append("Azure CLI: no 'az' on PATH")
        client_id = self.identity.client_id or self._env("AZURE_CLIENT_ID")
        try:
            return self._managed(client_id)
        except _Unreachable as e:
            tried.append(f"managed identity: {e}")
        lines = "".join(f"\n  {line}" for line in tried)
        raise LoginError(
            "no identity: none of these applies on this machine (add ': .identity device' under "
            f".login-acr to sign in at a terminal):{lines}"
        )

    # -- managed identity (IMDS) ------------------------------------------------

    def _managed(self, client_id: str | None, origin: str = "") -> AadToken:
        imds = (os.environ.get("AZURE_POD_IDENTITY_AUTHORITY_HOST") or DEFAULT_IMDS).rstrip("/")
        who = f"managed identity {client_id}" if client_id else "system-assigned managed identity"
        mi: Any = (
            msal.UserAssignedManagedIdentity(client_id=client_id) if client_id else msal.SystemAssignedManagedIdentity()
        )
        app = msal.ManagedIdentityClient(mi, http_client=self.session, token_cache=self.cache())
        try:
            # MSAL reads the IMDS address (AZURE_POD_IDENTITY_AUTHORITY_HOST) from the process environment.
            result = app.acquire_token_for_client(resource=self.resource)
        except requests.Timeout:
            raise _Unreachable(f"no managed identity at IMDS {imds} (timed out)") from None
        except requests.ConnectionError:
            raise _Unreachable(f"no managed identity at IMDS {imds} (connection refused)") from None
        except (requests.RequestException, ValueError) as e:
            raise LoginError(f"{who}: IMDS {imds} answered unexpectedly ({type(e).__name__})") from None
        if "access_token" not in result:
            raise LoginError(f"{who}{origin}: IMDS refused: {_aad_error(result)}")
        return self._token(result, who + origin, None)

    # -- service principals -----------------------------------------------------

    def _service_principal(self, required: bool) -> _ServicePrincipal | None:
        if self.identity.credentials is not None:
            return self._sp_from_file(self.identity.credentials)
        client_id = self._env("AZURE_CLIENT_ID")
        tenant = self.identity.tenant or self._env("AZURE_TENANT_ID")
        secret = self._env("AZURE_CLIENT_SECRET")
        cert = self._env("AZURE_CLIENT_CERTIFICATE_PATH")
        if client_id and tenant and (secret or cert):
            return _ServicePrincipal(
                client_id=client_id,
                tenant=tenant,
                secret=None if cert else secret,
                certificate=Path(cert) if cert else None,
                certificate_password=self._env("AZURE_CLIENT_CERTIFICATE_PASSWORD"),
            )
        if not required:
            return None
        missing = [
            name
            for name, value in (
                ("AZURE_CLIENT_ID", client_id),
                ("AZURE_TENANT_ID (or ': .tenant')", tenant),
                ("AZURE_CLIENT_SECRET or AZURE_CLIENT_CERTIFICATE_PATH", secret or cert),
            )
            if not value
        ]
        raise LoginError(f"no service principal: {', '.join(missing)} not set (or name a file with ': .credentials FILE')")

    def _sp_from_file(self, path: Path) -> _ServicePrincipal:
        """A JSON file as `az ad sp create-for-rbac` prints it, or with azure.json's key names."""
        data = self._read_json(path, "service principal file")
        if insecure_permissions(path):
            logger.warning("%s holds a secret and is readable by group or others: chmod 600 it", path)

        def pick(*keys: str) -> str | None:
            for k in keys:
                v = data.get(k)
                if isinstance(v, str) and v.strip():
                    return v.strip()
            return None

        client_id = pick("appId", "clientId", "aadClientId")
        tenant = self.identity.tenant or pick("tenant", "tenantId")
        secret = pick("password", "clientSecret", "aadClientSecret")
        cert = pick("certificatePath", "clientCertificatePath", "aadClientCertPath")
        missing = [n for n, v in (("appId", client_id), ("tenant", tenant), ("password or certificatePath", secret or cert)) if not v]
        if missing:
            raise LoginError(f"service principal file {path} lacks {', '.join(missing)}")
        assert client_id and tenant
        cert_path = Path(cert) if cert else None
        if cert_path is not None and not cert_path.is_absolute():
            cert_path = path.parent / cert_path
        return _ServicePrincipal(
            client_id=client_id,
            tenant=tenant,
            secret=None if cert_path else secret,
            certificate=cert_path,
            certificate_password=pick("certificatePassword", "aadClientCertPassword"),
            origin=str(path),
        )

    def _credential(self, sp: _ServicePrincipal) -> Any:
        if sp.certificate is None:
            return sp.secret
        try:
            pem = sp.certificate.read_text()
        except (OSError, UnicodeDecodeError):
            raise LoginError(f"service principal {sp.client_id}: cannot read certificate {sp.certificate}") from None
        if "PRIVATE KEY-----" not in pem or "CERTIFICATE-----" not in pem:
            raise LoginError(
                f"service principal {sp.client_id}: {sp.certificate} must hold the private key and the certificate (PEM)"
            )
        start = pem.index("-----BEGIN CERTIFICATE-----")
        cred: dict[str, Any] = {"private_key": pem, "public_certificate": pem[start:]}
        if sp.certificate_password:
            cred["passphrase"] = sp.certificate_password
        return cred

    def _client_credentials(self, sp: _ServicePrincipal) -> AadToken:
        host = self.authority_host(sp.authority)
        authority = f"{host}/{sp.tenant}"
        how = "certificate" if sp.certificate else "secret"
        who = f"service principal {sp.client_id} ({how} from {sp.origin})"
        key = ("sp", sp.client_id, authority, how)
        try:
            app = self._apps.get(key)
            if app is None:
                app = msal.ConfidentialClientApplication(
                    sp.client_id,
                    client_credential=self._credential(sp),
                    authority=authority,
                    http_client=self.session,
                    token_cache=self.cache(),
                    instance_discovery=False,
                )
                self._apps[key] = app
            result = app.acquire_token_for_client(scopes=[self.scope])
        except (requests.RequestException, ValueError) as e:
            raise _msal_failure(e, who, host, sp.tenant) from None
        if "access_token" not in result:
            raise _msal_failure(result, who, host, sp.tenant)
        return self._token(result, f"service principal {sp.client_id}", sp.tenant)

    # -- AKS ------------------------------------------------------------------------

    def _azure_json_path(self) -> Path:
        return self.identity.azure_json or Path(self._env("AZURE_CREDENTIAL_FILE") or AKS_AZURE_JSON)

    def _aks(self, required: bool) -> AadToken | None:
        path = self._azure_json_path()
        if not path.is_file():
            if required:
                raise LoginError(f"no AKS identity: {path} does not exist")
            return None
        data = self._read_json(path, "AKS cloud config")
        host = _CLOUD_AUTHORITIES.get(str(data.get("cloud", "")).lower())
        client_id = str(data.get("aadClientId") or "")
        secret = str(data.get("aadClientSecret") or "")
        if data.get("useManagedIdentityExtension") or client_id.lower() == "msi":
            mi_client = str(data.get("userAssignedIdentityID") or "") or self.identity.client_id
            return self._managed(mi_client or None, origin=f" (from {path})")
        tenant = self.identity.tenant or str(data.get("tenantId") or "")
        cert = str(data.get("aadClientCertPath") or "")
        if not client_id or not tenant or not (secret or cert):
            raise LoginError(f"{path} names neither a managed identity nor a service principal (aadClientId, tenantId, aadClientSecret)")
        return self._client_credentials(
            _ServicePrincipal(
                client_id=client_id,
                tenant=tenant,
                secret=None if cert else secret,
                certificate=Path(cert) if cert else None,
                certificate_password=str(data.get("aadClientCertPassword") or "") or None,
                authority=None if (self.identity.authority or self._env("AZURE_AUTHORITY_HOST")) else host,
                origin=str(path),
            )
        )

    @staticmethod
    def _read_json(path: Path, what: str) -> dict[str, Any]:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise LoginError(f"no {what}: {path} does not exist") from None
        except (OSError, UnicodeDecodeError):
            raise LoginError(f"cannot read {what} {path}") from None
        except ValueError:
            raise LoginError(f"{what} {path} is not valid JSON") from None
        if not isinstance(data, dict):
            raise LoginError(f"{what} {path} is not a JSON object")
        return data

    # -- Azure CLI ------------------------------------------------------------------

    def _azure_cli(self, required: bool) -> AadToken | None:
        az = shutil.which("az", path=self.env.get("PATH"))
        if az is None:
            if required:
                raise LoginError("no 'az': the Azure CLI is not installed (not on PATH)")
            return None
        argv = [az, "account", "get-access-token", "--resource", self.resource, "--output", "json"]
        if self.identity.tenant:
            argv += ["--tenant", self.identity.tenant]
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, timeout=120, env=dict(self.env), stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            raise LoginError("az account get-access-token timed out") from None
        except OSError as e:
            raise LoginError(f"cannot run {az}: {e.strerror}") from None
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            errors = [line for line in lines if line.startswith("ERROR")] or lines
            reason = _first_line(errors[0] if errors else f"exit status {done.returncode}")
            raise LoginError(f"az account get-access-token failed: {reason}")
        try:
            data = json.loads(done.stdout)
            value = data["accessToken"]
            if not isinstance(value, str) or not value:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise LoginError("az account get-access-token printed no accessToken") from None
        expires_at: float | None = None
        if isinstance(data.get("expires_on"), (int, float)) or str(data.get("expires_on", "")).isdigit():
            expires_at = float(data["expires_on"])
        elif isinstance(data.get("expiresOn"), str):
            try:
                expires_at = datetime.datetime.strptime(data["expiresOn"], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            except ValueError:
                expires_at = None
        claims = jwt_claims(value)
        tenant = data.get("tenant") if isinstance(data.get("tenant"), str) else None
        return AadToken(
            value,
            expires_at or float(claims.get("exp") or time.time() + 3600),
            tenant or (claims.get("tid") if isinstance(claims.get("tid"), str) else None),
            "Azure CLI",
        )

    # -- device code ------------------------------------------------------------------

    def _device_code(self) -> AadToken:
        host = self.authority_host()
        tenant = self.identity.tenant or self._env("AZURE_TENANT_ID") or "organizations"
        authority = f"{host}/{tenant}"
        client_id = self.identity.client_id or AZURE_CLI_CLIENT_ID
        key = ("device", client_id, authority)
        try:
            app = self._apps.get(key)
            if app is None:
                app = msal.PublicClientApplication(
                    client_id,
                    authority=authority,
                    http_client=self.session,
                    token_cache=self.cache(),
                    instance_discovery=False,
                )
                self._apps[key] = app
            for account in app.get_accounts():
                result = app.acquire_token_silent([self.scope], account=account)
                if result and "access_token" in result:
                    return self._token(result, f"device code sign-in ({account.get('username') or 'cached'})", tenant)
            flow = app.initiate_device_flow(scopes=[self.scope])
            if "user_code" not in flow:
                raise LoginError(f"device code: AAD refused to start a sign-in: {_aad_error(flow)}")
            self.prompt(flow.get("message") or f"open {flow.get('verification_uri')} and enter {flow['user_code']}")
            result = app.acquire_token_by_device_flow(flow)
        except (requests.RequestException, ValueError) as e:
            raise _msal_failure(e, "device code sign-in", host, tenant) from None
        if "access_token" not in result:
            raise _msal_failure(result, "device code sign-in", host, tenant)
        who = (result.get("id_token_claims") or {}).get("preferred_username") or "a person"
        return self._token(result, f"device code sign-in ({who})", tenant if tenant not in ("organizations", "common") else None)
