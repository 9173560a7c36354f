"""Build real, pullable images in memory and push them over plain HTTP with ``requests``.

Layers are deterministic gzipped tars with correct diff_ids, so containerd unpacks what we push and
digests are stable across runs. Pushing speaks the distribution API directly (POST+PUT, single
POST, chunked PATCHes, or one streamed PATCH for huge blobs) and answers the registry's own auth
challenge (Basic, or a Bearer token fetched from the challenge's realm), so the same helpers push
to the anonymous, the htpasswd and the token-auth registry. Referrers are pushed as OCI 1.1
manifests with ``subject`` and ``artifactType``, and since docker-registry 2.8 has no referrers API
the ``sha256-<hex>`` tag-schema index is maintained the way the OCI distribution spec 1.1 says.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import platform as _platform
import re
import tarfile
import urllib.parse
from dataclasses import dataclass
from typing import (Any, Iterable, Iterator, Literal, Mapping, Optional, Protocol, Sequence,
                    Union)

import requests
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

# --- media types ---
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
ACCEPT_ALL_MANIFESTS = ", ".join(MANIFEST_TYPES)

#: The layer annotations overlaybd's converter (containerd/accelerated-container-image) writes.
OVERLAYBD_BLOB_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
OVERLAYBD_BLOB_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
OVERLAYBD_BLOB_FS_TYPE = "containerd.io/snapshot/overlaybd/blob-fs-type"

EMPTY_JSON = b"{}"
EMPTY_DIGEST = "sha256:" + hashlib.sha256(EMPTY_JSON).hexdigest()
EMPTY_DESCRIPTOR: dict[str, Any] = {"mediaType": OCI_EMPTY, "digest": EMPTY_DIGEST, "size": 2}

Descriptor = dict[str, Any]
UploadMethod = Literal["put", "post", "chunked"]
Platform = dict[str, str]


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """Compact, key-sorted JSON: stable bytes, so stable digests."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def parse_platform(value: Union[str, Mapping[str, str]]) -> Platform:
    """``linux/arm64/v8`` or an OCI platform dict -> OCI platform dict."""
    if not isinstance(value, str):
        return dict(value)
    parts = value.split("/")
    out: Platform = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2 and parts[2]:
        out["variant"] = parts[2]
    return out


def platform_string(p: Mapping[str, str]) -> str:
    return "/".join(x for x in (p["os"], p["architecture"], p.get("variant", "")) if x)


def host_platform() -> Platform:
    """The platform containerd picks on this machine by default (GOARCH naming)."""
    machine = _platform.machine().lower()
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
            "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}
    out: Platform = {"os": "linux", "architecture": arch.get(machine, machine)}
    if out["architecture"] == "arm64":
        out["variant"] = "v8"
    elif out["architecture"] == "arm":
        out["variant"] = "v7"
    return out


def other_platform() -> str:
    """A platform that is not this machine's, as `os/arch[/variant]`."""
    return "linux/arm64/v8" if host_platform()["architecture"] == "amd64" else "linux/amd64"


