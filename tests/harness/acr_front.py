"""The shape of Azure Container Registry in front of the harness' token server and registry.

What a client of ACR sees, and what `AcrFront` reproduces on loopback:

* one host for the registry API *and* its token endpoints: `/oauth2/token` and
  `/oauth2/exchange` are answered (here by the `TokenServer`) on the registry's own host, and
  the 401 challenge reads `Bearer realm="https://NAME.azurecr.io/oauth2/token",service="NAME.azurecr.io"`;
* blobs are not served by the registry: `GET|HEAD /v2/<name>/blobs/<digest>` with a valid token
  answers `307 Temporary Redirect` to a storage host, with a SAS URL
  (`...?sv=...&se=...&sr=b&sp=r&sig=...`) that works without any `Authorization`;
* everything else (manifests, referrers, tags) is the backend's (a `ReferrersFront` in front of
  the real registry).

`StorageFront` is the storage host: it checks the SAS signature and expiry and serves the blob's
bytes, which it reads from the registry. Both take the URLs clients must use (`public_url`),
so a recording proxy can sit in front of each (scripts/record does that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import re
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional

from .ports import LOOPBACK, free_port
from .tokenserver import TokenServer

_BLOB_RE = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[a-f0-9]{64})$")
_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})
SAS_VERSION = "2021-08-06"
CHUNK = 64 * 1024


def _proxy(handler: BaseHTTPRequestHandler, host: str, port: int, realm: Optional[tuple[str, str]] = None) -> None:
    """Pass a request to host:port and its answer back (bodies here are small); `realm` (old, new)
    rewrites the token realm of a 401 challenge, as ACR names its own host there."""
    length = int(handler.headers.get("Content-Length") or 0)
    body = handler.rfile.read(length) if length else None
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP}
        conn.request(handler.command, handler.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response_only(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                if realm and k.lower() == "www-authenticate":
                    v = v.replace(f'realm="{realm[0]}"', f'realm="{realm[1]}"')
                handler.send_header(k, v)
        length_header = resp.getheader("Content-Length")
        handler.send_header("Content-Length", length_header if handler.command == "HEAD" and length_header else str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
    except (OSError, http.client.HTTPException):
        handler.close_connection = True
    finally:
        conn.close()


class _Server:
    handler: type[BaseHTTPRequestHandler]

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self._server: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> Any:
        handler = type("Handler", (self.handler,), {"front": self})
        server = ThreadingHTTPServer((LOOPBACK, self.port), handler)
        server.daemon_threads = True
        server.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StorageFront(_Server):
    """Blob storage with SAS URLs: `/<container>/docker/registry/v2/blobs/sha256/<ab>/<hex>/data`."""

    def __init__(self, registry: Any, key: bytes, *, public_url: Optional[str] = None,
                 container: str = "lifecacr", port: Optional[int] = None) -> None:
        super().__init__(port)
        self.registry = registry
        self.key = key
        self.container = container
        self.public_url = (public_url or self.url).rstrip("/")
        self.repos: dict[str, str] = {}  # digest -> a repository that has it
        self.blobs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def path_of(self, digest: str) -> str:
        hexd = digest.split(":", 1)[1]
        return f"/{self.container}/docker/registry/v2/blobs/sha256/{hexd[:2]}/{hexd}/data"

    def signature(self, path: str, expiry: str) -> str:
        mac = hmac.new(self.key, f"r\n{expiry}\n{path}\n{SAS_VERSION}".encode(), hashlib.sha256)
        return base64.b64encode(mac.digest()).decode()

    def sas_url(self, name: str, digest: str, lifetime: int = 1200) -> str:
        with self._lock:
            self.repos[digest] = name
        path = self.path_of(digest)
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + lifetime))
        query = urllib.parse.urlencode({"sv": SAS_VERSION, "se": expiry, "sr": "b", "sp": "r",
                                        "sig": self.signature(path, expiry)})
        return f"{self.public_url}{path}?{query}"

    def blob(self, digest: str) -> Optional[bytes]:
        from .images import RegistryClient

        with self._lock:
            cached = self.blobs.get(digest)
            name = self.repos.get(digest)
        if cached is not None or name is None:
            return cached
        with RegistryClient.of(self.registry) as client:
            r = client.request("GET", f"/v2/{name}/blobs/{digest}", repo=name)
            if r.status_code != 200:
                return None
            data = r.content
        with self._lock:
            self.blobs[digest] = data
        return data

    class handler(BaseHTTPRequestHandler):  # noqa: N801 - the server's handler class
        front: "StorageFront"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes, ctype: str = "application/xml", extra: Optional[dict[str, str]] = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self) -> None:
            front = self.front
            split = urllib.parse.urlsplit(self.path)
            q = dict(urllib.parse.parse_qsl(split.query))
            with front._lock:
                front.requests.append((self.command, split.path))
            if "Authorization" in self.headers:
                # Azure refuses a SAS request that also carries a bearer token.
                return self._answer(400, b"<Error><Code>InvalidAuthenticationInfo</Code></Error>")
            sig, expiry = q.get("sig", ""), q.get("se", "")
            good = hmac.compare_digest(sig, front.signature(split.path, expiry))
            if not good or expiry < time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()):
                return self._answer(403, b"<Error><Code>AuthenticationFailed</Code></Error>")
            m = re.match(r"^/[^/]+/docker/registry/v2/blobs/sha256/[a-f0-9]{2}/(?P<hex>[a-f0-9]{64})/data$", split.path)
            data = front.blob("sha256:" + m["hex"]) if m else None
            if data is None:
                return self._answer(404, b"<Error><Code>BlobNotFound</Code></Error>")
            self._answer(200, data, "application/octet-stream",
                         {"x-ms-blob-type": "BlockBlob", "Accept-Ranges": "bytes", "ETag": '"0x8DC0000000000"'})

        do_HEAD = do_GET


class AcrFront(_Server):
    """ACR's registry host: token endpoints, blob redirects to storage, the rest proxied."""

    def __init__(self, backend_url: str, token_server: TokenServer, storage: StorageFront, *,
                 public_url: Optional[str] = None, port: Optional[int] = None) -> None:
        super().__init__(port)
        parts = urllib.parse.urlsplit(backend_url)
        self.backend = (parts.hostname or LOOPBACK, parts.port or 80)
        self.token_server = token_server
        self.storage = storage
        self.public_url = (public_url or self.url).rstrip("/")
        self.redirects = 0

    def authorized(self, header: str, name: str) -> bool:
        if not header.lower().startswith("bearer "):
            return False
        claims = self.token_server.verify(header[7:].strip())
        if not claims or claims.get("aud") != self.token_server.service:
            return False
        return any(a.get("type") == "repository" and a.get("name") == name and "pull" in a.get("actions", [])
                   for a in claims.get("access", []))

    class handler(BaseHTTPRequestHandler):  # noqa: N801
        front: "AcrFront"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            front = self.front
            split = urllib.parse.urlsplit(self.path)
            if split.path.startswith("/oauth2/"):
                return _proxy(self, "127.0.0.1", front.token_server.port)
            m = _BLOB_RE.match(split.path)
            if m and self.command in ("GET", "HEAD"):
                name, digest = m["name"], m["digest"]
                if not front.authorized(self.headers.get("Authorization", ""), name):
                    realm = f"{front.public_url}/oauth2/token"
                    body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}\n'
                    self.send_response(401)
                    self.send_header("Content-Type", "application/json; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("WWW-Authenticate", f'Bearer realm="{realm}",service="{front.token_server.service}",'
                                     f'scope="repository:{name}:pull"')
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(body)
                    return
                location = front.storage.sas_url(name, digest)
                front.redirects += 1
                body = f'<a href="{location.replace("&", "&amp;")}">Temporary Redirect</a>.\n\n'.encode()
                self.send_response(307)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Location", location)
                self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                return
            _proxy(self, *front.backend, realm=(front.token_server.realm, f"{front.public_url}/oauth2/token"))

        do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET
