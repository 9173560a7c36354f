"""`GET /metrics`: what the mirror did, for Prometheus, to loopback clients.

Answered ahead of the `+ .proxy` root, like `/status`, by `prometheus_client` in the text format
(0.0.4), or in OpenMetrics when the scrape's `Accept` asks for `application/openmetrics-text`.
Each mirror has its own `CollectorRegistry` (two mirrors in one process stay apart); nothing
goes into the library's global registry.

Everything is counted from what the chain already records: a request's route, status, teleport
decision and credentials are read when the answer is complete; the latency of the mirror's own
upstream requests (manifests, referrers, token grants, blob probes) is observed by a response
hook on the mirror's one `requests` session, which `requests` calls once the headers have
arrived; a streamed blob's bytes are its `Content-Length` once mitmproxy has finished streaming
it (no per-chunk work on the data path); token fetches, internal events, stale answers,
back-off and shared lookups are read from the mirror's state at scrape time.

Label values are bounded: routes and request kinds are fixed words, upstreams are the `.mirror`
lines, a storage host is `storage`; repository names and digests never become labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import requests
from mitmproxy import http
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder

from addons.proxy.credentials_endpoint import loopback_peer
from addons.proxy.context import read_record, record
from addons.registry import oci
from addons.registry.auth import Credentials, jwt_expiry
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)

PATH = "/metrics"
#: Seconds; registries answer manifests in milliseconds, token grants and cold storage in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def request_kind(url: str, upstream_hosts: Iterable[str]) -> str:
    """A bounded word for an upstream request: the API it calls, or `storage` for another host."""
    parts = urlsplit(url)
    path = parts.path
    if path.endswith("/oauth2/token") or path.endswith("/token"):
        return "token"
    if path.endswith("/oauth2/exchange"):
        return "exchange"
    if parts.netloc.lower() not in upstream_hosts:
        return "storage"
    if path in ("/v2", "/v2/"):
        return "ping"
    for kind in ("manifests", "blobs", "referrers", "tags"):
        if f"/{kind}/" in path or path.endswith(f"/{kind}/list"):
            return kind
    if "/_oras/" in path:
        return "referrers"
    return "other"


class StateCollector:
    """What the mirror's state already counts, read at scrape time: tokens and internal events."""

    def __init__(self, state: MirrorState) -> None:
        self.state = state

    def collect(self) -> Iterable[Metric]:
        fetches = CounterMetricFamily("acr_token_fetches", "Upstream tokens fetched, by upstream.", labels=["upstream"])
        cached = GaugeMetricFamily("acr_tokens_cached", "Upstream tokens held in the cache.")
        tokens = self.state.tokens
        per_upstream: dict[str, int] = {}
        for (ns, _scope), n in list(tokens.fetches.items()):
            per_upstream[ns] = per_upstream.get(ns, 0) + n
        for ns, n in sorted(per_upstream.items()):
            fetches.add_metric([ns], n)
        cached.add_metric([], len(tokens.tokens()))
        events = CounterMetricFamily("acr_events", "The mirror's internal event counters (as in /status).", labels=["event"])
        for event, n in sorted(self.state.counters.items()):
            events.add_metric([event], n)
        return [fetches, cached, events, *self.outage()]

    def outage(self) -> list[Metric]:
        """Stale answers, back-off and shared lookups (addons.proxy.outage, backoff, core.flight)."""
        hosts = {u.ns.lower() for u in self.state.upstreams.values()}

        def upstream(host: str) -> str:
            return host if host in hosts else "other"

        stale = CounterMetricFamily(
            "acr_stale_answers",
            "Tag lookups answered with the last answer because the upstream could not answer, by reason.",
            labels=["upstream", "reason"])
        by: dict[tuple[str, str], int] = {}
        if self.state.stale is not None:
            for (host, reason), n in list(self.state.stale.served.by.items()):
                by[(upstream(host), reason)] = by.get((upstream(host), reason), 0) + n
        for key, n in sorted(by.items()):
            stale.add_metric(list(key), n)
        backoff = self.state.backoff
        throttled = CounterMetricFamily(
            "acr_upstream_throttled",
            "Upstream answers asking the mirror to wait (429, or 503 with Retry-After), by upstream.",
            labels=["upstream"])
        refusals = CounterMetricFamily(
            "acr_backoff_refusals",
            "Requests answered without asking the upstream because it asked the mirror to wait, by upstream.",
            labels=["upstream"])
        for family, counts in ((throttled, backoff.throttled), (refusals, backoff.refusals)):
            per: dict[str, int] = {}
            for host, n in list(counts.items()):
                per[upstream(host)] = per.get(upstream(host), 0) + n
            for host, n in sorted(per.items()):
                family.add_metric([host], n)
        windows = backoff.windows()
        left = GaugeMetricFamily("acr_upstream_backoff_seconds", "Seconds of back-off left, by upstream.",
                                 labels=["upstream"])
        for host in sorted(hosts):
            left.add_metric([host], max(0.0, windows.get(host, 0.0)))
        shared = CounterMetricFamily(
            "acr_shared_lookups", "Lookups that joined an identical upstream request already in flight, by kind.",
            labels=["kind"])
        joined = dict(self.state.flights.joined)
        joined["token"] = joined.get("token", 0) + self.state.tokens.joined
        for kind in ("manifest", "referrers", "token"):
            shared.add_metric([kind], joined.get(kind, 0))
        return [stale, throttled, refusals, left, shared]


