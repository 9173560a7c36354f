"""Outages in process: the back-off window on an injected clock, shared flights from threads and
the event loop, the stale store on disk, and stale answers on the worker-thread path (here
the transport is told not to answer on the loop; tests/test_outage.py covers the loop)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import taddons

from addons import catalog
from addons.chain import AcrMirror
from addons.core.flight import Flights
from addons.core.offline import Answer, run_hooks_now
from addons.proxy import backoff as backoff_mod
from addons.proxy.backoff import Backoff, retry_after_seconds
from addons.proxy.stale import Entry, StaleStore, accept_class, file_name
from addons.proxy.state import MirrorState
from addons.proxy.upstream import UpstreamError, send
from addons.registry import oci
from addons.registry.oci import Upstream
from tests import test_teleport_unit as teleport_unit
from tests.harness.inprocess import calls, install

UPSTREAM = Upstream.from_spec("http://127.0.0.1:5000")
NS = UPSTREAM.ns


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- back-off ---------------------------------------------------------------------------


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None


def test_backoff_default_cap_and_what_starts_it() -> None:
    clock = Clock()
    b = Backoff(clock)
    assert b.observe("h", 503, None) is None and b.observe("h", 500, "5") is None and not b.active
    assert b.observe("h", 429, None) == backoff_mod.DEFAULT
    assert b.observe("other", 503, "86400") == backoff_mod.CAP
    assert b.remaining("H") == backoff_mod.DEFAULT
    clock.now += backoff_mod.DEFAULT
    assert b.remaining("h") == 0.0 and b.throttled["h"] == 1


def test_one_upstream_request_per_window(tmp_path: Path) -> None:
    """A registry answering 429 with Retry-After: 5 is asked once per window, however often the
    mirror is asked; the time moves on an injected clock."""
    clock = Clock()
    state = MirrorState(home=tmp_path, upstreams={NS: UPSTREAM}, backoff=Backoff(clock))
    adapter = install(state, lambda req: (429, {"Retry-After": "5"}, b'{"errors":[]}'))
    url = UPSTREAM.url("/v2/app/manifests/v1")
    for window in range(3):
        assert send(state, "GET", url, share="manifest").status_code == 429
        for _ in range(64):
            with pytest.raises(UpstreamError) as e:
                send(state, "GET", url, share="manifest")
            assert e.value.code == "TOOMANYREQUESTS" and e.value.retry_after == "5"
        assert len(calls(adapter)) == window + 1
        clock.now += 4.5
        with pytest.raises(UpstreamError) as e:
            send(state, "GET", url)
        assert e.value.retry_after == "1"
        clock.now += 0.5
    assert state.backoff.throttled[NS] == 3


# --- shared flights ---------------------------------------------------------------------


def test_threads_and_coroutines_share_one_flight_and_a_leaving_caller_cancels_nothing() -> None:
    flights = Flights()
    release = threading.Event()
    runs = []

    def work() -> str:
        runs.append(1)
        release.wait(10)
        return "answer"

    async def main() -> None:
        leader = asyncio.create_task(flights.arun("manifest", "k", lambda: asyncio.to_thread(work)))
        await asyncio.sleep(0)
        joiners = [asyncio.create_task(flights.arun("manifest", "k", lambda: asyncio.to_thread(work))) for _ in range(3)]
        thread_result: list[Any] = []
        t = threading.Thread(target=lambda: thread_result.append(flights.run("manifest", "k", work)))
        t.start()
        while flights.joined["manifest"] < 4:
            await asyncio.sleep(0.001)
        leader.cancel()  # the first client hangs up: the others still get the answer
        joiners[0].cancel()
        release.set()
        results = await asyncio.gather(*joiners[1:])
        await asyncio.to_thread(t.join, 10)
        assert results == [("answer", True)] * 2 and thread_result == [("answer", True)]
        with pytest.raises(asyncio.CancelledError):
            await leader

    asyncio.run(main())
    assert runs == [1] and flights.in_flight() == 0


def test_a_failure_is_shared_too() -> None:
    flights = Flights()

    def fail() -> None:
        raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", "down")

    with pytest.raises(UpstreamError):
        flights.run("manifest", "k", fail)
    assert flights.in_flight() == 0


# --- the store --------------------------------------------------------------------------


def entry(tag: str, body: bytes = b"{}", saved: float = 1000.0, accept: str = "a") -> Entry:
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    return Entry((NS, "app", tag, accept), saved, {"Content-Type": oci.OCI_MANIFEST, oci.CONTENT_DIGEST_HEADER: digest},
                 body, (oci.OCI_MANIFEST, digest, body))


def test_the_store_is_owner_only_survives_a_restart_and_ignores_what_it_cannot_read(tmp_path: Path) -> None:
    folder = tmp_path / "stale"
    store = StaleStore(folder)
    store.put(entry("v1"))
    store.put(entry("v2", b'{"a":1}'))
    store.flush()
    assert folder.stat().st_mode & 0o777 == 0o700
    assert sorted(p.stat().st_mode & 0o777 for p in folder.iterdir()) == [0o600, 0o600]
    (folder / "garbage.json").write_text("{not json")
    (folder / ("0" * 40 + ".json")).write_bytes(entry("v3").to_json())  # named for another key
    again = StaleStore(folder)
    got = again.get((NS, "app", "v2", "a"))
    assert got is not None and got.body == b'{"a":1}' and len(again) == 2
    assert again.drop(NS, "app", "v1") == 1
    again.flush()
    assert not (folder / file_name((NS, "app", "v1", "a"))).exists()
    store.close()
    again.close()


def test_the_store_is_bounded_and_drops_the_least_recently_used(tmp_path: Path) -> None:
    store = StaleStore(tmp_path / "stale", limit_entries=3)
    for tag in ("a", "b", "c"):
        store.put(entry(tag))
    assert store.get((NS, "app", "a", "a")) is not None  # used: b is now the oldest
    store.put(entry("d"))
    store.flush()
    assert store.get((NS, "app", "b", "a")) is None and len(store) == 3
    assert len(list((tmp_path / "stale").iterdir())) == 3
    small = StaleStore(tmp_path / "small", limit_bytes=entry("x").size * 2)
    for tag in "xyz":
        small.put(entry(tag))
    assert len(small) == 2 and small.size <= small.limit_bytes
    store.close()
    small.close()


def test_an_unchanged_answer_is_rewritten_only_after_refresh(tmp_path: Path) -> None:
    store = StaleStore(tmp_path / "stale")
    store.put(entry("v1", saved=1000.0))
    store.put(entry("v1", saved=1010.0))
    assert store.get((NS, "app", "v1", "a")).saved == 1000.0  # type: ignore[union-attr]
    store.put(entry("v1", saved=1000.0 + 61))
    assert store.get((NS, "app", "v1", "a")).saved == 1061.0  # type: ignore[union-attr]
    store.close()


# --- stale answers on the worker-thread path ---------------------------------------------

RUNMD = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy          127.0.0.1:8578
: .manifests      head, get
:   .authn        oauth2
:   .resolve
: .blobs          get
:   .authn        oauth2
:   .pull
```
"""


