"""The mirror's own endpoints: `/auth` for overlaybd and `/status`.

`/auth` is checked against a line-by-line port of what overlaybd does with the answer
(`load_cred_from_http` -> `ImageAuthResponse` -> `parse_auths` in overlaybd's
src/image_service.cpp), so "overlaybd would find the credentials" is what is asserted. The hooks
run through mitmproxy's test utilities with the client's address set on the flow; one test runs
a real `acr mirror start` that records flows, to show the credential never reaches a flow file.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
from mitmproxy import http
from mitmproxy import io as mio
from mitmproxy.test import taddons, tflow, tutils

from addons import catalog
from addons.registry.auth import ACR_REFRESH_TOKEN_USER
from addons.chain import AcrMirror
from addons.observe.endpoints import Endpoints
from addons.proxy.credentials_endpoint import REDACTED, CredentialsEndpoint, loopback_peer, remote_host
from addons.node.login_acr import write_meta
from addons.proxy.front import Proxy
from tests.harness.inprocess import drive
from tests.harness.mirror import Mirror

BLOB = "sha256:" + "b" * 64
# A refresh token as ACR hands them out: a JWT (here with exp 2001-09-09).
REFRESH = (
    base64.urlsafe_b64encode(b'{"alg":"RS256","typ":"JWT"}').rstrip(b"=").decode() + "."
    + base64.urlsafe_b64encode(json.dumps({"exp": 4102444800, "aud": "example.azurecr.io"}).encode()).rstrip(b"=").decode()
    + ".c2lnbmF0dXJlLW9mLXRoZS1yZWZyZXNoLXRva2Vu"
)

RUNMD = """\
``` start mirror
+ .runtime
: .mirror       example.azurecr.io
: .mirror       http://127.0.0.1:5000
+ .proxy        localhost:8578
: .manifests    head, get
:   .login      access_token
: .blobs        get
:   .login      access_token
```
"""


# --- what overlaybd does with the answer ------------------------------------------------------


def overlaybd_credentials(body: bytes, remote_path: str) -> tuple[str, str]:
    """overlaybd's load_cred_from_http + parse_blob_url + parse_auths, in Python."""
    doc = json.loads(body)
    # ImageAuthResponse: traceId (string), success (bool, default false), data.auths (object)
    assert isinstance(doc.get("traceId", ""), str)
    if doc.get("success", False) is not True:
        raise AssertionError("overlaybd: http request failed")
    auths = doc["data"]["auths"]
    assert isinstance(auths, dict)
    seg: list[str] = []
    for prefix in ("http://", "https://"):
        if remote_path.startswith(prefix):
            words = remote_path[len(prefix):].split("/")[:-1]  # each segment that a '/' follows
            seg = [words[0]] + [words[i] for i in range(2, len(words) - 1)]
    for addr, value in auths.items():
        path, match = "", False
        for s in seg:
            path = s if not path else f"{path}/{s}"
            if addr == path:
                match = True
                break
        if not match:
            continue
        if "auth" in value:
            user, _, password = base64.b64decode(value["auth"]).decode().partition(":")
            return user, password
        if "username" in value and "password" in value:
            return value["username"], value["password"]
    return "", ""


def test_the_overlaybd_port_matches_registry_host_prefixes() -> None:
    body = json.dumps({"traceId": "t", "success": True, "data": {"auths": {
        "other.io": {"username": "x", "password": "y"},
        "r.io/ns": {"auth": base64.b64encode(b"u:p").decode()},
    }}}).encode()
    assert overlaybd_credentials(body, f"https://r.io/v2/ns/app/blobs/{BLOB}") == ("u", "p")
    assert overlaybd_credentials(body, f"https://s.io/v2/ns/app/blobs/{BLOB}") == ("", "")


# --- driving the hooks -------------------------------------------------------------------------


def mirror_in(home: Path, text: str = RUNMD, credentials: Optional[str] = REFRESH) -> AcrMirror:
    if credentials is not None:
        (home / "access_token").write_text(credentials + "\n")
        (home / "access_token").chmod(0o600)
    return AcrMirror(catalog.parse_text(text, str(home / "mirror.runmd")))


