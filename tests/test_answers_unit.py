"""The pieces that make the mirror answer as docker-registry does, without a registry.

What `Accept` admits, the `If-None-Match` test, the digest of a signed schema1 manifest (the
distribution spec's: the payload without `signatures`), upstream error answers passed on
unchanged, and the registries.conf drop-in. The whole behaviour against the real registry is
tests/test_clients.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
import requests
import urllib3

from addons import catalog
from addons.node.hostsfile import registries_conf
from addons.proxy.resolve import (
    SCHEMA1_SIGNED, accepts, content_digest, etag_match, lookup_accept, not_modified, read_manifest,
)
from addons.proxy.upstream import UpstreamError
from addons.registry import oci


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def signed_schema1(payload: bytes) -> bytes:
    """A JWS-signed schema1 manifest the way libtrust lays it out: the payload up to its
    closing brace, the signatures, then the tail that the protected header names."""
    tail = payload[payload.rindex(b"\n}"):]
    head = payload[: len(payload) - len(tail)]
    protected = b64url(json.dumps({"formatLength": len(head), "formatTail": b64url(tail)}).encode())
    signatures = json.dumps([{"header": {"alg": "ES256"}, "signature": "x", "protected": protected}])
    return head + b',\n   "signatures": ' + signatures.encode() + tail


PAYLOAD = b'{\n   "schemaVersion": 1,\n   "name": "demo/x",\n   "tag": "v1"\n}'


def response(body: bytes, headers: dict[str, str], status: int = 200) -> requests.Response:
    resp = requests.Response()
    resp.status_code = status
    resp.headers.update(headers)
    resp.raw = urllib3.HTTPResponse(body=io.BytesIO(body), headers=headers, status=status, preload_content=False)
    return resp


@pytest.mark.parametrize("accept, media_type, ok", [
    ([oci.OCI_MANIFEST], oci.OCI_MANIFEST, True),
    ([f"{oci.OCI_MANIFEST}; q=0.9"], oci.OCI_MANIFEST, True),
    (["*/*"], oci.OCI_MANIFEST, False),  # docker-registry counts named types only
    ([], oci.DOCKER_MANIFEST, False),
    ([oci.DOCKER_MANIFEST], oci.DOCKER_MANIFEST_LIST, False),
    # Other types (artifacts, stored schema1) are served whatever the client accepts.
    (["*/*"], "application/vnd.oci.artifact.manifest.v1+json", True),
    ([], "application/json", True),
])
def test_an_image_manifest_or_index_goes_to_a_client_only_when_its_accept_names_the_type(accept, media_type, ok) -> None:
    assert accepts(accept, media_type) is ok


def test_the_mirrors_lookup_asks_for_every_manifest_type_whatever_the_client_sent() -> None:
    accept = lookup_accept(["*/*"], ())
    assert all(t in accept for t in oci.MANIFEST_TYPES) and "*/*" not in accept


def test_if_none_match_is_the_digest_quoted_or_not() -> None:
    d = "sha256:" + "a" * 64
    assert etag_match([f'"{d}"'], d) and etag_match([d], d)
    assert not etag_match(['"sha256:' + "b" * 64 + '"'], d) and not etag_match([], d)


def test_a_304_has_no_body_type_or_length_like_the_registrys() -> None:
    resp = not_modified()
    assert resp.status_code == 304 and resp.content == b""
    assert "Content-Type" not in resp.headers and "Content-Length" not in resp.headers
    assert resp.headers[oci.API_VERSION_HEADER] == oci.API_VERSION and resp.headers["Date"]


def test_a_signed_schema1_digest_is_that_of_its_payload_without_signatures() -> None:
    body = signed_schema1(PAYLOAD)
    digest = "sha256:" + hashlib.sha256(PAYLOAD).hexdigest()
    assert content_digest(body, SCHEMA1_SIGNED) == (digest, "")
    m = read_manifest(response(body, {"Content-Type": SCHEMA1_SIGNED, oci.CONTENT_DIGEST_HEADER: digest}), "v1", "m")
    assert (m.digest, m.body) == (digest, body)


def test_a_signed_schema1_whose_claimed_digest_is_wrong_is_a_gateway_error() -> None:
    body = signed_schema1(PAYLOAD)
    with pytest.raises(UpstreamError) as e:
        read_manifest(response(body, {"Content-Type": SCHEMA1_SIGNED, oci.CONTENT_DIGEST_HEADER: "sha256:" + "0" * 64}), "v1", "m")
    assert e.value.status == 502


def test_a_signed_schema1_that_cannot_be_checked_passes_with_the_reason_noted() -> None:
    body = b'{"schemaVersion": 1, "signatures": [{"protected": "!!"}]}'
    claimed = "sha256:" + "c" * 64
    notes: list[str] = []
    m = read_manifest(response(body, {"Content-Type": SCHEMA1_SIGNED, oci.CONTENT_DIGEST_HEADER: claimed}), "v1", "m", notes)
    assert m.digest == claimed
    assert notes and "digest not checked" in notes[0]


def test_an_upstream_client_error_passes_on_unchanged() -> None:
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v9"}}]}\n'
    headers = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body))}
    e = UpstreamError.from_status(response(body, headers, 404), "manifest demo/x:v9")
    assert e.status == 404 and e.code == "MANIFEST_UNKNOWN"
    assert 'manifest unknown {"Tag":"v9"}' in e.message  # the log line says why
    get, head = e.response("GET"), e.response("HEAD")
    assert (get.status_code, get.content, get.headers["Content-Type"]) == (404, body, headers["Content-Type"])
    assert (head.content, head.headers["Content-Length"]) == (b"", str(len(body)))


def test_an_upstream_401_stays_the_mirrors_gateway_error() -> None:
    """The mirror's own credentials failed: containerd must fall back, not meet the realm."""
    e = UpstreamError.from_status(response(b'{"errors":[{"code":"UNAUTHORIZED","message":"x"}]}', {}, 401), "blob b")
    assert (e.status, e.code, e.body) == (502, "UNAUTHORIZED", None)


