"""`.discover TYPE[, TYPE ...]`: the referrers of the resolved manifest, of the listed types.

Registries expose referrers three ways: the OCI 1.1 referrers API, the spec's fallback tag
`sha256-<hex>`, and ORAS's own endpoint, which early converters use. Which one an upstream speaks
is learned on its first lookup and remembered, so a cold tag pull costs one referrers call
and a warm one none: results are cached per digest (found referrers for long, since a digest
never changes; "none found" only briefly, since a conversion may finish after a first pull).
Discovery never fails a pull: a failure is a reason recorded for `.teleport`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urljoin

from mitmproxy import ctx as mitmctx

from addons.core.duration import seconds_option

from addons.registry import oci
from addons.registry.oci import Descriptor, Upstream
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import split_list
from addons.proxy.context import Referrers, RequestContext
from addons.proxy.state import MirrorState
from addons.proxy.upstream import Authorizer, NeedsIO, UpstreamError, send
from addons.teleport.gate import Gate

logger = logging.getLogger(__name__)

#: A media type (`application/vnd...+json`) or a bare artifact type name (`dadi.image.v1`).
_ARTIFACT_TYPE_RE = re.compile(r"^[\w.+-]+(/[\w.+-]+)?$")
_LINK_NEXT_RE = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
APIS = ("oci", "oras", "tagschema")
MAX_PAGES = 10
MAX_INDEX_BYTES = 4 * 1024 * 1024
POSITIVE_TTL = 24 * 3600.0
NEGATIVE_TTL = 30.0
CACHE_ENTRIES = 4096


class DiscoverError(Exception):
    """Why referrers could not be listed; `reason` is one of teleport's reasons."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def reason_for(e: UpstreamError) -> str:
    if e.status == 504:
        return "timeout"
    if e.code in ("UNAUTHORIZED", "DENIED"):
        return "auth"
    return "upstream"


def parse_referrers(body: bytes, api: str) -> list[Descriptor]:
    """Descriptors from an OCI index (API or tag schema) or a legacy ORAS `{"referrers": [...]}`."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can read
        raise DiscoverError("bad-json", f"{api} referrers: not JSON") from None
    if not isinstance(doc, dict):
        raise DiscoverError("bad-json", f"{api} referrers: not a JSON object")
    items = doc.get("referrers" if api == "oras" else "manifests")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise DiscoverError("bad-json", f"{api} referrers: the list is not an array")
    out = []
    for item in items:
        try:
            out.append(Descriptor.from_json(item))
        except ValueError as e:
            raise DiscoverError("bad-json", f"{api} referrers: {e}") from None
    return out


def filter_types(referrers: list[Descriptor], types: tuple[str, ...]) -> list[Descriptor]:
    """Referrers of the wanted types, in the order of `types` (the preference order)."""
    return [r for t in types for r in referrers if r.artifact_type == t]


@dataclass
class _Entry:
    expires: float
    referrers: list[Descriptor]
    api: str


@dataclass
class ReferrersClient:
    """Shared by every route of a mirror: the learned API per upstream and the cache."""

    state: MirrorState
    clock: object = time.monotonic
    apis: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    _cache: dict[tuple[str, str, str, tuple[str, ...]], _Entry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def referrers(
        self, upstream: Upstream, name: str, digest: str, types: tuple[str, ...], auth: Authorizer | None,
        io: bool = True,
    ) -> tuple[list[Descriptor], str, bool]:
        """(referrers of `types`, API used, from cache). Blocking, unless `io` is False: then
        from the cache or NeedsIO."""
        key = (upstream.ns, name, digest, types)
        now = self.clock()  # type: ignore[operator]
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > now:
                return entry.referrers, entry.api, True
        if not io:
            raise NeedsIO(digest)
        found, api = self._lookup(upstream, name, digest, types, auth)
        found = filter_types(found, types)
        ttl = POSITIVE_TTL if found else NEGATIVE_TTL
        with self._lock:
            if len(self._cache) >= CACHE_ENTRIES:
                for k in [k for k, v in self._cache.items() if v.expires <= now] or list(self._cache)[: CACHE_ENTRIES // 4]:
                    self._cache.pop(k, None)
            self._cache[key] = _Entry(now + ttl, found, api)
        return found, api, False

    def _lookup(self, upstream: Upstream, name: str, digest: str, types: tuple[str, ...], auth: Authorizer | None) -> tuple[list[Descriptor], str]:
        learned = self.apis.get(upstream.ns)
        order = (learned,) if learned else APIS
        for api in order:
            result = getattr(self, f"_{api}")(upstream, name, digest, types, auth)
            if result is not None:
                self.apis[upstream.ns] = api
                return result, api
        # Only the tag schema can say "none" for a registry without an API; it did (404).
        return [], "tagschema"

    def _get(self, url: str, auth: Authorizer | None, accept: str, what: str) -> tuple[int, bytes, dict[str, str]]:
        self.calls += 1
        self.state.counters["referrers_calls"] += 1
        try:
            resp = send(self.state, "GET", url, headers={"Accept": accept}, auth=auth, what=what,
                        timeout=self.state.settings.discover_timeout)
        except UpstreamError as e:
            raise DiscoverError(reason_for(e), e.message) from None
        try:
            body = resp.raw.read(MAX_INDEX_BYTES + 1, decode_content=True)
        except OSError:
            raise DiscoverError("upstream", f"{what}: body cut short") from None
        finally:
            resp.close()
        if len(body) > MAX_INDEX_BYTES:
            raise DiscoverError("bad-json", f"{what}: larger than 4 MiB")
        if resp.status_code in (401, 403):
            raise DiscoverError("auth", f"{what}: upstream answered {resp.status_code}")
        if resp.status_code >= 500 or resp.status_code == 429:
            raise DiscoverError("upstream", f"{what}: upstream answered {resp.status_code}")
        return resp.status_code, body, dict(resp.headers)

    def _oci(self, upstream: Upstream, name: str, digest: str, types: tuple[str, ...], auth: Authorizer | None) -> list[Descriptor] | None:
        url = upstream.url(f"/v2/{name}/referrers/{digest}")
        if len(types) == 1:
            url += f"?artifactType={quote(types[0], safe='')}"
        out: list[Descriptor] = []
        for _ in range(MAX_PAGES):
            status, body, headers = self._get(url, auth, oci.OCI_INDEX, f"referrers of {digest}")
            if status == 404:
                return None if not out else out
            if status != 200:
                raise DiscoverError("upstream", f"referrers of {digest}: upstream answered {status}")
            out.extend(parse_referrers(body, "oci"))
            link = _LINK_NEXT_RE.search(headers.get("Link", "") or headers.get("link", ""))
            if not link:
                break
            url = urljoin(url, link.group(1))
        return out

    def _oras(self, upstream: Upstream, name: str, digest: str, types: tuple[str, ...], auth: Authorizer | None) -> list[Descriptor] | None:
        url = upstream.url(f"/v2/{name}/_oras/artifacts/referrers?digest={quote(digest, safe='')}")
        if len(types) == 1:
            url += f"&artifactType={quote(types[0], safe='')}"
        status, body, _ = self._get(url, auth, "application/json", f"ORAS referrers of {digest}")
        if status == 404:
            return None
        if status != 200:
            raise DiscoverError("upstream", f"ORAS referrers of {digest}: upstream answered {status}")
        return parse_referrers(body, "oras")

    def _tagschema(self, upstream: Upstream, name: str, digest: str, types: tuple[str, ...], auth: Authorizer | None) -> list[Descriptor] | None:
        algorithm, _, hexpart = digest.partition(":")
        tag = f"{algorithm}-{hexpart}"[:128]
        url = upstream.url(f"/v2/{name}/manifests/{tag}")
        status, body, _ = self._get(url, auth, oci.OCI_INDEX, f"referrers tag of {digest}")
        if status == 404:
            return []
        if status != 200:
            raise DiscoverError("upstream", f"referrers tag of {digest}: upstream answered {status}")
        return parse_referrers(body, "tagschema")


@dataclass
class TeleportShared:
    """One per `MirrorState` (its `teleport` field), made by addons.chain.build_state."""

    referrers: ReferrersClient
    #: The node's verdict; None when the runmd has no `.teleport` step (and /status shows none).
    gate: Gate | None = None

    @classmethod
    def of(cls, state: MirrorState, teleports: bool) -> TeleportShared:
        """The shared part of `state`; `teleports`: the runmd has `.teleport` steps."""
        return cls(ReferrersClient(state), Gate() if teleports else None)


def teleport_shared(state: MirrorState) -> TeleportShared:
    """The teleport steps' shared part of `state`."""
    if not isinstance(state.teleport, TeleportShared):
        raise TypeError("the mirror's state has no teleport part: make it with addons.chain.build_state")
    return state.teleport


