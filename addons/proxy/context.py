"""One request's state, from the front door to the answer: the contract between the steps.

The `+ .proxy` root makes a `RequestContext` for every request it routes; each step of the
route reads what earlier steps decided and writes its own decision into typed fields, so
reading a plugin tells you what it may rely on (`login` -> `credentials`, `authn` ->
`authorizer`, `resolve` -> `manifest`, `discover` -> `referrers`, `teleport` -> `teleport`,
`pull` -> `forward`). Credentials and authorizers live only here.

`flow.metadata["acr"]` is a plain copy derived from the context (`publish`): what mitmweb
shows, what flow files keep, what `acr.why`, `acr.teleports`, `/metrics` and the replay read.
It never holds a secret.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from mitmproxy import connection, http

from addons.proxy.relay import BlobBody
from addons.proxy.upstream import Authorizer, UpstreamError
from addons.registry.auth import Credentials
from addons.registry.oci import Descriptor, Manifest, Upstream

#: The key of the public copy in flow.metadata.
META = "acr"


#: The second line of a comment whose answer the mirror made itself (a filter finds them).
ANSWERED = "answered by the mirror"
#: The mark of a teleported tag (mitmweb shows it as 🚀).
ROCKET = ":rocket:"


def info(flow: http.HTTPFlow) -> dict[str, Any]:
    """The flow's public decision record (created empty); for flows no route serves, too."""
    return flow.metadata.setdefault(META, {})


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

    def public(self) -> dict[str, Any]:
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

    def public(self) -> dict[str, Any]:
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

    @property
    def seconds(self) -> float:
        return max(self.ended - self.started, 0.0)

    @property
    def mb_per_s(self) -> float | None:
        """Throughput in MB/s (10^6 bytes), or None when too quick to tell."""
        return self.bytes / self.seconds / 1e6 if self.seconds > 0 else None

    def public(self) -> dict[str, Any]:
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
        # Never opened: show the upstream, as a fresh unconnected record (the placeholder one
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

    def public(self) -> dict[str, Any]:
        """The plain copy for flow.metadata: no credentials, tokens or bodies."""
        out: dict[str, Any] = {
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
        if self.teleport_target_of:
            out["teleport_target_of"] = self.teleport_target_of
        out["answered"] = "upstream" if self.forward is not None else "mirror"
        if self.upstream_status is not None:
            out["upstream_status"] = self.upstream_status
        if self.refused:
            out["refused"] = self.refused
        if self.prefix:
            out["prefix"] = self.prefix
        if self.why:
            out["why"] = self.why
        out["steps"] = list(self.steps)
        return out

    def publish(self, flow: http.HTTPFlow) -> None:
        """Refresh flow.metadata's public copy, comment and mark (on the event loop)."""
        info(flow).update(self.public())
        flow.comment = self.story()
        if self.marked:
            flow.marked = self.marked


def note(flow: http.HTTPFlow, step: str, decision: str) -> None:
    """Record a decision in the public copy of a flow no route serves (a refusal, an endpoint)."""
    info(flow).setdefault("steps", []).append(f"{step}: {decision}")
