"""`.resolve [ACCEPT, ...]`: fetch the manifest upstream and answer every client as the registry would.

The mirror always GETs the manifest, even for a HEAD: containerd trusts the digest a HEAD
reports, so the mirror must know the bytes behind it (and teleport needs them). Its own
lookup asks for every manifest type (plus the listed ones), so it always gets the manifest
as stored, never a conversion, and that is what the cache keeps by digest. The client gets
that manifest only when its `Accept` names the type; otherwise the registry would answer it
differently (a 404, a platform manifest, a signed schema1), so the mirror asks the registry
with the client's own headers and passes that answer on. No answer depends on an earlier
client's headers. Bodies are checked against the digest asked for and the digest the
registry claims (a signed schema1 by its payload, as the distribution spec defines it); a
mismatch is a gateway error, never a served manifest.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import json
import logging
import re
from collections.abc import Generator

import requests
from mitmproxy import http

from addons.registry import oci
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.plugin import split_list
from addons.proxy.context import RequestContext
from addons.proxy.state import MirrorState
from addons.registry.oci import Manifest, Upstream
from addons.proxy.upstream import Authorizer, NeedsIO, UpstreamError, asend, passed_headers, passed_response, send

logger = logging.getLogger(__name__)

_MEDIA_TYPE_RE = re.compile(r"^[\w.+-]+/[\w.+-]+$")
#: The distribution spec lets registries refuse manifests over 4 MiB; so do we.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
#: Docker's signed schema1 manifests (docker-registry converts a schema2 image to one for a
#: client that accepts no Docker v2 type); their digest is that of the unsigned payload.
SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
SCHEMA1_TYPES = frozenset({SCHEMA1_SIGNED, "application/vnd.docker.distribution.manifest.v1+json"})


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


def accepts(accept: list[str], media_type: str) -> bool:
    """Whether the registry gives a client with this `Accept` the manifest as stored.

    Like docker-registry: an OCI or Docker v2 manifest or index only when `Accept` names its
    type (`*/*` does not count), any other type (an artifact, a stored schema1) to everyone.
    """
    want = oci.base_media_type(media_type)
    if want not in oci.MANIFEST_TYPES:
        return True
    return any(oci.base_media_type(v) == want for v in accept)


def lookup_accept(client: list[str], configured: tuple[str, ...]) -> str:
    """The `Accept` of the mirror's own lookups: every manifest type, the `.resolve` types and
    the client's own, so the registry answers with the manifest as stored."""
    return _lookup_accept(tuple(client), configured)


@functools.lru_cache(maxsize=256)
def _lookup_accept(client: tuple[str, ...], configured: tuple[str, ...]) -> str:
    """A client sends the same few `Accept` lists again and again: merged once each."""
    return oci.merge_accept([*oci.MANIFEST_TYPES, *configured], [v for v in client if v != "*/*"])


def etag_match(values: list[str], digest: str) -> bool:
    """docker-registry's test: an `If-None-Match` line equal to the digest, quoted or not."""
    return any(v.strip() in (digest, f'"{digest}"') for v in values)


def http_date() -> str:
    return email.utils.formatdate(usegmt=True)


def schema1_payload(body: bytes) -> bytes:
    """The payload a signed schema1 manifest's digest is taken over: the JWS `protected` header
    names how much of the body (`formatLength`) and which tail (`formatTail`) make it up."""
    try:
        doc = json.loads(body)
        protected = doc["signatures"][0]["protected"]
        header = json.loads(base64.urlsafe_b64decode(protected + "=" * (-len(protected) % 4)))
        length, tail = int(header["formatLength"]), header["formatTail"]
        tail_bytes = base64.urlsafe_b64decode(tail + "=" * (-len(tail) % 4))
    except (ValueError, KeyError, IndexError, TypeError, RecursionError) as e:
        raise ValueError(f"signed schema1 manifest without a readable payload ({e.__class__.__name__})") from None
    if not 0 < length <= len(body):
        raise ValueError("signed schema1 manifest: formatLength out of range")
    return body[:length] + tail_bytes