def make_flow(path: str, method: str = "GET", peer: tuple[Any, ...] = ("127.0.0.1", 40000)) -> http.HTTPFlow:
    req = tutils.treq(method=method.encode(), path=path.encode(), authority=b"", host="127.0.0.1", port=9,
                      headers=http.Headers(((b"Host", b"localhost:8578"),)), content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.peername = peer
    return flow


def sent_body(mirror: AcrMirror, flow: http.HTTPFlow) -> bytes:
    """What the client receives: the body after the response hooks, before the loop runs on."""
    async def respond() -> tuple[bytes, bytes]:
        for addon in mirror.addons:
            fn = getattr(addon, "response", None)
            if fn is not None:
                fn(flow)
        assert flow.response is not None
        sent = flow.response.content or b""
        await asyncio.sleep(0)  # the response is on the wire; now it is redacted again
        return sent, flow.response.content or b""

    with taddons.context(mirror):
        sent, after = asyncio.run(respond())
    assert REFRESH.encode() not in after
    return sent


def auth_url(remote: str) -> str:
    return f"/auth?remote_url={remote}"  # overlaybd appends the URL as it is, unencoded


# --- /auth --------------------------------------------------------------------------------------


def test_endpoints_stand_before_the_proxy_root(tmp_path: Path) -> None:
    addons = mirror_in(tmp_path).addons
    # /metrics and the offline replay check stand among the front addons too, after /status.
    proxy = next(i for i, a in enumerate(addons) if isinstance(a, Proxy))
    assert isinstance(addons[0], CredentialsEndpoint) and isinstance(addons[1], Endpoints) and proxy >= 2


@pytest.mark.parametrize(
    "remote, key",
    [
        (f"https://example.azurecr.io/v2/library/busybox/blobs/{BLOB}", "example.azurecr.io"),
        (f"https://Example.azurecr.io:443/v2/a/blobs/{BLOB}", "Example.azurecr.io:443"),
        (f"http://127.0.0.1:5000/v2/team/app/blobs/{BLOB}", "127.0.0.1:5000"),
    ],
)
def test_auth_answers_what_overlaybd_reads(tmp_path: Path, remote: str, key: str) -> None:
    mirror = mirror_in(tmp_path)
    flow = drive(mirror, make_flow(auth_url(remote)))
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.headers["Content-Type"] == "application/json"
    assert flow.response.headers["Cache-Control"] == "no-store"
    # Until the response hook, the flow (what the flow writer and mitmweb keep) holds no secret.
    assert REFRESH.encode() not in flow.response.content
    assert json.loads(flow.response.content)["data"]["auths"][key]["password"] == REDACTED
    body = sent_body(mirror, flow)
    doc = json.loads(body)
    assert doc["success"] is True and isinstance(doc["traceId"], str) and doc["traceId"]
    assert list(doc["data"]["auths"]) == [key]
    assert overlaybd_credentials(body, remote) == (ACR_REFRESH_TOKEN_USER, REFRESH)
    assert flow.metadata["acr"]["endpoint"] == "auth"
    assert REFRESH not in json.dumps(flow.metadata) and REFRESH not in (flow.comment or "")


def test_auth_gives_user_and_password_credentials(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path, credentials="puller:s3cret-pass")
    remote = f"http://127.0.0.1:5000/v2/app/blobs/{BLOB}"
    flow = drive(mirror, make_flow(auth_url(remote)))
    assert b"s3cret-pass" not in flow.response.content
    assert overlaybd_credentials(sent_body(mirror, flow), remote) == ("puller", "s3cret-pass")


def test_auth_without_credentials_is_anonymous(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path, credentials=None)
    remote = f"https://example.azurecr.io/v2/app/blobs/{BLOB}"
    flow = drive(mirror, make_flow(auth_url(remote)))
    assert flow.response.status_code == 200
    body = sent_body(mirror, flow)
    assert json.loads(body)["data"] == {"auths": {}}
    assert overlaybd_credentials(body, remote) == ("", "")


@pytest.mark.parametrize(
    "peer, allowed",
    [
        (("127.0.0.1", 1), True),
        (("127.9.8.7", 1), True),
        (("::1", 1, 0, 0), True),
        (("::ffff:127.0.0.1", 1, 0, 0), True),
        (("10.1.2.3", 1), False),
        (("::ffff:10.1.2.3", 1, 0, 0), False),
        (("192.168.0.7", 1), False),
        (("fe80::1%eth0", 1, 0, 2), False),
    ],
)
def test_auth_is_for_loopback_clients_only(tmp_path: Path, peer: tuple[Any, ...], allowed: bool) -> None:
    mirror = mirror_in(tmp_path)
    flow = drive(mirror, make_flow(auth_url(f"https://example.azurecr.io/v2/a/blobs/{BLOB}"), peer=peer))
    assert loopback_peer(flow) is allowed
    if allowed:
        assert flow.response.status_code == 200
        return
    assert flow.response.status_code == 403
    body = sent_body(mirror, flow)
    doc = json.loads(body)
    assert doc["success"] is False and doc["message"]
    assert REFRESH.encode() not in body and b"auths" not in body


@pytest.mark.parametrize(
    "path, method, status",
    [
        (auth_url(f"https://other.example.com/v2/a/blobs/{BLOB}"), "GET", 404),
        (auth_url(f"https://example.azurecr.io.evil.com/v2/a/blobs/{BLOB}"), "GET", 404),
        (auth_url(f"http://127.0.0.1:5001/v2/a/blobs/{BLOB}"), "GET", 404),
        ("/auth", "GET", 400),
        ("/auth?remote_url=", "GET", 400),
        (auth_url("https://example.azurecr.io:99999/v2/a/blobs/x"), "GET", 400),
        (auth_url(f"https://example.azurecr.io/v2/a/blobs/{BLOB}"), "POST", 405),
        (auth_url(f"https://example.azurecr.io/v2/a/blobs/{BLOB}"), "HEAD", 405),
    ],
)
def test_auth_refuses(tmp_path: Path, path: str, method: str, status: int) -> None:
    mirror = mirror_in(tmp_path)
    flow = drive(mirror, make_flow(path, method))
    assert flow.response.status_code == status
    body = sent_body(mirror, flow)
    assert REFRESH.encode() not in body
    if method != "HEAD":
        assert json.loads(body)["success"] is False


def test_unusable_credentials_file_is_a_502_without_content(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path, credentials="a b c\nd\ne")
    flow = drive(mirror, make_flow(auth_url(f"https://example.azurecr.io/v2/a/blobs/{BLOB}")))
    assert flow.response.status_code == 502
    assert b"a b c" not in flow.response.content


def test_remote_host_normalizes_default_ports() -> None:
    assert remote_host("https://R.io:443/v2/a") == ("R.io:443", "r.io")
    assert remote_host("http://r.io:80/v2/a") == ("r.io:80", "r.io")
    assert remote_host("http://r.io:443/v2/a") == ("r.io:443", "r.io:443")
    assert remote_host("r.io/v2/a") == ("r.io", "r.io")
    assert remote_host("https://user@r.io/v2") == ("r.io", "r.io")
    assert remote_host("https:///v2") is None


def test_other_paths_still_reach_the_proxy_root(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path)
    assert drive(mirror, make_flow("/v2/")).response.status_code == 200
    assert drive(mirror, make_flow("/authx")).response.status_code == 404
    assert drive(mirror, make_flow("/v2/auth/manifests/latest?ns=other.io")).response.status_code == 404
    # A forward-proxy request for /status is the proxy root's to refuse, not ours to answer.
    req = tutils.treq(method=b"GET", scheme=b"http", host="example.com", port=80, authority=b"example.com",
                      path=b"/status", content=b"")
    flow = tflow.tflow(req=req)
    drive(mirror, flow)
    assert flow.response.status_code == 400
    assert "endpoint" not in flow.metadata.get("acr", {})


# --- /status ----------------------------------------------------------------------------------


class _Tokens:
    def tokens(self) -> list[dict[str, Any]]:
        return [{"upstream": "example.azurecr.io", "scope": "repository:app:pull", "anonymous": False,
                 "expires_at": 2.0e9, "expires_in": 299.5, "fetches": 1}]


def test_status_reports_health_without_secrets(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path)
    now = time.time()
    write_meta(tmp_path / ".work", {"registry": "example.azurecr.io", "identity": "Azure CLI",
                                     "obtained_at": now, "expires_at": now + 3600, "file": "access_token"})
    assert mirror.state is not None
    mirror.state.tokens = _Tokens()  # type: ignore[assignment]
    mirror.state.counters["requests"] += 3
    flow = drive(mirror, make_flow("/status"))  # loopback only: other peers get 403 (tests/test_hardening.py)
    assert flow.response.status_code == 200
    body = sent_body(mirror, flow)
    assert REFRESH.encode() not in body and REFRESH.split(".")[2].encode() not in body
    doc = json.loads(body)
    assert doc["status"] == "ok"
    assert doc["upstreams"] == [{"ns": "example.azurecr.io", "url": "https://example.azurecr.io"},
                                {"ns": "127.0.0.1:5000", "url": "http://127.0.0.1:5000"}]
    (cred,) = doc["credentials"]
    assert cred["file"] == "access_token" and cred["kind"] == "acr-refresh-token"
    assert cred["expires_at"] == 4102444800 and cred["expires_in"] > 0
    assert doc["acr_login"]["identity"] == "Azure CLI" and 3590 < doc["acr_login"]["expires_in"] <= 3600
    assert doc["tokens"][0]["scope"] == "repository:app:pull"
    assert doc["counters"]["requests"] == 3 and doc["counters"]["status_requests"] == 1


def test_status_head_and_wrong_method(tmp_path: Path) -> None:
    mirror = mirror_in(tmp_path, credentials=None)
    head = drive(mirror, make_flow("/status", "HEAD"))
    assert head.response.status_code == 200 and head.response.content == b""
    assert int(head.response.headers["Content-Length"]) > 0
    post = drive(mirror, make_flow("/status", "POST"))
    assert post.response.status_code == 405 and post.response.headers["Allow"] == "GET, HEAD"
    doc = json.loads(drive(mirror, make_flow("/status")).response.content)
    assert doc["credentials"] == [{"file": "access_token", "present": False}] and doc["acr_login"] is None


# --- a real mirror: the credential is sent, and never written to a flow file ---------------------


def test_auth_through_a_running_mirror_keeps_flow_files_clean(tmp_path: Path,
                                                              mirror_factory: Callable[..., Mirror]) -> None:
    flows = tmp_path / "flows.mitm"
    text = RUNMD.replace("localhost:8578", "127.0.0.1:{port}")
    m = mirror_factory("http://127.0.0.1:5000", runmd=text, credentials=REFRESH,
                       sets=[f"save_stream_file={flows}"], args=["--hosts-dir", str(tmp_path / "certs.d")],
                       env={"PYTHONUNBUFFERED": "1"})
    remote = f"https://example.azurecr.io/v2/library/busybox/blobs/{BLOB}"
    r = m.get(auth_url(remote))
    assert r.status_code == 200, m.log_text()
    assert overlaybd_credentials(r.content, remote) == (ACR_REFRESH_TOKEN_USER, REFRESH)
    status = m.get("/status")
    assert status.status_code == 200 and status.json()["counters"]["auth_requests"] == 1
    m.stop()
    raw = flows.read_bytes()
    assert REFRESH.encode() not in raw and REFRESH.split(".")[2].encode() not in raw
    with open(flows, "rb") as f:
        recorded = [fl for fl in mio.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
    auth = [fl for fl in recorded if fl.request.path.startswith("/auth")]
    assert len(auth) == 1 and json.loads(auth[0].response.content)["data"]["auths"]["example.azurecr.io"]["password"] == REDACTED
    assert REFRESH not in m.log_text()