def make_flow(ref: str, method: str = "HEAD") -> http.HTTPFlow:
    return teleport_unit.make_flow(f"/v2/app/manifests/{ref}?ns=127.0.0.1%3A5000", method)


def test_a_cold_lookup_in_a_worker_thread_is_answered_stale(tmp_path: Path) -> None:
    body = json.dumps({"schemaVersion": 2, "mediaType": oci.OCI_MANIFEST, "layers": []}).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    mode = {"answer": "ok"}

    def registry(req: requests.PreparedRequest) -> Answer:
        if mode["answer"] == "down":
            raise requests.ConnectionError("refused")
        if req.path_url.startswith("/v2/app/manifests/v1"):
            return 200, {"Content-Type": oci.OCI_MANIFEST, "Docker-Content-Digest": digest}, body
        return (200, {}, b"{}") if req.path_url == "/v2/" else (404, {}, b"")

    mirror = AcrMirror(catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd")))
    state = mirror.state
    assert state is not None
    state.stale = StaleStore(tmp_path / "stale")
    adapter = install(state, registry)
    adapter.asend = None  # type: ignore[assignment]  # no answers on the loop: lookups run in a worker thread
    with taddons.context(mirror):
        fresh = run_hooks_now(mirror.addons, make_flow("v1", "GET"), ("requestheaders", "request", "response"))
        mode["answer"] = "down"
        stale_at = time.time()
        stale = run_hooks_now(mirror.addons, make_flow("v1", "GET"), ("requestheaders", "request", "response"))
        unseen = run_hooks_now(mirror.addons, make_flow("v2"), ("requestheaders", "request", "response"))
        # Never for a digest, even one the store were to hold an answer for.
        pinned = "sha256:" + "2" * 64
        state.stale.put(Entry((NS, "app", pinned, accept_class(oci.accept_values(http.Headers(
            ((b"Accept", oci.DEFAULT_ACCEPT.encode()),))))), 0.0, {}, body, (oci.OCI_MANIFEST, pinned, body)))
        state.stale.clock = lambda: 1.0
        by_digest = run_hooks_now(mirror.addons, make_flow(pinned), ("requestheaders", "request", "response"))
        # Older than acr_stale_max: not given.
        state.settings.stale_max = 60.0
        state.stale.clock = lambda: stale_at + 61.0
        too_old = run_hooks_now(mirror.addons, make_flow("v1", "GET"), ("requestheaders", "request", "response"))
    assert fresh.response is not None and stale.response is not None and unseen.response is not None
    assert stale.response.status_code == 200 and stale.response.content == fresh.response.content == body
    assert stale.response.headers["Warning"] == '110 - "Response is Stale"'
    assert stale.metadata["acr"]["stale"]["reason"] == "refused"
    assert stale.comment.startswith("stale 0s: upstream unreachable")
    assert unseen.response.status_code == 502
    assert by_digest.response is not None and by_digest.response.status_code == 502
    assert too_old.response is not None and too_old.response.status_code == 502
    assert "too old" in too_old.comment
    # The token once, then each lookup in a worker thread.
    assert state.counters["worker_hops"] == 6
    state.stale.close()