def content_digest(body: bytes, media_type: str, algorithm: str = "sha256") -> tuple[str | None, str]:
    """The digest a registry gives this manifest, or (None, why) when it cannot be computed."""
    if oci.base_media_type(media_type) in SCHEMA1_TYPES and b'"signatures"' in body:
        try:
            return digest_of(schema1_payload(body), algorithm), ""
        except ValueError as e:
            return None, str(e)
    return digest_of(body, algorithm), ""


def manifest_response(method: str, manifest: Manifest) -> http.Response:
    """HEAD and GET of one manifest, alike but for the body (mitmproxy writes HEAD bodies),
    with the headers docker-registry sends."""
    headers = {
        "Content-Type": manifest.media_type,
        oci.CONTENT_DIGEST_HEADER: manifest.digest,
        oci.API_VERSION_HEADER: oci.API_VERSION,
        "Etag": f'"{manifest.digest}"',
        "Date": http_date(),
    }
    return oci.make_response(200, manifest.body, headers, method)


def not_modified() -> http.Response:
    """docker-registry's 304: no body, no Content-Type or Content-Length."""
    resp = http.Response.make(304, b"", {oci.API_VERSION_HEADER: oci.API_VERSION, "Date": http_date()})
    resp.headers.pop("Content-Length", None)
    return resp


def read_body(resp: requests.Response, what: str) -> bytes:
    """An upstream manifest body, at most 4 MiB; closes the response."""
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
    return b"".join(chunks)


def media_type_of(resp: requests.Response, body: bytes) -> str:
    media_type = resp.headers.get("Content-Type", "").split(";")[0].strip()
    if not oci.is_manifest_type(media_type) and media_type not in SCHEMA1_TYPES:
        media_type = _media_type_from_body(body) or media_type
    return media_type


def read_manifest(resp: requests.Response, reference: str, what: str, notes: list[str] | None = None) -> Manifest:
    """Read and check an upstream 200: size limit, digest of the reference and of the header.

    A signed schema1 manifest whose payload cannot be read is passed on under the registry's
    digest, with the reason added to `notes` (never a 502 for what the registry serves).
    """
    body = read_body(resp, what)
    media_type = media_type_of(resp, body)
    if not media_type:
        raise UpstreamError(502, "MANIFEST_INVALID", f"{what}: upstream sent no media type")
    algorithm = reference.split(":", 1)[0] if oci.is_digest(reference) else "sha256"
    claimed = resp.headers.get(oci.CONTENT_DIGEST_HEADER)
    digest, why = content_digest(body, media_type, algorithm)
    if digest is None:
        unchecked = reference if oci.is_digest(reference) else claimed
        if not unchecked:
            raise UpstreamError(502, "DIGEST_INVALID", f"{what}: {why}, and no Docker-Content-Digest")
        message = f"digest not checked: {why}"
        logger.warning("%s: %s", what, message)
        if notes is not None:
            notes.append(message)
        return Manifest(media_type, unchecked, body)
    if oci.is_digest(reference) and digest != reference:
        raise UpstreamError(502, "DIGEST_INVALID", f"{what}: upstream content does not match the digest")
    sha256 = digest if algorithm == "sha256" else content_digest(body, media_type)[0] if claimed else None
    if claimed and claimed.startswith("sha256:") and claimed != sha256:
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


def _cached(state: MirrorState, upstream: Upstream, name: str, ref: str) -> Manifest | None:
    return state.manifests.get((upstream.ns, name, ref)) if oci.is_digest(ref) else None


def _kept(state: MirrorState, upstream: Upstream, name: str, ref: str, resp: requests.Response, what: str,
          notes: list[str] | None) -> Manifest:
    """The upstream's answer to a manifest lookup, checked and put in the cache."""
    if resp.status_code != 200:
        raise UpstreamError.from_status(resp, what)
    checked: list[str] = []
    manifest = read_manifest(resp, ref, what, checked)
    if notes is not None:
        notes.extend(checked)
    if not checked and oci.base_media_type(manifest.media_type) not in SCHEMA1_TYPES:
        state.manifests.put((upstream.ns, name, manifest.digest), manifest)
    return manifest