RUNMD = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
: .mirror       example.azurecr.io
: .mirror       http://localhost:5001
: .host         127.0.0.1:8578, resolve, pull
+ .proxy        127.0.0.1:8578
: .manifests    head, get
:   .resolve
```
"""


def test_the_registries_conf_drop_in_names_each_registry_by_a_path_prefix(tmp_path) -> None:
    compiled = catalog.parse_text(RUNMD, str(tmp_path / "mirror.runmd"))
    text = registries_conf(compiled, tmp_path / ".work")
    assert '[[registry]]\nprefix = "example.azurecr.io"\nlocation = "example.azurecr.io"\n' in text
    assert '[[registry.mirror]]\nlocation = "127.0.0.1:8578/example.azurecr.io"\ninsecure = true' in text
    # A port cannot stand in a path component: the host alone names that registry.
    assert 'prefix = "127.0.0.1:5000"\nlocation = "127.0.0.1:5000"\ninsecure = true' in text
    assert 'location = "127.0.0.1:8578/127.0.0.1"' in text
    assert 'location = "127.0.0.1:8578/localhost"' in text


def test_the_readme_shows_the_drop_in_that_the_command_prints(tmp_path) -> None:
    import re
    import subprocess
    from pathlib import Path

    acr = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "acr")
    subprocess.run([acr, "--registry", "example", "init"], cwd=tmp_path, check=True, capture_output=True)
    out = subprocess.run([acr, "hosts", "show", "--registries-conf"], cwd=tmp_path, check=True,
                         capture_output=True, text=True).stdout
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    shown = re.search(r"<!-- registries-conf: .*? -->\n```toml\n(.*?)```", readme, re.S)
    assert shown is not None and shown.group(1) == out


def test_a_next_page_link_keeps_the_registry_host_prefix() -> None:
    from addons.proxy.tags import link_with_prefix

    link = '</v2/demo/app/tags/list?last=v1&n=1>; rel="next"'
    assert link_with_prefix(link, "127.0.0.1") == '</v2/127.0.0.1/demo/app/tags/list?last=v1&n=1>; rel="next"'
