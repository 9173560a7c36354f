"""The token client against real servers: docker-registry (anonymous, htpasswd, token) and the
harness token server, plus a stub session for what no real server should be asked to do."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from addons.registry import oci
from addons.registry.auth import (
    ACR_REFRESH_TOKEN_USER,
    AuthError,
    Credentials,
    TokenClient,
    insecure_permissions,
    jwt_claims,
    jwt_expiry,
)
from tests.harness.images import sha256_digest
from tests.harness.ports import ClosedPort
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjEyMzR9.c2ln"  # {"exp": 1234}


# --- Credentials.from_file ----------------------------------------------------


def _write(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "credentials"
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "text, username, password",
    [
        ("opaque-refresh-token\n", ACR_REFRESH_TOKEN_USER, "opaque-refresh-token"),
        (f"  {JWT}  \n\n", ACR_REFRESH_TOKEN_USER, JWT),
        ("alice:pa:ss word\n", "alice", "pa:ss word"),
        ("alice\npa:ss word\n", "alice", "pa:ss word"),
        ("\ufeffbob\r\nsecret\r\n", "bob", "secret"),
        ('{"username": "carol", "password": "pw"}', "carol", "pw"),
        ('{"refresh_token": "rt"}\n', ACR_REFRESH_TOKEN_USER, "rt"),
        (f"{ACR_REFRESH_TOKEN_USER}:rt2", ACR_REFRESH_TOKEN_USER, "rt2"),
    ],
)
def test_credentials_from_file(tmp_path: Path, text: str, username: str, password: str) -> None:
    creds = Credentials.from_file(_write(tmp_path, text))
    assert (creds.username, creds.password) == (username, password)
    assert creds.is_refresh_token is (username == ACR_REFRESH_TOKEN_USER)


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        (" \n\t\n", "empty"),
        ("a\nb\nsecret-c\n", "3 lines"),
        ("alice:\n", "empty user name or password"),
        (":secret-x\n", "empty user name or password"),
        ("secret with spaces\n", "spaces"),
        ('{"username": "u"}', "lacks"),
        ('{"password": "secret-y"', "not valid JSON"),
        ('["secret-z"]', "not an object"),
        ("al:ice\nsecret-w\n", "user name"),
    ],
)
def test_credentials_from_file_rejects(tmp_path: Path, text: str, why: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=why) as e:
        Credentials.from_file(path)
    message = str(e.value)
    assert str(path) in message
    assert "expected" in message
    assert "secret" not in message.replace(str(path), "")


def test_credentials_from_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "creds"
    path.write_bytes(b"\xff\xfe\x00secret")
    with pytest.raises(ValueError, match="UTF-8"):
        Credentials.from_file(path)


def test_credentials_repr_hides_password() -> None:
    creds = Credentials("alice", "hunter2")
    assert "hunter2" not in repr(creds)
    assert "hunter2" not in creds.identity
    assert creds.identity != Credentials("alice", "hunter3").identity
    assert creds.basic() == "Basic " + base64.b64encode(b"alice:hunter2").decode()


@pytest.mark.parametrize(
    "mode, insecure",
    [(0o600, False), (0o400, False), (0o640, True), (0o604, True), (0o620, True)],
)
def test_insecure_permissions(tmp_path: Path, mode: int, insecure: bool) -> None:
    assert insecure_permissions(_write(tmp_path, "t", mode)) is insecure


def test_jwt_expiry() -> None:
    assert jwt_expiry(JWT) == 1234.0
    assert jwt_expiry("not-a-jwt") is None
    assert jwt_expiry("a.b.c") is None
    assert jwt_expiry("eyJhIjoxfQ.eyJleHAiOiJzb29uIn0.x") is None  # exp is not a number


def test_jwt_claims() -> None:
    tid = base64.urlsafe_b64encode(json.dumps({"tid": "t-1", "exp": 9}).encode()).decode().rstrip("=")
    assert jwt_claims(f"eyJhbGciOiJSUzI1NiJ9.{tid}.c2ln") == {"tid": "t-1", "exp": 9}
    assert jwt_claims("eyJhbGciOiJub25lIn0.WzFd.") == {}  # the payload is not an object
    assert jwt_claims("a.b") == {}


def test_auth_error_gateway_status() -> None:
    assert AuthError("timeout", "t").gateway_status == 504
    assert AuthError("unavailable", "u", 503).gateway_status == 503
    for kind in ("unreachable", "denied", "bad-response", "refused"):
        assert AuthError(kind, "x").gateway_status == 502


# --- real registries: anonymous and Basic -----------------------------------------


def test_anonymous_registry(registry: Registry) -> None:
    client = TokenClient()
    upstream = oci.Upstream.from_spec(registry.url)
    assert client.challenge(upstream) == []
    assert client.authorization(upstream, "repository:a/b:pull", None) is None
    assert client.authorization(registry.url, "repository:a/b:pull", Credentials("u", "p")) is None
    assert client.pings[upstream.ns] == 1  # the challenge is cached
    client.invalidate_challenge(upstream)
    client.challenge(upstream)
    assert client.pings[upstream.ns] == 2


def test_basic_registry(htpasswd_registry: Registry) -> None:
    client = TokenClient()
    upstream = oci.Upstream.from_spec(htpasswd_registry.url)
    [challenge] = client.challenge(upstream)
    assert challenge.scheme == "basic"
    assert htpasswd_registry.credentials is not None
    creds = Credentials(*htpasswd_registry.credentials)
    header = client.authorization(upstream, "repository:a/b:pull", creds)
    assert header is not None and header.startswith("Basic ")
    assert requests.get(upstream.url("/v2/"), headers={"Authorization": header}, timeout=5).status_code == 200
    assert client.authorization(upstream, "repository:a/b:pull", None) is None
    wrong = client.authorization(upstream, "repository:a/b:pull", Credentials("tester", "wrong"))
    assert requests.get(upstream.url("/v2/"), headers={"Authorization": wrong}, timeout=5).status_code == 401


# --- real token registry: Bearer ----------------------------------------------------


@pytest.fixture
def ts(token_server: TokenServer) -> TokenServer:
    """The session's token server, reset around each test by conftest."""
    return token_server


