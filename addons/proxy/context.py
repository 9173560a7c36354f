"""One request's state, from the front door to the answer: the contract between the steps.

The `+ .proxy` root makes a `RequestContext` for every request it routes; each step of the
route reads what earlier steps decided and writes its own decision into typed fields, so
reading a plugin tells you what it may rely on (`login` -> `credentials`, `authn` ->
`authorizer`, `resolve` -> `manifest`, `discover` -> `referrers`, `teleport` -> `teleport`,
`pull` -> `forward`). Credentials and authorizers live only here.

Its public record, `RequestRecord`, is a plain copy derived from the context (`publish`),
kept in `flow.metadata["acr"]` because mitmproxy saves flow.metadata with the flow: what
mitmweb shows, what flow files keep, what the log line, token scrubbing, `acr.why`,
`acr.teleports`, `/metrics` and the replay read, always through `record` and `read_record`.
Requests no route serves (refusals, the mirror's own endpoints) are recorded there too. It
never holds a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast
from urllib.parse import urlencode, urlsplit

from mitmproxy import connection, http

from addons.proxy.relay import BlobBody
from addons.proxy.upstream import Authorizer, UpstreamError
from addons.registry.auth import Credentials
from addons.registry.oci import Descriptor, Manifest, Upstream
from addons.registry.ranges import RangeRead

#: The key of the public copy in flow.metadata.
META = "acr"


#: The second line of a comment whose answer the mirror made itself (a filter finds them).
ANSWERED = "answered by the mirror"
#: The mark of a teleported tag (mitmweb shows it as 🚀).
ROCKET = ":rocket:"


class ResolvedRecord(TypedDict):
    digest: str
    media_type: str
    size: int


class ReferrerRecord(TypedDict):
    digest: str
    artifact_type: str


class DiscoverRecord(TypedDict, total=False):
    api: str
    cached: bool
    referrers: list[ReferrerRecord]
    #: Why no list could be had, with the message (or why discovery was skipped).
    error: str
    message: str
    skipped: str


#: `.teleport`'s decision: `from`, `to` and the streamable manifest, or `skipped` and `message`.
TeleportRecord = TypedDict("TeleportRecord", {
    "from": str, "to": str, "format": str, "artifact_type": str, "media_type": str, "size": int,
    "skipped": "str | None", "message": str,
}, total=False)


class StreamedRecord(TypedDict):
    bytes: int
    seconds: float
    mb_per_s: float | None
    source: str
    cut: bool


class ClientRecord(TypedDict):
    """The client's request line as it arrived (scrubbed): a forwarded flow's URL is the upstream's."""

    method: str
    path: str
    authority: str


class StaleRecord(TypedDict):
    """A stale answer: how old, why the upstream could not answer, and the line people read."""

    age: float
    reason: str
    status: int | None
    text: str


class RangeRecord(TypedDict):
    """A Range answer: which bytes (inclusive) of how many (None when the registry did not say)."""

    start: int
    end: int
    total: int | None


class ReplayRecord(TypedDict):
    """An offline re-run's verdict on a recorded flow (addons.observe.replay)."""

    same: bool
    diffs: list[str]


class RequestRecord(TypedDict, total=False):
    """The public record of one request (see the module docstring); every key only when it happened."""

    route: str
    route_id: int
    name: str
    reference: str
    ns: str
    upstream: str
    #: How the mirror authenticated upstream, or what `/auth` handed out (`credentials`, `anonymous`).
    auth: str
    resolved: ResolvedRecord
    discover: DiscoverRecord
    teleport: TeleportRecord
    forward: bool
    redirected: bool
    handed_off: bool
    stalled: bool
    streamed: StreamedRecord
    teleport_target_of: str
    answered: Literal["upstream", "mirror"]
    upstream_status: int
    #: `STATUS CODE` (or `STATUS reason`) of a refusal.
    refused: str
    prefix: str
    why: str
    steps: list[str]
    #: The mirror's own endpoint that answered: `auth`, `status`, `metrics`, `livez` or `readyz`.
    endpoint: str
    client: ClientRecord
    replay: ReplayRecord
    stale: StaleRecord
    #: Seconds of back-off left when the mirror answered without asking the registry.
    backoff: float
    shared: bool
    range: RangeRecord