def referrers_tag(digest: str) -> str:
    """The OCI 1.1 referrers tag schema: ``sha256:abc`` -> ``sha256-abc``."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}-{hexpart}"


# --- building ---
@dataclass(frozen=True)
class Blob:
    """Content plus its media type; digest and size follow from the bytes."""

    data: bytes
    media_type: str
    annotations: Optional[dict[str, str]] = None

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> Descriptor:
        d: Descriptor = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


@dataclass(frozen=True)
class Layer(Blob):
    """A gzipped tar layer; ``diff_id`` is the digest of the uncompressed tar (config rootfs)."""

    diff_id: str = ""


def layer_tar(files: Mapping[str, bytes]) -> bytes:
    """A deterministic uncompressed tar of files (parents added as dirs), mtime 0, root-owned;
    files under ``bin/`` are executable, so an image can carry a program a container runs."""
    dirs: set[str] = set()
    for path in files:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)
        for path in sorted(files):
            data = files[path]
            info = tarfile.TarInfo(path.strip("/"))
            info.size, info.mtime = len(data), 0
            info.mode = 0o755 if path.strip("/").startswith("bin/") else 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_layer(files: Mapping[str, bytes], *, media_type: str = OCI_LAYER_GZIP) -> Layer:
    """A gzipped tar layer of ``files``; gzip mtime 0 keeps the digest stable."""
    raw = layer_tar(files)
    return Layer(data=gzip.compress(raw, compresslevel=6, mtime=0), media_type=media_type,
                 diff_id=sha256_digest(raw))


def make_overlaybd_layer(files: Mapping[str, bytes], fs_type: str = "ext4") -> Layer:
    """A layer shaped as overlaybd's converter writes one: an uncompressed tar (media type
    `...layer.v1.tar`) holding the single read-only file `overlaybd.commit`, annotated with the
    blob's own digest, its size and the file system inside. The commit file here holds a tar of
    `files` (a real one is overlaybd's block format, which only overlaybd's tools write): what
    matters to the mirror and to containerd is the descriptor, and containerd's overlayfs
    snapshotter unpacks it, as it would a real one, into a directory with one blob file."""
    commit = layer_tar(files)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size, info.mode, info.mtime = len(commit), 0o444, 0
        tar.addfile(info, io.BytesIO(commit))
    raw = buf.getvalue()
    digest = sha256_digest(raw)
    return Layer(data=raw, media_type=OCI_LAYER, diff_id=digest, annotations={
        OVERLAYBD_BLOB_DIGEST: digest, OVERLAYBD_BLOB_SIZE: str(len(raw)), OVERLAYBD_BLOB_FS_TYPE: fs_type})


@dataclass(frozen=True)
class Image:
    """A single-platform image: config blob, layers and the manifest bytes that name them."""

    config: Blob
    layers: tuple[Layer, ...]
    manifest: bytes
    media_type: str
    platform: Platform

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    @property
    def blobs(self) -> tuple[Blob, ...]:
        return (self.config, *self.layers)

    def descriptor(self, *, with_platform: bool = False) -> Descriptor:
        d: Descriptor = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if with_platform:
            d["platform"] = dict(self.platform)
        return d


def make_image(
    files: Optional[Mapping[str, bytes]] = None,
    *,
    layers: Optional[Sequence[Mapping[str, bytes]]] = None,
    oci: bool = True,
    platform: Union[str, Mapping[str, str], None] = None,
    annotations: Optional[Mapping[str, str]] = None,
    labels: Optional[Mapping[str, str]] = None,
    overlaybd: bool = False,
) -> Image:
    """An image with one layer of ``files`` (or several ``layers``) for ``platform``.

    ``oci=False`` gives Docker schema 2 media types, which many registries still serve.
    ``overlaybd=True`` makes a streamable image: its layers are overlaybd blobs
    (``make_overlaybd_layer``), as the converter and ACR Artifact Streaming push them.
    """
    plat = parse_platform(platform) if platform is not None else host_platform()
    if layers is None:
        layers = [files if files is not None else {"hello.txt": b"hello from lifec\n"}]
    layer_type = OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP
    if overlaybd:
        built = tuple(make_overlaybd_layer(f) for f in layers)
    else:
        built = tuple(make_layer(f, media_type=layer_type) for f in layers)
    config_obj: dict[str, Any] = {
        "architecture": plat["architecture"],
        "os": plat["os"],
        "created": "1970-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in built]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "lifec test harness"}
                    for _ in built],
    }
    if "variant" in plat:
        config_obj["variant"] = plat["variant"]
    config = Blob(canonical_json(config_obj), OCI_CONFIG if oci else DOCKER_CONFIG)
    manifest_obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST if oci else DOCKER_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in built],
    }
    if annotations:
        manifest_obj["annotations"] = dict(annotations)
    return Image(config=config, layers=built, manifest=canonical_json(manifest_obj),
                 media_type=manifest_obj["mediaType"], platform=plat)


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list over platform images."""

    images: tuple[Image, ...]
    manifest: bytes
    media_type: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def size(self) -> int:
        return len(self.manifest)

    def descriptor(self) -> Descriptor:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}

    def for_platform(self, p: Union[str, Mapping[str, str]]) -> Image:
        want = parse_platform(p)
        for img in self.images:
            if all(img.platform.get(k) == v for k, v in want.items()):
                return img
        raise KeyError(platform_string(want))