@pytest.fixture
def creds(token_credentials: tuple[str, str]) -> Credentials:
    """A token-server user that may push and pull."""
    return Credentials(*token_credentials)


@pytest.fixture
def upstream(token_registry: Registry) -> oci.Upstream:
    return oci.Upstream.from_spec(token_registry.url)


def _push_image(client: TokenClient, upstream: oci.Upstream, creds: Credentials, name: str) -> str:
    """Push a config blob and a manifest, authorised by the client under test; return the digest."""
    auth = client.authorization(upstream, oci.scope_for(name, ("pull", "push")), creds)
    assert auth is not None
    headers = {"Authorization": auth}
    config = b"{}"
    config_digest = sha256_digest(config)
    r = requests.post(upstream.url(f"/v2/{name}/blobs/uploads/"), headers=headers, timeout=5)
    assert r.status_code == 202, r.text
    location = r.headers["Location"]
    if location.startswith("/"):
        location = upstream.url(location)
    r = requests.put(
        location,
        params={"digest": config_digest},
        data=config,
        headers={**headers, "Content-Type": "application/octet-stream"},
        timeout=5,
    )
    assert r.status_code == 201, r.text
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.OCI_MANIFEST,
            "config": {"mediaType": oci.OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": [],
        }
    ).encode()
    r = requests.put(
        upstream.url(f"/v2/{name}/manifests/v1"),
        data=manifest,
        headers={**headers, "Content-Type": oci.OCI_MANIFEST},
        timeout=5,
    )
    assert r.status_code == 201, r.text
    return sha256_digest(manifest)


def _token_requests(ts: TokenServer) -> list[tuple[str, str | None]]:
    return [(r.method, (r.params.get("grant_type") or [None])[0]) for r in ts.requests]


