"""The OCI 1.1 referrers API (and its legacy ORAS ancestor) in front of docker-registry 2.8.

distribution 2.8 answers 404 for `/v2/<name>/referrers/<digest>`, so a mirror tested only
against it would only ever exercise the tag-schema fallback. `ReferrersFront` is a loopback
HTTP server that sits in front of the real registry: it answers the referrers endpoints
itself, the way the distribution spec 1.1 says, and proxies every other request to the
registry byte for byte, streamed, so manifests, blobs and the tag schema are the registry's own.

Where the referrers come from (one real approach, documented): the referrers tag-schema
index `sha256-<hex>` in the registry (which `images.push_referrer` maintains as the spec
tells clients to) names the candidates; each candidate manifest is then fetched from the
registry and kept only if its `subject` really is the asked digest. The descriptor served is
built from that manifest as the spec says: `mediaType`, `digest`, `size` of the manifest,
`artifactType` = its `artifactType` (else its config's media type), `annotations` = its
annotations. So what the API answers is what is in the registry, not a second bookkeeping.

Modes (`front.mode = ...`, switchable while running):
  oci       the OCI 1.1 API; the legacy ORAS endpoint answers 404
  none      no API: 404 for both, the client falls back to the tag schema (proxied)
  oras      legacy `GET /v2/<name>/_oras/artifacts/referrers?digest=D&artifactType=T`
            -> `{"referrers": [descriptor...]}`; 404 for the OCI API
  error     500 (an OCI error body) for both endpoints
  slow      sleeps `slow_seconds` and then answers as `oci`
  garbage   200 with an index content type and a body that is not JSON
  nofilter  as `oci`, but ignores `artifactType` and omits `OCI-Filters-Applied`

Seed-era ORAS artifact manifests (`application/vnd.cncf.oras.artifact.manifest.v1+json`, whose
`blobs` list the converted image manifest) cannot be stored by distribution 2.8, which refuses
unknown manifest types: `add_artifact(name, body)` keeps such a manifest in the front, which
then serves it by digest and lists it among the referrers of its `subject`.

`page_size` (default None: one page) splits the OCI answer into pages linked with
`Link: <...>; rel="next"`, as the spec allows. Every request is recorded in `requests`
(method, path, query) so tests can count what a client asked.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

from .ports import LOOPBACK, free_port

MODES = ("oci", "none", "oras", "error", "slow", "garbage", "nofilter")
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT_MANIFESTS = ", ".join((
    OCI_MANIFEST, OCI_INDEX,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
))
FILTERS_HEADER = "OCI-Filters-Applied"

_REFERRERS_RE = re.compile(r"^/v2/(?P<name>.+)/referrers/(?P<digest>[^/]+)$")
_ORAS_RE = re.compile(r"^/v2/(?P<name>.+)/_oras/artifacts/referrers$")
_MANIFEST_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")
_TAG_SCHEMA_RE = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<tag>[a-z0-9]+-[a-f0-9]{32,})$")
_DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
#: Hop-by-hop headers (RFC 9110 §7.6.1) are the only ones not copied across.
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                  "transfer-encoding", "upgrade"})
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Seen:
    """One request as the front saw it."""

    method: str
    path: str
    query: dict[str, list[str]]
    #: whether the request carried an Authorization header (never its value)
    authorized: bool = False

    @property
    def kind(self) -> str:
        """`oci`, `oras` or `tagschema` for the three ways to list referrers; else `other`."""
        if _REFERRERS_RE.match(self.path):
            return "oci"
        if _ORAS_RE.match(self.path):
            return "oras"
        if _TAG_SCHEMA_RE.match(self.path):
            return "tagschema"
        return "other"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _error(code: str, message: str) -> bytes:
    return _json({"errors": [{"code": code, "message": message, "detail": None}]})


class ReferrersFront:
    """The server; use as a context manager (or `start()`/`stop()`)."""

    def __init__(self, registry_url: str, *, mode: str = "oci", slow_seconds: float = 3.0,
                 page_size: Optional[int] = None, credentials: Optional[tuple[str, str]] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        parts = urllib.parse.urlsplit(registry_url)
        if parts.scheme != "http" or not parts.port:
            raise ValueError("expected the registry as http://host:port")
        self.registry_url = registry_url.rstrip("/")
        self._upstream = (parts.hostname or LOOPBACK, parts.port)
        self.mode = mode
        self.slow_seconds = slow_seconds
        #: for the front's own reads from a registry with auth (its referrers endpoints check none)
        self.credentials = credentials
        self._client: Any = None
        self.page_size = page_size
        self.port = free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self.requests: list[Seen] = []
        #: (repository, digest) -> manifest bytes the registry cannot store (see add_artifact)
        self.artifacts: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    # --- what tests look at ---------------------------------------------------------

    def clear_log(self) -> None:
        with self._lock:
            self.requests.clear()

    def seen(self, kind: Optional[str] = None) -> list[Seen]:
        with self._lock:
            items = list(self.requests)
        return [s for s in items if kind is None or s.kind == kind]

    def referrers_calls(self) -> int:
        """Requests that list referrers, whichever of the three ways (API, ORAS, tag schema)."""
        return sum(1 for s in self.seen() if s.kind != "other")

    def add_artifact(self, name: str, body: bytes) -> dict[str, Any]:
        """Keep an artifact manifest distribution cannot store; returns its referrer descriptor."""
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        with self._lock:
            self.artifacts[(name, digest)] = body
        return _descriptor(digest, body, json.loads(body))

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> "ReferrersFront":
        front = self

        class Handler(_Handler):
            pass

        Handler.front = front
        server = ThreadingHTTPServer((LOOPBACK, self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        server.handle_error = lambda request, client_address: None  # a client hung up: fine
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"referrers-front-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> "ReferrersFront":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the referrers, read from the registry ----------------------------------------

    def _registry_get(self, path: str, accept: str) -> tuple[int, bytes]:
        if self.credentials is not None:
            from .images import RegistryClient

            with self._lock:  # one client (and its cached tokens) for the front's reads
                if self._client is None:
                    self._client = RegistryClient(self.registry_url, self.credentials)
                r = self._client.request("GET", path, repo=path.split("/manifests/")[0][4:],
                                         headers={"Accept": accept})
                return r.status_code, r.content
        conn = http.client.HTTPConnection(*self._upstream, timeout=30)
        try:
            conn.request("GET", path, headers={"Accept": accept})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def referrers_of(self, name: str, digest: str) -> list[dict[str, Any]]:
        """Descriptors of the manifests whose `subject` is `digest` (see the module docstring)."""
        algorithm, _, encoded = digest.partition(":")
        status, body = self._registry_get(f"/v2/{name}/manifests/{algorithm}-{encoded}", OCI_INDEX)
        candidates = json.loads(body).get("manifests", []) if status == 200 else []
        out = []
        for candidate in candidates:
            status, raw = self._registry_get(f"/v2/{name}/manifests/{candidate['digest']}",
                                             ACCEPT_MANIFESTS)
            if status != 200:
                continue  # deleted since: a stale tag-schema entry
            if "sha256:" + hashlib.sha256(raw).hexdigest() != candidate["digest"]:
                continue
            manifest = json.loads(raw)
            if (manifest.get("subject") or {}).get("digest") != digest:
                continue
            out.append(_descriptor(candidate["digest"], raw, manifest))
        with self._lock:
            kept = [(d, raw) for (n, d), raw in self.artifacts.items() if n == name]
        for d, raw in kept:
            manifest = json.loads(raw)
            if (manifest.get("subject") or {}).get("digest") == digest:
                out.append(_descriptor(d, raw, manifest))
        return out


def _descriptor(digest: str, raw: bytes, manifest: dict[str, Any]) -> dict[str, Any]:
    """A referrer's descriptor as the spec builds it from the referrer manifest."""
    artifact_type = manifest.get("artifactType") or (manifest.get("config") or {}).get("mediaType")
    desc: dict[str, Any] = {"mediaType": manifest.get("mediaType") or OCI_MANIFEST, "digest": digest,
                            "size": len(raw)}
    if artifact_type:
        desc["artifactType"] = artifact_type
    if manifest.get("annotations"):
        desc["annotations"] = manifest["annotations"]
    return desc


