"""Recorded sessions: scrubbed when written, re-run offline, and replayed as the upstream.

tests/replay/ holds one ACR-shaped session recorded by `scripts/record --fixture` (a real
containerd pull through the mirror from a token registry with ACR's shape in front: the token
endpoint on the registry's host, blob 307s to a storage host with SAS URLs, referrers of types
`streaming.v1` and `streaming.link.v1`), renamed to lifecacr.azurecr.io:

* acr-client.mitm: containerd <-> mirror, with the mirror's decisions in the metadata;
* acr-upstream.mitm: mirror <-> registry and storage;
* acr-session.json: what was pushed and what the pull resolved to; mirror.runmd: the pipeline.

Three kinds of test use it:

1. The files hold no credential (a scan of every file, and the scrubber itself).
2. Offline: `mitmdump -n -r acr-client.mitm -s acr_addons.py` with `acr_replay_upstream` re-makes
   every recorded decision with the chain of today's code (addons.observe.replay.ReplayCheck), and a
   deliberate change (another platform, a route without HEAD) is reported as a change.
3. Server replay: `mitmdump --server-replay acr-upstream.mitm` is the mirror's upstream, so a
   real `acr mirror start` serves the whole pull (HTTP client, and containerd as root) with no
   registry at all; a mirror without `.teleport` is caught by the same check.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from mitmproxy import http
from mitmproxy.addons.save import Save
from mitmproxy.test import taddons, tflow, tutils

from addons.observe import record
from addons.observe.record import (REDACTED, URL_REDACTED, RecordScrub, ScrubbingSave, install, scrub_flow,
                           scrub_form_text, scrub_header_value, scrub_json_text, scrub_text)
from addons.observe.replay import Origin, RecordedUpstream, parse_rehost, read_flows, rehost_flow, replace_origins
from addons.proxy.context import read_record
from tests.harness.mirror import Mirror
from tests.harness.replay import (CLIENT_FLOWS, MITMDUMP, REPLAY_DIR, ROOT, RUNMD, UPSTREAM_FLOWS, ReplayServer,
                                  check_pull, http_pull, replay_runmd, session_info)

SESSION = session_info()
REFRESH_JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJsaWZlYyJ9.c2lnbmF0dXJlLW9mLWEtcmVmcmVzaC10b2tlbg"


def _record_constants() -> dict[str, str]:
    """The fixture run's known secrets, read from scripts/record.py (one definition)."""
    tree = ast.parse((ROOT / "scripts" / "record.py").read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in ("PASSWORD", "STORAGE_KEY"):
            value = ast.literal_eval(node.value)
            out[node.targets[0].id] = value.decode() if isinstance(value, bytes) else value
    assert set(out) == {"PASSWORD", "STORAGE_KEY"}
    return out


# --- 1. no secret in a committed file -------------------------------------------------------

SECRET_PATTERNS = {
    "a JWT": re.compile(rb"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),
    "a Bearer token": re.compile(rb"(?i)bearer\s+(?!realm=)(?!<redacted>)[A-Za-z0-9._~+/=-]{6,}"),
    "Basic credentials": re.compile(rb"(?i)basic\s+(?!realm=)(?!<redacted>)[A-Za-z0-9+/=]{6,}"),
    "a SAS signature": re.compile(rb"(?i)(?:[?&;]|&amp;|%26|%3f)sig(?:=|%3d)(?!REDACTED)[^&\"'\s<>;]+"),
    "a SAS expiry": re.compile(rb"(?i)(?:[?&;]|&amp;|%26|%3f)se(?:=|%3d)(?!REDACTED)[^&\"'\s<>;]+"),
    "a token member": re.compile(rb'"(?:token|access_token|refresh_token|password)"\s*:\s*"(?!<redacted>)[^"]+"'),
    "a token form field": re.compile(rb"(?:^|&)(?:refresh_token|password|access_token)=(?!REDACTED)[^&\s]+"),
}


def secrets_in(data: bytes, known: dict[str, str]) -> list[str]:
    found = [what for what, pattern in SECRET_PATTERNS.items() if pattern.search(data)]
    found += [f"the {name}" for name, value in known.items() if value.encode() in data]
    return found


def test_no_committed_recording_holds_a_secret() -> None:
    known = _record_constants()
    files = sorted(p for p in REPLAY_DIR.rglob("*") if p.is_file())
    assert {CLIENT_FLOWS, UPSTREAM_FLOWS} <= {p.name for p in files}
    for path in files:
        assert secrets_in(path.read_bytes(), known) == [], path
        assert path.stat().st_size < 200_000, f"{path} is not small"


@pytest.mark.parametrize("planted", [
    REFRESH_JWT.encode(),
    b"Authorization: Bearer abcdef0123456789",
    b"Basic dXNlcjpwYXNzd29yZA==",
    b"https://x.blob.core.windows.net/c/b?sv=2021&se=2030-01-01&sig=AbCd%2F1234",
    b'{"access_token": "opaque-token-value"}',
    b"grant_type=password&username=u&password=hunter2",
    b"lifec-record-password-4f7d1c",
])
def test_the_scan_finds_planted_secrets(planted: bytes) -> None:
    assert secrets_in(b"...." + planted + b"....", _record_constants())


def test_the_scan_accepts_what_a_recording_needs() -> None:
    ok = (b'WWW-Authenticate: Bearer realm="https://lifecacr.azurecr.io/oauth2/token",service="lifecacr.azurecr.io"'
          b" Authorization: Bearer <redacted> ?sv=2021-08-06&se=REDACTED&sr=b&sp=r&sig=REDACTED"
          b' {"access_token": "<redacted>"} refresh_token=REDACTED')
    assert secrets_in(ok, {}) == []


# --- the scrubber ----------------------------------------------------------------------------


def test_scrub_text_sas_userinfo_and_percent_encoded_urls() -> None:
    url = "https://u:p@acct.blob.core.windows.net/c/d?sv=2021-08-06&se=2030-01-01T00%3A00Z&sr=b&sp=r&sig=Ab%2Fc%3D"
    assert scrub_text(url) == f"https://{URL_REDACTED}@acct.blob.core.windows.net/c/d?sv=2021-08-06&se=REDACTED&sr=b&sp=r&sig=REDACTED"
    inner = "/auth?remote_url=https%3A%2F%2Fa%2Fb%3Fsv%3D1%26sig%3DAbC%252F%26sp%3Dr"
    assert scrub_text(inner) == "/auth?remote_url=https%3A%2F%2Fa%2Fb%3Fsv%3D1%26sig%3DREDACTED%26sp%3Dr"
    assert scrub_text(f"token {REFRESH_JWT} end") == f"token {REDACTED} end"
    # Nothing else changes: digests, ns, ordinary queries.
    plain = "/v2/a/manifests/sha256:" + "a" * 64 + "?ns=lifecacr.azurecr.io&n=10&last=b"
    assert scrub_text(plain) == plain


def test_scrub_bodies_keep_every_other_byte() -> None:
    body = '{"token": "t1", "access_token":"t2", "expires_in": 300, "refresh_token" : "t\\"3", "scope": "repository:a:pull"}'
    assert scrub_json_text(body) == (
        '{"token": "<redacted>", "access_token":"<redacted>", "expires_in": 300, "refresh_token" : "<redacted>", '
        '"scope": "repository:a:pull"}'
    )
    form = "grant_type=refresh_token&service=s&scope=repository%3Aa%3Apull&refresh_token=rt&password=&access_token=at"
    assert scrub_form_text(form) == (
        "grant_type=refresh_token&service=s&scope=repository%3Aa%3Apull&refresh_token=REDACTED&password=&access_token=REDACTED"
    )


@pytest.mark.parametrize("name, value, expected", [
    ("Authorization", "Bearer abc.def.ghi", f"Bearer {REDACTED}"),
    ("authorization", "Basic dXNlcjpwYXNz", f"Basic {REDACTED}"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz", f"Basic {REDACTED}"),
    ("Cookie", "session=1", REDACTED),
    ("Set-Cookie", "session=1; Path=/", REDACTED),
    ("Location", "https://s/b?sig=x&se=y&sp=r", "https://s/b?sig=REDACTED&se=REDACTED&sp=r"),
    ("WWW-Authenticate", 'Bearer realm="https://r/oauth2/token",service="r"', 'Bearer realm="https://r/oauth2/token",service="r"'),
    ("X-Trace", REFRESH_JWT, REDACTED),
])
def test_scrub_header_values(name: str, value: str, expected: str) -> None:
    assert scrub_header_value(name, value) == expected


def token_flow() -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(
        method=b"POST", path=b"/oauth2/token", host="lifecacr.azurecr.io", port=443, scheme=b"https",
        headers=http.Headers(((b"content-type", b"application/x-www-form-urlencoded"),
                               (b"authorization", b"Basic dXNlcjpwYXNzd29yZA=="))),
        content=b"grant_type=refresh_token&service=lifecacr.azurecr.io&refresh_token=" + REFRESH_JWT.encode(),
    ))
    f.response = tutils.tresp(headers=http.Headers(((b"content-type", b"application/json"),)),
                              content=json.dumps({"access_token": REFRESH_JWT, "expires_in": 300}).encode())
    f.metadata["acr"] = {"note": f"https://s/b?sig=s3cr3t&sp=r {REFRESH_JWT}"}
    f.comment = "see https://s/b?sig=s3cr3t"
    return f


def test_scrub_flow_reaches_every_part_of_a_flow() -> None:
    f = scrub_flow(token_flow())
    data = json.dumps(f.get_state(), default=lambda b: b.decode("latin-1")).encode()
    assert secrets_in(data, {"sig": "s3cr3t"}) == []
    assert f.response is not None and json.loads(f.response.content)["expires_in"] == 300


def test_the_flow_writer_writes_scrubbed_copies_and_leaves_the_live_flow(tmp_path: Path) -> None:
    out = tmp_path / "flows.mitm"
    save = Save()
    with taddons.context(save) as tctx:
        install(tctx.master)
        assert isinstance(save, ScrubbingSave) and tctx.master.addons.get("save") is save
        chain = tctx.master.addons.chain
        assert isinstance(chain[0], RecordScrub) and chain.index(chain[0]) < chain.index(save)
        tctx.configure(save, save_stream_file=str(out))
        live = token_flow()
        live.live = True
        unfinished = token_flow()
        save.request(unfinished)  # still open at shutdown: written by done()
        save.response(live)
        # What the client is sent is untouched: the token answer still carries the token.
        assert live.response is not None and REFRESH_JWT.encode() in live.response.content
        tctx.master.commands.call("save.file", [live], str(tmp_path / "saved.mitm"))
        save.done()
    for path in (out, tmp_path / "saved.mitm"):
        data = path.read_bytes()
        assert secrets_in(data, {"sig": "s3cr3t"}) == [], path
    assert len(read_flows(str(out))) == 2


def test_record_scrub_removes_request_credentials_once_sent() -> None:
    f = tflow.tflow(req=tutils.treq(path=b"/c/b?sv=1&sig=s3cr3t&sp=r",
                                    headers=http.Headers(((b"authorization", b"Bearer abcdefgh"),))), resp=True)
    f.live = True
    scrubber = RecordScrub()
    scrubber.requestheaders(f)
    assert read_record(f)["client"] == {"method": "GET", "path": "/c/b?sv=1&sig=REDACTED&sp=r", "authority": ""}
    assert f.request.path.endswith("sig=s3cr3t&sp=r")  # not yet sent: untouched
    scrubber.responseheaders(f)
    assert f.request.path == "/c/b?sv=1&sig=REDACTED&sp=r"
    assert f.request.headers["authorization"] == f"Bearer {REDACTED}"


# --- recorded session shape --------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream_flows() -> list[http.HTTPFlow]:
    return read_flows(str(REPLAY_DIR / UPSTREAM_FLOWS))


@pytest.fixture(scope="module")
def client_flows() -> list[http.HTTPFlow]:
    return read_flows(str(REPLAY_DIR / CLIENT_FLOWS))


def test_the_upstream_session_has_acr_shape(upstream_flows: list[http.HTTPFlow]) -> None:
    registry, storage = SESSION["registry"], Origin.parse(SESSION["storage_origin"]).host
    challenge = next(f for f in upstream_flows if f.response and f.response.status_code == 401)
    assert challenge.response is not None
    assert challenge.response.headers["WWW-Authenticate"] == (
        f'Bearer realm="https://{registry}/oauth2/token",service="{registry}"')
    token = next(f for f in upstream_flows if f.request.path == "/oauth2/token")
    assert token.request.method == "POST" and token.request.host == registry
    assert token.request.urlencoded_form["grant_type"] == "refresh_token"
    assert token.request.urlencoded_form["refresh_token"] == URL_REDACTED
    referrers = [f for f in upstream_flows if "/referrers/" in f.request.path]
    types = {m["artifactType"] for f in referrers for m in json.loads(f.response.content)["manifests"]}  # type: ignore[union-attr]
    assert {"application/vnd.azure.artifact.streaming.v1", "application/vnd.azure.artifact.streaming.link.v1"} <= types
    redirects = [f for f in upstream_flows if f.response and f.response.status_code == 307]
    assert redirects and all(f.response.headers["Location"].startswith(f"https://{storage}/") for f in redirects)  # type: ignore[union-attr]
    assert all("sig=REDACTED" in f.response.headers["Location"] for f in redirects)  # type: ignore[union-attr]
    blobs = [f for f in upstream_flows if f.request.host == storage]
    assert blobs and all("Authorization" not in f.request.headers for f in blobs)


def test_the_client_session_carries_the_decisions(client_flows: list[http.HTTPFlow]) -> None:
    head = next(f for f in client_flows if f.request.method == "HEAD")
    meta = read_record(head)
    assert meta["teleport"]["to"] == SESSION["teleport"]["to"] and meta["teleport"]["from"] == SESSION["teleport"]["from"]
    assert head.marked == ":rocket:" and head.comment.startswith("teleport ")
    blobs = [f for f in client_flows if read_record(f).get("route") == "blobs"]
    assert blobs and all(read_record(f)["redirected"] and f.response.content is None for f in blobs)  # type: ignore[union-attr]


# --- 2. the chain re-run offline ----------------------------------------------------------------


def offline(tmp_path: Path, *sets: str, upstream: bool = True, runmd: Path = REPLAY_DIR / RUNMD) -> dict[str, Any]:
    report = tmp_path / f"report-{len(list(tmp_path.glob('report-*')))}.json"
    cmd = [MITMDUMP, "-n", "-q", "-r", str(REPLAY_DIR / CLIENT_FLOWS), "-s", str(ROOT / "acr_addons.py"),
           "--set", f"acr_runmd={runmd}", "--set", f"acr_replay_report={report}"]
    if upstream:
        cmd += ["--set", f"acr_replay_upstream={REPLAY_DIR / UPSTREAM_FLOWS}"]
    for s in sets:
        cmd += ["--set", s]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert report.is_file(), result.stdout + result.stderr
    return json.loads(report.read_text())


def changed(report: dict[str, Any]) -> dict[str, list[str]]:
    return {f["request"]: f["diffs"] for f in report["flows"] if f["diffs"]}


def test_offline_rerun_makes_every_recorded_decision_again(tmp_path: Path) -> None:
    report = offline(tmp_path, f"acr_platform={SESSION['platform']}")
    assert report["checked"] == SESSION["flows"]["client"] and report["changed"] == 0, changed(report)
    head = next(f for f in report["flows"] if f["request"].startswith("HEAD manifests"))
    assert head["now"]["teleport"] == f"to {SESSION['teleport']['to']}"
    assert head["now"]["resolved"] == SESSION["index"]
    blobs = [f for f in report["flows"] if " blobs " in f["request"]]
    assert blobs and all(f["now"].get("redirected") for f in blobs)


def test_offline_rerun_detects_a_changed_teleport_decision(tmp_path: Path) -> None:
    """The deliberate change: an arm64 node. The chain now picks the index's arm64 referrer."""
    report = offline(tmp_path, "acr_platform=linux/arm64")
    diffs = changed(report)
    assert list(diffs) == [f"HEAD manifests {SESSION['repository']}:{SESSION['tag']}"]
    (diff,) = next(iter(diffs.values()))
    assert diff == f"teleport: recorded to {SESSION['teleport']['to']}, now to {SESSION['arm64']['streamable']}"


def test_offline_routing_check_detects_a_changed_route(tmp_path: Path) -> None:
    same = offline(tmp_path, upstream=False)
    assert same["changed"] == 0 and same["upstream_recording"] is None
    runmd = tmp_path / "mirror.runmd"
    runmd.write_text((REPLAY_DIR / RUNMD).read_text().replace(": .manifests      head, get", ": .manifests      get"))
    report = offline(tmp_path, upstream=False, runmd=runmd)
    diffs = changed(report)
    assert list(diffs) == [f"HEAD manifests {SESSION['repository']}:{SESSION['tag']}"]
    assert any(d.startswith("refused: recorded -, now 405") for d in next(iter(diffs.values())))


# --- rehosting ---------------------------------------------------------------------------------


def test_rehost_parses_origins_and_respects_port_boundaries() -> None:
    mapping = parse_rehost("https://lifecacr.azurecr.io=http://127.0.0.1:5001, http://127.0.0.1:500=https://a.b")
    assert mapping[0] == (Origin("https", "lifecacr.azurecr.io", 443), Origin("http", "127.0.0.1", 5001))
    text = 'Bearer realm="https://lifecacr.azurecr.io/oauth2/token" http://127.0.0.1:5000/x http://127.0.0.1:500/y'
    assert replace_origins(text, mapping) == (
        'Bearer realm="http://127.0.0.1:5001/oauth2/token" http://127.0.0.1:5000/x https://a.b/y')
    assert replace_origins("ns=127.0.0.1%3A500&x=127.0.0.1:5000", mapping, names=True) == "ns=a.b&x=127.0.0.1:5000"
    for bad in ("https://a=ftp://b", "https://a/path=http://b", "no-equals"):
        with pytest.raises(ValueError):
            parse_rehost(bad)


def test_rehost_flow_moves_request_headers_bodies_and_metadata() -> None:
    f = tflow.tflow(req=tutils.treq(host="127.0.0.1", port=5001, path=b"/v2/a/manifests/v1?ns=127.0.0.1%3A5001"), resp=True)
    f.response.headers["Location"] = "http://127.0.0.1:5001/v2/x"  # type: ignore[union-attr]
    f.metadata["acr"] = {"ns": "127.0.0.1:5001", "upstream": "http://127.0.0.1:5001"}
    rehost_flow(f, parse_rehost("http://127.0.0.1:5001=https://lifecacr.azurecr.io"))
    assert f.request.url == "https://lifecacr.azurecr.io/v2/a/manifests/v1?ns=lifecacr.azurecr.io"
    assert f.response.headers["Location"] == "https://lifecacr.azurecr.io/v2/x"  # type: ignore[union-attr]
    assert read_record(f) == {"ns": "lifecacr.azurecr.io", "upstream": "https://lifecacr.azurecr.io"}


def test_recorded_upstream_matches_without_secrets(upstream_flows: list[http.HTTPFlow]) -> None:
    rec = RecordedUpstream(upstream_flows)
    blob = next(f for f in upstream_flows if f.request.host.endswith("blob.core.windows.net"))
    assert rec.find("GET", blob.request.url.replace("sig=REDACTED", "sig=other")) is blob
    assert rec.find("GET", "https://lifecacr.azurecr.io/oauth2/token?service=x&scope=y") is not None
    assert rec.find("GET", "https://lifecacr.azurecr.io/v2/unknown/manifests/v9") is None


# --- 3. the recorded ACR as the mirror's upstream -----------------------------------------------


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayServer]:
    folder = tmp_path_factory.mktemp("replay")
    with ReplayServer(REPLAY_DIR / UPSTREAM_FLOWS, [SESSION["registry_origin"], SESSION["storage_origin"]],
                      folder / "replay.log") as server:
        yield server


def replay_mirror(factory: Any, server: ReplayServer, *, teleport: bool = True, platform: str = SESSION["platform"]) -> Mirror:
    upstream = server.url(SESSION["registry_origin"])
    return factory([], runmd=replay_runmd(upstream, "127.0.0.1:{port}", teleport=teleport),
                   credentials="replay-refresh-token-not-a-secret", sets=[f"acr_platform={platform}"])


def ns_of(server: ReplayServer) -> str:
    return server.url(SESSION["registry_origin"]).split("//", 1)[1]


def test_server_replay_serves_the_whole_pull_without_a_registry(replay_server: ReplayServer, mirror_factory: Any) -> None:
    mirror = replay_mirror(mirror_factory, replay_server)
    result = http_pull(mirror.url, ns_of(replay_server), SESSION["repository"], SESSION["tag"], SESSION["platform"])
    assert check_pull(result, SESSION) == [], mirror.log_text()[-3000:]
    log = mirror.log_text()
    assert f"teleported to {SESSION['teleport']['to']}" in log and "via storage" in log
    assert "replay-refresh-token" not in log


def test_server_replay_detects_a_mirror_without_teleport(replay_server: ReplayServer, mirror_factory: Any) -> None:
    """The deliberate change: `.teleport` deleted from the runmd. The tag now resolves to the
    original index (whose image the recording does not hold), and the check says so."""
    mirror = replay_mirror(mirror_factory, replay_server, teleport=False)
    result = http_pull(mirror.url, ns_of(replay_server), SESSION["repository"], SESSION["tag"], SESSION["platform"])
    problems = check_pull(result, SESSION)
    assert any(p.startswith(f"teleport: the tag resolved to {SESSION['index']}") for p in problems), problems


def test_server_replay_detects_another_platform(replay_server: ReplayServer, mirror_factory: Any) -> None:
    mirror = replay_mirror(mirror_factory, replay_server, platform="linux/arm64")
    head = mirror.head(f"/v2/{SESSION['repository']}/manifests/{SESSION['tag']}?ns={ns_of(replay_server)}",
                       headers={"Accept": "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json"})
    assert head.headers["Docker-Content-Digest"] == SESSION["arm64"]["streamable"]


@pytest.mark.e2e
def test_server_replay_with_containerd(replay_server: ReplayServer, mirror_factory: Any, containerd: Any,
                                       tmp_hosts_dir: Any) -> None:
    if SESSION["platform"] != "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(__import__("platform").machine(), "?"):
        pytest.skip("the recorded session is for another platform than this machine's")
    mirror = replay_mirror(mirror_factory, replay_server)
    ns = ns_of(replay_server)
    tmp_hosts_dir.write(ns, mirror.url)
    ref = f"{ns}/{SESSION['repository']}:{SESSION['tag']}"
    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir, platform=SESSION["platform"])
    assert result.returncode == 0, result.stderr + mirror.log_text()[-3000:]
    assert containerd.image_target(ref) == SESSION["teleport"]["to"]
    assert set(SESSION["blobs"]) <= containerd.content_digests()


def test_record_script_documents_both_modes() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "record.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--fixture" in out.stdout and "--runmd" in out.stdout
    assert record.SECRET_PARAMS >= {"sig", "se"}