def test_bearer_refresh_token_accepted_by_registry(
    ts: TokenServer, upstream: oci.Upstream, repo_name: str
) -> None:
    creds = Credentials.refresh_token(ts.issue_refresh_token())
    client = TokenClient()
    digest = _push_image(client, upstream, creds, repo_name)
    ts.clear_log()

    scope = oci.scope_for(repo_name)
    header = client.authorization(upstream, scope, creds)
    assert header is not None and header.startswith("Bearer ")
    assert _token_requests(ts) == [("POST", "refresh_token")]
    [req] = ts.requests
    assert req.params["client_id"] == ["lifec-registry"]
    assert req.params["service"] == [ts.service]
    assert req.params["scope"] == [scope]
    assert req.params["refresh_token"] == ["<redacted>"]  # it was sent, in the form body

    r = requests.get(
        upstream.url(f"/v2/{repo_name}/manifests/v1"),
        headers={"Authorization": header, "Accept": oci.DEFAULT_ACCEPT},
        timeout=5,
    )
    assert r.status_code == 200, r.text
    assert r.headers["Docker-Content-Digest"] == digest
    # The pull token does not allow a push: the scope was honoured.
    uploads = upstream.url(f"/v2/{repo_name}/blobs/uploads/")
    r = requests.post(uploads, headers={"Authorization": header}, timeout=5)
    assert r.status_code == 401


def test_bearer_password_grant(ts: TokenServer, upstream: oci.Upstream, creds: Credentials) -> None:
    client = TokenClient()
    header = client.authorization(upstream, "repository:p/q:pull", creds)
    assert header is not None and header.startswith("Bearer ")
    assert _token_requests(ts) == [("POST", "password")]
    assert ts.requests[0].params["username"] == [creds.username]
    r = requests.get(upstream.url("/v2/p/q/tags/list"), headers={"Authorization": header}, timeout=5)
    assert r.status_code == 404  # authorised; the repository just does not exist
    assert r.json()["errors"][0]["code"] == "NAME_UNKNOWN"