def fetch_manifest(
    state: MirrorState, upstream: Upstream, name: str, ref: str, accept: str, authorizer: Authorizer | None,
    io: bool = True, notes: list[str] | None = None,
) -> tuple[Manifest, bool]:
    """A manifest from the cache (by digest) or upstream; True when it came from the cache.

    The cache holds content by its digest, which names the same bytes for every client;
    whether a client may be given them is the caller's question (`accepts`). Signed schema1
    manifests are not kept: their digest is not one the registry serves by digest.
    Blocking, unless `io` is False: then it answers from the cache or raises NeedsIO.
    """
    hit = _cached(state, upstream, name, ref)
    if hit is not None:
        return hit, True
    if not io:
        raise NeedsIO(ref)
    what = f"manifest {name}:{ref}"
    resp = send(state, "GET", upstream.url(f"/v2/{name}/manifests/{ref}"), headers={"Accept": accept},
                auth=authorizer, what=what)
    return _kept(state, upstream, name, ref, resp, what, notes), False


def client_headers(ctx: RequestContext) -> dict[str, str | None]:
    """The client's headers that change a manifest answer, as the client sent them.

    None drops a header requests would add by itself (its default `Accept: */*`).
    """
    out: dict[str, str | None] = {"Accept": ", ".join(ctx.accept) if ctx.accept else None}
    if ctx.if_none_match:
        out["If-None-Match"] = ", ".join(ctx.if_none_match)
    for name, value in ctx.pass_headers.items():
        if name.lower() == "range":
            out["Range"] = value
    return out


def passed(ctx: RequestContext, resp: requests.Response, what: str) -> tuple[http.Response, str]:
    """The registry's answer to the client's own headers, checked, as the client gets it."""
    if resp.status_code == 304:
        resp.close()
        return passed_response(ctx.method, 304, b"", passed_headers(resp)), "not modified (upstream)"
    if resp.status_code != 200:
        raise UpstreamError.from_status(resp, what)
    headers = passed_headers(resp)
    body = read_body(resp, what)
    media_type = media_type_of(resp, body)
    claimed = resp.headers.get(oci.CONTENT_DIGEST_HEADER)
    algorithm = (claimed or "sha256:").split(":", 1)[0]
    digest, why = content_digest(body, media_type, algorithm if algorithm in ("sha256", "sha512") else "sha256")
    if digest is None:
        note = f"{media_type} {claimed or 'without digest'}: digest not checked: {why}"
        logger.warning("%s: %s", what, note)
    elif claimed and claimed != digest:
        raise UpstreamError(502, "DIGEST_INVALID", f"{what}: upstream Docker-Content-Digest does not match its content")
    elif ctx.by_digest and digest != ctx.reference and oci.base_media_type(media_type) not in SCHEMA1_TYPES:
        raise UpstreamError(502, "DIGEST_INVALID", f"{what}: upstream content does not match the digest")
    else:
        note = f"{digest} {media_type} {len(body)} B"
    headers["Content-Length"] = str(len(body))
    return passed_response(ctx.method, 200, body, headers), note


