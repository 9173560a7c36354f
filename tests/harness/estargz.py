"""eStargz test images: an original pushed to the registry, its eStargz copy made by the real
converter (``ctr-remote image convert --estargz --oci``), and the copy linked to the original as
an ACR-style streaming referrer.

distribution 2.8 keeps no referrers of its own: the copy is re-pushed as an artifact manifest
(the converter's manifest plus ``artifactType`` and ``subject``) and listed in the tag-schema
index, which the referrers front (tests/harness/referrers.py) answers the referrers API from.
What the registry's access log says about blob reads is parsed here too.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .containerd import Ctr
from .images import (OCI_MANIFEST, RegistryClient, Target, add_to_referrers_index, canonical_json,
                     get_manifest, host_platform, make_image, push_image, random_chunks,
                     sha256_digest)
from .stargz import CAT, CTR_REMOTE, build

STREAMING = "application/vnd.azure.artifact.streaming.v1"
#: What marks an eStargz layer (its media type stays tar+gzip): ctr-remote's converter writes both.
TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
#: What a container started from a test image prints: ``cat`` of this file.
HELLO = "hello.txt"


@dataclass(frozen=True)
class StargzPair:
    """An original image (tagged) and its eStargz copy (a referrer, by digest only)."""

    repo: str
    tag: str
    original: str
    original_layer: str
    original_size: int
    copy: str
    copy_layer: str
    copy_size: int
    hello: bytes


def image_files(hello: bytes, filler_bytes: int, seed: int = 0) -> dict[str, bytes]:
    """A static ``cat``, the file a container prints, and ``filler_bytes`` of incompressible
    data that a lazy start never needs."""
    files = {"bin/cat": (build() / CAT).read_bytes(), HELLO: hello}
    if filler_bytes:
        files["filler.bin"] = b"".join(random_chunks(seed, filler_bytes))
    return files


def push_pair(registry: Target, conversion: Ctr, repo: str, tag: str, *, hello: bytes,
              filler_bytes: int = 0, seed: int = 0) -> StargzPair:
    """Push ``repo:tag`` (one layer), convert it to eStargz on ``conversion``'s containerd (a
    namespace of its own; pulls straight from the registry), push the copy and link it as a
    streaming referrer of the original (ACR's annotations: format, platform)."""
    client = RegistryClient.of(registry)
    host = client.url.split("://", 1)[1]
    original = make_image(image_files(hello, filler_bytes, seed))
    push_image(registry, repo, tag, original)
    src, dst = f"{host}/{repo}:{tag}", f"{host}/{repo}:{tag}-estargz-source"
    _run(conversion.ctr("images", "pull", "--plain-http", "--snapshotter", "overlayfs", src, timeout=300), "pull")
    _run(subprocess.run([CTR_REMOTE, "-a", conversion.address, "-n", conversion.namespace, "image", "convert",
                         "--estargz", "--oci", src, dst], capture_output=True, text=True, timeout=300), "convert")
    _run(conversion.ctr("images", "push", "--plain-http", dst, timeout=300), "push")
    conversion.ctr("images", "rm", "--sync", src, dst)
    converted = get_manifest(registry, repo, f"{tag}-estargz-source", accept=OCI_MANIFEST).json()
    unmarked = {TOC_DIGEST, UNCOMPRESSED_SIZE} - set(converted["layers"][0].get("annotations", {}))
    if unmarked:
        raise RuntimeError(f"the converted layer lacks the eStargz annotations {sorted(unmarked)}")
    plat = host_platform()
    marks = {"streaming.format": "estargz", "streaming.platform.os": plat["os"],
             "streaming.platform.arch": plat["architecture"]}
    referrer: dict[str, Any] = {**converted, "artifactType": STREAMING, "annotations": marks,
                                "subject": {"mediaType": original.media_type, "digest": original.digest,
                                            "size": original.size}}
    body = canonical_json(referrer)
    digest = client.put_manifest(repo, sha256_digest(body), body, OCI_MANIFEST)
    add_to_referrers_index(client, repo, original.digest, {
        "mediaType": OCI_MANIFEST, "digest": digest, "size": len(body), "artifactType": STREAMING,
        "annotations": marks})
    layer = converted["layers"][0]
    return StargzPair(repo=repo, tag=tag, original=original.digest, original_layer=original.layers[0].digest,
                      original_size=original.layers[0].size, copy=digest, copy_layer=layer["digest"],
                      copy_size=layer["size"], hello=hello)


def _run(result: "subprocess.CompletedProcess[str]", what: str) -> None:
    if result.returncode != 0:
        raise RuntimeError(f"eStargz {what} failed ({result.returncode}): {(result.stderr or result.stdout)[-1500:]}")


# --- the registry's access log -------------------------------------------------------------

#: distribution's combined log line: host - - [time] "METHOD PATH HTTP/x" status bytes "referer" "agent"
_ACCESS = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-) '
                     r'"[^"]*" "(?P<agent>[^"]*)"')


@dataclass(frozen=True)
class BlobRead:
    """One blob GET the registry answered, from its access log."""

    path: str
    status: int
    bytes: int
    agent: str


def blob_reads(log_text: str, digest: str) -> list[BlobRead]:
    """The GETs of blob ``digest`` in a registry access log, in order."""
    out = []
    for m in _ACCESS.finditer(log_text):
        if m["method"] == "GET" and m["path"].split("?")[0].endswith(f"/blobs/{digest}"):
            out.append(BlobRead(m["path"], int(m["status"]), int(m["bytes"]) if m["bytes"] != "-" else 0, m["agent"]))
    return out


def log_size(path: Path) -> int:
    """Where a log ends now: read from here on to see only what comes next."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def log_since(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")

