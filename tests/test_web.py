"""Watching the mirror in mitmweb: `acr mirror start --web`, its flow list, filters and commands.

Flows carry the mirror's decisions: the URL is where the answer came from (the registry, or the
storage host of a followed redirect; the mirror's own address for a refusal), the comment leads
with the decision in a few characters (then who answered and every step's decision), a teleported
tag is marked 🚀, and `flow.metadata["acr"]` keeps it all as data. The tests run real mirrors with
`--web`: in front of the real registry with the OCI referrers API (a teleported tag, a tag without
referrer, a refused foreign `ns`, a 32 MiB blob), and in front of the recorded ACR session
(storage redirects). They check the flow list in headless Chromium (what a user sees), the filters
with mitmweb's own browser-side filter code (tests/harness/webfilter.py), and the commands through
mitmweb's HTTP API as its page calls them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mitmproxy import http, io, options
from mitmproxy.test import taddons
from mitmproxy.tools.dump import DumpMaster

from addons import catalog
from addons.chain import AcrMirror
from addons.core.mitm.web import FOCUS_HEADER, FOCUS_SCRIPT_PATH
from addons.proxy.context import Forward, RequestContext
from addons.proxy.routes import deliver
from addons.registry.oci import Upstream
from tests.harness import chromium, webfilter
from tests.harness.images import make_image, push_image, push_random_blob, push_referrer
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import free_port, wait_port
from tests.harness.referrers import ReferrersFront
from tests.harness.registry import Registry
from tests.harness.replay import REPLAY_DIR, RUNMD, UPSTREAM_FLOWS, ReplayServer, http_pull, replay_runmd, session_info

SESSION = session_info()
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "mitmweb-teleport.png"
STREAMING_LINK = "application/vnd.azure.artifact.streaming.link.v1"
SBOM = "application/spdx+json"
BLOB_SIZE = 32 << 20


class Web:
    """mitmweb's HTTP API, used as its page does (XSRF cookie echoed in a header)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.s = requests.Session()
        self.s.trust_env = False
        index = self.s.get(self.url + "/", timeout=10)
        assert index.status_code == 200 and "mitmproxy" in index.text.lower()
        self.index = index.text

    def flows(self) -> list[dict[str, Any]]:
        return self.s.get(self.url + "/flows", timeout=10).json()

    def command(self, name: str, *args: str, focus: str | None = None) -> Any:
        headers = {"X-XSRFToken": self.s.cookies.get("_xsrf", "")}
        if focus:
            headers[FOCUS_HEADER] = focus  # what the page's focus script adds
        r = self.s.post(f"{self.url}/commands/{name}", json={"arguments": list(args)}, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()


def headline(flow: dict[str, Any]) -> str:
    return flow["comment"].split("\n", 1)[0]


def url_of(flow: dict[str, Any]) -> str:
    """What the URL column shows (mitmweb's RequestUtils.pretty_url)."""
    req = flow["request"]
    default = {"http": 80, "https": 443}[req["scheme"]]
    port = "" if req["port"] == default else f":{req['port']}"
    return f"{req['scheme']}://{req['pretty_host']}{port}{req['path']}"


# --- a mirror in front of the real registry, with the OCI referrers API -----------------------


@dataclasses.dataclass
class Site:
    front: ReferrersFront
    mirror: Mirror
    web: Web
    repo: str
    streamable: str
    blob: str
    log: str = ""


def push_site(registry: Registry, repo: str) -> tuple[str, str]:
    """v1 with ACR's streaming link to a streamable image, v2 with only an SBOM referrer, a blob."""
    v1 = make_image({"hello.txt": b"hello from v1\n"})
    push_image(registry, repo, "v1", v1)
    fast = make_image({"hello.txt": b"hello from v1, streamable\n"}, overlaybd=True)
    push_image(registry, repo, None, fast)
    push_referrer(registry, repo, v1, STREAMING_LINK, {
        "streaming.format": "overlaybd", "streaming.version": "v1",
        "streaming.platform.os": "linux", "streaming.platform.arch": v1.platform["architecture"],
        "streaming.mediaType": fast.media_type, "streaming.digest": fast.digest, "streaming.size": str(fast.size)})
    v2 = make_image({"hello.txt": b"hello from v2\n"})
    push_image(registry, repo, "v2", v2)
    push_referrer(registry, repo, v2, SBOM, {"org.example": "not streamable"})
    blob, _ = push_random_blob(registry, repo, BLOB_SIZE, seed=16)
    return fast.digest, blob


@pytest.fixture(scope="module")
def site(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """`acr mirror start --web` after a scripted pull: a teleported tag (and its follow-up GET by
    digest), a tag without a streamable referrer, a refused foreign `ns`, and a 32 MiB blob."""
    repo = "web/hello"
    streamable, blob = push_site(registry, repo)
    home = tmp_path_factory.mktemp("web-mirror")
    web_port = free_port()
    with ReferrersFront(registry.url) as front:
        # This machine's containerd cannot stream overlaybd: the site vouches for it (`always`).
        mirror = Mirror(home, [front.url], args=["--web", "--web-port", str(web_port)], sets=["acr_teleport=always"])
        try:
            wait_port("127.0.0.1", web_port, 15)
            ns = front.host
            for tag in ("v1", "v2"):
                pulled = http_pull(mirror.url, ns, repo, tag)
                assert not pulled.errors, pulled.requests
            refused = requests.head(f"{mirror.url}/v2/{repo}/manifests/v1", params={"ns": "foreign.example"}, timeout=10)
            assert refused.status_code == 404
            with requests.get(f"{mirror.url}/v2/{repo}/blobs/{blob}", params={"ns": ns}, stream=True, timeout=60) as r:
                assert r.status_code == 200
                assert sum(len(c) for c in r.iter_content(1 << 20)) == BLOB_SIZE
            web = Web(web_port)
            deadline = time.monotonic() + 10
            while not any(headline(f).startswith("blob 32 MiB") for f in web.flows()) and time.monotonic() < deadline:
                time.sleep(0.1)
            yield Site(front, mirror, web, repo, streamable, blob)
        finally:
            mirror.stop()
            print(f"--- web mirror log ---\n{mirror.log_text()[-3000:]}")


def by_headline(flows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [f for f in flows if headline(f).startswith(prefix)]


def test_each_flow_shows_where_it_was_served_from_and_leads_with_the_decision(site: Site) -> None:
    flows = site.web.flows()
    registry = site.front.url
    (teleported,) = by_headline(flows, "🚀 → ")
    assert headline(teleported) == f"🚀 → {site.streamable[7:15]} overlaybd"
    assert teleported["marked"] == "🚀" and teleported["request"]["method"] == "HEAD"
    assert url_of(teleported) == f"{registry}/v2/{site.repo}/manifests/v1"
    assert teleported["comment"].split("\n")[1].startswith("answered by the mirror")
    assert any(line.startswith("teleport: ") for line in teleported["comment"].split("\n"))
    (follow_up,) = by_headline(flows, f"by digest {site.streamable[7:15]}")
    assert headline(follow_up) == f"by digest {site.streamable[7:15]} (🚀 {site.repo}:v1)"
    assert url_of(follow_up) == f"{registry}/v2/{site.repo}/manifests/{site.streamable}"
    (plain,) = by_headline(flows, "no teleport: ")
    assert headline(plain) == "no teleport: no-referrer" and plain["request"]["method"] == "HEAD"
    assert url_of(plain) == f"{registry}/v2/{site.repo}/manifests/v2"
    (refused,) = by_headline(flows, "refused ")
    assert headline(refused) == "refused 404 NAME_UNKNOWN"
    # Served by the mirror itself: its own address, never the foreign registry or reverse mode's placeholder.
    assert url_of(refused) == f"{site.mirror.url}/v2/{site.repo}/manifests/v1?ns=foreign.example"
    (big,) = by_headline(flows, "blob 32 MiB ")
    assert re.fullmatch(r"blob 32 MiB [\d.]+ [kMG]?B/s registry", headline(big)), headline(big)
    assert url_of(big) == f"{registry}/v2/{site.repo}/blobs/{site.blob}"
    assert "answered by the mirror" not in big["comment"]
    assert not any("127.0.0.1:9/" in url_of(f) for f in flows), [url_of(f) for f in flows]


def test_streamed_blob_records_bytes_duration_throughput_and_download_says_streamed(site: Site) -> None:
    dump = site.web.s.get(site.web.url + "/flows/dump", timeout=10)
    flows = list(io.FlowReader(__import__("io").BytesIO(dump.content)).stream())
    (big,) = [f for f in flows if f.metadata.get("acr", {}).get("reference") == site.blob]
    streamed = big.metadata["acr"]["streamed"]
    assert streamed["bytes"] == BLOB_SIZE and streamed["source"] == "registry" and not streamed["cut"]
    assert streamed["seconds"] > 0 and streamed["mb_per_s"] == pytest.approx(BLOB_SIZE / streamed["seconds"] / 1e6, rel=0.01)
    assert f"streamed {BLOB_SIZE} B (32 MiB) in " in big.comment
    download = site.web.s.get(f"{site.web.url}/flows/{big.id}/response/content.data", timeout=10)
    assert download.status_code == 200, download.text
    assert "was streamed to the client" in download.text and f"{BLOB_SIZE} bytes" in download.text
    view = site.web.s.get(f"{site.web.url}/flows/{big.id}/response/content/Auto.json", timeout=10)
    assert view.status_code == 200, view.text
    assert "Traceback" not in site.mirror.log_text()


#: The filters the README lists, and what each must find in the site's session.
README_FILTERS = {
    "~marked": ["🚀"],
    "~comment ^🚀": ["🚀"],
    '~comment "^no teleport"': ["no teleport"],
    "~comment ^refused": ["refused"],
    "~comment ^blob": ["blob"],
    '~comment "answered by the mirror"': ["🚀", "by digest", "no teleport", "refused", "manifest", "blob HEAD", "ping"],
}


def test_readme_filters_work_in_mitmwebs_search_box(site: Site) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Watching the mirror in mitmweb"):]
    section = section[:section.index("\n## ", 3)]
    listed = re.findall(r"`(~[^`]+)`", section)
    assert listed and set(listed) == set(README_FILTERS), listed
    flows = site.web.flows()
    names = {f["id"]: headline(f) for f in flows}
    for expr, wanted in README_FILTERS.items():
        found = [names[i] for i in webfilter.matching(expr, flows)]
        assert found and all(any(h.startswith(w) for w in wanted) for h in found), (expr, found)
    assert [names[i] for i in webfilter.matching("~marked", flows)] == [f"🚀 → {site.streamable[7:15]} overlaybd"]
    assert not webfilter.matching('!~comment "answered by the mirror" & !~comment ^blob', flows)
    with pytest.raises(webfilter.FilterSyntaxError):
        webfilter.matching("~meta digest-pinned", flows)  # mitmweb's search box has no ~meta


def test_acr_why_at_focus_explains_the_flow_selected_in_the_ui(site: Site) -> None:
    flows = site.web.flows()
    (plain,) = by_headline(flows, "no teleport: ")
    why = site.web.command("acr.why", "@focus", focus=plain["id"])["value"]
    assert why[0].startswith(f"HEAD /v2/{site.repo}/manifests/v2?ns=") and any("no-referrer" in line for line in why), why
    (refused,) = by_headline(flows, "refused ")
    why = site.web.command("acr.why", "@focus", focus=refused["id"])["value"]
    assert why[0].startswith(f"HEAD /v2/{site.repo}/manifests/v1") and "NAME_UNKNOWN" in why[1], why
    # The page loads the script that names the selected flow.
    assert f'src=".{FOCUS_SCRIPT_PATH}"' in site.web.index
    script = site.web.s.get(site.web.url + FOCUS_SCRIPT_PATH, timeout=10)
    assert script.status_code == 200 and FOCUS_HEADER in script.text
    # What the script adds to the page's command call, run with node in a stand-in window.
    page = """
      let sent = null;
      globalThis.window = {location: {hash: "#/flows/ID/comment"}, fetch: (url, init) => { sent = init; }};
      eval(require("fs").readFileSync(0, "utf8"));
      window.fetch("./commands/acr.why", {method: "POST", headers: {"X-XSRFToken": "x"}, body: "{}"});
      const command = sent.headers;
      window.fetch("./flows", {});
      process.stdout.write(JSON.stringify([command, sent.headers || null]));
    """.replace("ID", plain["id"])
    out = subprocess.run([webfilter.node(), "-e", page], input=script.text, capture_output=True, text=True,
                         timeout=30, check=True)
    command, other = json.loads(out.stdout)
    assert command == {"X-XSRFToken": "x", FOCUS_HEADER: plain["id"]} and other is None


def test_acr_teleports_groups_the_follow_up_get_under_its_tag_and_lists_refusals(site: Site) -> None:
    lines = site.web.command("acr.teleports", "@all")["value"]
    repo, s = site.repo, site.streamable
    assert lines[0].startswith(f"{repo}:v1 teleported sha256:") and lines[0].endswith(f"-> {s} (overlaybd)")
    assert lines[1] == f"  GET {repo}@{s} -> 200 (the client fetching the streamable manifest)"
    assert lines[2].startswith(f"{repo}:v2 not teleported: no-referrer")
    assert re.fullmatch(rf"  GET {repo}@sha256:[0-9a-f]{{64}} -> 200 \(the client fetching the manifest it was served\)", lines[3])
    assert lines[4] == f"refused: HEAD /v2/{repo}/manifests/v1 404 NAME_UNKNOWN: registry 'foreign.example' is not mirrored here"
    assert len(lines) == 5, lines
    assert not any("digest-pinned" in line for line in lines)


def test_status_bar_shows_the_real_listen_address_and_access_log_is_quiet(site: Site) -> None:
    state = site.web.s.get(site.web.url + "/options", timeout=10).json()
    assert (state["listen_host"]["value"], state["listen_port"]["value"]) == ("127.0.0.1", site.mirror.port)
    for _ in range(20):
        site.web.flows()
    assert " GET /flows " not in site.mirror.log_text() and "tornado.access" not in site.mirror.log_text()


def flow_rows(dom: str) -> list[dict[str, str]]:
    """The flow table's rows as rendered: each cell's text by its column class."""
    rows = []
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", dom, re.S):
        cells = dict(re.findall(r'<td class="col-([a-z]+)[^"]*"[^>]*>(.*?)</td>', tr, re.S))
        if "comment" in cells:
            rows.append({k: html.unescape(re.sub(r"<[^>]+>", " ", v)).strip() for k, v in cells.items()})
    return rows


@pytest.mark.skipif(chromium.browser() is None, reason="chromium is not installed (scripts/setup installs it)")
def test_flow_list_in_a_real_browser(site: Site, tmp_path: Path) -> None:
    dom = chromium.dump_dom(site.web.url + "/")
    rows = flow_rows(dom)
    assert rows, dom[-2000:]
    by = {r["comment"].split("  ")[0]: r for r in rows}
    registry = site.front.url
    teleported = next(r for r in rows if r["comment"].startswith(f"🚀 → {site.streamable[7:15]} overlaybd"))
    # mitmweb puts a flow's mark in front of its URL.
    assert teleported["path"] == f"🚀 {registry}/v2/{site.repo}/manifests/v1", teleported
    assert any(r["comment"].startswith("no teleport: no-referrer") and r["path"].endswith("/manifests/v2") for r in rows), rows
    assert any(r["comment"].startswith("refused 404 NAME_UNKNOWN") and r["path"].startswith(site.mirror.url) for r in rows), rows
    big = next(r for r in rows if r["comment"].startswith("blob 32 MiB "))
    assert big["path"] == f"{registry}/v2/{site.repo}/blobs/{site.blob}"
    manifest_sizes = [r["size"] for r in rows if "/manifests/" in r["path"] and r["comment"].startswith("by digest")]
    assert manifest_sizes and all(re.fullmatch(r"\d+(\.\d+)?(b|kb)", s) for s in manifest_sizes), manifest_sizes
    assert not any("127.0.0.1:9/" in r["path"] for r in rows), [r["path"] for r in rows]
    assert by  # every row has a comment
    footer = re.search(r'title="HTTP Proxy Server Address"[^>]*>(.*?)</span>', dom, re.S)
    assert footer and re.sub(r"<[^>]*>", "", footer.group(1)) == site.mirror.host, footer and footer.group(1)
    # The marked (teleported) row is what the screenshot in the README shows first.
    target = f"{site.web.url}/#/flows/{next(f['id'] for f in site.web.flows() if f['marked'])}/comment"
    # The test always photographs the page; scripts/web_screenshot.py asks it to keep the picture
    # for the README (a plain test run leaves the repository as it was).
    keep = os.environ.get("LIFEC_UPDATE_SCREENSHOT") == "1"
    shot = chromium.screenshot(target, SCREENSHOT if keep else tmp_path / SCREENSHOT.name)
    assert shot.stat().st_size > 10000


# --- no connection for what the mirror answers itself ---------------------------------------


class Listener:
    """A loopback socket that counts the connections it gets and answers each request with 200."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


class Deliver:
    """Answers /answered itself, forwards /forwarded: through the route's own `deliver`."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def request(self, flow: http.HTTPFlow) -> None:
        ctx = RequestContext(route="manifests", route_id=1, method=flow.request.method, name="demo/hello",
                             reference="v1", upstream=self.upstream)
        if flow.request.path.startswith("/answered"):
            ctx.answer = http.Response.make(200, b"{}", {"Content-Type": "application/json"})
        else:
            ctx.forward = Forward(self.upstream.url("/forwarded"), redirected=False)
        deliver(flow, ctx)


def test_answered_flow_shows_the_upstream_url_and_nothing_connects_there() -> None:
    listener = Listener()
    listen = free_port()
    upstream = Upstream(scheme="http", host=f"127.0.0.1:{listener.port}")

    async def run() -> tuple[int, int, str, tuple[str, int]]:
        opts = options.Options()
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        opts.update(mode=[f"reverse:http://127.0.0.1:9@127.0.0.1:{listen}"], connection_strategy="lazy")
        seen: list[http.HTTPFlow] = []

        class Keep:
            def response(self, flow: http.HTTPFlow) -> None:
                seen.append(flow)

        master.addons.add(Deliver(upstream), Keep())
        task = asyncio.create_task(master.run())
        await asyncio.to_thread(wait_port, "127.0.0.1", listen, 10)
        get = lambda path: requests.get(f"http://127.0.0.1:{listen}{path}", timeout=10)  # noqa: E731
        answered = await asyncio.to_thread(get, "/answered?ns=x")
        assert answered.status_code == 200 and answered.content == b"{}"
        await asyncio.sleep(0.3)
        after_answered = listener.connections
        forwarded = await asyncio.to_thread(get, "/forwarded?ns=x")
        assert forwarded.content == b"ok"
        after_forwarded = listener.connections
        master.shutdown()
        await task
        flow = seen[0]
        return after_answered, after_forwarded, flow.request.url, flow.server_conn.address

    try:
        after_answered, after_forwarded, shown, server = asyncio.run(run())
    finally:
        listener.close()
    assert shown == f"http://127.0.0.1:{listener.port}/v2/demo/hello/manifests/v1"
    assert server == ("127.0.0.1", listener.port)
    assert after_answered == 0, "the mirror's own answer opened a connection to the URL it shows"
    assert after_forwarded == 1  # the listener does see a forwarded flow: the check above can fail


# --- the recorded ACR session as upstream: storage redirects ----------------------------------


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayServer]:
    with ReplayServer(REPLAY_DIR / UPSTREAM_FLOWS, [SESSION["registry_origin"], SESSION["storage_origin"]],
                      tmp_path_factory.mktemp("replay") / "replay.log") as server:
        yield server


def test_acr_mirror_start_web_serves_mitmweb_with_the_chain(replay_server: ReplayServer, mirror_factory: Any) -> None:
    upstream = replay_server.url(SESSION["registry_origin"])
    storage = replay_server.url(SESSION["storage_origin"])
    web_port = free_port()
    mirror: Mirror = mirror_factory([], runmd=replay_runmd(upstream, "127.0.0.1:{port}"),
                                    credentials="replay-refresh-token-not-a-secret",
                                    sets=[f"acr_platform={SESSION['platform']}"],
                                    args=["--web", "--web-port", str(web_port)])
    wait_port("127.0.0.1", web_port, 15)
    ns = upstream.split("//", 1)[1]
    result = http_pull(mirror.url, ns, SESSION["repository"], SESSION["tag"], SESSION["platform"])
    assert not result.errors
    web = Web(web_port)
    # The client has its bytes a moment before the relay marks the last blob's flow done.
    deadline = time.monotonic() + 10
    listed = web.flows()
    while len(by_headline(listed, "blob ")) < len(SESSION["blobs"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        listed = web.flows()
    teleported = by_headline(listed, "🚀 → ")
    assert len(teleported) == 1 and teleported[0]["marked"] == "🚀"
    assert teleported[0]["request"]["method"] == "HEAD"
    assert url_of(teleported[0]) == f"{upstream}/v2/{SESSION['repository']}/manifests/{SESSION['tag']}"
    blobs = by_headline(listed, "blob ")
    assert len(blobs) == len(SESSION["blobs"])
    for f in blobs:
        assert re.fullmatch(r"blob \d+ (B|KiB) ([\d.]+ [kMG]?B/s|- MB/s) storage", headline(f)), headline(f)
        # The storage host the redirect led to; nothing of the SAS signature once the request is sent.
        assert url_of(f).startswith(storage + "/") and "sig=REDACTED" in f["request"]["path"], url_of(f)
    commands = web.s.get(web.url + "/commands", timeout=10).json()
    assert {"acr.teleports", "acr.why", "acr.tokens"} <= set(commands)
    value = web.command("acr.teleports", "@all")["value"]
    assert any(f"teleported {SESSION['teleport']['from']} -> {SESSION['teleport']['to']}" in line for line in value)
    tokens = web.command("acr.tokens")["value"]
    assert len(tokens) == 1 and tokens[0].startswith(f"{ns} repository:{SESSION['repository']}:pull expires in ")
    assert "eyJ" not in json.dumps(tokens)


def mirror_in(tmp_path: Path) -> AcrMirror:
    return AcrMirror(catalog.parse_text((REPLAY_DIR / RUNMD).read_text(), str(tmp_path / "mirror.runmd")))


def test_acr_tokens_shows_scopes_and_expiry_never_a_token(tmp_path: Path) -> None:
    class Tokens:
        def tokens(self) -> list[dict[str, Any]]:
            return [{"upstream": "lifecacr.azurecr.io", "scope": "repository:demo/hello:pull", "anonymous": False,
                     "expires_at": time.time() + 290, "expires_in": 290.4, "fetches": 1}]

    mirror = mirror_in(tmp_path)
    with taddons.context(mirror) as tctx:
        assert mirror.state is not None
        mirror.state.tokens = Tokens()  # type: ignore[assignment]
        (line,) = tctx.master.commands.execute("acr.tokens")
    assert line == "lifecacr.azurecr.io repository:demo/hello:pull expires in 290 s"


def test_web_refuses_a_non_loopback_ui(tmp_path: Path) -> None:
    home = tmp_path / "m"
    home.mkdir()
    (home / "mirror.runmd").write_text(replay_runmd("http://127.0.0.1:9", f"127.0.0.1:{free_port()}"))
    out = subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), "mirror", "serve", "--web",
                          "--web-port", str(free_port()), "--set", "web_host=0.0.0.0"],
                         capture_output=True, text=True, timeout=30, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "not a loopback address" in out.stderr
