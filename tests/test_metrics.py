"""`GET /metrics`: Prometheus text format, loopback only, and counts that match what happened.

The scrape endpoint itself is driven through mitmproxy's test utilities; the counts are read
from a real `acr mirror start` after real requests: to docker-registry, and a pull served by the
recorded ACR session (tests/replay, `mitmdump --server-replay`), so requests, teleport decisions,
upstream latency, streamed bytes and the token fetch are all real.
"""

from __future__ import annotations

import re
from urllib.parse import quote
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons import catalog
from addons.chain import build_addons, build_state
from addons.observe.metrics import CONTENT_TYPE, Histogram, Metrics, request_kind
from tests.harness.images import ACCEPT_ALL_MANIFESTS, make_image, push_image
from tests.harness.registry import Registry
from tests.harness.replay import (REPLAY_DIR, UPSTREAM_FLOWS, ReplayServer, http_pull, replay_runmd,
                                  session_info)

SESSION = session_info()
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
RUNMD = replay_runmd("http://127.0.0.1:5000", "127.0.0.1:8578")

#: One sample line of the text format 0.0.4: name, optional labels, value.
SAMPLE_RE = re.compile(
    r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?P<labels>\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\})?'
    r" (?P<value>[-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|\+Inf|-Inf|NaN))$"
)