def record(flow: http.HTTPFlow) -> RequestRecord:
    """The flow's public record, to write (created empty); for flows no route serves, too."""
    return cast(RequestRecord, flow.metadata.setdefault(META, {}))


def read_record(flow: Any) -> RequestRecord:
    """The public record of any flow, to read: empty when it has none (not a registry request)."""
    return cast(RequestRecord, (getattr(flow, "metadata", None) or {}).get(META) or {})


def has_record(flow: http.HTTPFlow) -> bool:
    """Whether the mirror recorded anything for the flow (then it gets a log line)."""
    return META in flow.metadata


@dataclass
class Referrers:
    """What `.discover` found for the resolved manifest."""

    found: list[Descriptor] = field(default_factory=list)
    api: str = ""
    cached: bool = False
    #: Why no list could be had (a teleport reason, e.g. `timeout`), with the message.
    error: str | None = None
    message: str = ""
    #: Looks up the referrers of another digest of the same repository (an index's children);
    #: with `io=False` it answers from the cache or raises NeedsIO.
    lookup: Callable[[str, bool], list[Descriptor]] | None = field(default=None, repr=False, compare=False)

    def public(self) -> DiscoverRecord:
        if self.error:
            return {"error": self.error, "message": self.message}
        return {
            "api": self.api,
            "cached": self.cached,
            "referrers": [{"digest": r.digest, "artifact_type": r.artifact_type} for r in self.found],
        }


@dataclass
class TeleportDecision:
    """`.teleport`'s answer: the streamable manifest served for the tag, or why not."""

    original: str
    #: The streamable manifest served instead, or None when the original is served.
    target: Manifest | None = None
    format: str = ""
    artifact_type: str = ""
    skipped: str | None = None
    message: str = ""

    @property
    def teleported(self) -> bool:
        return self.target is not None

    def public(self) -> TeleportRecord:
        if self.target is None:
            return {"skipped": self.skipped, "message": self.message}
        return {
            "from": self.original,
            "to": self.target.digest,
            "format": self.format,
            "artifact_type": self.artifact_type,
            "media_type": self.target.media_type,
            "size": self.target.size,
        }


@dataclass
class StaleAnswer:
    """A tag answered from the last answer the mirror gave for it, because the upstream could not answer."""

    #: Seconds since that answer was given.
    age: float
    #: Why the upstream could not: `refused`, `timeout`, `5xx`, `429` or `backoff`.
    reason: str
    #: The upstream's status, where it answered one.
    status: int | None = None

    def text(self) -> str:
        """`stale 3m12s: upstream 502`, for the log line and mitmweb."""
        why = {"refused": "upstream unreachable", "timeout": "upstream timed out", "backoff": "backing off"}
        return f"stale {age_text(self.age)}: {why.get(self.reason) or f'upstream {self.status or self.reason}'}"

    def public(self) -> StaleRecord:
        return {"age": round(self.age, 3), "reason": self.reason, "status": self.status, "text": self.text()}


def age_text(seconds: float) -> str:
    """An age the way a person reads it: `45s`, `3m12s`, `2h05m`, `1d03h`."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class Forward:
    """Where `.pull` sends the flow for mitmproxy to stream, and with which header."""

    url: str
    redirected: bool
    #: The upstream token for a same-origin stream; removed from the flow once sent.
    authorization: str | None = field(default=None, repr=False)


@dataclass
class Streamed:
    """A streamed body as it passed: counted chunk by chunk, never stored."""

    bytes: int = 0
    started: float = 0.0
    ended: float = 0.0
    source: str = "registry"
    cut: bool = False
    #: When the last chunk passed (time.monotonic): what the stall watchdog looks at.
    last: float = 0.0

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 0.0)

    @property
    def mb_per_s(self) -> float | None:
        """Throughput in MB/s (10^6 bytes), or None when too quick to tell."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else None

    def public(self) -> StreamedRecord:
        rate = self.mb_per_s
        return {"bytes": self.bytes, "seconds": round(self.seconds, 6),
                "mb_per_s": None if rate is None else round(rate, 1), "source": self.source, "cut": self.cut}

    def text(self) -> str:
        return f"{size_text(self.bytes)} {rate_text(self.bytes, self.seconds)} {self.source}"