class _Handler(BaseHTTPRequestHandler):
    front: ReferrersFront
    protocol_version = "HTTP/1.1"  # keep-alive, like a real registry
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # every method goes through one place
    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _serve(self) -> None:
        front = self.front
        split = urllib.parse.urlsplit(self.path)
        seen = Seen(self.command, split.path, urllib.parse.parse_qs(split.query),
                    authorized="Authorization" in self.headers)
        with front._lock:
            front.requests.append(seen)
        mode = front.mode
        if self.command in ("GET", "HEAD"):
            m = _REFERRERS_RE.match(split.path)
            if m:
                return self._oci(mode, m["name"], m["digest"], seen.query)
            m = _ORAS_RE.match(split.path)
            if m:
                return self._oras(mode, m["name"], seen.query)
            m = _MANIFEST_RE.match(split.path)
            if m:
                with front._lock:
                    kept = front.artifacts.get((m["name"], m["ref"]))
                if kept is not None:
                    return self._answer(200, kept, json.loads(kept)["mediaType"],
                                        {"Docker-Content-Digest": m["ref"]})
        self._proxy()

    # --- answers of our own ------------------------------------------------------------

    def _answer(self, status: int, body: bytes, content_type: str, headers: Optional[dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Docker-Distribution-API-Version", "registry/2.0")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _not_found(self) -> None:
        # What distribution 2.8 answers for a route it does not know.
        self._answer(404, b"404 page not found\n", "text/plain; charset=utf-8")

    def _failure_modes(self, mode: str) -> bool:
        """Answer for the modes that break the endpoint; True when answered."""
        if mode == "error":
            self._answer(500, _error("UNKNOWN", "referrers: internal error (test fixture)"), "application/json")
            return True
        if mode == "garbage":
            self._answer(200, b'{"schemaVersion": 2, "manifests": [{"digest": <not json', OCI_INDEX)
            return True
        if mode == "slow":
            time.sleep(self.front.slow_seconds)
        return False

    def _oci(self, mode: str, name: str, digest: str, query: dict[str, list[str]]) -> None:
        if mode in ("none", "oras"):
            return self._not_found()
        if self._failure_modes(mode):
            return
        if not _DIGEST_RE.match(digest):
            return self._answer(400, _error("DIGEST_INVALID", "invalid digest"), "application/json")
        manifests = self.front.referrers_of(name, digest)
        headers: dict[str, str] = {}
        wanted = query.get("artifactType")
        if wanted and mode != "nofilter":
            manifests = [d for d in manifests if d.get("artifactType") in wanted]
            headers[FILTERS_HEADER] = "artifactType"
        size = self.front.page_size
        if size:
            page = int((query.get("page") or ["0"])[0])
            start = page * size
            if start + size < len(manifests):
                q = {k: v for k, v in query.items() if k != "page"}
                q["page"] = [str(page + 1)]
                nxt = f"/v2/{name}/referrers/{digest}?{urllib.parse.urlencode(q, doseq=True)}"
                headers["Link"] = f'<{nxt}>; rel="next"'
            manifests = manifests[start:start + size]
        body = _json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        self._answer(200, body, OCI_INDEX, headers)

    def _oras(self, mode: str, name: str, query: dict[str, list[str]]) -> None:
        if mode != "oras" and mode not in ("error", "garbage"):
            return self._not_found()
        if self._failure_modes(mode):
            return
        digest = (query.get("digest") or [""])[0]
        if not _DIGEST_RE.match(digest):
            return self._answer(400, _error("DIGEST_INVALID", "invalid digest"), "application/json")
        referrers = self.front.referrers_of(name, digest)
        wanted = query.get("artifactType")
        if wanted:
            referrers = [d for d in referrers if d.get("artifactType") in wanted]
        self._answer(200, _json({"referrers": referrers}), "application/json")

    # --- everything else: the registry's answer, streamed -------------------------------

    def _request_body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                left = size
                while left:
                    chunk = self.rfile.read(min(CHUNK, left))
                    if not chunk:
                        return
                    left -= len(chunk)
                    yield chunk
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

    def _proxy(self) -> None:
        conn = http.client.HTTPConnection(*self.front._upstream, timeout=60)
        try:
            conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for k, v in self.headers.items():
                if k.lower() not in _HOP:
                    conn.putheader(k, v)
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            if chunked:
                conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for chunk in self._request_body():
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            if chunked:
                conn.send(b"0\r\n\r\n")
            resp = conn.getresponse()
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for k, v in resp.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            has_body = self.command != "HEAD" and resp.status not in (204, 304) and resp.status >= 200
            rechunk = has_body and length is None
            if rechunk:
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if has_body:
                while True:
                    chunk = resp.read1(CHUNK) if hasattr(resp, "read1") else resp.read(CHUNK)
                    if not chunk:
                        break
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if rechunk else chunk)
                if rechunk:
                    self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, http.client.HTTPException):
            self.close_connection = True
        finally:
            conn.close()