def test_post_404_falls_back_to_get(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    ts.post_not_found = True
    client = TokenClient()
    refresh = Credentials.refresh_token(ts.issue_refresh_token())
    for creds in (creds, refresh):
        ts.clear_log()
        header = client.authorization(upstream, "repository:p/q:pull", creds)
        assert header is not None and header.startswith("Bearer ")
        assert [r.method for r in ts.requests] == ["POST", "GET"]
        get = ts.requests[1]
        assert get.has_authorization
        assert get.params["service"] == [ts.service]
        assert get.params["scope"] == ["repository:p/q:pull"]
        r = requests.get(upstream.url("/v2/p/q/tags/list"), headers={"Authorization": header}, timeout=5)
        assert r.status_code == 404


def test_anonymous_bearer(ts: TokenServer, upstream: oci.Upstream) -> None:
    ts.anonymous_pull = True
    client = TokenClient()
    header = client.authorization(upstream, "repository:p/q:pull", None)
    assert header is not None and header.startswith("Bearer ")
    [req] = ts.requests
    assert req.method == "GET" and not req.has_authorization
    r = requests.get(upstream.url("/v2/p/q/tags/list"), headers={"Authorization": header}, timeout=5)
    assert r.status_code == 404


def test_tokens_are_cached(ts: TokenServer, upstream: oci.Upstream, creds: Credentials) -> None:
    client = TokenClient()
    scope = "repository:p/q:pull"
    first = client.authorization(upstream, scope, creds)
    n = len(ts.requests)
    assert client.authorization(upstream, scope, creds) == first
    assert len(ts.requests) == n
    assert client.fetch_count(upstream, scope) == 1
    assert client.pings[upstream.ns] == 1
    # Another scope or other credentials are other tokens.
    client.authorization(upstream, "repository:other:pull", creds)
    client.authorization(upstream, scope, Credentials.refresh_token(ts.issue_refresh_token()))
    assert len(ts.requests) == n + 2
    assert client.fetch_count(upstream, scope) == 2


def test_expiry_leeway_with_injected_clock(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    ts.expires_in = 300
    offset = [0.0]
    base = time.time()
    client = TokenClient(leeway=30, clock=lambda: base + offset[0])
    scope = "repository:p/q:pull"
    client.authorization(upstream, scope, creds)
    [info] = client.tokens()
    assert 298 <= info["expires_at"] - base <= 301
    offset[0] = 260  # 40 s before expiry: still good
    client.authorization(upstream, scope, creds)
    assert client.fetch_count(upstream, scope) == 1
    offset[0] = 280  # inside the 30 s leeway: fetch again
    client.authorization(upstream, scope, creds)
    assert client.fetch_count(upstream, scope) == 2


def test_short_lived_token_leeway_is_capped(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    """A token living less than twice the leeway is still reused for half its life."""
    ts.expires_in = 40
    offset = [0.0]
    base = time.time()
    client = TokenClient(leeway=30, clock=lambda: base + offset[0])
    client.authorization(upstream, "repository:p/q:pull", creds)
    offset[0] = 15
    client.authorization(upstream, "repository:p/q:pull", creds)
    assert client.fetch_count(upstream, "repository:p/q:pull") == 1
    offset[0] = 25
    client.authorization(upstream, "repository:p/q:pull", creds)
    assert client.fetch_count(upstream, "repository:p/q:pull") == 2


class SlowSession(requests.Session):
    """Makes every token request take a while, so that concurrent callers really overlap."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        if not url.endswith("/v2/"):
            time.sleep(self.delay)
        return super().request(method, url, *args, **kwargs)


def _run_threads(n: int, target: Any) -> list[Any]:
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as e:  # collected and asserted by the caller
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_single_flight(ts: TokenServer, upstream: oci.Upstream, creds: Credentials) -> None:
    client = TokenClient(session=SlowSession(0.3))
    client.challenge(upstream)
    results = _run_threads(20, lambda i: client.authorization(upstream, "repository:p/q:pull", creds))
    assert all(isinstance(r, str) and r.startswith("Bearer ") for r in results), results
    assert len(set(results)) == 1
    assert client.fetch_count(upstream, "repository:p/q:pull") == 1
    assert ts.count("token_post") == 1


def test_single_flight_shares_failure(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    client = TokenClient(session=SlowSession(0.3))
    client.challenge(upstream)
    wrong = Credentials(creds.username, "nope")
    results = _run_threads(10, lambda i: client.authorization(upstream, "repository:p/q:pull", wrong))
    assert all(isinstance(r, AuthError) and r.kind == "denied" for r in results), results
    assert client.fetch_count(upstream, "repository:p/q:pull") == 1


def test_scopes_fetch_in_parallel(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    """Single flight is per key: different scopes do not wait for each other."""
    client = TokenClient(session=SlowSession(1.0))
    client.challenge(upstream)
    started = time.monotonic()
    results = _run_threads(4, lambda i: client.authorization(upstream, f"repository:r{i}:pull", creds))
    elapsed = time.monotonic() - started
    assert all(isinstance(r, str) for r in results), results
    assert elapsed < 3.0, elapsed  # serialised would take >= 4 s
    assert ts.count("token_post") == 4


def test_invalidate(ts: TokenServer, upstream: oci.Upstream, creds: Credentials) -> None:
    client = TokenClient()
    scope = "repository:p/q:pull"
    client.authorization(upstream, scope, creds)
    client.authorization(upstream, "repository:keep:pull", creds)
    client.invalidate(upstream, scope)
    assert [t["scope"] for t in client.tokens()] == ["repository:keep:pull"]
    client.authorization(upstream, scope, creds)
    assert client.fetch_count(upstream, scope) == 2
    assert client.fetch_count(upstream, "repository:keep:pull") == 1


def test_wrong_credentials_denied(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials
) -> None:
    client = TokenClient()
    with pytest.raises(AuthError) as e:
        client.authorization(upstream, "repository:p/q:pull", Credentials(creds.username, "wrong-pw"))
    assert e.value.kind == "denied" and e.value.status == 401
    with pytest.raises(AuthError) as e:
        client.authorization(upstream, "repository:p/q:pull", Credentials.refresh_token("forged-refresh-token"))
    assert e.value.kind == "denied"
    assert "wrong-pw" not in str(e.value) and "forged" not in str(e.value)
    assert client.tokens() == []


def test_token_endpoint_down(upstream: oci.Upstream) -> None:
    client = TokenClient(timeout=2.0)
    with ClosedPort() as closed:
        client.set_challenge(upstream, f'Bearer realm="{closed.url}/token",service="s"')
        started = time.monotonic()
        with pytest.raises(AuthError) as e:
            client.authorization(upstream, "repository:p/q:pull", Credentials("alice", "pw-x"))
    assert e.value.kind == "unreachable"
    assert e.value.gateway_status == 502
    assert time.monotonic() - started < 2.0


def test_token_endpoint_hangs() -> None:
    """A server that accepts but never answers costs the timeout, not forever."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        client = TokenClient(timeout=0.5)
        upstream = oci.Upstream.from_spec(f"http://127.0.0.1:{port}")
        client.set_challenge(upstream, f'Bearer realm="http://127.0.0.1:{port}/token"')
        started = time.monotonic()
        with pytest.raises(AuthError) as e:
            client.authorization(upstream, "repository:p/q:pull", None)
        assert e.value.kind == "timeout"
        assert e.value.gateway_status == 504
        assert time.monotonic() - started < 3


def test_registry_down() -> None:
    with ClosedPort() as closed:
        client = TokenClient(timeout=2.0)
        with pytest.raises(AuthError) as e:
            client.authorization(closed.url, "repository:p/q:pull", None)
    assert e.value.kind == "unreachable"


def test_no_secret_in_logs_or_errors(
    ts: TokenServer, upstream: oci.Upstream, creds: Credentials, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    refresh = ts.issue_refresh_token()
    secrets = [creds.password, refresh, "wrong-secret-pw"]
    client = TokenClient()
    headers = [
        client.authorization(upstream, "repository:p/q:pull", creds),
        client.authorization(upstream, "repository:p/q:pull", Credentials.refresh_token(refresh)),
    ]
    ts.post_not_found = True
    headers.append(client.authorization(upstream, "repository:g/h:pull", creds))
    errors: list[str] = []
    for wrong in (Credentials(creds.username, "wrong-secret-pw"), Credentials.refresh_token("x" + refresh)):
        with pytest.raises(AuthError) as e:
            client.authorization(upstream, "repository:z/z:pull", wrong)
        errors += [str(e.value), repr(e.value)]
    for h in headers:
        assert h is not None
        secrets += [h, h.split(" ", 1)[1]]
    secrets += [creds.basic(), creds.basic().split(" ", 1)[1]]
    text = "\n".join(
        [r.getMessage() for r in caplog.records]
        + [str(r.args) for r in caplog.records]
        + errors
        + [json.dumps(client.tokens()), repr(client.tokens())]
    )
    assert caplog.records, "expected some debug logging"
    for secret in secrets:
        assert secret not in text


# --- stub session: policy checks that must not reach any network -----------------


class StubSession:
    """Answers requests from a table and records them; unknown URLs fail the test."""

    def __init__(self, routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append((method, url, kwargs))
        if (method, url) not in self.routes:
            raise AssertionError(f"unexpected request {method} {url}")
        status, headers, body = self.routes[(method, url)]
        r = requests.Response()
        r.status_code = status
        r.headers = CaseInsensitiveDict(headers)
        r._content = body
        r._content_consumed = True
        r.url = url
        return r


def _stub_client(routes: dict, **kwargs: Any) -> tuple[TokenClient, StubSession]:
    session = StubSession(routes)
    return TokenClient(session=session, **kwargs), session  # type: ignore[arg-type]


REG = "https://reg.example"


def test_downgraded_realm_refused() -> None:
    client, session = _stub_client(
        {("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": 'Bearer realm="http://auth.example/token"'}, b"")}
    )
    with pytest.raises(AuthError) as e:
        client.authorization(REG, "repository:a:pull", Credentials("u", "pw"))
    assert e.value.kind == "refused"
    assert [c[1] for c in session.calls] == [f"{REG}/v2/"]  # credentials went nowhere


def test_plain_http_realm_on_loopback_allowed() -> None:
    client, session = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": 'Bearer realm="http://127.0.0.1:9/token"'}, b""),
            ("POST", "http://127.0.0.1:9/token"): (200, {}, b'{"access_token": "opaque"}'),
        }
    )
    assert client.authorization(REG, "repository:a:pull", Credentials("u", "pw")) == "Bearer opaque"


def test_token_requests_do_not_follow_redirects() -> None:
    client, session = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": f'Bearer realm="{REG}/token",service="reg"'}, b""),
            ("POST", f"{REG}/token"): (302, {"Location": "https://evil.example/token"}, b""),
        }
    )
    with pytest.raises(AuthError) as e:
        client.authorization(REG, "repository:a:pull", Credentials("u", "pw"))
    assert e.value.kind == "bad-response" and e.value.status == 302
    token_calls = [c for c in session.calls if c[1] != f"{REG}/v2/"]
    assert token_calls and all(c[2]["allow_redirects"] is False for c in token_calls)
    assert all("evil" not in c[1] for c in session.calls)


