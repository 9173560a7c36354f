"""`GET /metrics`: Prometheus text format or OpenMetrics, loopback only, and counts that match
what happened.

The scrape endpoint itself is driven through mitmproxy's test utilities; the counts are read
from a real `acr mirror start` after real requests: to docker-registry (a Range read included,
and a login with a JWT refresh token for the credential's expiry), and a pull served by the
recorded ACR session (tests/replay, `mitmdump --server-replay`), so requests, teleport decisions,
upstream latency, streamed bytes and the token fetch are all real. Scrapes are read with
prometheus_client's parsers, and `promtool check metrics` lints the live one.
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
from prometheus_client.openmetrics import parser as om_parser
from prometheus_client.parser import text_string_to_metric_families

from addons import catalog
from addons.chain import build_addons, build_state
from addons.observe.metrics import Metrics, request_kind
from tests.harness.images import ACCEPT_ALL_MANIFESTS, make_image, push_image
from tests.harness.promtool import SCRAPE_SERIES, metric_names, promtool
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer
from tests.test_monitoring import dashboard_expressions, rule_expressions
from tests.test_readme import check
from tests.harness.replay import (REPLAY_DIR, UPSTREAM_FLOWS, ReplayServer, http_pull, replay_runmd,
                                  session_info)

SESSION = session_info()
ACCEPT = {"Accept": ACCEPT_ALL_MANIFESTS}
RUNMD = replay_runmd("http://127.0.0.1:5000", "127.0.0.1:8578")

_KEY = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def canonical(key: str) -> str:
    """`name{b="2",a="1"}` as `name{a="1",b="2"}`: samples are looked up in any label order."""
    m = _KEY.match(key)
    assert m, key
    pairs = sorted(_LABEL.findall(m["labels"] or ""))
    return m["name"] + ("{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}" if pairs else "")


class Samples(dict):
    """A scrape's samples by `name{labels}`, read by prometheus_client's own parser."""

    def __getitem__(self, key: str) -> float:
        return super().__getitem__(canonical(key))

    def families(self) -> set[str]:
        return set(self.kinds)


def parse_exposition(text: str, openmetrics: bool = False) -> Samples:
    """Parse a scrape with the library's parser (OpenMetrics' strict one when asked), and check
    what it does not: counters are named `_total`, histogram buckets are cumulative."""
    parse = om_parser.text_string_to_metric_families if openmetrics else text_string_to_metric_families
    out = Samples()
    out.kinds = {}
    for family in parse(text):
        out.kinds[family.name] = family.type
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            labels = ",".join(f'{k}="{escape(v)}"' for k, v in sample.labels.items())
            key = canonical(f"{sample.name}{{{labels}}}")
            assert key not in out, f"duplicate sample {key}"
            dict.__setitem__(out, key, sample.value)
        if family.type == "histogram":
            series: dict[tuple, list[tuple[float, float]]] = {}
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                    series.setdefault(rest, []).append((float(sample.labels["le"]), sample.value))
            for rest, buckets in series.items():
                values = [v for _, v in sorted(buckets)]
                assert values == sorted(values), f"{family.name} buckets not cumulative"
    return out


#: The families the README shows from a live scrape: the ones whose values one pull fixes.
README_FAMILIES = ("acr_requests_total", "acr_teleport_decisions_total", "acr_streamed_bytes_total",
                   "acr_upstream_throttled_total")


def readme_excerpt(text: str) -> str:
    """The lines of README_FAMILIES' families in a scrape, in its order."""
    keep = [line for line in text.splitlines()
            if any(re.match(rf"^(# (HELP|TYPE) )?{name}[ {{]", line) for name in README_FAMILIES)]
    return "\n".join(keep) + "\n"


