"""`.login-acr` and `.install`: every way to an AAD token, the ACR exchange, the files
it writes, the refresh while the mirror runs, and one clear line for each missing piece.

MSAL itself does the talking, pointed at a loopback stand-in for AAD and IMDS
(tests/harness/aad.py) through its documented settings (`authority`, `instance_discovery=False`,
AZURE_POD_IDENTITY_AUTHORITY_HOST, REQUESTS_CA_BUNDLE for the stand-in's certificate). The ACR
side is the harness token server behind a real docker-registry: `.login-acr` finds the exchange
from the registry's own 401 challenge, as the Azure CLI does, and the refresh token it gets is
then checked against that registry.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from addons.registry import aad as aadmod
from addons import catalog
from addons.node.install import Install
from addons.registry.auth import jwt_expiry
from addons.node.login_acr import LoginAcr, LoginRefresh, meta_path, read_meta, refresh_due
from addons.runmd.syntax import RunmdError
from addons.runmd.runtime import Runtime, StepError
from tests.harness.aad import AadStandIn
from tests.harness.images import ACCEPT_ALL_MANIFESTS, make_image, push_image
from tests.harness.loglines import parse
from tests.harness.mirror import Mirror
from tests.harness.ports import ClosedPort
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

ACR = str(Path(sys.executable).with_name("acr"))
#: Variables that would steer the login elsewhere if the machine running the tests had them.
AZURE_VARS = (
    "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_AUTHORITY_HOST", "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_CREDENTIAL_FILE", "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET",
)


# --- helpers -------------------------------------------------------------------------------


def runmd(registry: str, login: str = "", *, extra: str = "", install: bool = False) -> str:
    """A runtime block: `.login-acr REGISTRY` with attribute lines `login`, then `.mirror`."""
    lines = ["``` start mirror", "+ .runtime", f": .login-acr    {registry}"]
    lines += [f":   {line.strip()}" for line in login.strip().splitlines() if line.strip()]
    if install:
        lines.append(": .install      access_token")
    if extra:
        lines += extra.strip().splitlines()
    lines += ["```", ""]
    return "\n".join(lines)


def login(home: Path, text: str) -> dict[str, Any]:
    """Run the runtime steps of `text` in `home`; return the meta file it wrote."""
    compiled = catalog.parse_text(text, str(home / "mirror.runmd"))
    Runtime.for_document(compiled).run()
    meta = read_meta(home / ".work")
    assert meta is not None
    return meta


def login_error(home: Path, text: str, lines: int = 1) -> str:
    """Run the steps, expecting a StepError: return its message, checked to be `lines` lines."""
    compiled = catalog.parse_text(text, str(home / "mirror.runmd"))
    with pytest.raises(StepError) as info:
        Runtime.for_document(compiled).run()
    message = str(info.value)
    assert len(message.splitlines()) == lines and "\r" not in message, message
    assert "Traceback" not in message
    assert not (home / "access_token").exists()
    return message


def refresh_token_of(home: Path) -> str:
    return (home / "access_token").read_text().strip()


def assert_accepted(token_server: TokenServer, token_registry: Registry, home: Path, subject: str) -> str:
    """The refresh token written is one the registry's token service knows, for that subject."""
    token = refresh_token_of(home)
    assert token_server.refresh_user(token, token_registry.host) == subject
    return token