class Discover(ProxyPlugin):
    plugin = "discover"
    routes = frozenset({"manifests"})

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        types = tuple(split_list(text))
        if not types:
            raise ValueError("expected artifact types, e.g. '.discover application/vnd.azure.artifact.streaming.v1'")
        for t in types:
            if not _ARTIFACT_TYPE_RE.match(t):
                raise ValueError(f"expected an artifact type, got '{t}'")
        return types

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_discover_timeout", str, "5",
            "Seconds a referrers lookup may take before teleport gives up and serves the original.",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_discover_timeout" in updated:
            self.state.settings.discover_timeout = seconds_option(
                mitmctx.options.acr_discover_timeout, "acr_discover_timeout")

    def lookup(self, ctx: RequestContext, digest: str, io: bool = True) -> tuple[list[Descriptor], str, bool]:
        """Referrers of `digest` in the request's repository; raises DiscoverError (or NeedsIO)."""
        return teleport_shared(self.state).referrers.referrers(ctx.upstream, ctx.name, digest, self.config, ctx.authorizer, io)

    def applies(self, ctx: RequestContext) -> bool:
        """A resolved manifest is being answered with 200: find what refers to it. Not when the
        registry's own answer for the client's headers is passed on (nothing may replace it)."""
        return (ctx.manifest is not None and not ctx.failed and not ctx.passed_through
                and ctx.answer is not None and ctx.answer.status_code == 200)

    def ready(self, ctx: RequestContext) -> bool:
        if oci.is_digest(ctx.reference):
            ctx.discover_skipped = "digest-pinned"
            return True
        return self._discover(ctx, io=False)

    def run(self, ctx: RequestContext) -> None:
        self._discover(ctx, io=True)

    def _discover(self, ctx: RequestContext, io: bool) -> bool:
        assert ctx.manifest is not None
        digest = ctx.manifest.digest
        try:
            found, api, cached = self.lookup(ctx, digest, io)
        except NeedsIO:
            return False
        except DiscoverError as e:
            ctx.referrers = Referrers(error=e.reason, message=e.message)
            ctx.note("discover", f"{e.reason}: {e.message}")
            return True

        def more(child: str, io: bool) -> list[Descriptor]:
            return self.lookup(ctx, child, io)[0]

        ctx.referrers = Referrers(found=found, api=api, cached=cached, lookup=more)
        ctx.note("discover", f"{len(found)} referrer(s) via {api}{' (cached)' if cached else ''}")
        return True
