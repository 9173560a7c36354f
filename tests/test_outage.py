"""Outages and throttling, against a running `acr mirror start`: stale tag answers while the
registry cannot answer, one upstream request for many identical lookups, back-off after 429.

The registry here is a stand-in (tests/harness/fakeserver.py) whose answers the test switches:
a 404 for a deleted tag, a 503, a 429 with `Retry-After`, or an answer held until the test
releases it. tests/test_outage_containerd.py is the same story told by real containerd.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import pytest
import requests

from tests.harness.fakeserver import Fake, Seen
from tests.harness.loglines import TEXT_TIME, parse
from tests.harness.mirror import Mirror
from tests.harness.ports import direct_session
from tests import test_readme as readme

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
#: containerd's Accept for a tag lookup.
CONTAINERD_ACCEPT = {"Accept": ", ".join((DOCKER_MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json",
                                          OCI_MANIFEST, "application/vnd.oci.image.index.v1+json", "*/*"))}
WARNING = '110 - "Response is Stale"'
#: Seconds a mirror may take to start on a machine shared by several test runs.
START = 60.0


def manifest(text: str) -> tuple[bytes, str]:
    body = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 2,
                   "digest": "sha256:" + hashlib.sha256(b"{}").hexdigest()},
        "layers": [], "annotations": {"text": text},
    }).encode()
    return body, "sha256:" + hashlib.sha256(body).hexdigest()


class StandIn:
    """A registry whose answer for `app` manifests the test switches (`mode`)."""

    def __init__(self, fake_server: Callable[..., Fake]) -> None:
        self.mode = "ok"
        self.body, self.digest = manifest("v1")
        self.release = threading.Event()
        self.release.set()
        self.retry_after = "5"
        self.fake = fake_server(self.answer)

    def answer(self, h: Any, seen: Seen) -> None:
        path = seen.path.partition("?")[0]
        if path == "/v2/":
            return h.json(200, {})
        if path.startswith("/v2/app/manifests/") and not path.endswith(("/sha256-" + self.digest[7:],)):
            mode = self.mode
            if mode == "ok":
                self.release.wait(30)
                return h.reply(200, self.body, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": self.digest})
            if mode == "404":
                return h.json(404, {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]})
            if mode == "403":
                return h.json(403, {"errors": [{"code": "DENIED", "message": "denied"}]})
            if mode == "429":
                return h.json(429, {"errors": [{"code": "TOOMANYREQUESTS", "message": "slow down"}]},
                              {"Retry-After": self.retry_after})
            return h.json(503, {"errors": [{"code": "UNAVAILABLE", "message": "down"}]})
        return h.json(404, {"errors": [{"code": "NOT_FOUND", "message": "no"}]})

    def lookups(self, tag: str = "v1") -> int:
        return sum(1 for s in self.fake.requests if s.path.partition("?")[0] == f"/v2/app/manifests/{tag}")


@pytest.fixture
def stand_in(fake_server: Callable[..., Fake]) -> StandIn:
    return StandIn(fake_server)


@pytest.fixture
def mirror(mirror_factory: Callable[..., Mirror], stand_in: StandIn) -> Mirror:
    m = mirror_factory(stand_in.fake.url, sets=["acr_teleport=never"], start=False)
    m.start(timeout=START)
    return m


def path(stand_in: StandIn, ref: str = "v1", kind: str = "manifests") -> str:
    return f"/v2/app/{kind}/{ref}?ns={quote(stand_in.fake.host, safe='')}"


def metric(m: Mirror, name: str, **labels: str) -> float:
    """One sample of the mirror's /metrics, read by prometheus_client's parser (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(m.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_a_tag_seen_before_is_answered_stale_while_the_registry_fails(mirror: Mirror, stand_in: StandIn) -> None:
    fresh = mirror.get(path(stand_in), headers=CONTAINERD_ACCEPT)
    assert fresh.status_code == 200 and "Warning" not in fresh.headers
    stand_in.mode = "503"
    for method in ("HEAD", "GET"):
        stale = direct_session().request(method, mirror.url + path(stand_in), headers=CONTAINERD_ACCEPT, timeout=30)
        assert stale.status_code == 200, stale.text
        assert stale.headers["Warning"] == WARNING
        for name in ("Docker-Content-Digest", "Content-Type", "Content-Length", "Etag"):
            assert stale.headers[name] == fresh.headers[name], name
    assert stale.content == fresh.content == stand_in.body
    lines = [line for line in mirror.log_text().splitlines() if "manifests app:v1 -> 200" in line and "stale" in line]
    assert len(lines) == 2 and "upstream 503)" in lines[0], lines
    # README's sample is this line in the one log format, with the digest and port made stable
    # (its time is compared as any time).
    sample = lines[0].replace(stand_in.digest, "sha256:DIGEST").replace(stand_in.fake.host, "127.0.0.1:PORT")
    assert parse(sample) is not None and parse(sample).level == "INFO", sample
    readme.check("stale-log", f"```\n{sample}\n```\n", lambda text: TEXT_TIME.sub("TIME ", text))
    assert metric(mirror, "acr_stale_answers_total", upstream=stand_in.fake.host, reason="5xx") == 2
    status = mirror.get("/status").json()["stale"]
    assert status["answers"] == 2 and status["last"]["digest"] == stand_in.digest and status["last"]["reason"] == "5xx"
    # Never for a digest (one the mirror holds is served from its cache, as always), a tag
    # never seen, or a client whose Accept decides another answer.
    assert mirror.get(path(stand_in, stand_in.digest), headers=CONTAINERD_ACCEPT).headers.get("Warning") is None
    assert mirror.get(path(stand_in, "sha256:" + "1" * 64), headers=CONTAINERD_ACCEPT).status_code == 503
    assert mirror.get(path(stand_in, "never"), headers=CONTAINERD_ACCEPT).status_code == 503
    assert mirror.get(path(stand_in), headers={"Accept": DOCKER_MANIFEST}).status_code == 503
    # A registry that answers 403 answers: its answer stands.
    stand_in.mode = "403"
    assert mirror.get(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 502
    # The registry is back: the next answer is fresh.
    stand_in.mode = "ok"
    again = mirror.get(path(stand_in), headers=CONTAINERD_ACCEPT)
    assert again.status_code == 200 and "Warning" not in again.headers


def test_a_deleted_tag_stays_deleted(mirror: Mirror, stand_in: StandIn) -> None:
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 200
    stand_in.mode = "404"
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 404
    stand_in.mode = "503"  # the 404 dropped the kept answer: nothing stale to give
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 503


def test_stale_answers_survive_a_restart_and_can_be_turned_off(mirror: Mirror, stand_in: StandIn) -> None:
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 200
    mirror.stop()
    stand_in.mode = "503"
    mirror.start(timeout=START)
    answer = mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT)
    assert answer.status_code == 200 and answer.headers["Warning"] == WARNING
    folder = mirror.home / ".work" / "stale"
    assert folder.stat().st_mode & 0o777 == 0o700
    files = list(folder.iterdir())
    assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
    assert "app" not in files[0].name  # a repository name never becomes a path
    mirror.stop()
    mirror.sets.append("acr_stale_max=0")
    mirror.start(timeout=START)
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 503


def _concurrently(n: int, fn: Callable[[], requests.Response]) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: fn(), range(n)))


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_64_concurrent_cold_lookups_of_one_tag_cost_one_upstream_request(mirror: Mirror, stand_in: StandIn) -> None:
    stand_in.release.clear()  # the registry holds its answer until all 64 lookups wait for it
    n = 64
    with concurrent.futures.ThreadPoolExecutor(1) as outer:
        running = outer.submit(_concurrently, n, lambda: mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT))
        _wait_until(lambda: metric(mirror, "acr_shared_lookups_total", kind="manifest") == n - 1,
                    "63 lookups joined the first")
        stand_in.release.set()
        answers = running.result()
    assert stand_in.lookups() == 1
    assert {a.status_code for a in answers} == {200}
    assert len({tuple(sorted((k, v) for k, v in a.headers.items() if k != "Date")) for a in answers}) == 1