class Metrics:
    """Counts requests and decisions; answers `GET /metrics` (see the module docstring)."""

    name = "acr-metrics"

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("acr_requests", "Requests the mirror answered, by route, method and status.",
                                ["route", "method", "status"], registry=r)
        self.request_duration = Histogram(
            "acr_request_duration_seconds", "Seconds from a request's first byte to its answer's last, by route.",
            ["route"], buckets=BUCKETS, registry=r)
        self.teleports = Counter(
            "acr_teleport_decisions",
            "Tag resolutions by teleport decision: 'teleported', or the reason the original was served.",
            ["reason"], registry=r)
        self.upstream_latency = Histogram(
            "acr_upstream_request_duration_seconds",
            "Seconds until an upstream answered a request of the mirror's own, by request kind.",
            ["kind"], buckets=BUCKETS, registry=r)
        self.upstream_responses = Counter(
            "acr_upstream_responses", "Answers to the mirror's own upstream requests, by upstream, request kind and status.",
            ["upstream", "kind", "status"], registry=r)
        self.first_byte = Histogram(
            "acr_blob_first_byte_seconds", "Seconds from a blob request to the first byte of the streamed answer, by source.",
            ["source"], buckets=BUCKETS, registry=r)
        self.streamed_bytes = Counter("acr_streamed_bytes", "Bytes of blobs streamed to clients, by source.",
                                      ["source"], registry=r)
        self.range_requests = Counter("acr_range_requests", "Blob reads answered with part of a blob (206).", registry=r)
        self.range_bytes = Counter("acr_range_bytes", "Bytes of blobs sent in answers to Range reads.", registry=r)
        self.credential_expiry = Gauge(
            "acr_credential_expiry_timestamp_seconds",
            "When the credentials the mirror uses for an upstream expire (POSIX seconds), where they say so.",
            ["upstream"], registry=r)
        self.refused_scrapes = Counter("acr_metrics_refused", "Scrapes refused because the client was not on loopback.",
                                       registry=r)
        started = Gauge("acr_start_time_seconds", "When this mirror process started (POSIX seconds).", registry=r)
        started.set(time.time())
        r.register(StateCollector(state))
        #: The expiry read from each set of credentials seen, so a token is decoded once.
        self._expiry: dict[Credentials, float | None] = {}
        # The session every plugin and the token client use (MirrorState.session).
        state.session.hooks["response"].append(self.observe_upstream)

    # -- observations ---------------------------------------------------------------------

    def observe_upstream(self, resp: requests.Response, *args: Any, **kwargs: Any) -> None:
        """requests' response hook (worker threads): latency until the upstream's headers arrived."""
        try:
            hosts = {u.ns.lower() for u in self.state.upstreams.values()}
            kind = request_kind(resp.request.url or "", hosts)
            upstream = urlsplit(resp.request.url or "").netloc.lower()
            if upstream not in hosts:
                upstream = "storage" if kind == "storage" else "other"
            self.upstream_latency.labels(kind).observe(resp.elapsed.total_seconds())
            self.upstream_responses.labels(upstream, kind, str(resp.status_code)).inc()
        except Exception:  # a metric must never break a pull
            logger.debug("upstream metric failed", exc_info=True)

    def _credentials(self, flow: http.HTTPFlow) -> None:
        """The expiry of the credentials this request used upstream, when they carry one."""
        ctx = self.state.contexts.get(flow)
        creds = getattr(ctx, "credentials", None)
        if ctx is None or creds is None or ctx.upstream is None:
            return
        if creds not in self._expiry:
            self._expiry[creds] = jwt_expiry(creds.password)
        expiry = self._expiry[creds]
        if expiry is not None:
            self.credential_expiry.labels(ctx.upstream.ns).set(expiry)

    def _count(self, flow: http.HTTPFlow) -> None:
        meta = read_record(flow)
        route = meta.get("endpoint") or meta.get("route") or "unrouted"
        resp = flow.response if not flow.error else None
        self.requests.labels(route, flow.request.method, str(resp.status_code) if resp is not None else "error").inc()
        end = resp.timestamp_end if resp is not None and resp.timestamp_end else time.time()
        if flow.request.timestamp_start:
            self.request_duration.labels(route).observe(max(0.0, end - flow.request.timestamp_start))
        teleport = meta.get("teleport") or {}
        if teleport:
            self.teleports.labels("teleported" if "to" in teleport else str(teleport.get("skipped", "unknown"))).inc()
        self._credentials(flow)
        if meta.get("forward") and resp is not None:
            source = "storage" if meta.get("redirected") else "registry"
            if resp.timestamp_start and flow.request.timestamp_end:
                self.first_byte.labels(source).observe(max(0.0, resp.timestamp_start - flow.request.timestamp_end))
            if resp.status_code in (200, 206):
                try:
                    size = int(resp.headers.get("content-length", ""))
                except ValueError:
                    size = len(resp.raw_content or b"")
                self.streamed_bytes.labels(source).inc(size)
            part = meta.get("range")
            if resp.status_code == 206 and part:
                self.range_requests.inc()
                self.range_bytes.inc(part["end"] - part["start"] + 1)

    # -- hooks ----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if req.first_line_format != "relative" or req.path.partition("?")[0] != PATH:
            return
        record(flow)["endpoint"] = "metrics"
        if not loopback_peer(flow):
            self.refused_scrapes.inc()
            flow.response = http.Response.make(403, b"metrics are only served to clients on this machine\n",
                                               {"Content-Type": "text/plain; charset=utf-8"})
            return
        if req.method not in ("GET", "HEAD"):
            flow.response = http.Response.make(405, b"", {"Allow": "GET, HEAD"})
            return
        body, content_type = self.exposition(req.headers.get("accept", ""))
        headers = {"Content-Type": content_type, "Cache-Control": "no-store"}
        flow.response = oci.make_response(200, body, headers, req.method)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._count(flow)

    # -- the exposition -------------------------------------------------------------------

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The scrape's body and content type: OpenMetrics when `accept` asks for it."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
