"""Watching the mirror in mitmweb: `acr mirror start --web`, filters and the acr.* commands.

Flows carry the mirror's decisions three ways: `flow.comment` (the flow list's comment column),
`flow.marked` (a teleported tag is marked :rocket:) and `flow.metadata["acr"]` (every step's
decision). The filters are checked on the recorded session (tests/replay), the commands through
mitmproxy's command manager, and one test runs a real `acr mirror start --web` whose upstream is
the recorded ACR, and uses mitmweb's own HTTP API as the browser would. No browser needed.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from mitmproxy import flowfilter, http
from mitmproxy.addons.view import View
from mitmproxy.test import taddons

from addons import catalog
from addons.chain import AcrMirror
from addons.observe.replay import read_flows
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import free_port, wait_port
from tests.harness.replay import (CLIENT_FLOWS, REPLAY_DIR, RUNMD, UPSTREAM_FLOWS, ReplayServer, http_pull,
                                  replay_runmd, session_info)

SESSION = session_info()


@pytest.fixture(scope="module")
def flows() -> list[http.HTTPFlow]:
    return read_flows(str(REPLAY_DIR / CLIENT_FLOWS))


def matching(expr: str, flows: list[http.HTTPFlow]) -> list[str]:
    f = flowfilter.parse(expr)
    return [flow.request.method + " " + flow.metadata["acr"]["reference"] for flow in flows if f(flow)]


def test_filters_find_the_teleported_pull(flows: list[http.HTTPFlow]) -> None:
    tag = SESSION["tag"]
    assert matching("~comment teleport", flows) == [f"HEAD {tag}"]
    assert matching("~marker rocket", flows) == [f"HEAD {tag}"]
    assert matching("~marked", flows) == [f"HEAD {tag}"]
    assert matching(f"~meta \"'to': '{SESSION['teleport']['to']}'\"", flows) == [f"HEAD {tag}"]
    assert matching("~meta streaming.link.v1", flows) == [f"HEAD {tag}"]
    assert matching("~meta digest-pinned", flows) == [f"GET {SESSION['teleport']['to']}"]
    blobs = sorted(f"GET {d}" for d in SESSION["blobs"])
    assert sorted(matching("~meta \"'redirected': True\"", flows)) == blobs
    assert sorted(matching("~comment \"^blobs \" & ~meta forward", flows)) == blobs
    assert matching("~comment teleport & !~marked", flows) == []


def mirror_in(tmp_path: Path) -> AcrMirror:
    return AcrMirror(catalog.parse_text((REPLAY_DIR / RUNMD).read_text(), str(tmp_path / "mirror.runmd")))


def test_acr_commands_explain_recorded_decisions(tmp_path: Path, flows: list[http.HTTPFlow]) -> None:
    view = View()
    mirror = mirror_in(tmp_path)
    with taddons.context(view, mirror) as tctx:
        view.add(flows)
        commands = tctx.master.commands
        assert {"acr.teleports", "acr.why", "acr.tokens"} <= set(commands.commands)
        teleports = commands.execute("acr.teleports @all")
        assert teleports == [
            f"{SESSION['repository']}:{SESSION['tag']} teleported {SESSION['teleport']['from']} -> "
            f"{SESSION['teleport']['to']} (overlaybd)",
            f"{SESSION['repository']}:{SESSION['teleport']['to']} not teleported: digest-pinned: pulled by digest: served as asked",
        ]
        why = commands.execute("acr.why @marked")
        assert why[0].startswith(f"HEAD /v2/{SESSION['repository']}/manifests/{SESSION['tag']}")
        assert any(line.strip().startswith("teleport: ") and SESSION["teleport"]["to"] in line for line in why)
        assert any(line.strip().startswith("discover: ") for line in why)
        assert commands.execute("acr.tokens") == []


def test_acr_tokens_shows_scopes_and_expiry_never_a_token(tmp_path: Path) -> None:
    class Tokens:
        def tokens(self) -> list[dict[str, Any]]:
            return [{"upstream": "lifecacr.azurecr.io", "scope": "repository:demo/hello:pull", "anonymous": False,
                     "expires_at": time.time() + 290, "expires_in": 290.4, "fetches": 1}]

    mirror = mirror_in(tmp_path)
    with taddons.context(mirror) as tctx:
        assert mirror.state is not None
        mirror.state.services["tokens"] = Tokens()
        (line,) = tctx.master.commands.execute("acr.tokens")
    assert line == "lifecacr.azurecr.io repository:demo/hello:pull expires in 290 s"


# --- a real `acr mirror start --web` -------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayServer]:
    with ReplayServer(REPLAY_DIR / UPSTREAM_FLOWS, [SESSION["registry_origin"], SESSION["storage_origin"]],
                      tmp_path_factory.mktemp("replay") / "replay.log") as server:
        yield server


class Web:
    """mitmweb's HTTP API, used as its page does (XSRF cookie echoed in a header)."""

    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.s = requests.Session()
        self.s.trust_env = False
        index = self.s.get(self.url + "/", timeout=10)
        assert index.status_code == 200 and "mitmproxy" in index.text.lower()

    def flows(self) -> list[dict[str, Any]]:
        return self.s.get(self.url + "/flows", timeout=10).json()

    def command(self, name: str, *args: str) -> Any:
        r = self.s.post(f"{self.url}/commands/{name}", json={"arguments": list(args)},
                        headers={"X-XSRFToken": self.s.cookies.get("_xsrf", "")}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()


def test_acr_mirror_start_web_serves_mitmweb_with_the_chain(replay_server: ReplayServer, mirror_factory: Any) -> None:
    upstream = replay_server.url(SESSION["registry_origin"])
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
    listed = web.flows()
    teleported = [f for f in listed if f["comment"].startswith("teleport ")]
    assert len(teleported) == 1 and teleported[0]["marked"] == "🚀"
    assert teleported[0]["request"]["method"] == "HEAD"
    blobs = [f for f in listed if f["comment"].startswith("blobs ")]
    assert len(blobs) == len(SESSION["blobs"])
    # Nothing of the storage SAS URL is shown once the request is sent.
    assert all("sig=REDACTED" in f["request"]["path"] for f in blobs), [f["request"]["path"] for f in blobs]
    commands = web.s.get(web.url + "/commands", timeout=10).json()
    assert {"acr.teleports", "acr.why", "acr.tokens"} <= set(commands)
    value = web.command("acr.teleports", "@all")["value"]
    assert any(f"teleported {SESSION['teleport']['from']} -> {SESSION['teleport']['to']}" in line for line in value)
    tokens = web.command("acr.tokens")["value"]
    assert len(tokens) == 1 and tokens[0].startswith(f"{ns} repository:{SESSION['repository']}:pull expires in ")
    assert "eyJ" not in json.dumps(tokens)


def test_web_refuses_a_non_loopback_ui(tmp_path: Path) -> None:
    home = tmp_path / "m"
    home.mkdir()
    (home / "mirror.runmd").write_text(replay_runmd("http://127.0.0.1:9", f"127.0.0.1:{free_port()}"))
    out = subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), "mirror", "serve", "--web",
                          "--web-port", str(free_port()), "--set", "web_host=0.0.0.0"],
                         capture_output=True, text=True, timeout=30, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 2 and "not a loopback address" in out.stderr
