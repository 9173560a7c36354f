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

from mitmproxy import http

from addons.proxy.relay import BlobBody
from addons.proxy.upstream import Authorizer, UpstreamError
from addons.registry.auth import Credentials
from addons.registry.oci import Descriptor, Manifest, Upstream

#: The key of the public copy in flow.metadata.
META = "acr"


class NeedsIO(Exception):
    """A step's non-blocking attempt (`ready`) found that it must wait for the network."""


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
    # -- the answer ---------------------------------------------------------------------
    #: The response the steps decided on; the route puts it on the flow (on the event loop).
    answer: http.Response | None = None
    error: UpstreamError | None = None
    upstream_status: int | None = None
    refused: str | None = None
    steps: list[str] = field(default_factory=list)
    #: mitmweb's comment and mark for the flow, set on the flow with the answer.
    comment: str = ""
    marked: str = ""

    @property
    def by_digest(self) -> bool:
        return self.route == "manifests" and ":" in self.reference

    @property
    def failed(self) -> bool:
        """A step answered with an error: later steps have nothing to do."""
        return self.error is not None

    def note(self, step: str, decision: str) -> None:
        """Record one step's decision, in order, for mitmweb, flow files and `acr.why`."""
        self.steps.append(f"{step}: {decision}")

    def fail(self, step: str, e: UpstreamError) -> None:
        """A step's upstream failure becomes the answer (already mapped for the client)."""
        self.error = e
        self.answer = e.response(self.method)
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
        if self.upstream_status is not None:
            out["upstream_status"] = self.upstream_status
        if self.refused:
            out["refused"] = self.refused
        out["steps"] = list(self.steps)
        return out

    def publish(self, flow: http.HTTPFlow) -> None:
        """Refresh flow.metadata's public copy, comment and mark (on the event loop)."""
        info(flow).update(self.public())
        if self.comment:
            flow.comment = self.comment
        if self.marked:
            flow.marked = self.marked


def note(flow: http.HTTPFlow, step: str, decision: str) -> None:
    """Record a decision in the public copy of a flow no route serves (a refusal, an endpoint)."""
    info(flow).setdefault("steps", []).append(f"{step}: {decision}")
