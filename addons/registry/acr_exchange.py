"""ACR's exchange of an AAD access token for a registry refresh token (`/oauth2/exchange`).

The exchange follows the Azure CLI: `GET /v2/` on the registry names the token realm and
service; `POST <realm host>/oauth2/exchange` with `grant_type=access_token` returns the refresh
token. No token or secret is ever logged or put into an error message.
"""

from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field

import requests

from addons.registry.aad import AadToken, LoginError, _aad_error, _first_line
from addons.registry.auth import jwt_expiry
from addons.registry.oci import Upstream, parse_challenge

#: An ACR refresh token whose expiry cannot be read is assumed to live this long (ACR: 3 h).
DEFAULT_REFRESH_LIFETIME = 3 * 3600.0


@dataclass
class RefreshToken:
    value: str = field(repr=False)
    expires_at: float
    registry: str
    source: str
    tenant: str | None


def _registry_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False  # like the mirror's own session: proxy variables do not reroute registry traffic
    return s


def exchange_endpoint(registry: Upstream, session: requests.Session, timeout: float = 10.0) -> tuple[str, str]:
    """(exchange URL, service) from the registry's `/v2/` challenge, as the Azure CLI finds them."""
    try:
        resp = session.get(registry.url("/v2/"), timeout=timeout, allow_redirects=False)
        resp.close()
    except requests.Timeout:
        raise LoginError(f"cannot reach {registry.base_url}: timed out") from None
    except requests.ConnectionError:
        raise LoginError(f"cannot reach {registry.base_url}: connection refused") from None
    except requests.RequestException as e:
        raise LoginError(f"cannot reach {registry.base_url}: {type(e).__name__}") from None
    default = (registry.url("/oauth2/exchange"), registry.host)
    header = resp.headers.get("WWW-Authenticate", "")
    if resp.status_code != 401 or not header:
        return default
    try:
        challenges = parse_challenge(header)
    except ValueError:
        return default
    bearer = next((c for c in challenges if c.scheme == "bearer" and c.realm), None)
    if bearer is None:
        return default
    realm = urllib.parse.urlsplit(bearer.realm or "")
    if realm.scheme not in ("http", "https") or not realm.netloc:
        return default
    return f"{realm.scheme}://{realm.netloc}/oauth2/exchange", bearer.service or registry.host


def exchange(
    registry: Upstream,
    token: AadToken,
    session: requests.Session | None = None,
    timeout: float = 30.0,
) -> RefreshToken:
    """Trade an AAD access token for an ACR refresh token at the registry's `/oauth2/exchange`."""
    session = session or _registry_session()
    url, service = exchange_endpoint(registry, session, min(timeout, 10.0))
    form = {"grant_type": "access_token", "service": service, "access_token": token.value}
    if token.tenant:
        form["tenant"] = token.tenant
    try:
        resp = session.post(url, data=form, timeout=timeout, allow_redirects=False)
    except requests.Timeout:
        raise LoginError(f"{registry.host}: the exchange at {url} timed out") from None
    except requests.RequestException:
        raise LoginError(f"{registry.host}: cannot reach the exchange at {url}") from None
    if resp.status_code != 200:
        raise LoginError(f"{registry.host} refused the exchange of the AAD token of {token.source}: {_registry_error(resp)}")
    try:
        refresh = resp.json()["refresh_token"]
        if not isinstance(refresh, str) or not refresh or any(c.isspace() for c in refresh):
            raise ValueError
    except (ValueError, KeyError, TypeError):
        raise LoginError(f"{registry.host}: the exchange answered without a refresh_token") from None
    expires_at = jwt_expiry(refresh) or time.time() + DEFAULT_REFRESH_LIFETIME
    return RefreshToken(refresh, expires_at, registry.host, token.source, token.tenant)


def _registry_error(resp: requests.Response) -> str:
    """`STATUS CODE: message` from the registry's error JSON, never echoing anything else."""
    detail = ""
    try:
        body = resp.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code"), errors[0].get("message")
            detail = " ".join(str(p) for p in (code, message) if p)
        elif isinstance(body, dict) and body.get("error"):
            detail = _aad_error(body)
    except ValueError:
        pass
    return f"{resp.status_code}{': ' + _first_line(detail) if detail else ''}"