class Resolve(ProxyPlugin):
    plugin = "resolve"
    routes = frozenset({"manifests"})
    answers = frozenset({"manifests"})

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        return parse_media_types(text)

    def ready(self, ctx: RequestContext) -> bool:
        """A pull by digest whose manifest is cached and of a type the client accepts;
        a tag always asks upstream (tags move)."""
        lookup = self._lookup(ctx)
        try:
            next(lookup)
        except StopIteration as done:
            return done.value
        lookup.close()  # it wants a request: `fetch` or `run` makes it
        return False

    async def fetch(self, ctx: RequestContext) -> bool:
        """A warm lookup on the event loop (addons.proxy.upstream.asend): the same requests and
        decisions as `run`; False, to be `run`, where a request would block (no cached token)."""
        lookup = self._lookup(ctx)
        try:
            url, headers, what = next(lookup)
            while True:
                try:
                    resp = await asend(self.state, "GET", url, headers=headers, auth=ctx.authorizer, what=what)
                except NeedsIO:
                    lookup.close()
                    return False
                except UpstreamError as e:
                    url, headers, what = lookup.throw(e)
                    continue
                url, headers, what = lookup.send(resp)
        except StopIteration as done:
            return done.value

    def run(self, ctx: RequestContext) -> None:
        lookup = self._lookup(ctx)
        try:
            url, headers, what = next(lookup)
            while True:
                try:
                    resp = send(self.state, "GET", url, headers=headers, auth=ctx.authorizer, what=what)
                except UpstreamError as e:
                    url, headers, what = lookup.throw(e)
                    continue
                url, headers, what = lookup.send(resp)
        except StopIteration:
            return

    def _lookup(self, ctx: RequestContext) -> Generator[tuple[str, dict[str, str | None], str], requests.Response, bool]:
        """The whole decision, written once for the three ways to run it (`ready`, `fetch`,
        `run`): it yields each upstream GET it needs, as (URL, headers, what), and is sent the
        answer (or thrown the UpstreamError). Returns True when the request is answered."""
        accept = lookup_accept(ctx.accept, self.config)
        notes: list[str] = []
        what = f"manifest {ctx.name}:{ctx.reference}"
        url = ctx.upstream_url()
        manifest = _cached(self.state, ctx.upstream, ctx.name, ctx.reference)
        cached = manifest is not None
        try:
            if manifest is None:
                resp = yield url, {"Accept": accept}, what
                manifest = _kept(self.state, ctx.upstream, ctx.name, ctx.reference, resp, what, notes)
        except UpstreamError as e:
            ctx.fail("resolve", e)
            logger.debug("%s %s:%s -> %d (%s)", ctx.method, ctx.name, ctx.reference, e.status, e.message)
            return True
        if etag_match(ctx.if_none_match, manifest.digest):
            # The registry compares the stored manifest's digest before it looks at Accept.
            self._found(ctx, manifest, cached, accept, notes)
            ctx.answer = not_modified()
            ctx.why = "not modified: If-None-Match names this digest"
            ctx.note("resolve", ctx.why)
            return True
        if accepts(ctx.accept, manifest.media_type):
            self._found(ctx, manifest, cached, accept, notes)
            ctx.answer = manifest_response(ctx.method, manifest)
            ctx.served = manifest
            return True
        # The registry answers a client that does not accept this type differently: ask it
        # with the client's own headers (see `passed`).
        try:
            resp = yield url, client_headers(ctx), what
            answer, note = passed(ctx, resp, what)
        except UpstreamError as e:
            self._found(ctx, manifest, cached, accept, notes)
            ctx.fail("resolve", e)
            ctx.note("resolve", f"the client does not accept {manifest.media_type}: answered as the registry did")
            return True
        self._found(ctx, manifest, cached, accept, notes)
        self.state.counters["manifests_passed"] += 1
        ctx.answer = answer
        ctx.passed_through = True
        if answer.status_code != 200:
            ctx.why = note
        ctx.note("resolve", f"the client does not accept {manifest.media_type}: the registry answered {note}")
        return True

    def _found(self, ctx: RequestContext, manifest: Manifest, cached: bool, accept: str, notes: list[str]) -> None:
        self.state.counters["manifests_cached" if cached else "manifests_fetched"] += 1
        ctx.manifest, ctx.manifest_cached, ctx.lookup_accept = manifest, cached, accept
        ctx.note("resolve", f"{manifest.digest} {manifest.media_type} {manifest.size} B{' (cached)' if cached else ''}")
        for n in notes:
            ctx.note("resolve", n)
        logger.debug("%s %s:%s -> %s (%s)", ctx.method, ctx.name, ctx.reference, manifest.digest,
                     "cache" if cached else ctx.upstream.ns)
