"""The data path at hook level, where an end-to-end run would be overkill: the mirror's own
upstream requests (`send`: one retry after 401, timeouts, no redirects), how upstream answers map
to what the client gets, manifest checks, blob forwarding (storage redirects never carry the
token; `client` mode hands them on), token scrubbing before mitmproxy's flow writer, the one log
line per request, credentials files, and the mitmproxy internals addons.core.mitm relies on.

The upstream is a `requests` transport adapter mounted on the mirror's own session, so the
plugins run their real code paths; flows go through the hooks the way mitmproxy calls them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import requests
import urllib3
from mitmproxy import http
from mitmproxy.addons.save import Save
from mitmproxy.test import taddons, tflow, tutils

from addons import catalog

from addons.registry import oci

from addons.chain import AcrMirror, build_state
from addons.core.offline import Answer, AnswerAdapter, run_hooks_now
from addons.proxy.login import Login
from addons.registry.oci import Upstream
from addons.proxy.tail import summary
from addons.observe.tokenscrub import TokenScrub
from addons.proxy.pull import Pull, same_origin
from addons.proxy.manifest_cache import ManifestCache
from addons.proxy.resolve import MAX_MANIFEST_BYTES, Manifest, manifest_response, read_manifest
from addons.proxy.state import MirrorState
from addons.proxy.upstream import Authorizer, UpstreamError, send
from tests.harness.inprocess import install

UPSTREAM = Upstream.from_spec("http://127.0.0.1:5000")
NS = UPSTREAM.ns
STORAGE = "http://storage.example:8080"
BLOB = b"layer bytes " * 100
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- tokens for the mirror's own upstream requests ----------------------------------------



class FakeTokens:
    """The token client's interface, handing out t1, t2, ... and recording invalidations."""

    def __init__(self) -> None:
        self.issued = 0
        self.current: Optional[str] = None
        self.invalidated = 0
        self.challenges: list[str] = []

    def authorization(self, upstream: Any, scope: str, credentials: Any) -> str:
        if self.current is None:
            self.issued += 1
            self.current = f"Bearer t{self.issued}"
        return self.current

    def cached_authorization(self, upstream: Any, scope: str, credentials: Any) -> tuple[bool, Optional[str]]:
        return (True, self.current) if self.current is not None else (False, None)

    def invalidate(self, upstream: Any, scope: str) -> None:
        self.invalidated += 1
        self.current = None

    def set_challenge(self, upstream: Any, header: str) -> list[Any]:
        self.challenges.append(header)
        return []

    def invalidate_challenge(self, upstream: Any) -> None:
        pass


def authorizer(tokens: Optional[FakeTokens] = None) -> Authorizer:
    return Authorizer(tokens=tokens or FakeTokens(), upstream=UPSTREAM,  # type: ignore[arg-type]
                      scope="repository:app:pull", credentials=None)


def state() -> MirrorState:
    return MirrorState(home=Path("/nonexistent"), upstreams={NS: UPSTREAM})


def test_the_shared_helpers_are_typed_fields_made_with_the_state(tmp_path: Path) -> None:
    """What the steps share exists as soon as the state does; a misspelt helper is an error, not a new table."""
    st = build_state(catalog.parse_text(MANIFESTS, str(tmp_path / "mirror.runmd")))
    assert st.tokens.session is st.session
    assert isinstance(st.manifests, ManifestCache) and st.blob_modes == {} and st.teleport_targets == {}
    with pytest.raises(AttributeError):
        st.blob_mode = {}  # type: ignore[attr-defined]
    other = requests.Session()
    st.use_session(other)
    assert st.session is other and st.tokens.session is other  # token grants go the same way


# --- send: the mirror's own upstream requests -----------------------------------------------


def test_send_retries_once_after_a_401_with_a_fresh_token() -> None:
    st, tokens = state(), FakeTokens()
    answers = iter([(401, {"WWW-Authenticate": 'Bearer realm="http://r/token",error="invalid_token"'}, b""),
                    (200, {}, b"ok")])
    adapter = install(st, lambda req: next(answers))
    resp = send(st, "GET", UPSTREAM.url("/v2/app/manifests/v1"), auth=authorizer(tokens))
    assert resp.status_code == 200
    assert [r.headers["Authorization"] for r in adapter.seen] == ["Bearer t1", "Bearer t2"]
    assert tokens.invalidated == 1 and tokens.challenges == ['Bearer realm="http://r/token",error="invalid_token"']
    assert st.counters["upstream_401_retries"] == 1