def size_text(n: int) -> str:
    """A byte count the way a person reads it in a narrow column: `538 B`, `12 KiB`, `256 MiB`."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" or value >= 10 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def range_text(r: RangeRead | dict[str, Any]) -> str:
    """`range 850 KiB of 68 MiB`: a Range answer, for the log line and mitmweb's comment."""
    if isinstance(r, dict):
        r = RangeRead(r["start"], r["end"], r.get("total"))
    return f"range {size_text(r.length)}" + (f" of {size_text(r.total)}" if r.total is not None else "")


def rate_text(n: int, seconds: float) -> str:
    """Throughput in decimal units, as network speeds are quoted: `610 MB/s`, `36 kB/s`."""
    if seconds <= 0:
        return "- MB/s"
    rate = n / seconds
    for unit, scale in (("GB/s", 1e9), ("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.0f} {unit}" if rate >= 10 * scale else f"{rate / scale:.1f} {unit}"
    return f"{rate:.0f} B/s"


def short(digest: str) -> str:
    """The first 8 hex digits of a digest: what a person compares at a glance."""
    return digest.partition(":")[2][:8] or digest[:8]


def show_served_from(flow: http.HTTPFlow, url: str) -> None:
    """Show `url` as where an *answered* flow came from: only once its response is set.

    mitmproxy opens a server connection only for a flow without a response (reverse mode with
    the lazy connection strategy): rewriting an answered flow's URL and server address changes
    what mitmweb shows, and sends nothing anywhere. A URL that cannot be shown leaves the flow
    as it came (a display detail never breaks an answer).
    """
    assert flow.response is not None, "an unanswered flow would be sent to this URL"
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    req = flow.request
    try:
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        req.scheme, req.host, req.port = parts.scheme, parts.hostname or req.host, port
        if parts.path and path != req.path:  # an origin alone keeps the client's path
            req.path = path
    except (ValueError, UnicodeError):
        return
    if flow.server_conn.timestamp_start is None:
        # Never opened: show the upstream, as a fresh unconnected record (the mode's target one
        # may be shared with the client connection's other flows).
        flow.server_conn = connection.Server(address=(parts.hostname or "", port))


def listen_origin(flow: http.HTTPFlow) -> str | None:
    """The mirror's own origin as the client reached it (where a refusal was served from), or
    None when the flow did not come in through a socket (made offline)."""
    sockname = flow.client_conn.sockname
    if not sockname or not sockname[0]:
        return None
    host, port = sockname[0], sockname[1]
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if flow.client_conn.tls else 'http'}://{host}:{port}"


@dataclass
class RequestContext:
    """Everything one routed request carries from step to step."""

    route: str
    route_id: int
    method: str
    name: str
    reference: str
    upstream: Upstream
    #: The client's `Accept` values, every line (skopeo repeats the header).
    accept: list[str] = field(default_factory=list)
    #: The client's query without `ns`, and `ns` as it sent it (kept on a tag list's next link).
    query: list[tuple[str, str]] = field(default_factory=list)
    ns_sent: str | None = None
    #: The upstream host named by the path (`/v2/<host>/<name>/...`), for clients that send no `ns`.
    prefix: str | None = None
    #: The client's `If-None-Match` lines (a manifest answer is 304 when one names its digest).
    if_none_match: list[str] = field(default_factory=list)
    #: The client's headers that go upstream with a blob or tag list (Range, Accept, If-None-Match).
    pass_headers: dict[str, str] = field(default_factory=dict)
    # -- login, authn ---------------------------------------------------------------
    credentials: Credentials | None = field(default=None, repr=False)
    authorizer: Authorizer | None = field(default=None, repr=False)
    auth_scheme: str | None = None
    # -- resolve, discover, teleport ------------------------------------------------------
    manifest: Manifest | None = None
    manifest_cached: bool = False
    #: The `Accept` the mirror's own manifest lookups use (the client's plus `.resolve` types).
    lookup_accept: str = ""
    #: The manifest in the answer when it is the one resolved (the client accepts its type).
    served: Manifest | None = None
    #: The answer is the registry's own for the client's headers (the client does not accept
    #: the resolved type): nothing may replace it.
    passed_through: bool = False
    referrers: Referrers | None = None
    discover_skipped: str | None = None
    teleport: TeleportDecision | None = None
    # -- pull -------------------------------------------------------------------------
    forward: Forward | None = None
    #: A blob body the mirror fetched itself and writes to the client past mitmproxy's layers.
    body: BlobBody | None = field(default=None, repr=False)
    #: Whether the client connection allows that (plain TCP, HTTP/1; set before the steps run).
    hand_off: bool = False
    stalled: bool = False
    streamed: Streamed | None = None
    #: The part of the blob a 206 answer carries (a Range read: passed unchecked by digest).
    range: RangeRead | None = None
    # -- the answer ---------------------------------------------------------------------
    #: The response the steps decided on; the route puts it on the flow (on the event loop).
    answer: http.Response | None = None
    error: UpstreamError | None = None
    upstream_status: int | None = None
    refused: str | None = None
    #: Why the answer is not a 2xx, in a few words, for the log line.
    why: str = ""
    steps: list[str] = field(default_factory=list)
    #: mitmweb's mark for the flow, set on the flow with the answer.
    marked: str = ""
    #: The tag this digest was served for by a teleport (`name:tag`), for its follow-up GET.
    teleport_target_of: str | None = None
    # -- outages --------------------------------------------------------------------------
    #: The answer is the last one given for this tag, because the upstream could not answer.
    stale: StaleAnswer | None = None
    #: Seconds of back-off left when the mirror refused (or answered stale) without asking upstream.
    backoff: float | None = None
    #: This lookup joined an identical one already in flight (one upstream request for both).
    shared: bool = False
    #: An answer body that holds a credential (`/auth`): on the flow only while it is sent, so
    #: that neither the flow writer nor mitmweb ever sees it.
    secret_body: bytes | None = field(default=None, repr=False)

    @property
    def by_digest(self) -> bool:
        return self.route == "manifests" and ":" in self.reference

    @property
    def failed(self) -> bool:
        """A step answered with an error: later steps have nothing to do."""
        return self.error is not None

    def upstream_url(self) -> str:
        """The registry URL this request stands for: without containerd's `ns`, the client's
        other query fields encoded again (they were decoded when the request was parsed)."""
        if self.route == "tags":
            path = f"/v2/{self.name}/tags/list"
        else:
            path = f"/v2/{self.name}/{self.route}/{self.reference}"
        url = self.upstream.url(path)
        return f"{url}?{urlencode(self.query)}" if self.query else url

    def headline(self) -> str:
        """The decision in a few characters, for mitmweb's narrow comment column."""
        if self.stale is not None:
            return self.stale.text()
        if self.error is not None:
            return f"failed {self.answer.status_code if self.answer else self.error.status} {self.error.code}"
        if self.route == "manifests":
            t = self.teleport
            if t is not None and t.target is not None:
                return f"🚀 → {short(t.target.digest)} {t.format}"
            if t is not None and t.skipped != "digest-pinned":
                return f"no teleport: {t.skipped}"
            digest = self.manifest.digest if self.manifest else self.reference
            if self.by_digest:
                return f"by digest {short(digest)}" + (f" (🚀 {self.teleport_target_of})" if self.teleport_target_of else "")
            return f"manifest {short(digest)}"
        if self.route == "blobs":
            if self.method == "HEAD":
                length = self.answer.headers.get("Content-Length", "") if self.answer else ""
                return f"blob HEAD {size_text(int(length))}" if length.isdigit() else "blob HEAD"
            if self.streamed is not None and self.streamed.cut:
                return f"blob cut at {size_text(self.streamed.bytes)} {self.streamed.source}"
            if self.range is not None:
                return range_text(self.range)
            if self.streamed is not None and self.streamed.ended:
                return f"blob {self.streamed.text()}"
            if self.stalled:
                return "blob stalled"
            if self.forward is not None:
                return f"blob streaming from {'storage' if self.forward.redirected else 'registry'}"
            return "blob"
        if self.route == "tags":
            return "tag list"
        return self.route

    def story(self) -> str:
        """The flow's comment: the headline, who answered, then every step's decision."""
        if self.forward is not None:
            host = urlsplit(self.forward.url).netloc
            where = f"streamed from {'storage ' + host if self.forward.redirected else 'the registry ' + host}"
        elif self.streamed is not None:  # a body handed past mitmproxy's layers
            where = f"streamed from {'storage' if self.streamed.source == 'storage' else 'the registry ' + self.upstream.ns}"
        else:
            where = f"{ANSWERED} (from {self.upstream.ns})"
        return "\n".join([self.headline(), where, *self.steps])

    def note(self, step: str, decision: str) -> None:
        """Record one step's decision, in order, for mitmweb, flow files and `acr.why`."""
        self.steps.append(f"{step}: {decision}")

    def fail(self, step: str, e: UpstreamError) -> None:
        """A step's upstream failure becomes the answer (already mapped for the client)."""
        self.error = e
        self.answer = e.response(self.method)
        self.why = e.message
        if e.status and step in ("resolve", "pull"):
            self.upstream_status = e.status
        self.note(step, e.message)

    def public(self) -> RequestRecord:
        """The plain copy for flow.metadata: no credentials, tokens or bodies."""
        out: RequestRecord = {
            "route": self.route,
            "route_id": self.route_id,
            "name": self.name,
            "reference": self.reference,
            "ns": self.upstream.ns,
            "upstream": self.upstream.base_url,
        }
        if self.auth_scheme is not None:
            out["auth"] = self.auth_scheme
        if self.manifest is not None:
            out["resolved"] = {"digest": self.manifest.digest, "media_type": self.manifest.media_type,
                               "size": self.manifest.size}
        if self.discover_skipped:
            out["discover"] = {"skipped": self.discover_skipped}
        elif self.referrers is not None:
            out["discover"] = self.referrers.public()
        if self.teleport is not None:
            out["teleport"] = self.teleport.public()
        if self.forward is not None:
            out["forward"] = True
            out["redirected"] = self.forward.redirected
        elif self.body is not None:
            out["forward"] = True
            out["redirected"] = self.body.redirected
            out["handed_off"] = True
        if self.stalled:
            out["stalled"] = True
        if self.streamed is not None:
            out["streamed"] = self.streamed.public()
        if self.range is not None:
            out["range"] = self.range.public()
        if self.teleport_target_of:
            out["teleport_target_of"] = self.teleport_target_of
        out["answered"] = "upstream" if self.forward is not None else "mirror"
        if self.upstream_status is not None:
            out["upstream_status"] = self.upstream_status
        if self.refused:
            out["refused"] = self.refused
        if self.prefix:
            out["prefix"] = self.prefix
        if self.stale is not None:
            out["stale"] = self.stale.public()
        if self.backoff is not None:
            out["backoff"] = round(self.backoff, 3)
        if self.shared:
            out["shared"] = True
        if self.why:
            out["why"] = self.why
        out["steps"] = list(self.steps)
        return out

    def publish(self, flow: http.HTTPFlow) -> None:
        """Refresh flow.metadata's public copy, comment and mark (on the event loop)."""
        record(flow).update(self.public())
        flow.comment = self.story()
        if self.marked:
            flow.marked = self.marked


def note(flow: http.HTTPFlow, step: str, decision: str) -> None:
    """Record a decision in the public copy of a flow no route serves (a refusal, an endpoint)."""
    record(flow).setdefault("steps", []).append(f"{step}: {decision}")
