"""`GET /metrics`: what the mirror did, in Prometheus' text format (0.0.4), for loopback clients.

Answered ahead of the `+ .proxy` root, like `/status`. Everything is counted from what the
chain already records: a request's route and status and its teleport decision are read from
`flow.metadata["acr"]` when the answer is complete; the latency of the mirror's own upstream
requests (manifests, referrers, token grants, blob probes) is observed by a response hook on
the mirror's one `requests` session, which `requests` calls once the headers have arrived; a
streamed blob's bytes are its `Content-Length` once mitmproxy has finished streaming it (no
per-chunk work on the data path); token fetches are the token client's own count.

Label values are bounded: routes and request kinds are fixed words, upstreams are the `.mirror`
lines, a storage host is `storage`; repository names and digests never become labels.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

import requests
from mitmproxy import http

from addons.proxy.credentials_endpoint import loopback_peer
from addons.proxy.context import info
from addons.registry import oci
from addons.proxy.state import MirrorState

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATH = "/metrics"
#: Seconds; registries answer manifests in milliseconds, token grants and cold storage in seconds.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def labels(names: Sequence[str], values: Sequence[Any]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{escape(str(v))}"' for n, v in zip(names, values)) + "}"


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) and not value.is_integer() else str(int(value))


class Histogram:
    """A labelled histogram; `observe` is called from the worker threads of `requests`."""

    def __init__(self, buckets: Sequence[float] = BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    series[i] += 1
            series[-2] += value  # sum
            series[-1] += 1  # count

    def count(self, key: tuple[str, ...]) -> int:
        with self._lock:
            return int(self._series.get(key, [0.0])[-1])

    def render(self, name: str, label_names: Sequence[str]) -> Iterable[str]:
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._series.items())
        for key, series in items:
            for i, bound in enumerate(self.buckets):
                yield f"{name}_bucket{labels((*label_names, 'le'), (*key, _number(bound)))} {int(series[i])}"
            yield f"{name}_bucket{labels((*label_names, 'le'), (*key, '+Inf'))} {int(series[-1])}"
            yield f"{name}_sum{labels(label_names, key)} {series[-2]:.6f}"
            yield f"{name}_count{labels(label_names, key)} {int(series[-1])}"


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


class Metrics:
    """Counts requests and decisions; answers `GET /metrics` (see the module docstring)."""

    name = "acr-metrics"

    def __init__(self, state: MirrorState) -> None:
        self.state = state
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.teleports: collections.Counter[str] = collections.Counter()
        self.upstream_responses: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.upstream_latency = Histogram()
        self.first_byte = Histogram()
        self.streamed_bytes: collections.Counter[str] = collections.Counter()
        self.refused_scrapes = 0
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
            self.upstream_latency.observe((kind,), resp.elapsed.total_seconds())
            with self._lock:
                self.upstream_responses[(upstream, kind, str(resp.status_code))] += 1
        except Exception:  # a metric must never break a pull
            logger.debug("upstream metric failed", exc_info=True)

    def _count(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get("acr") or {}
        route = meta.get("endpoint") or meta.get("route") or "unrouted"
        status = str(flow.response.status_code) if flow.response is not None and not flow.error else "error"
        teleport = meta.get("teleport") or {}
        with self._lock:
            self.requests[(route, flow.request.method, status)] += 1
            if teleport:
                self.teleports["teleported" if "to" in teleport else str(teleport.get("skipped", "unknown"))] += 1
        if meta.get("forward") and flow.response is not None and not flow.error:
            source = "storage" if meta.get("redirected") else "registry"
            resp = flow.response
            if resp.timestamp_start and flow.request.timestamp_end:
                self.first_byte.observe((source,), max(0.0, resp.timestamp_start - flow.request.timestamp_end))
            if resp.status_code in (200, 206):
                try:
                    size = int(resp.headers.get("content-length", ""))
                except ValueError:
                    size = len(resp.raw_content or b"")
                with self._lock:
                    self.streamed_bytes[source] += size

    # -- hooks ----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if req.first_line_format != "relative" or req.path.partition("?")[0] != PATH:
            return
        info(flow)["endpoint"] = "metrics"
        if not loopback_peer(flow):
            self.refused_scrapes += 1
            flow.response = http.Response.make(403, b"metrics are only served to clients on this machine\n",
                                               {"Content-Type": "text/plain; charset=utf-8"})
            return
        if req.method not in ("GET", "HEAD"):
            flow.response = http.Response.make(405, b"", {"Allow": "GET, HEAD"})
            return
        body = self.render().encode()
        headers = {"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
        flow.response = oci.make_response(200, body, headers, req.method)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        if flow.live:
            self._count(flow)

    # -- the exposition -------------------------------------------------------------------

    def render(self) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: Iterable[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            requests_ = sorted(self.requests.items())
            teleports = sorted(self.teleports.items())
            upstream = sorted(self.upstream_responses.items())
            streamed = sorted(self.streamed_bytes.items())
        family("acr_requests_total", "counter", "Requests the mirror answered, by route, method and status.",
               (f"acr_requests_total{labels(('route', 'method', 'status'), k)} {v}" for k, v in requests_))
        family("acr_teleport_decisions_total", "counter",
               "Tag resolutions by teleport decision: 'teleported', or the reason the original was served.",
               (f"acr_teleport_decisions_total{labels(('reason',), (k,))} {v}" for k, v in teleports))
        family("acr_upstream_request_duration_seconds", "histogram",
               "Seconds until an upstream answered a request of the mirror's own, by request kind.",
               self.upstream_latency.render("acr_upstream_request_duration_seconds", ("kind",)))
        family("acr_upstream_responses_total", "counter",
               "Answers to the mirror's own upstream requests, by upstream, request kind and status.",
               (f"acr_upstream_responses_total{labels(('upstream', 'kind', 'status'), k)} {v}" for k, v in upstream))
        family("acr_blob_first_byte_seconds", "histogram",
               "Seconds from a blob request to the first byte of the streamed answer, by source.",
               self.first_byte.render("acr_blob_first_byte_seconds", ("source",)))
        family("acr_streamed_bytes_total", "counter", "Bytes of blobs streamed to clients, by source.",
               (f"acr_streamed_bytes_total{labels(('source',), (k,))} {v}" for k, v in streamed))
        tokens = self.state.tokens
        fetches: collections.Counter[str] = collections.Counter()
        for (ns, _scope), n in list(tokens.fetches.items()):
            fetches[ns] += n
        cached = len(tokens.tokens())
        family("acr_token_fetches_total", "counter", "Upstream tokens fetched, by upstream.",
               (f"acr_token_fetches_total{labels(('upstream',), (k,))} {v}" for k, v in sorted(fetches.items())))
        family("acr_tokens_cached", "gauge", "Upstream tokens held in the cache.", [f"acr_tokens_cached {cached}"])
        family("acr_events_total", "counter", "The mirror's internal event counters (as in /status).",
               (f"acr_events_total{labels(('event',), (k,))} {v}" for k, v in sorted(self.state.counters.items())))
        family("acr_metrics_refused_total", "counter", "Scrapes refused because the client was not on loopback.",
               [f"acr_metrics_refused_total {self.refused_scrapes}"])
        family("acr_start_time_seconds", "gauge", "When this mirror process started (POSIX seconds).",
               [f"acr_start_time_seconds {self.started:.3f}"])
        return "\n".join(out) + "\n"