def exported_names(samples: Samples) -> set[str]:
    """The series names a scrape's families give a query: `_total` of a counter, `_bucket`,
    `_sum` and `_count` of a histogram (also for a family with no sample yet)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {name + suffix for name, kind in samples.kinds.items() for suffix in suffixes[kind]}


def samples_of(m: Metrics) -> Samples:
    """What a scrape of `m` would show now, parsed."""
    return parse_exposition(m.exposition()[0].decode())


@pytest.fixture
def metrics(tmp_path: Path) -> Metrics:
    compiled = catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd"))
    return Metrics(build_state(compiled))


def scrape(m: Metrics, method: str = "GET", peer: tuple[str, int] = ("127.0.0.1", 50000), path: bytes = b"/metrics",
           accept: str = "") -> http.HTTPFlow:
    f = tflow.tflow(req=tutils.treq(method=method.encode(), path=path))
    if accept:
        f.request.headers["Accept"] = accept
    f.client_conn.peername = peer
    f.live = True
    with taddons.context(m):
        m.requestheaders(f)
    return f


TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores"


def test_metrics_answer_in_the_text_format(metrics: Metrics) -> None:
    f = scrape(metrics)
    assert f.response is not None and f.response.status_code == 200
    assert f.response.headers["Content-Type"] == TEXT_FORMAT
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
    samples = samples_of(metrics)
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
    part = mirror.get(f"{base}/blobs/{layer.digest}{q}", headers={"Range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == layer.data[2:10]
    s = parse_exposition(mirror.get("/metrics").text)
    assert {k: v for k, v in s.items() if k.startswith("acr_requests_total")} == {canonical(k): v for k, v in {
        'acr_requests_total{route="manifests",method="HEAD",status="200"}': 1,
        'acr_requests_total{route="manifests",method="GET",status="200"}': 1,
        'acr_requests_total{route="manifests",method="GET",status="404"}': 1,
        'acr_requests_total{route="unrouted",method="GET",status="404"}': 1,
        'acr_requests_total{route="blobs",method="GET",status="200"}': 1,
        'acr_requests_total{route="blobs",method="GET",status="206"}': 1,
    }.items()}
    assert s["acr_range_requests_total"] == 1 and s["acr_range_bytes_total"] == 8
    assert s['acr_request_duration_seconds_count{route="blobs"}'] == 2
    # One decision per manifest answered 200: the tag's (why it is not teleported depends on the
    # node and the registry) and the digest's, which is never teleported.
    decisions = {k: v for k, v in s.items() if k.startswith("acr_teleport_decisions_total")}
    assert sum(decisions.values()) == 2 and decisions['acr_teleport_decisions_total{reason="digest-pinned"}'] == 1
    assert s['acr_streamed_bytes_total{source="registry"}'] == layer.size + 8
    assert s['acr_blob_first_byte_seconds_count{source="registry"}'] == 2
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
    s = samples_of(metrics)
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


def test_openmetrics_when_the_scrape_asks_for_it(metrics: Metrics) -> None:
    metrics.teleports.labels('a"b\\c').inc()
    f = scrape(metrics, accept="application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert f.response is not None and f.response.headers["Content-Type"] == OPENMETRICS
    assert (f.response.text or "").endswith("# EOF\n")
    s = parse_exposition(f.response.text or "", openmetrics=True)
    assert s['acr_teleport_decisions_total{reason="a\\"b\\\\c"}'] == 1  # label values escaped and read back
    assert s.kinds["acr_requests"] == "counter" and s.kinds["acr_request_duration_seconds"] == "histogram"
    assert scrape(metrics, accept="text/html").response.headers["Content-Type"] == TEXT_FORMAT  # type: ignore[union-attr]


def test_two_mirrors_in_one_process_count_apart(tmp_path: Path) -> None:
    compiled = catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd"))
    one, two = Metrics(build_state(compiled)), Metrics(build_state(compiled))
    one.requests.labels("manifests", "GET", "200").inc()
    assert samples_of(one)['acr_requests_total{route="manifests",method="GET",status="200"}'] == 1
    assert 'route="manifests"' not in two.exposition()[0].decode()
    from prometheus_client import REGISTRY

    assert not any(name.startswith("acr_") for name in REGISTRY._names_to_collectors)


def test_throttling_upstream_answers_are_counted(metrics: Metrics) -> None:
    # What the mirror's upstream requests report to the back-off (addons.proxy.upstream): a 429,
    # or a 503 that names a time, throttles; a bare 503 and a 200 do not.
    for status, retry_after in ((429, None), (503, "3"), (503, None), (200, None)):
        metrics.state.backoff.observe("127.0.0.1:5000", status, retry_after)
    samples = samples_of(metrics)
    assert samples['acr_upstream_throttled_total{upstream="127.0.0.1:5000"}'] == 2
    assert 0 < samples['acr_upstream_backoff_seconds{upstream="127.0.0.1:5000"}'] <= 10


def test_credential_expiry_is_the_refresh_tokens(token_server: TokenServer, token_registry: Registry,
                                                 repo_name: str, mirror_factory: Any) -> None:
    """A real mirror logged in with an ACR-style refresh token (a JWT): its expiry per upstream."""
    import jwt

    push_image(token_registry, repo_name, "v1", make_image({"expiry": repo_name.encode()}))
    refresh = token_server.issue_refresh_token()
    mirror = mirror_factory(token_registry.url, credentials=refresh)
    q = f"?ns={quote(token_registry.host, safe='')}"
    assert mirror.head(f"/v2/{repo_name}/manifests/v1{q}", headers=ACCEPT).status_code == 200
    s = parse_exposition(mirror.get("/metrics").text)
    expiry = jwt.decode(refresh, options={"verify_signature": False})["exp"]
    assert s[f'acr_credential_expiry_timestamp_seconds{{upstream="{token_registry.host}"}}'] == expiry


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
    assert r.status_code == 200 and r.headers["Content-Type"] == TEXT_FORMAT
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
    assert s['acr_request_duration_seconds_count{route="blobs"}'] == len(SESSION["blobs"])
    assert s['acr_range_requests_total'] == 0 and s['acr_range_bytes_total'] == 0
    # Prometheus' own linter on the live scrape, in both formats the mirror speaks.
    lint = promtool("check", "metrics", input=r.text)
    assert lint.returncode == 0 and not lint.stdout.strip() and not lint.stderr.strip(), lint.stdout + lint.stderr
    om = mirror.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"] == OPENMETRICS
    assert parse_exposition(om.text, openmetrics=True)['acr_teleport_decisions_total{reason="teleported"}'] == 1
    # Every metric the dashboard and the alert rules read is one this mirror exports.
    exported = exported_names(s) | SCRAPE_SERIES
    for where, expr in dashboard_expressions() + rule_expressions():
        assert metric_names(expr) <= exported, (where, metric_names(expr) - exported)
    check("metrics", "```text\n" + readme_excerpt(r.text) + "```\n", lambda t: re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", t))
    # The scrapes themselves are counted for the next one; /status is unaffected.
    again = parse_exposition(mirror.get("/metrics").text)
    assert again['acr_requests_total{route="metrics",method="GET",status="200"}'] == 2
    assert mirror.get("/status").json()["status"] == "ok"