def parse_exposition(text: str) -> dict[str, float]:
    """Check every line of an exposition and return {'name{labels}': value}."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert len(line.split(" ", 3)) == 4, line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped") and name not in typed, line
            typed[name] = kind
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not a sample line: {line!r}"
        family = re.sub(r"_(bucket|sum|count)$", "", m["name"]) if m["name"] not in typed else m["name"]
        assert family in typed, f"{m['name']} has no TYPE line"
        if typed[family] == "counter":
            assert m["name"].endswith("_total"), m["name"]
        key = m["name"] + (m["labels"] or "")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(m["value"])
    # Histograms: cumulative buckets, +Inf equal to _count.
    for family in (f for f, k in typed.items() if k == "histogram"):
        series: dict[str, list[tuple[float, float]]] = {}
        for key, value in samples.items():
            m = re.match(rf"^{family}_bucket\{{(?P<rest>.*)le=\"(?P<le>[^\"]+)\"\}}$", key)
            if m:
                series.setdefault(m["rest"], []).append((float(m["le"].replace("+Inf", "inf")), value))
        for rest, buckets in series.items():
            values = [v for _, v in sorted(buckets)]
            assert values == sorted(values), f"{family} buckets not cumulative"
            labels = "{" + rest.rstrip(",") + "}" if rest else ""
            assert values[-1] == samples[f"{family}_count{labels}"]
    return samples


@pytest.fixture
def metrics(tmp_path: Path) -> Metrics:
    compiled = catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd"))
    return Metrics(build_state(compiled))


def scrape(m: Metrics, method: str = "GET", peer: tuple[str, int] = ("127.0.0.1", 50000), path: bytes = b"/metrics") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path))
    f.client_conn.peername = peer
    f.live = True
    with taddons.context(m):
        m.requestheaders(f)
    return f


def test_metrics_answer_in_the_text_format(metrics: Metrics) -> None:
    f = scrape(metrics)
    assert f.response is not None and f.response.status_code == 200
    assert f.response.headers["Content-Type"] == CONTENT_TYPE
    samples = parse_exposition(f.response.text or "")
    assert samples["acr_tokens_cached"] == 0 and samples["acr_metrics_refused_total"] == 0
    head = scrape(metrics, "HEAD")
    assert head.response is not None and head.response.content == b""
    assert int(head.response.headers["Content-Length"]) > 100
    assert scrape(metrics, "POST").response.status_code == 405  # type: ignore[union-attr]
    assert scrape(metrics, path=b"/v2/").response is None  # not ours


@pytest.mark.parametrize("peer", [("10.1.2.3", 4000), ("::ffff:192.168.1.5", 4000), ("2001:db8::1", 4000)])
def test_metrics_only_for_loopback_clients(metrics: Metrics, peer: tuple[str, int]) -> None:
    f = scrape(metrics, peer=peer)
    assert f.response is not None and f.response.status_code == 403
    assert b"acr_" not in f.response.content
    samples = parse_exposition(metrics.render())
    assert samples["acr_metrics_refused_total"] == 1


def test_requests_and_decisions_of_real_requests_are_counted(registry: Registry, repo_name: str,
                                                              mirror_factory: Any) -> None:
    """What a real mirror counted for requests it served from a real docker-registry (the
    records come from the requests themselves, whatever carries them inside the mirror)."""
    image = make_image({"counted": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    mirror = mirror_factory(registry.url)
    q = f"?ns={quote(registry.host, safe='')}"
    base = f"/v2/{repo_name}"
    layer = image.layers[0]
    assert mirror.head(f"{base}/manifests/v1{q}", headers=ACCEPT).status_code == 200
    assert mirror.get(f"{base}/manifests/{image.digest}{q}", headers=ACCEPT).status_code == 200
    assert mirror.get(f"{base}/manifests/nope{q}", headers=ACCEPT).status_code == 404
    assert mirror.get(f"{base}/manifests/v1?ns=not-mirrored.example", headers=ACCEPT).status_code == 404
    assert mirror.get(f"{base}/blobs/{layer.digest}{q}").content == layer.data
    s = parse_exposition(mirror.get("/metrics").text)
    assert {k: v for k, v in s.items() if k.startswith("acr_requests_total")} == {
        'acr_requests_total{route="manifests",method="HEAD",status="200"}': 1,
        'acr_requests_total{route="manifests",method="GET",status="200"}': 1,
        'acr_requests_total{route="manifests",method="GET",status="404"}': 1,
        'acr_requests_total{route="unrouted",method="GET",status="404"}': 1,
        'acr_requests_total{route="blobs",method="GET",status="200"}': 1,
    }
    # One decision per manifest answered 200: the tag's (why it is not teleported depends on the
    # node and the registry) and the digest's, which is never teleported.
    decisions = {k: v for k, v in s.items() if k.startswith("acr_teleport_decisions_total")}
    assert sum(decisions.values()) == 2 and decisions['acr_teleport_decisions_total{reason="digest-pinned"}'] == 1
    assert s['acr_streamed_bytes_total{source="registry"}'] == layer.size
    assert s['acr_blob_first_byte_seconds_count{source="registry"}'] == 1
    assert 'acr_streamed_bytes_total{source="storage"}' not in s
    again = parse_exposition(mirror.get("/metrics").text)
    assert again['acr_requests_total{route="metrics",method="GET",status="200"}'] == 1


def test_upstream_latency_comes_from_the_mirrors_session(metrics: Metrics) -> None:
    assert metrics.observe_upstream in metrics.state.session.hooks["response"]
    resp = requests.Response()
    resp.status_code = 200
    resp.request = requests.Request("GET", "http://127.0.0.1:5000/v2/a/manifests/v1").prepare()
    import datetime

    resp.elapsed = datetime.timedelta(milliseconds=42)
    metrics.observe_upstream(resp)
    resp.request = requests.Request("GET", "https://acct.blob.core.windows.net/c/d?sig=x").prepare()
    metrics.observe_upstream(resp)
    s = parse_exposition(metrics.render())
    assert s['acr_upstream_request_duration_seconds_bucket{kind="manifests",le="0.05"}'] == 1
    assert s['acr_upstream_request_duration_seconds_bucket{kind="manifests",le="0.025"}'] == 0
    assert s['acr_upstream_responses_total{upstream="127.0.0.1:5000",kind="manifests",status="200"}'] == 1
    assert s['acr_upstream_responses_total{upstream="storage",kind="storage",status="200"}'] == 1


@pytest.mark.parametrize("url, kind", [
    ("http://r/v2/", "ping"),
    ("http://r/v2/a/b/manifests/v1", "manifests"),
    ("http://r/v2/a/blobs/sha256:ab", "blobs"),
    ("http://r/v2/a/referrers/sha256:ab?artifactType=x", "referrers"),
    ("http://r/v2/a/_oras/artifacts/referrers?digest=x", "referrers"),
    ("http://r/v2/a/tags/list", "tags"),
    ("http://r/oauth2/token", "token"),
    ("https://auth.docker.io/token?service=x", "token"),
    ("http://r/oauth2/exchange", "exchange"),
    ("https://other/blob/data", "storage"),
])
def test_request_kinds_are_a_closed_set(url: str, kind: str) -> None:
    assert request_kind(url, {"r"}) == kind


def test_histogram_and_label_escaping() -> None:
    h = Histogram((0.1, 1.0))
    h.observe(('a"b\\c\nd',), 0.5)
    lines = list(h.render("x_seconds", ("k",)))
    assert lines[0] == 'x_seconds_bucket{k="a\\"b\\\\c\\nd",le="0.1"} 0'
    assert lines[1].endswith('le="1"} 1') and lines[2].endswith('le="+Inf"} 1')


def test_metrics_stand_among_the_front_addons(tmp_path: Path) -> None:
    compiled = catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd"))
    addons = build_addons(compiled, build_state(compiled))
    names = [type(a).__name__ for a in addons]
    assert names.index("Metrics") < names.index("Proxy")


# --- a real mirror, a real pull (served by the recorded session) ---------------------------------


@pytest.fixture(scope="module")
def replay_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayServer]:
    with ReplayServer(REPLAY_DIR / UPSTREAM_FLOWS, [SESSION["registry_origin"], SESSION["storage_origin"]],
                      tmp_path_factory.mktemp("replay") / "replay.log") as server:
        yield server


def test_metrics_after_a_teleported_pull(replay_server: ReplayServer, mirror_factory: Any) -> None:
    upstream = replay_server.url(SESSION["registry_origin"])
    mirror = mirror_factory([], runmd=replay_runmd(upstream, "127.0.0.1:{port}"),
                            credentials="replay-refresh-token-not-a-secret", sets=[f"acr_platform={SESSION['platform']}"])
    ns = upstream.split("//", 1)[1]
    result = http_pull(mirror.url, ns, SESSION["repository"], SESSION["tag"], SESSION["platform"])
    assert not result.errors, mirror.log_text()[-2000:]
    r = mirror.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"] == CONTENT_TYPE
    s = parse_exposition(r.text)
    assert s['acr_requests_total{route="manifests",method="HEAD",status="200"}'] == 1
    assert s['acr_requests_total{route="blobs",method="GET",status="200"}'] == len(SESSION["blobs"])
    assert s['acr_teleport_decisions_total{reason="teleported"}'] == 1
    assert s['acr_teleport_decisions_total{reason="digest-pinned"}'] == 1
    assert s['acr_streamed_bytes_total{source="storage"}'] == sum(SESSION["blobs"].values())
    assert s[f'acr_token_fetches_total{{upstream="{ns}"}}'] == 1
    for kind in ("ping", "token", "manifests", "referrers", "blobs"):
        assert s[f'acr_upstream_request_duration_seconds_count{{kind="{kind}"}}'] >= 1, kind
    assert s[f'acr_upstream_responses_total{{upstream="{ns}",kind="blobs",status="307"}}'] == len(SESSION["blobs"])
    # The scrape itself is counted for the next one; /status is unaffected.
    again = parse_exposition(mirror.get("/metrics").text)
    assert again['acr_requests_total{route="metrics",method="GET",status="200"}'] == 1
    assert mirror.get("/status").json()["status"] == "ok"