def test_send_gives_up_after_the_second_401() -> None:
    st, tokens = state(), FakeTokens()
    adapter = install(st, lambda req: (401, {}, b""))
    resp = send(st, "GET", UPSTREAM.url("/v2/app/manifests/v1"), auth=authorizer(tokens))
    assert resp.status_code == 401 and len(adapter.seen) == 2 and tokens.issued == 2
    assert UpstreamError.from_status(resp, "manifest app:v1").status == 502


def test_send_without_an_authorizer_never_retries() -> None:
    st = state()
    adapter = install(st, lambda req: (401, {}, b""))
    assert send(st, "GET", UPSTREAM.url("/v2/")).status_code == 401
    assert len(adapter.seen) == 1 and "Authorization" not in adapter.seen[0].headers


def test_send_uses_the_configured_timeouts_and_never_follows_redirects() -> None:
    st = state()
    st.settings.upstream_timeout, st.settings.connect_timeout = 7.0, 2.0
    adapter = install(st, lambda req: (307, {"Location": STORAGE + "/x"}, b""))
    resp = send(st, "GET", UPSTREAM.url("/v2/app/blobs/" + DIGEST))
    assert resp.status_code == 307 and len(adapter.seen) == 1
    assert adapter.timeout == (2.0, 7.0)


@pytest.mark.parametrize("exc, status, code", [
    (requests.ConnectTimeout(), 504, "UPSTREAM_TIMEOUT"),
    (requests.ReadTimeout(), 504, "UPSTREAM_TIMEOUT"),
    (requests.ConnectionError(), 502, "UPSTREAM_UNAVAILABLE"),
    (requests.exceptions.InvalidHeader(), 502, "UPSTREAM_UNAVAILABLE"),
])
def test_send_turns_transport_failures_into_gateway_errors(exc: Exception, status: int, code: str) -> None:
    st = state()

    def boom(req: requests.PreparedRequest) -> Answer:
        raise exc

    install(st, boom)
    with pytest.raises(UpstreamError) as info:
        send(st, "GET", UPSTREAM.url("/v2/app/manifests/v1"), what="manifest app:v1")
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.message.startswith("manifest app:v1")


@pytest.mark.parametrize("status, what, mapped, code", [
    (404, "manifest app:v1", 404, "MANIFEST_UNKNOWN"),
    (404, "blob sha256:x", 404, "BLOB_UNKNOWN"),
    (401, "blob sha256:x", 502, "UNAUTHORIZED"),
    (403, "blob sha256:x", 502, "DENIED"),
    (429, "blob sha256:x", 503, "TOOMANYREQUESTS"),
    (400, "blob sha256:x", 400, "UNKNOWN"),
    (500, "blob sha256:x", 500, "UPSTREAM_UNAVAILABLE"),
    (503, "blob sha256:x", 503, "UPSTREAM_UNAVAILABLE"),
])
def test_upstream_statuses_map_to_answers_that_make_containerd_fall_back(
    status: int, what: str, mapped: int, code: str,
) -> None:
    resp = requests.Response()
    resp.status_code = status
    resp.headers["Retry-After"] = "3"
    e = UpstreamError.from_status(resp, what)
    assert (e.status, e.code) == (mapped, code)
    answer = e.response("HEAD")
    assert answer.status_code == mapped and answer.content == b""
    assert int(answer.headers["Content-Length"]) > 0
    if status != 404:  # a 404 is final; anything else may be retried later
        assert answer.headers["Retry-After"] == "3"


# --- manifests --------------------------------------------------------------------------------


def upstream_response(body: bytes, headers: dict[str, str]) -> requests.Response:
    resp = requests.Response()
    resp.status_code = 200
    resp.headers.update(headers)
    resp.raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers=headers, status=200, preload_content=False)
    return resp


MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": []}).encode()


def test_read_manifest_checks_the_digest_asked_for() -> None:
    m = read_manifest(upstream_response(MANIFEST, {"Content-Type": oci.OCI_MANIFEST}), sha(MANIFEST), "m")
    assert (m.digest, m.media_type, m.size) == (sha(MANIFEST), oci.OCI_MANIFEST, len(MANIFEST))
    with pytest.raises(UpstreamError) as info:
        read_manifest(upstream_response(MANIFEST + b" ", {"Content-Type": oci.OCI_MANIFEST}), sha(MANIFEST), "m")
    assert (info.value.status, info.value.code) == (502, "DIGEST_INVALID")


def test_read_manifest_refuses_a_registry_that_lies_about_the_digest() -> None:
    headers = {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": sha(b"other")}
    with pytest.raises(UpstreamError) as info:
        read_manifest(upstream_response(MANIFEST, headers), "v1", "m")
    assert info.value.status == 502


def test_read_manifest_limits_the_size_and_learns_the_type_from_the_body() -> None:
    big = b" " * (MAX_MANIFEST_BYTES + 1)
    with pytest.raises(UpstreamError) as info:
        read_manifest(upstream_response(big, {"Content-Type": oci.OCI_MANIFEST}), "v1", "m")
    assert (info.value.status, info.value.code) == (502, "MANIFEST_INVALID")
    m = read_manifest(upstream_response(MANIFEST, {"Content-Type": "text/plain"}), "v1", "m")
    assert m.media_type == oci.OCI_MANIFEST


def test_head_and_get_of_a_manifest_agree_but_for_the_body() -> None:
    m = Manifest(oci.OCI_MANIFEST, sha(MANIFEST), MANIFEST)
    head, get = manifest_response("HEAD", m), manifest_response("GET", m)
    assert head.content == b"" and get.content == MANIFEST
    for name in ("Content-Type", "Docker-Content-Digest", "Content-Length"):
        assert head.headers[name] == get.headers[name]
    assert int(head.headers["Content-Length"]) == len(MANIFEST)


# --- blobs through the hooks --------------------------------------------------------------------

BLOBS = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy        localhost:8578
: .blobs        head, get
:   .pull       {mode}
```
"""


def blob_flow(method: str = "GET", digest: str = DIGEST) -> http.HTTPFlow:
    req = tutils.treq(method=method.encode(), path=f"/v2/app/blobs/{digest}?ns=127.0.0.1%3A5000".encode(),
                      authority=b"", host="127.0.0.1", port=9,
                      headers=http.Headers(((b"Host", b"localhost:8578"), (b"Range", b"bytes=0-9"),
                                            (b"Authorization", b"Basic client-secret"))),
                      content=b"")
    flow = tflow.tflow(req=req)
    flow.client_conn.tls = True  # a TLS client: the path where mitmproxy streams the blob
    return flow


def run_blob(mode: str, handler: Callable[[requests.PreparedRequest], Answer], *, method: str = "GET",
             follow: bool = True, tokens: Optional[FakeTokens] = None, flows: int = 1,
             ) -> tuple[AcrMirror, AnswerAdapter, list[http.HTTPFlow]]:
    """Drive blob flows through requestheaders and request, with an authorizer in place."""
    mirror = AcrMirror(catalog.parse_text(BLOBS.replace("{mode}", mode), "mirror.runmd"))
    assert mirror.state is not None
    adapter = install(mirror.state, handler)
    tokens = tokens or FakeTokens()
    out = []
    with taddons.context(mirror) as tctx:
        tctx.configure(mirror, acr_follow_redirects=follow)
        for _ in range(flows):
            flow = blob_flow(method)
            run_hooks_now(mirror.addons, flow, ("requestheaders",))
            mirror.state.contexts[flow].authorizer = authorizer(tokens)
            run_hooks_now(mirror.addons, flow, ("request",))
            out.append(flow)
    return mirror, adapter, out


def redirecting(req: requests.PreparedRequest) -> Answer:
    if req.url and req.url.startswith("http://127.0.0.1:5000/"):
        return 307, {"Location": f"{STORAGE}/b/{DIGEST}?sig=abc"}, b""
    raise AssertionError(f"the mirror itself must not fetch {req.url}")


def test_a_storage_redirect_is_followed_without_the_token() -> None:
    mirror, adapter, (flow,) = run_blob("follow", redirecting)
    assert [r.method for r in adapter.seen] == ["HEAD"]  # the probe, with the token: no body fetched twice
    assert adapter.seen[0].headers["Authorization"] == "Bearer t1"
    assert flow.request.url == f"{STORAGE}/b/{DIGEST}?sig=abc"
    assert flow.request.host_header == "storage.example:8080"
    assert "Authorization" not in flow.request.headers  # neither ours nor the client's
    assert flow.request.headers["Range"] == "bytes=0-9"
    meta = flow.metadata["acr"]
    assert meta["forward"] and meta["redirected"] and flow.response is None
    assert mirror.state.contexts[flow].forward.authorization is None  # type: ignore[union-attr]


def test_a_registry_that_serves_blobs_gets_the_token_and_is_remembered() -> None:
    def direct(req: requests.PreparedRequest) -> Answer:
        return 200, {"Content-Length": str(len(BLOB))}, b""

    mirror, adapter, flows = run_blob("follow", direct, flows=2)
    assert [r.method for r in adapter.seen] == ["HEAD", "HEAD"]  # a HEAD probe: no body is fetched twice
    for flow in flows:
        assert flow.request.url.startswith("http://127.0.0.1:5000/v2/app/blobs/")
        assert flow.request.headers["Authorization"] == "Bearer t1"
        assert not flow.metadata["acr"]["redirected"]
    assert mirror.state.blob_modes == {NS: "direct"}  # type: ignore[union-attr]


@pytest.mark.parametrize("mode, follow", [("client", True), ("follow", False)], ids=["runmd", "option"])
def test_client_mode_forwards_without_probing(mode: str, follow: bool) -> None:
    _, adapter, (flow,) = run_blob(mode, redirecting, follow=follow)
    assert adapter.seen == []
    assert flow.request.url.startswith("http://127.0.0.1:5000/v2/app/blobs/")
    assert flow.request.headers["Authorization"] == "Bearer t1"


def test_an_upstream_failure_during_the_probe_is_a_gateway_error() -> None:
    def down(req: requests.PreparedRequest) -> Answer:
        raise requests.ConnectTimeout()

    _, _, (flow,) = run_blob("follow", down)
    assert flow.response is not None and flow.response.status_code == 504
    assert "forward" not in flow.metadata["acr"]


def test_a_missing_blob_streams_the_registry_error_body_to_a_tls_client() -> None:
    def missing(req: requests.PreparedRequest) -> Answer:
        return 404, {"Content-Type": "application/json", "Content-Length": "157"}, b""  # a HEAD: no body

    _, adapter, (flow,) = run_blob("follow", missing)
    assert [r.method for r in adapter.seen] == ["HEAD"]
    assert flow.response is None  # not the HEAD's empty answer: the GET goes upstream for its body
    assert flow.request.url.startswith("http://127.0.0.1:5000/v2/app/blobs/")
    assert flow.request.headers["Authorization"] == "Bearer t1"


def test_blob_head_is_answered_by_the_mirror_with_the_upstream_length() -> None:
    def direct(req: requests.PreparedRequest) -> Answer:
        assert req.method == "HEAD"
        return 200, {"Content-Length": str(len(BLOB)), "Docker-Content-Digest": DIGEST, "Set-Cookie": "x=y"}, b""

    _, _, (flow,) = run_blob("follow", direct, method="HEAD")
    assert flow.response is not None and flow.response.status_code == 200
    assert flow.response.content == b"" and flow.response.headers["Content-Length"] == str(len(BLOB))
    assert "Set-Cookie" not in flow.response.headers


def streamed(mirror: AcrMirror, flow: http.HTTPFlow, status: int, headers: dict[str, str]) -> http.HTTPFlow:
    flow.response = tutils.tresp(status_code=status, headers=http.Headers(
        [(k.encode(), v.encode()) for k, v in headers.items()]), content=None)
    return run_hooks_now(mirror.addons, flow, ("responseheaders",))


def test_responseheaders_streams_and_scrubs_the_token() -> None:
    def direct(req: requests.PreparedRequest) -> Answer:
        return 200, {}, b""

    mirror, _, (flow,) = run_blob("follow", direct)
    assert flow.request.headers["Authorization"] == "Bearer t1"
    streamed(mirror, flow, 200, {"Content-Length": "10", "Set-Cookie": "a=b"})
    assert flow.response is not None and callable(flow.response.stream)
    assert flow.response.stream(b"chunk") == b"chunk"  # passes data through untouched, noting activity
    assert "Authorization" not in flow.request.headers and "Set-Cookie" not in flow.response.headers


@pytest.mark.parametrize("status, mapped", [(401, 502), (403, 502), (429, 503)])
def test_a_refused_forward_makes_the_client_fall_back_and_drops_the_token(status: int, mapped: int) -> None:
    def direct(req: requests.PreparedRequest) -> Answer:
        return 200, {}, b""

    tokens = FakeTokens()
    mirror, _, (flow,) = run_blob("follow", direct, tokens=tokens)
    streamed(mirror, flow, status, {"WWW-Authenticate": 'Bearer realm="http://evil/token"'})
    assert flow.response is not None and flow.response.status_code == mapped
    assert "WWW-Authenticate" not in flow.response.headers
    assert tokens.invalidated == 1


def test_a_redirect_the_probe_did_not_see_is_handed_on_and_learned() -> None:
    def direct(req: requests.PreparedRequest) -> Answer:
        return 200, {}, b""

    mirror, _, (flow,) = run_blob("follow", direct)
    streamed(mirror, flow, 307, {"Location": STORAGE + "/x"})
    assert flow.response is not None and flow.response.status_code == 307
    assert mirror.state.blob_modes[NS] == "redirect"  # type: ignore[union-attr]


@pytest.mark.parametrize("a, b, same", [
    ("http://r:5000/v2/x", "http://r:5000/other?q", True),
    ("http://r:5000/v2/x", "https://r:5000/v2/x", False),
    ("http://r:5000/v2/x", "http://r:5001/v2/x", False),
    ("https://r/v2/x", "https://s.blob.example/v2/x", False),
])
def test_same_origin(a: str, b: str, same: bool) -> None:
    assert same_origin(a, b) is same


def test_pull_parses_its_mode() -> None:
    assert Pull.parse("") == "follow" and Pull.parse("Client") == "client"
    with pytest.raises(ValueError):
        Pull.parse("maybe")


# --- no token reaches mitmproxy's flow writer ---------------------------------------------------


def forwarded_flow() -> http.HTTPFlow:
    flow = tflow.tflow(resp=True)
    flow.request.headers["Authorization"] = "Bearer secret-token"
    flow.metadata["acr"] = {"forward": True, "route": "blobs"}
    return flow


@pytest.mark.parametrize("hook", ["responseheaders", "response", "error"])
def test_token_scrub_removes_the_token_in_every_hook_that_saves_or_shows_a_flow(hook: str) -> None:
    flow = forwarded_flow()
    getattr(TokenScrub(), hook)(flow)
    assert "Authorization" not in flow.request.headers


def test_token_scrub_leaves_flows_the_mirror_did_not_forward_alone() -> None:
    flow = tflow.tflow(resp=True)
    flow.request.headers["Authorization"] = "Basic from-a-client"
    TokenScrub().response(flow)
    assert flow.request.headers["Authorization"] == "Basic from-a-client"


def test_token_scrub_runs_ahead_of_the_flow_writer_and_scrubs_unfinished_flows_at_exit() -> None:
    mirror = AcrMirror(catalog.parse_text(BLOBS.replace("{mode}", ""), "mirror.runmd"))
    save = Save()
    with taddons.context(save, mirror) as tctx:
        chain = tctx.master.addons.chain
        assert isinstance(chain[0], TokenScrub)
        assert chain.index(chain[0]) < chain.index(save)
        flow = forwarded_flow()
        save.active_flows.add(flow)  # a forward still running when the mirror stops
        chain[0].done()
        assert "Authorization" not in flow.request.headers


# --- one log line per request ----------------------------------------------------------------------


def test_summary_is_one_line_with_the_decisions() -> None:
    flow = tflow.tflow(resp=True)
    flow.request.method, flow.request.path = "GET", "/v2/app/blobs/" + DIGEST + "?ns=x"
    flow.metadata["acr"] = {"route": "blobs", "name": "app", "reference": DIGEST, "ns": NS,
                            "upstream": UPSTREAM.base_url, "redirected": True}
    line = summary(flow)
    assert "\n" not in line
    assert line.startswith(f"GET blobs app:{DIGEST} -> 200") and "via storage" in line and f"[{NS}]" in line
    flow.response, flow.error = None, tflow.terr()
    assert "-> error" in summary(flow) and "error:" in summary(flow)


MANIFESTS = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy        localhost:8578
: .manifests    head, get
:   .login      access_token
:   .resolve
```
"""


def test_each_request_writes_exactly_one_info_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "access_token").write_text("user:secret-password\n")
    os.chmod(tmp_path / "access_token", 0o600)
    mirror = AcrMirror(catalog.parse_text(MANIFESTS, str(tmp_path / "mirror.runmd")))
    assert mirror.state is not None
    mirror.state.home = tmp_path
    install(mirror.state, lambda req: (200, {"Content-Type": oci.OCI_MANIFEST}, MANIFEST))
    caplog.set_level(logging.INFO)
    flows = []
    with taddons.context(mirror):
        for method in ("HEAD", "GET", "GET"):
            req = tutils.treq(method=method.encode(), path=b"/v2/app/manifests/v1", authority=b"",
                              host="127.0.0.1", port=9, content=b"",
                              headers=http.Headers(((b"Host", b"localhost:8578"), (b"Accept", b"*/*"))))
            flow = tflow.tflow(req=req)
            run_hooks_now(mirror.addons, flow, ("requestheaders", "request", "response"))
            flows.append(flow)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and r.name == "addons.proxy.tail"]
    assert lines == [f"{m} manifests app:v1 -> 200 {sha(MANIFEST)} [{NS}]" for m in ("HEAD", "GET", "GET")]
    others = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and r.name != "addons.proxy.tail"]
    assert len(others) == 1 and others[0].endswith(": loaded user user")  # once, not per request
    for flow in flows:
        assert flow.comment and flow.metadata["acr"]["steps"]
        assert "secret-password" not in json.dumps(flow.metadata) + flow.comment
    assert "secret-password" not in caplog.text


# --- credentials files ----------------------------------------------------------------------------


def login_of(tmp_path: Path) -> Login:
    mirror = AcrMirror(catalog.parse_text(MANIFESTS, str(tmp_path / "mirror.runmd")))
    assert mirror.state is not None
    mirror.state.home = tmp_path
    return next(a for a in mirror.addons if isinstance(a, Login))


def test_login_warns_about_a_file_others_can_read_and_rereads_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "access_token"
    path.write_text("eyJhbGciOi.eyJzdWIiOi.c2ln\n")
    os.chmod(path, 0o644)
    login = login_of(tmp_path)
    creds = login.credentials()
    assert creds is not None and creds.is_refresh_token
    assert "readable by group or others" in caplog.text
    path.write_text("user:pw-2\n")
    os.utime(path, ns=(1, 1))
    again = login.credentials()
    assert again is not None and (again.username, again.password) == ("user", "pw-2")
    assert "eyJhbGciOi" not in caplog.text and "pw-2" not in caplog.text


def test_login_without_a_file_is_anonymous_and_says_so_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    login = login_of(tmp_path)
    assert login.credentials() is None and login.credentials() is None
    assert caplog.text.count("does not exist") == 1


def test_login_with_an_unusable_file_is_a_gateway_error_without_its_content(tmp_path: Path) -> None:
    (tmp_path / "access_token").write_text("a b c\nd\ne\n")
    with pytest.raises(UpstreamError) as info:
        login_of(tmp_path).credentials()
    assert info.value.status == 502 and "a b c" not in info.value.message