def test_default_expiry_is_60_seconds_without_hints() -> None:
    now = [1000.0]
    client, _ = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": f'Bearer realm="{REG}/token"'}, b""),
            ("GET", f"{REG}/token"): (200, {}, b'{"token": "opaque"}'),
        },
        clock=lambda: now[0],
    )
    assert client.authorization(REG, "repository:a:pull", None) == "Bearer opaque"
    assert client.tokens()[0]["expires_at"] == 1060.0


def test_jwt_exp_used_when_no_expires_in() -> None:
    now = [1000.0]
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1500}).encode()).decode().rstrip("=")
    token = f"eyJhbGciOiJub25lIn0.{claims}.sig"
    client, _ = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": f'Bearer realm="{REG}/token"'}, b""),
            ("GET", f"{REG}/token"): (200, {}, json.dumps({"access_token": token}).encode()),
        },
        clock=lambda: now[0],
    )
    client.authorization(REG, "repository:a:pull", None)
    assert client.tokens()[0]["expires_at"] == 1500.0


@pytest.mark.parametrize(
    "status, body, kind",
    [
        (500, b"", "unavailable"),
        (429, b"", "unavailable"),
        (200, b"not json", "bad-response"),
        (200, b'{"token": ""}', "bad-response"),
        (200, b'["x"]', "bad-response"),
        (403, b"", "denied"),
    ],
)
def test_token_endpoint_failures(status: int, body: bytes, kind: str) -> None:
    client, _ = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": f'Bearer realm="{REG}/token"'}, b""),
            ("GET", f"{REG}/token"): (status, {}, body),
        }
    )
    with pytest.raises(AuthError) as e:
        client.authorization(REG, "repository:a:pull", None)
    assert e.value.kind == kind