def make_index(
    entries: Sequence[tuple[Union[str, Mapping[str, str], None], Image]],
    *,
    oci: bool = True,
    annotations: Optional[Mapping[str, str]] = None,
) -> Index:
    """An index listing each (platform, image); platform None means the image's own."""
    images: list[Image] = []
    descriptors: list[Descriptor] = []
    for plat, img in entries:
        d = img.descriptor()
        d["platform"] = parse_platform(plat) if plat is not None else dict(img.platform)
        images.append(img)
        descriptors.append(d)
    obj: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX if oci else DOCKER_LIST,
                           "manifests": descriptors}
    if annotations:
        obj["annotations"] = dict(annotations)
    return Index(images=tuple(images), manifest=canonical_json(obj), media_type=obj["mediaType"])


def make_multiarch(
    platforms: Sequence[str] = ("linux/amd64", "linux/arm64/v8"), *, oci: bool = True,
    salt: str = "multi",
) -> Index:
    """A small index with a distinct image per platform (content names the platform and salt)."""
    entries = [
        (p, make_image({"platform.txt": f"{salt} {p}\n".encode()}, oci=oci, platform=p))
        for p in platforms
    ]
    return make_index(entries, oci=oci)


# --- random blobs that never sit in memory whole ---
def random_chunks(seed: int, size: int, chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """``size`` pseudo-random bytes from ``seed``, chunk by chunk (same seed, same bytes).

    AES-CTR over zeros: ~3 GB/s, so a 1 GiB blob costs the registry's time, not ours.
    """
    key = hashlib.sha256(b"lifec-random-blob:%d" % seed).digest()
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    zeros = bytes(chunk_size)
    left = size
    while left > 0:
        n = min(chunk_size, left)
        yield encryptor.update(zeros[:n])
        left -= n


def random_blob_digest(seed: int, size: int) -> str:
    h = hashlib.sha256()
    for chunk in random_chunks(seed, size):
        h.update(chunk)
    return "sha256:" + h.hexdigest()


# --- talking to a registry ---
class RegistryLike(Protocol):
    url: str
    credentials: Optional[tuple[str, str]]


def basic_auth(user: str, password: str) -> str:
    """An ``Authorization: Basic`` value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


_PARAM = re.compile(r'(\w+)="([^"]*)"')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    return scheme.lower(), dict(_PARAM.findall(rest))


class RegistryClient:
    """A ``requests`` session that answers the registry's 401 challenge the way docker does.

    After the first challenge the Authorization is sent up front, so a streamed body (which cannot
    be replayed) goes out already authorized. Proxies from the environment are ignored: all
    traffic stays on loopback.
    """

    def __init__(self, url: str, credentials: Optional[tuple[str, str]] = None,
                 timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.credentials = credentials
        self.timeout = timeout
        self.session = requests.Session()
        self.session.trust_env = False
        self._auth: dict[str, str] = {}  # repository -> Authorization header value
        self.token_requests = 0

    @classmethod
    def of(cls, registry: Union["RegistryClient", RegistryLike]) -> "RegistryClient":
        if isinstance(registry, RegistryClient):
            return registry
        return cls(registry.url, getattr(registry, "credentials", None))

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> "RegistryClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _authorize(self, challenge: str) -> Optional[str]:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.credentials is None:
                return None
            return basic_auth(*self.credentials)
        if scheme != "bearer" or "realm" not in params:
            return None
        query = {"service": params.get("service", "")}
        if params.get("scope"):
            query["scope"] = params["scope"]
        self.token_requests += 1
        r = self.session.get(params["realm"], params=query, auth=self.credentials,
                             timeout=self.timeout)
        if r.status_code != 200:
            return None
        body: dict[str, Any] = r.json()
        token = str(body.get("token") or body["access_token"])
        return "Bearer " + token

    def request(self, method: str, path_or_url: str, *, repo: Optional[str] = None,
                replayable: bool = True, **kwargs: Any) -> requests.Response:
        """One request; on a 401 fetch credentials per the challenge and retry once."""
        url = path_or_url if "://" in path_or_url else self.url + path_or_url
        key = repo or ""
        headers = dict(kwargs.pop("headers", None) or {})
        if key in self._auth:
            headers["Authorization"] = self._auth[key]
        kwargs.setdefault("timeout", self.timeout)
        r = self.session.request(method, url, headers=headers, **kwargs)
        if r.status_code != 401 or not replayable:
            return r
        auth = self._authorize(r.headers.get("WWW-Authenticate", ""))
        if auth is None:
            return r
        self._auth[key] = auth
        headers["Authorization"] = auth
        return self.session.request(method, url, headers=headers, **kwargs)

    # --- blobs ---
    def blob_exists(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo=repo)
        return r.status_code == 200

    def _start_upload(self, repo: str) -> str:
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo=repo)
        _expect(r, 202, "start upload")
        return urllib.parse.urljoin(self.url + "/", r.headers["Location"])

    def push_blob(self, repo: str, data: bytes, *, method: UploadMethod = "put",
                  chunk_size: int = 1 << 20, skip_existing: bool = True) -> str:
        """Upload ``data`` the way ``method`` says; returns the digest.

        ``put``: POST then one PUT with the body (monolithic). ``post``: a single POST with
        ``?digest=``; a registry that answers 202 instead of 201 (docker-registry 2.8 does) gets
        the PUT, as the spec tells clients. ``chunked``: PATCHes with Content-Range, then PUT.
        """
        digest = sha256_digest(data)
        if skip_existing and self.blob_exists(repo, digest):
            return digest
        octet = {"Content-Type": "application/octet-stream"}
        if method == "post":
            r = self.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", repo=repo,
                             data=data, headers=octet)
            if r.status_code == 201:
                return digest
            _expect(r, 202, "single POST upload")
            location = urllib.parse.urljoin(self.url + "/", r.headers["Location"])
            r = self.request("PUT", _with_query(location, digest=digest), repo=repo, data=data,
                             headers=octet)
            _expect(r, 201, "PUT after POST")
            return digest
        location = self._start_upload(repo)
        if method == "chunked":
            for start in range(0, len(data), chunk_size):
                chunk = data[start:start + chunk_size]
                headers = dict(octet)
                headers["Content-Range"] = f"{start}-{start + len(chunk) - 1}"
                r = self.request("PATCH", location, repo=repo, data=chunk, headers=headers)
                _expect(r, 202, "chunk PATCH")
                location = urllib.parse.urljoin(self.url + "/", r.headers["Location"])
            data = b""
        r = self.request("PUT", _with_query(location, digest=digest), repo=repo, data=data,
                         headers=octet)
        _expect(r, 201, "upload")
        return digest

    def push_stream(self, repo: str, chunks: Iterable[bytes]) -> tuple[str, int]:
        """Stream chunks in one chunked PATCH, hashing on the way, then PUT the digest.

        Memory stays at one chunk, which is what a 1 GiB blob test needs.
        """
        location = self._start_upload(repo)
        h = hashlib.sha256()
        total = 0

        def body() -> Iterator[bytes]:
            nonlocal total
            for chunk in chunks:
                h.update(chunk)
                total += len(chunk)
                yield chunk

        r = self.request("PATCH", location, repo=repo, data=body(), replayable=False,
                         headers={"Content-Type": "application/octet-stream"})
        _expect(r, 202, "streamed PATCH")
        location = urllib.parse.urljoin(self.url + "/", r.headers["Location"])
        digest = "sha256:" + h.hexdigest()
        r = self.request("PUT", _with_query(location, digest=digest), repo=repo, data=b"")
        _expect(r, 201, "finish streamed upload")
        return digest, total

    # --- manifests ---
    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        r = self.request("PUT", f"/v2/{repo}/manifests/{reference}", repo=repo, data=body,
                         headers={"Content-Type": media_type})
        _expect(r, 201, f"PUT manifest {repo}:{reference}")
        digest = sha256_digest(body)
        got = r.headers.get("Docker-Content-Digest")
        if got and got != digest:
            raise RuntimeError(f"registry computed {got} for a manifest we hashed as {digest}")
        return digest

    def get_manifest(self, repo: str, reference: str,
                     accept: str = ACCEPT_ALL_MANIFESTS) -> requests.Response:
        return self.request("GET", f"/v2/{repo}/manifests/{reference}", repo=repo,
                            headers={"Accept": accept})

    def delete_manifest(self, repo: str, digest: str) -> requests.Response:
        return self.request("DELETE", f"/v2/{repo}/manifests/{digest}", repo=repo)


def _with_query(url: str, **params: str) -> str:
    sep = "&" if urllib.parse.urlsplit(url).query else "?"
    return url + sep + urllib.parse.urlencode(params)


def _expect(r: requests.Response, status: int, what: str) -> None:
    if r.status_code != status:
        raise RuntimeError(f"{what}: expected {status}, got {r.status_code} {r.text[:500]}")


Target = Union[RegistryClient, RegistryLike]


def push_blob(registry: Target, repo: str, data: Union[bytes, Blob], *,
              method: UploadMethod = "put") -> str:
    """Push one blob; returns its digest."""
    raw = data.data if isinstance(data, Blob) else data
    return RegistryClient.of(registry).push_blob(repo, raw, method=method)


def push_random_blob(registry: Target, repo: str, size: int, seed: int = 0,
                     chunk_size: int = 1 << 20) -> tuple[str, int]:
    """Stream ``size`` seeded random bytes without holding them; returns (digest, size)."""
    return RegistryClient.of(registry).push_stream(repo, random_chunks(seed, size, chunk_size))


def push_image(registry: Target, repo: str, tag: Optional[str], image: Image, *,
               method: UploadMethod = "put") -> Descriptor:
    """Push blobs then the manifest (by tag, or by digest when tag is None)."""
    client = RegistryClient.of(registry)
    for blob in image.blobs:
        client.push_blob(repo, blob.data, method=method)
    client.put_manifest(repo, tag or image.digest, image.manifest, image.media_type)
    d = image.descriptor()
    d["platform"] = dict(image.platform)
    return d


def push_index(registry: Target, repo: str, tag: Optional[str], index: Index) -> Descriptor:
    """Push every platform image by digest, then the index by tag."""
    client = RegistryClient.of(registry)
    for img in index.images:
        push_image(client, repo, None, img)
    client.put_manifest(repo, tag or index.digest, index.manifest, index.media_type)
    return index.descriptor()


def subject_of(subject: Union[Descriptor, Image, Index]) -> Descriptor:
    """The three fields a ``subject`` carries."""
    d = subject if isinstance(subject, dict) else subject.descriptor()
    return {"mediaType": d["mediaType"], "digest": d["digest"], "size": d["size"]}


def make_referrer(
    subject: Union[Descriptor, Image, Index],
    artifact_type: str,
    *,
    annotations: Optional[Mapping[str, str]] = None,
    layers: Optional[Sequence[Blob]] = None,
    config: Optional[Blob] = None,
) -> tuple[bytes, list[Blob]]:
    """An OCI 1.1 artifact manifest (image manifest + artifactType + subject) and its blobs.

    With no config the empty descriptor is used, and with no layers the empty descriptor is the
    single layer, as the image spec's artifact guidance says.
    """
    blobs: list[Blob] = []
    if config is None:
        config_desc = dict(EMPTY_DESCRIPTOR)
        blobs.append(Blob(EMPTY_JSON, OCI_EMPTY))
    else:
        config_desc = config.descriptor()
        blobs.append(config)
    if layers:
        layer_descs = [b.descriptor() for b in layers]
        blobs.extend(layers)
    else:
        layer_descs = [dict(EMPTY_DESCRIPTOR)]
        if config is not None:
            blobs.append(Blob(EMPTY_JSON, OCI_EMPTY))
    obj: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": config_desc,
        "layers": layer_descs,
        "subject": subject_of(subject),
    }
    if annotations:
        obj["annotations"] = dict(annotations)
    return canonical_json(obj), blobs


def push_referrer(
    registry: Target,
    repo: str,
    subject: Union[Descriptor, Image, Index],
    artifact_type: str,
    annotations: Optional[Mapping[str, str]] = None,
    *,
    layers: Optional[Sequence[Blob]] = None,
    config: Optional[Blob] = None,
    tag: Optional[str] = None,
    update_tag_schema: bool = True,
) -> Descriptor:
    """Push a referrer of ``subject`` and list it in the ``sha256-<hex>`` tag-schema index.

    Returns the referrer's descriptor as it appears in that index (mediaType, digest, size,
    artifactType, annotations). ``update_tag_schema=False`` leaves the index alone, for tests
    of registries that do not maintain it.
    """
    client = RegistryClient.of(registry)
    body, blobs = make_referrer(subject, artifact_type, annotations=annotations, layers=layers,
                                config=config)
    for blob in blobs:
        client.push_blob(repo, blob.data)
    digest = client.put_manifest(repo, tag or sha256_digest(body), body, OCI_MANIFEST)
    desc: Descriptor = {"mediaType": OCI_MANIFEST, "digest": digest, "size": len(body),
                        "artifactType": artifact_type}
    if annotations:
        desc["annotations"] = dict(annotations)
    if update_tag_schema:
        add_to_referrers_index(client, repo, subject_of(subject)["digest"], desc)
    return desc


def add_to_referrers_index(registry: Target, repo: str, subject_digest: str,
                           descriptor: Descriptor) -> Descriptor:
    """Read-modify-write of the referrers tag-schema index (OCI distribution spec 1.1).

    The index tagged ``sha256-<hex>`` lists every referrer; an entry with the same digest is
    replaced, not duplicated. Returns the new index's descriptor.
    """
    client = RegistryClient.of(registry)
    tag = referrers_tag(subject_digest)
    r = client.get_manifest(repo, tag, accept=OCI_INDEX)
    if r.status_code == 200:
        index = r.json()
    elif r.status_code == 404:
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    else:
        raise RuntimeError(f"GET referrers tag {tag}: {r.status_code} {r.text[:300]}")
    manifests = [m for m in index.get("manifests", []) if m.get("digest") != descriptor["digest"]]
    manifests.append(descriptor)
    index["manifests"] = manifests
    body = canonical_json(index)
    digest = client.put_manifest(repo, tag, body, OCI_INDEX)
    return {"mediaType": OCI_INDEX, "digest": digest, "size": len(body)}


def get_manifest(registry: Target, repo: str, reference: str,
                 accept: str = ACCEPT_ALL_MANIFESTS) -> requests.Response:
    """GET a manifest with the registry's auth handled; the raw response for assertions."""
    return RegistryClient.of(registry).get_manifest(repo, reference, accept)
