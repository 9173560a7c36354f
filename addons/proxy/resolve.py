"""`.resolve [ACCEPT, ...]`: fetch the manifest upstream and answer HEAD and GET consistently.

The mirror always GETs the manifest, even for a HEAD: containerd trusts the digest a HEAD
reports, so the mirror must know the bytes behind it (and teleport needs them). The body is
checked against the digest the client asked for and the digest the registry claims; a
mismatch is a gateway error, never a served manifest. Manifests are content-addressed, so
pulls by digest are answered from a bounded cache.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
import threading

import requests
from mitmproxy import http

from addons.registry import oci
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import split_list
from addons.proxy.context import NeedsIO, RequestContext
from addons.proxy.state import MirrorState
from addons.registry.oci import Manifest, Upstream
from addons.proxy.upstream import Authorizer, UpstreamError, send

logger = logging.getLogger(__name__)

_MEDIA_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+$")
#: The distribution spec lets registries refuse manifests over 4 MiB; so do we.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CACHE_BYTES = 64 * 1024 * 1024


def parse_media_types(text: str) -> tuple[str, ...]:
    types = tuple(split_list(text))
    for t in types:
        if not _MEDIA_TYPE_RE.match(t):
            raise ValueError(f"expected media types like 'application/vnd.oci.image.index.v1+json', got '{t}'")
    return types


def digest_of(body: bytes, algorithm: str = "sha256") -> str:
    if algorithm not in ("sha256", "sha512"):
        raise UpstreamError(400, "DIGEST_INVALID", f"unsupported digest algorithm {algorithm}")
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def manifest_response(method: str, manifest: Manifest) -> http.Response:
    """HEAD and GET of one manifest, alike but for the body (mitmproxy writes HEAD bodies)."""
    headers = {
        "Content-Type": manifest.media_type,
        oci.CONTENT_DIGEST_HEADER: manifest.digest,
        oci.API_VERSION_HEADER: oci.API_VERSION,
    }
    return oci.make_response(200, manifest.body, headers, method)


def read_manifest(resp: requests.Response, reference: str, what: str) -> Manifest:
    """Read and check an upstream 200: size limit, digest of the reference and of the header."""
    chunks: list[bytes] = []
    total = 0
    try:
        for chunk in resp.iter_content(65536):
            total += len(chunk)
            if total > MAX_MANIFEST_BYTES:
                raise UpstreamError(502, "MANIFEST_INVALID", f"{what}: upstream manifest is larger than 4 MiB")
            chunks.append(chunk)
    except requests.RequestException:
        raise UpstreamError(502, "UPSTREAM_UNAVAILABLE", f"{what}: upstream body cut short") from None
    finally:
        resp.close()
    body = b"".join(chunks)
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    if not oci.is_manifest_type(media_type):
        media_type = _media_type_from_body(body) or media_type
    if not media_type:
        raise UpstreamError(502, "MANIFEST_INVALID", f"{what}: upstream sent no media type")
    if oci.is_digest(reference):
        algorithm = reference.split(":", 1)[0]
        digest = digest_of(body, algorithm)
        if digest != reference:
            raise UpstreamError(502, "DIGEST_INVALID", f"{what}: upstream content does not match the digest")
    else:
        digest = digest_of(body)
    claimed = resp.headers.get(oci.CONTENT_DIGEST_HEADER)
    if claimed and claimed.startswith("sha256:") and claimed != digest_of(body):
        raise UpstreamError(502, "DIGEST_INVALID", f"{what}: upstream Docker-Content-Digest does not match its content")
    return Manifest(media_type, digest, body)


def _media_type_from_body(body: bytes) -> str | None:
    import json

    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # deeply nested garbage is garbage too
        return None
    value = doc.get("mediaType") if isinstance(doc, dict) else None
    return value if isinstance(value, str) else None


class ManifestCache:
    """Manifests by (upstream, repository, digest), bounded in bytes, least recently used out."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._items: collections.OrderedDict[tuple[str, str, str], Manifest] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> Manifest | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str, str], manifest: Manifest) -> None:
        if manifest.size > self.limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = manifest
            self.size += manifest.size
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= old.size


def manifest_cache(state: MirrorState) -> ManifestCache:
    return state.service("manifests", ManifestCache)


def fetch_manifest(
    state: MirrorState, upstream: Upstream, name: str, ref: str, accept: str, authorizer: Authorizer | None,
    io: bool = True,
) -> tuple[Manifest, bool]:
    """A manifest from the cache (by digest) or upstream; True when it came from the cache.

    Blocking, unless `io` is False: then it answers from the cache or raises NeedsIO.
    """
    cache = manifest_cache(state)
    if oci.is_digest(ref):
        hit = cache.get((upstream.ns, name, ref))
        if hit is not None:
            return hit, True
    if not io:
        raise NeedsIO(ref)
    what = f"manifest {name}:{ref}"
    resp = send(
        state, "GET", upstream.url(f"/v2/{name}/manifests/{ref}"),
        headers={"Accept": accept}, auth=authorizer, stream=True, what=what,
    )
    if resp.status_code != 200:
        resp.close()
        raise UpstreamError.from_status(resp, what)
    manifest = read_manifest(resp, ref, what)
    cache.put((upstream.ns, name, manifest.digest), manifest)
    return manifest, False


class Resolve(ProxyPlugin):
    plugin = "resolve"
    routes = frozenset({"manifests"})
    summary = "fetch the manifest upstream, also accepting the listed media types"

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        return parse_media_types(text)

    def ready(self, ctx: RequestContext) -> bool:
        """A pull by digest whose manifest is cached; a tag always asks upstream (tags move)."""
        return self._resolve(ctx, io=False)

    def run(self, ctx: RequestContext) -> None:
        self._resolve(ctx, io=True)

    def _resolve(self, ctx: RequestContext, io: bool) -> bool:
        accept = oci.merge_accept(ctx.accept, self.config)
        try:
            manifest, cached = fetch_manifest(
                self.state, ctx.upstream, ctx.name, ctx.reference, accept, ctx.authorizer, io=io,
            )
        except NeedsIO:
            return False
        except UpstreamError as e:
            ctx.fail("resolve", e)
            logger.debug("%s %s:%s -> %d (%s)", ctx.method, ctx.name, ctx.reference, e.status, e.message)
            return True
        self.state.counters["manifests_cached" if cached else "manifests_fetched"] += 1
        ctx.manifest, ctx.manifest_cached, ctx.lookup_accept = manifest, cached, accept
        ctx.answer = manifest_response(ctx.method, manifest)
        ctx.note("resolve", f"{manifest.digest} {manifest.media_type} {manifest.size} B{' (cached)' if cached else ''}")
        logger.debug("%s %s:%s -> %s (%s)", ctx.method, ctx.name, ctx.reference, manifest.digest,
                     "cache" if cached else ctx.upstream.ns)
        return True