@pytest.mark.parametrize(
    "status, headers, kind",
    [
        (401, {}, "bad-response"),
        (401, {"WWW-Authenticate": 'Bearer realm="unterminated'}, "bad-response"),
        (503, {}, "unavailable"),
        (404, {}, "bad-response"),
    ],
)
def test_ping_failures(status: int, headers: dict[str, str], kind: str) -> None:
    client, _ = _stub_client({("GET", f"{REG}/v2/"): (status, headers, b"")})
    with pytest.raises(AuthError) as e:
        client.challenge(REG)
    assert e.value.kind == kind


def test_basic_challenge_and_unsupported_scheme() -> None:
    client, _ = _stub_client({("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": 'Basic realm="r"'}, b"")})
    assert client.authorization(REG, "repository:a:pull", None) is None
    assert client.authorization(REG, "repository:a:pull", Credentials("u", "p")) == Credentials("u", "p").basic()
    client, _ = _stub_client({("GET", f"{REG}/v2/"): (401, {"WWW-Authenticate": "Negotiate"}, b"")})
    with pytest.raises(AuthError) as e:
        client.authorization(REG, "repository:a:pull", None)
    assert e.value.kind == "unsupported"


def test_set_challenge_overrides_anonymous_ping() -> None:
    """Some registries answer /v2/ with 200 but want tokens for repositories."""
    client, session = _stub_client(
        {
            ("GET", f"{REG}/v2/"): (200, {}, b"{}"),
            ("GET", f"{REG}/token"): (200, {}, b'{"token": "t1", "expires_in": 300}'),
        }
    )
    assert client.authorization(REG, "repository:a:pull", None) is None
    client.set_challenge(REG, f'Bearer realm="{REG}/token",service="reg"')
    assert client.authorization(REG, "repository:a:pull", None) == "Bearer t1"
    params = session.calls[-1][2]["params"]
    assert params == {"service": "reg", "scope": "repository:a:pull"}