def test_429_stops_requests_for_the_window_and_clients_are_answered_at_once(mirror: Mirror, stand_in: StandIn) -> None:
    assert mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT).status_code == 200
    stand_in.mode = "429"
    before = stand_in.lookups()
    first = _concurrently(64, lambda: mirror.head(path(stand_in), headers=CONTAINERD_ACCEPT))
    other = _concurrently(64, lambda: mirror.get(path(stand_in, "other"), headers=CONTAINERD_ACCEPT))
    assert stand_in.lookups() - before == 1 and stand_in.lookups("other") == 0
    # The tag seen before is answered stale, the others 503 TOOMANYREQUESTS with what is left of the window.
    assert {a.status_code for a in first} == {200} and {a.headers["Warning"] for a in first} == {WARNING}
    assert {a.status_code for a in other} == {503}
    assert {a.json()["errors"][0]["code"] for a in other} == {"TOOMANYREQUESTS"}
    assert {1, 2, 3, 4, 5} >= {int(a.headers["Retry-After"]) for a in other}
    blob = mirror.get(path(stand_in, "sha256:" + "0" * 64, "blobs"))
    assert blob.status_code == 503 and blob.json()["errors"][0]["code"] == "TOOMANYREQUESTS"
    assert stand_in.lookups() - before == 1 and not any("/blobs/" in s.path for s in stand_in.fake.requests)
    assert metric(mirror, "acr_upstream_throttled_total", upstream=stand_in.fake.host) == 1
    assert metric(mirror, "acr_backoff_refusals_total", upstream=stand_in.fake.host) >= 64 + 1
    assert 0 < metric(mirror, "acr_upstream_backoff_seconds", upstream=stand_in.fake.host) <= 5
    assert metric(mirror, "acr_stale_answers_total", upstream=stand_in.fake.host, reason="429") >= 1