def fake_az(bin_dir: Path, payload: Optional[dict[str, Any]] = None, *, error: str = "", status: int = 0) -> Path:
    """An `az` on PATH that answers `account get-access-token` like the Azure CLI, and logs its args."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "az.args"
    out = bin_dir / "az.json"
    out.write_text(json.dumps(payload or {}))
    script = bin_dir / "az"
    body = f'echo "{error}" >&2; exit {status}' if status else f'/bin/cat "{out}"'
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'case "$*" in\n'
        f'  "account get-access-token --resource {aadmod.ACR_RESOURCE} --output json"*) {body} ;;\n'
        '  *) echo "ERROR: unexpected arguments: $*" >&2; exit 2 ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return script


def az_payload(stand_in: AadStandIn, subject: str = "user:az@example.com", tenant: str = "test-tenant") -> dict[str, Any]:
    token = stand_in.mint(subject, tenant)
    expires = int(time.time()) + 3600
    return {
        "accessToken": token,
        "expiresOn": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.localtime(expires)),
        "expires_on": expires,
        "subscription": "00000000-0000-0000-0000-00000000cafe",
        "tenant": tenant,
        "tokenType": "Bearer",
    }


@pytest.fixture
def azure(monkeypatch: pytest.MonkeyPatch, aad: AadStandIn, tmp_path: Path) -> AadStandIn:
    """A clean Azure environment pointing at the stand-in: no identity unless a test adds one,
    no `az` on PATH, no azure.json."""
    for name in AZURE_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in aad.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AZURE_CREDENTIAL_FILE", str(tmp_path / "no-azure.json"))
    (tmp_path / "bin").mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    return aad


def subprocess_env(stand_in: AadStandIn, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AZURE_VARS}
    env.update(stand_in.env())
    env.update(AZURE_CREDENTIAL_FILE=str(tmp_path / "no-azure.json"), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


# --- each way to a token obtains a refresh token ------------------------------------------


def test_managed_identity_via_imds(azure: AadStandIn, token_server: TokenServer, token_registry: Registry,
                                   tmp_path: Path) -> None:
    meta = login(tmp_path, runmd(token_registry.url))
    assert_accepted(token_server, token_registry, tmp_path, "mi:system")
    assert meta["identity"] == "system-assigned managed identity"
    imds = [r for r in azure.requests if r.service == "imds"]
    assert len(imds) == 1 and imds[0].params["resource"] == [aadmod.ACR_RESOURCE]
    assert "client_id" not in imds[0].params
    # The exchange the registry's challenge pointed at, in ACR's form, with the token's tenant.
    (exchange,) = [r for r in token_server.requests if r.path == "/oauth2/exchange"]
    assert exchange.method == "POST"
    assert exchange.params == {
        "grant_type": ["access_token"],
        "service": [token_registry.host],
        "access_token": ["<redacted>"],
        "tenant": ["test-tenant"],
    }


@pytest.mark.parametrize("how", ["attribute", "environment"])
def test_user_assigned_managed_identity(azure: AadStandIn, token_server: TokenServer, token_registry: Registry,
                                        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    azure.knobs.user_identities.add("11111111-2222-3333-4444-555555555555")
    attrs = ".identity managed"
    if how == "attribute":
        attrs += "\n.client_id 11111111-2222-3333-4444-555555555555"
    else:
        monkeypatch.setenv("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555")
    meta = login(tmp_path, runmd(token_registry.url, attrs))
    assert_accepted(token_server, token_registry, tmp_path, "mi:11111111-2222-3333-4444-555555555555")
    assert "11111111-2222-3333-4444-555555555555" in meta["identity"]
    (imds,) = [r for r in azure.requests if r.service == "imds"]
    assert imds.params["client_id"] == ["11111111-2222-3333-4444-555555555555"]


def test_aks_azure_json_with_a_managed_identity(azure: AadStandIn, token_server: TokenServer,
                                                token_registry: Registry, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    azure.knobs.user_identities.add("kubelet-identity")
    azure_json = tmp_path / "azure.json"
    azure_json.write_text(json.dumps({
        "cloud": "AzurePublicCloud", "tenantId": "test-tenant", "aadClientId": "msi",
        "aadClientSecret": "msi", "useManagedIdentityExtension": True,
        "userAssignedIdentityID": "kubelet-identity", "resourceGroup": "mc_rg",
    }))
    monkeypatch.setenv("AZURE_CREDENTIAL_FILE", str(azure_json))
    meta = login(tmp_path, runmd(token_registry.url))
    assert_accepted(token_server, token_registry, tmp_path, "mi:kubelet-identity")
    assert str(azure_json) in meta["identity"]


def test_aks_azure_json_with_a_service_principal(azure: AadStandIn, token_server: TokenServer,
                                                 token_registry: Registry, tmp_path: Path) -> None:
    secret = azure.add_secret_principal("aks-sp")
    azure_json = tmp_path / "cloud" / "azure.json"
    azure_json.parent.mkdir()
    azure_json.write_text(json.dumps({
        "cloud": "AzurePublicCloud", "tenantId": "test-tenant", "aadClientId": "aks-sp",
        "aadClientSecret": secret, "useManagedIdentityExtension": False,
    }))
    login(tmp_path, runmd(token_registry.url, f".identity aks\n.azure_json cloud/azure.json"))
    assert_accepted(token_server, token_registry, tmp_path, "sp:aks-sp")
    assert not [r for r in azure.requests if r.service == "imds"]


def test_service_principal_secret_from_the_environment(azure: AadStandIn, token_server: TokenServer,
                                                       token_registry: Registry, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    secret = azure.add_secret_principal("app-secret")
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-secret")
    monkeypatch.setenv("AZURE_TENANT_ID", "test-tenant")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    meta = login(tmp_path, runmd(token_registry.url))
    assert_accepted(token_server, token_registry, tmp_path, "sp:app-secret")
    assert meta["identity"] == "service principal app-secret" and meta["tenant"] == "test-tenant"
    # MSAL discovered the tenant at the stand-in and asked for the ACR scope.
    token = [r for r in azure.requests if r.path == "/test-tenant/oauth2/v2.0/token"]
    assert token and token[0].params["scope"] == [aadmod.ACR_RESOURCE + "/.default"]
    assert token[0].params["client_secret"] == ["<redacted>"]
    assert secret not in json.dumps(meta)


def test_service_principal_certificate_from_the_environment(azure: AadStandIn, token_server: TokenServer,
                                                            token_registry: Registry, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pem = tmp_path / "sp.pem"
    pem.write_text(azure.add_certificate_principal("app-cert"))
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-cert")
    monkeypatch.setenv("AZURE_TENANT_ID", "test-tenant")
    monkeypatch.setenv("AZURE_CLIENT_CERTIFICATE_PATH", str(pem))
    login(tmp_path, runmd(token_registry.url))
    assert_accepted(token_server, token_registry, tmp_path, "sp:app-cert")
    (req,) = [r for r in azure.requests if r.path.endswith("/oauth2/v2.0/token")]
    assert req.params["client_assertion_type"] == ["urn:ietf:params:oauth:client-assertion-type:jwt-bearer"]
    assert "client_secret" not in req.params


def test_service_principal_from_a_file(azure: AadStandIn, token_server: TokenServer, token_registry: Registry,
                                       tmp_path: Path) -> None:
    secret = azure.add_secret_principal("app-file")
    sp = tmp_path / "sp.json"
    sp.write_text(json.dumps({"appId": "app-file", "displayName": "node", "password": secret, "tenant": "test-tenant"}))
    sp.chmod(0o600)
    login(tmp_path, runmd(token_registry.url, ".credentials sp.json"))
    assert_accepted(token_server, token_registry, tmp_path, "sp:app-file")


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "identity-az"])
def test_azure_cli_when_installed(azure: AadStandIn, token_server: TokenServer, token_registry: Registry,
                                  tmp_path: Path, explicit: bool) -> None:
    fake_az(tmp_path / "bin", az_payload(azure, tenant="test-tenant"))
    meta = login(tmp_path, runmd(token_registry.url, ".identity az" if explicit else ""))
    assert_accepted(token_server, token_registry, tmp_path, "user:az@example.com")
    assert meta["identity"] == "Azure CLI" and meta["tenant"] == "test-tenant"
    args = (tmp_path / "bin" / "az.args").read_text().split()
    assert args == ["account", "get-access-token", "--resource", aadmod.ACR_RESOURCE, "--output", "json"]
    assert not [r for r in azure.requests if r.service == "imds"]  # az wins over IMDS


def test_azure_cli_gets_the_tenant_it_is_told(azure: AadStandIn, token_server: TokenServer,
                                              token_registry: Registry, tmp_path: Path) -> None:
    fake_az(tmp_path / "bin", az_payload(azure, tenant="test-tenant"))
    login(tmp_path, runmd(token_registry.url, ".identity az\n.tenant test-tenant"))
    assert (tmp_path / "bin" / "az.args").read_text().split()[-2:] == ["--tenant", "test-tenant"]


def test_device_code_for_a_person_then_silent(azure: AadStandIn, token_server: TokenServer,
                                              token_registry: Registry, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    meta = login(tmp_path, runmd(token_registry.url, ".identity device"))
    assert_accepted(token_server, token_registry, tmp_path, "user:person@example.com")
    err = capsys.readouterr().err
    assert "https://microsoft.com/devicelogin" in err and "enter the code" in err
    assert "person@example.com" in meta["identity"]
    cache = tmp_path / ".work" / "msal_token_cache.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert azure.count("aad", "/devicecode") == 1
    # The next login (a refresh, a restart) uses MSAL's cache: nobody is asked again.
    first = refresh_token_of(tmp_path)
    login(tmp_path, runmd(token_registry.url, ".identity device"))
    assert azure.count("aad", "/devicecode") == 1
    assert "enter the code" not in capsys.readouterr().err
    assert refresh_token_of(tmp_path) != first


# --- what is written ------------------------------------------------------------------------


def test_token_file_is_owner_only_and_the_meta_holds_no_secret(azure: AadStandIn, token_server: TokenServer,
                                                               token_registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "access_token").write_text("old\n")
    (tmp_path / "access_token").chmod(0o644)
    before = time.time()
    meta = login(tmp_path, runmd(token_registry.url, install=True))
    token = assert_accepted(token_server, token_registry, tmp_path, "mi:system")
    for path in (tmp_path / "access_token", meta_path(tmp_path / ".work"), tmp_path / ".work" / "access_token"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # `.install` copied the fresh token into the work folder.
    assert (tmp_path / ".work" / "access_token").read_text().strip() == token
    text = meta_path(tmp_path / ".work").read_text()
    assert token not in text and token.split(".")[2] not in text
    assert meta["registry"] == token_registry.host and meta["file"] == "access_token"
    assert before <= meta["obtained_at"] < meta["expires_at"]
    assert abs(meta["expires_at"] - (meta["obtained_at"] + token_server.knobs.refresh_expires_in)) < 5
    assert not list(tmp_path.glob(".access_token*")) and not list((tmp_path / ".work").glob(".*.tmp"))


def test_registry_name_is_found_among_the_mirrors(tmp_path: Path) -> None:
    def registry_of(text: str) -> str:
        compiled = catalog.parse_text(text, str(tmp_path / "mirror.runmd"))
        (_, step), = compiled.document.steps("login-acr")
        return LoginAcr(step, compiled.config(step)).registry(compiled).base_url

    assert registry_of(runmd("example")) == "https://example.azurecr.io"
    assert registry_of(runmd("Example", extra=": .mirror example.azurecr.cn")) == "https://example.azurecr.cn"
    assert registry_of(runmd("example", extra=": .mirror other.azurecr.io")) == "https://example.azurecr.io"
    assert registry_of(runmd("example.azurecr.us")) == "https://example.azurecr.us"
    assert registry_of(runmd("http://127.0.0.1:5000")) == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "text, fragment",
    [
        (runmd(""), ".login-acr"),
        (runmd("exa mple"), "registry name"),
        (runmd("example", ".identity password"), "unknown identity"),
        (runmd("example", ".tenant a b"), "tenant"),
        (runmd("example", ".authority http://login.example"), "authority"),
        (runmd("example", ".credentials"), "file path"),
    ],
)
def test_bad_inputs_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(RunmdError) as info:
        catalog.parse_text(text, "mirror.runmd")
    assert fragment in str(info.value)
    assert str(info.value).startswith("mirror.runmd:")


def test_refresh_time_is_before_expiry() -> None:
    assert refresh_due({"obtained_at": 0, "expires_at": 3 * 3600}, 900) == 3 * 3600 - 900
    # A short-lived token is refreshed at half its life, not after it expired.
    assert refresh_due({"obtained_at": 100, "expires_at": 104}, 900) == 102
    assert refresh_due({}, 900) is None


@pytest.mark.parametrize("text, lead", [("900", 900.0), ("15m", 900.0), ("0", 0.0), ("90s", 90.0)])
def test_refresh_lead_is_a_duration(text: str, lead: float, tmp_path: Path) -> None:
    from mitmproxy.test import taddons

    refresher = LoginRefresh(catalog.parse_text(runmd("example"), str(tmp_path / "mirror.runmd")))
    with taddons.context(refresher) as tctx:
        assert refresher.lead == 900.0
        tctx.configure(refresher, acr_login_refresh_lead=text)
        assert refresher.lead == lead


@pytest.mark.parametrize("bad", ["-1", "soon", "1d"])
def test_refresh_lead_refuses_what_is_not_a_duration(bad: str, tmp_path: Path) -> None:
    from mitmproxy import exceptions
    from mitmproxy.test import taddons

    refresher = LoginRefresh(catalog.parse_text(runmd("example"), str(tmp_path / "mirror.runmd")))
    with taddons.context(refresher) as tctx:
        with pytest.raises(exceptions.OptionsError, match="^acr_login_refresh_lead: expected a duration"):
            tctx.configure(refresher, acr_login_refresh_lead=bad)


# --- each missing piece is one clear line ----------------------------------------------------


def test_no_identity(azure: AadStandIn, token_registry: Registry, tmp_path: Path, closed_port: ClosedPort,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", closed_port.url)
    # One line per identity tried, in the order they are tried, each saying why it does not apply.
    message = login_error(tmp_path, runmd(token_registry.url), lines=5)
    first, *tried = message.splitlines()
    assert first.startswith("step 2 (.login-acr ") and "no identity:" in first and ".identity device" in first
    assert [line.split(":")[0].strip() for line in tried] == ["service principal", "AKS", "Azure CLI", "managed identity"]
    for line, piece in zip(tried, ("AZURE_CLIENT_ID", "azure.json does not exist", "no 'az' on PATH", "IMDS")):
        assert piece in line


def test_no_az(azure: AadStandIn, token_registry: Registry, tmp_path: Path) -> None:
    assert "no 'az': the Azure CLI is not installed" in login_error(tmp_path, runmd(token_registry.url, ".identity az"))


def test_az_not_logged_in(azure: AadStandIn, token_registry: Registry, tmp_path: Path) -> None:
    fake_az(tmp_path / "bin", error="ERROR: Please run 'az login' to setup account.", status=1)
    message = login_error(tmp_path, runmd(token_registry.url))
    assert message.endswith("az account get-access-token failed: ERROR: Please run 'az login' to setup account.")


def test_wrong_tenant(azure: AadStandIn, token_registry: Registry, tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    secret = azure.add_secret_principal("app-1")
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-1")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    monkeypatch.setenv("AZURE_TENANT_ID", "contoso-tenant")
    message = login_error(tmp_path, runmd(token_registry.url))
    assert "wrong tenant:" in message and "'contoso-tenant'" in message
    assert secret not in message


def test_identity_in_another_tenant(azure: AadStandIn, token_registry: Registry, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    azure.knobs.tenants.add("other-tenant")
    secret = azure.add_secret_principal("app-2", tenant="other-tenant")
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-2")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", secret)
    message = login_error(tmp_path, runmd(token_registry.url, ".identity service-principal\n.tenant test-tenant"))
    assert "wrong tenant:" in message and "AADSTS700016" in message


def test_bad_secret(azure: AadStandIn, token_registry: Registry, tmp_path: Path,
                    monkeypatch: pytest.MonkeyPatch) -> None:
    azure.add_secret_principal("app-3")
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-3")
    monkeypatch.setenv("AZURE_TENANT_ID", "test-tenant")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "not-the-secret")
    message = login_error(tmp_path, runmd(token_registry.url))
    assert "AADSTS7000215" in message and "not-the-secret" not in message


def test_missing_service_principal_pieces(azure: AadStandIn, token_registry: Registry, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_CLIENT_ID", "app-4")
    message = login_error(tmp_path, runmd(token_registry.url, ".identity service-principal"))
    assert "no service principal:" in message and "AZURE_TENANT_ID" in message and "AZURE_CLIENT_SECRET" in message


def test_unknown_user_assigned_identity(azure: AadStandIn, token_registry: Registry, tmp_path: Path) -> None:
    message = login_error(tmp_path, runmd(token_registry.url, ".identity managed\n.client_id nobody"))
    assert "managed identity nobody: IMDS refused: invalid_request: Identity not found" in message


def test_registry_refuses_the_exchange(azure: AadStandIn, token_server: TokenServer, token_registry: Registry,
                                       tmp_path: Path) -> None:
    azure.on_issue = None  # the registry does not know this identity
    message = login_error(tmp_path, runmd(token_registry.url))
    assert f"{token_registry.host} refused the exchange" in message and "401" in message
    assert token_server.count("exchange_denied") == 1


def test_unreachable_registry(azure: AadStandIn, tmp_path: Path, closed_port: ClosedPort) -> None:
    message = login_error(tmp_path, runmd(closed_port.url))
    assert f"cannot reach {closed_port.url}" in message


def test_mirror_start_fails_with_one_line(aad: AadStandIn, tmp_path: Path, closed_port: ClosedPort) -> None:
    """As an operator sees it: `acr mirror start` stops before serving, one `acr:` line on stderr."""
    text = runmd(closed_port.url, ".identity az", extra=f": .mirror {closed_port.url}")
    text += "``` start mirror\n+ .proxy 127.0.0.1:1\n: .manifests head, get\n```\n"
    (tmp_path / "mirror.runmd").write_text(text)
    (tmp_path / "bin").mkdir()
    result = subprocess.run(
        [ACR, "mirror", "start", "--hosts-dir", str(tmp_path / "certs.d")], cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
        env=subprocess_env(aad, tmp_path, PATH=str(tmp_path / "bin")),
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # The runtime steps' lines come in the one log format, at INFO; the error is the one `acr:` line.
    lines = [(parse(line), line) for line in result.stderr.splitlines()]
    assert all(log.level == "INFO" for log, _ in lines if log), result.stderr
    errors = [line for log, line in lines if not log]
    assert errors == ["acr: step 2 (.login-acr http://127.0.0.1:%d): no 'az': the Azure CLI is not installed "
                      "(not on PATH)" % closed_port.port], result.stderr
    assert not (tmp_path / "access_token").exists()


# --- refreshed while the mirror runs ----------------------------------------------------------

MIRROR = """\
``` start mirror
+ .runtime
: .login-acr    {registry}
: .install      access_token
: .mirror       {registry}
+ .proxy        127.0.0.1:{{port}}
: .manifests    head, get
:   .login      access_token
:   .authn      oauth2
:   .resolve    application/vnd.oci.image.index.v1+json
: .blobs        get
:   .login      access_token
:   .authn      oauth2
:   .pull
```
"""


def test_mirror_refreshes_the_login_while_serving(aad: AadStandIn, token_server: TokenServer,
                                                  token_registry: Registry, repo_name: str, tmp_path: Path,
                                                  mirror_factory: Callable[..., Mirror]) -> None:
    image = make_image({"login.txt": b"refreshed\n"})
    push_image(token_registry, repo_name, "v1", image)
    push_image(token_registry, f"{repo_name}-later", "v1", image)
    token_server.knobs.refresh_expires_in = 4  # the refresher must act within seconds
    # The token server checks expiry against a clock of the test's: still until moved below,
    # so a slow machine cannot expire a token before the mirror had the time to replace it.
    checked_at = [time.time()]
    token_server.knobs.clock = lambda: checked_at[0]
    fake_az(tmp_path / "bin", az_payload(aad))
    m = mirror_factory(
        token_registry.url, runmd=MIRROR.format(registry=token_registry.url),
        args=["--hosts-dir", str(tmp_path / "certs.d")],
        env=subprocess_env(aad, tmp_path, PATH=f"{tmp_path / 'bin'}:{os.environ.get('PATH', '')}"),
    )
    token_file = m.home / "access_token"
    first = token_file.read_text()
    tokens = {first}
    # A pull now: the mirror reads the first refresh token (and caches an access token for this repository).
    manifest = f"/v2/{repo_name}/manifests/v1?ns={token_registry.host}"
    early = m.get(manifest, headers={"Accept": ACCEPT_ALL_MANIFESTS})
    assert early.status_code == 200, (early.text, m.log_text()[-3000:])
    deadline = time.monotonic() + 15
    while len(tokens) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        tokens.add(token_file.read_text())
    assert len(tokens) >= 3, m.log_text()[-3000:]  # refreshed, twice, without a restart
    assert m.proc is not None and m.proc.poll() is None
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # The mirror pulls with whatever token is current: the token server's clock moves to just
    # before the newest token's expiry, past that of every older one.
    newest = max(jwt_expiry(t.strip()) or 0 for t in tokens)
    checked_at[0] = newest - 0.5
    assert sorted(jwt_expiry(t.strip()) or 0 for t in tokens)[-2] < newest - 0.5
    # Another repository needs a new access token: only the current refresh token gets one.
    r = m.get(manifest.replace(repo_name, f"{repo_name}-later"), headers={"Accept": ACCEPT_ALL_MANIFESTS})
    assert r.status_code == 200, (r.status_code, r.text, m.log_text()[-3000:])
    assert r.headers["Docker-Content-Digest"] == image.digest
    status = m.get("/status").json()
    assert status["acr_login"]["identity"] == "Azure CLI"
    assert status["acr_login"]["expires_in"] > 0
    log = m.log_text()
    assert "refreshing the ACR login failed" not in log
    for token in tokens:
        assert token.strip() not in log


# --- .install ------------------------------------------------------------------------------


def _install(home: Path, name: str = "access_token") -> None:
    compiled = catalog.parse_text(f"``` start mirror\n+ .runtime\n: .install {name}\n```\n", str(home / "mirror.runmd"))
    Runtime.for_document(compiled).run()


def test_install_copies_owner_only_and_replaces(tmp_path: Path) -> None:
    src = tmp_path / "access_token"
    src.write_text("one\n")
    src.chmod(0o644)
    _install(tmp_path)
    dst = tmp_path / ".work" / "access_token"
    assert dst.read_text() == "one\n" and stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / ".work").stat().st_mode) == 0o700
    src.write_text("two\n")
    _install(tmp_path)
    assert dst.read_text() == "two\n" and stat.S_IMODE(dst.stat().st_mode) == 0o600
    assert not list((tmp_path / ".work").glob(".*.tmp"))


def test_install_of_a_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(StepError) as info:
        _install(tmp_path, "nothing-here")
    assert str(info.value) == f"step 2 (.install nothing-here): no file {tmp_path / 'nothing-here'}"


@pytest.mark.parametrize("bad", ["/etc/shadow", "../secret", "a b"])
def test_install_refuses_paths_outside_the_folder(bad: str) -> None:
    with pytest.raises(ValueError):
        Install.parse(bad)


@pytest.mark.parametrize("failure, expected", [
    (aadmod.requests.ConnectionError("refused"), "device code sign-in: cannot reach https://login.example (ConnectionError)"),
    (ValueError("Unable to get authority configuration for https://login.example/t"),
     "wrong tenant: https://login.example does not know tenant 't' (device code sign-in)"),
    (ValueError("bad\nsecond line"), "device code sign-in: bad"),
    ({"error": "invalid_request", "error_codes": [90002], "error_description": "AADSTS90002: no tenant\nTrace"},
     "wrong tenant: device code sign-in is not in tenant 't': invalid_request: AADSTS90002: no tenant"),
    ({"error": "authorization_declined", "error_description": "AADSTS70000: declined"},
     "device code sign-in: AAD refused: authorization_declined: AADSTS70000: declined"),
])
def test_msal_failures_are_one_line_naming_the_identity(failure: Any, expected: str) -> None:
    """Service principal and device code sign-ins share this mapping of what MSAL raised or answered."""
    assert str(aadmod._msal_failure(failure, "device code sign-in", "https://login.example", "t")) == expected
