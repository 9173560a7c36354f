"""Clients other than containerd, answered exactly as the registry answers them.

containerd sends every manifest type in `Accept` and `?ns=` on every request; skopeo, podman,
CRI-O and plain HTTP clients do not. The matrix sends the same requests to the real
docker-registry and through the mirror (OCI image, Docker schema2, OCI index, Docker list; by
tag and by digest; seven `Accept` sets; GET and HEAD; `If-None-Match`; `Range`), in two orders, each on
a cold mirror, and fails on any difference a client could see. skopeo and podman (from Debian)
then pull through a registries.conf mirror entry of a mirror that serves two registries, which
they can only name by the path prefix `/v2/<registry-host>/...`.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from addons.proxy.resolve import schema1_payload
from tests.harness.images import (
    DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, make_image, make_multiarch, push_image, push_index,
    sha256_digest,
)
from tests.harness.mirror import Mirror
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

ACR = str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "acr")

#: Seven Accept sets, each a list of header lines (skopeo repeats the header).
ACCEPTS: dict[str, list[str]] = {
    "none": [],
    "any": ["*/*"],
    "oci-manifest": [OCI_MANIFEST],
    "docker-v2": [DOCKER_MANIFEST],
    "oci": [f"{OCI_INDEX}, {OCI_MANIFEST}"],
    "docker": [f"{DOCKER_LIST}, {DOCKER_MANIFEST}"],
    "all-as-lines": [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST],
}
SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"


def fetch(host: str, method: str, path: str, accept: Sequence[str], extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with exactly these header lines (http.client keeps repeated Accept lines)."""
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for line in accept:
            conn.putheader("Accept", line)
        for k, v in (extra or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, body
    finally:
        conn.close()


def visible(status: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """What a client sees of an answer. A signed schema1 manifest is re-signed on every
    request, so its body is compared by payload (its digest's input) and its length not."""
    content_type = headers.get("content-type")
    signed = content_type == SCHEMA1
    code = None
    if status >= 400 and body:
        code = json.loads(body)["errors"][0]["code"]
    return {
        "status": status,
        "code": code,
        "content-type": content_type,
        "digest": headers.get("docker-content-digest"),
        "length": None if signed else headers.get("content-length"),
        "etag": headers.get("etag"),
        "body": schema1_payload(body) if signed and body else body,
    }


@pytest.fixture
def pushed(registry: Registry, repo_name: str) -> dict[str, str]:
    """The four kinds of manifest under tags, and the digest each tag names."""
    oci = make_image({"kind": b"oci " + repo_name.encode()})
    docker = make_image({"kind": b"docker " + repo_name.encode()}, oci=False)
    index = make_multiarch(salt=f"oci {repo_name}")
    docker_list = make_multiarch(oci=False, salt=f"docker {repo_name}")
    push_image(registry, repo_name, "oci", oci)
    push_image(registry, repo_name, "docker", docker)
    push_index(registry, repo_name, "index", index)
    push_index(registry, repo_name, "list", docker_list)
    return {"oci": oci.digest, "docker": docker.digest, "index": index.digest, "list": docker_list.digest}


def requests_for(repo: str, pushed: dict[str, str]) -> list[tuple[str, str, str, dict[str, str]]]:
    """(method, path, accept set, extra headers) for every case of the matrix."""
    refs = [*pushed, *pushed.values(), "missing", "sha256:" + "0" * 64]
    out = []
    for ref in refs:
        for accept in ACCEPTS:
            for method in ("GET", "HEAD"):
                out.append((method, f"/v2/{repo}/manifests/{ref}", accept, {}))
    for tag, digest in pushed.items():
        for ref in (tag, digest):
            for accept in ("none", "all-as-lines"):
                for method in ("GET", "HEAD"):
                    out.append((method, f"/v2/{repo}/manifests/{ref}", accept, {"If-None-Match": f'"{digest}"'}))
            out.append(("GET", f"/v2/{repo}/manifests/{ref}", "oci", {"If-None-Match": '"sha256:' + "1" * 64 + '"'}))
            for accept in ("none", "all-as-lines"):  # docker-registry answers a manifest whole
                out.append(("GET", f"/v2/{repo}/manifests/{ref}", accept, {"Range": "bytes=0-9"}))
    return out


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_every_answer_is_the_registrys_own_in_any_order(
    registry: Registry, repo_name: str, pushed: dict[str, str], mirror_factory: Callable[..., Mirror], order: str,
) -> None:
    m = mirror_factory(registry.url)  # cold: whatever comes first must not decide later answers
    cases = requests_for(repo_name, pushed)
    if order == "reverse":
        cases.reverse()
    differences = []
    for method, path, accept, extra in cases:
        want = visible(*fetch(registry.host, method, path, ACCEPTS[accept], extra))
        got = visible(*fetch(m.host, method, path, ACCEPTS[accept], extra))
        if got != want:
            diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
            differences.append(f"{method} {path} accept={accept} {extra}: {diff}")
    assert not differences, f"{len(differences)} of {len(cases)} differ:\n" + "\n".join(differences[:20])
    assert m.proc is not None and m.proc.poll() is None


def test_304_and_errors_say_why_in_the_log(
    registry: Registry, repo_name: str, pushed: dict[str, str], mirror_factory: Callable[..., Mirror],
) -> None:
    m = mirror_factory(registry.url)
    status, _, _ = fetch(m.host, "GET", f"/v2/{repo_name}/manifests/oci", [OCI_MANIFEST], {"If-None-Match": pushed["oci"]})
    assert status == 304
    status, _, body = fetch(m.host, "GET", f"/v2/{repo_name}/manifests/index", [OCI_MANIFEST])
    assert status == 404 and b"accept header does not support OCI indexes" in body
    status, _, _ = fetch(m.host, "GET", f"/v2/{repo_name}/manifests/docker", [])
    assert status == 200
    status, _, _ = fetch(m.host, "GET", f"/v2/{repo_name}/manifests/missing", [])
    assert status == 404
    log = m.log_text()
    ns = registry.host
    assert (f"GET manifests {repo_name}:oci -> 304 {pushed['oci']} (not modified: If-None-Match names this digest) [{ns}]"
            in log), log
    assert (f"GET manifests {repo_name}:index -> 404 (manifest {repo_name}:index: upstream 404 MANIFEST_UNKNOWN: "
            f"OCI index found, but accept header does not support OCI indexes) [{ns}]") in log, log
    assert (f"GET manifests {repo_name}:missing -> 404 (manifest {repo_name}:missing: upstream 404 MANIFEST_UNKNOWN: "
            f'manifest unknown {{"Tag":"missing"}}) [{ns}]') in log, log
    # A signed schema1 answer is checked by its payload and passed on (with its own digest), never a 502.
    assert f"GET manifests {repo_name}:docker -> 200 sha256:" in log, log
    assert f"GET manifests {repo_name}:docker -> 200 {pushed['docker']}" not in log, log


# --- skopeo and podman: a registries.conf mirror of a mirror that serves two registries -----------


def registries_conf(m: Mirror) -> str:
    """The drop-in as `acr hosts show --registries-conf` prints it for this mirror's runmd."""
    out = subprocess.run(
        [ACR, "--runmd", str(m.runmd_path), "hosts", "show", "--registries-conf"],
        capture_output=True, text=True, check=True, cwd=m.home,
    ).stdout
    assert f'location = "{m.host}/' in out, out
    return out


def client_home(tmp_path: Path, dropin: str) -> dict[str, str]:
    """A HOME whose containers config names only loopback registries (the user's
    registries.conf replaces the system one, and its registries.conf.d holds the drop-in)."""
    conf = tmp_path / "home" / ".config" / "containers"
    (conf / "registries.conf.d").mkdir(parents=True)
    (conf / "registries.conf").write_text("unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n")
    (conf / "registries.conf.d" / "50-lifec-registry.conf").write_text(dropin)
    (conf / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path / "home")}


def two_upstream_mirror(
    token_registry: Registry, token_server: TokenServer, closed_port: Any, mirror_factory: Callable[..., Mirror],
) -> Mirror:
    """A mirror of the token registry (only it has the credentials) and of a second registry."""
    return mirror_factory(
        [token_registry.url, f"http://localhost:{closed_port.port}"],
        credentials=token_server.issue_refresh_token(),
    )


def registry_manifest_requests(registry: Registry, repo: str) -> list[str]:
    return [line for line in registry.log_text().splitlines() if f"/v2/{repo}/manifests/" in line and '"GET ' in line]


@pytest.mark.e2e
def test_skopeo_inspects_copies_and_lists_tags_through_the_mirror_by_path_prefix(
    token_registry: Registry, token_server: TokenServer, repo_name: str, closed_port: Any,
    mirror_factory: Callable[..., Mirror], tmp_path: Path,
) -> None:
    image = make_image({"skopeo": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    m = two_upstream_mirror(token_registry, token_server, closed_port, mirror_factory)
    env = client_home(tmp_path, registries_conf(m))
    ref = f"docker://{token_registry.host}/{repo_name}:v1"

    def skopeo(*args: str) -> str:
        result = subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout

    inspected = json.loads(skopeo("inspect", "--raw", ref))
    assert inspected["mediaType"] == OCI_MANIFEST
    out = tmp_path / "copy"
    skopeo("copy", ref, f"dir:{out}")
    assert sha256_digest((out / "manifest.json").read_bytes()) == image.digest
    for blob in image.blobs:
        assert sha256_digest((out / blob.digest.split(":", 1)[1]).read_bytes()) == blob.digest
    # list-tags asks the named registry itself: name the mirror, with the registry as prefix.
    tags = json.loads(skopeo("list-tags", "--tls-verify=false", f"docker://{m.host}/127.0.0.1/{repo_name}"))
    assert tags["Tags"] == ["v1"]
    # Through the mirror (the registry would have refused skopeo: it has no credentials).
    log = m.log_text()
    assert f"GET manifests {repo_name}:v1 -> 200" in log, log
    assert f"GET blobs {repo_name}:{image.layers[0].digest} -> 200" in log, log
    assert f"GET tags {repo_name} -> 200" in log, log
    seen = registry_manifest_requests(token_registry, repo_name)
    assert seen and all("python-requests" in line for line in seen), seen


@pytest.mark.e2e
def test_podman_pulls_through_a_registries_conf_mirror_entry(
    token_registry: Registry, token_server: TokenServer, repo_name: str, closed_port: Any,
    mirror_factory: Callable[..., Mirror], tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("podman with a private --root needs root here")
    image = make_image({"podman": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    m = two_upstream_mirror(token_registry, token_server, closed_port, mirror_factory)
    env = client_home(tmp_path, registries_conf(m))
    storage = Path(tempfile.mkdtemp(prefix="acr-podman-"))  # podman wants a runroot under 50 characters
    podman = [
        "podman", "--root", str(storage / "root"), "--runroot", str(storage / "run"), "--storage-driver", "vfs",
        "--cgroup-manager", "cgroupfs", "--events-backend", "none",
    ]
    try:
        result = subprocess.run(
            [*podman, "pull", f"{token_registry.host}/{repo_name}:v1"],
            capture_output=True, text=True, timeout=180, env=env,
        )
        assert result.returncode == 0, result.stderr
        listed = subprocess.run(
            [*podman, "images", "--format", "{{.Repository}}:{{.Tag}}"],
            capture_output=True, text=True, timeout=60, env=env,
        )
        assert f"{token_registry.host}/{repo_name}:v1" in listed.stdout, listed.stdout + listed.stderr
    finally:
        subprocess.run([*podman, "system", "reset", "--force"], capture_output=True, timeout=120, env=env)
        shutil.rmtree(storage, ignore_errors=True)
    log = m.log_text()
    assert f"GET manifests {repo_name}:v1 -> 200" in log, log
    assert f"GET blobs {repo_name}:{image.layers[0].digest} -> 200" in log, log
    seen = registry_manifest_requests(token_registry, repo_name)
    assert seen and all("python-requests" in line for line in seen), seen


def test_a_route_that_no_step_answers_forwards_to_its_upstream_and_dump_says_so(
    registry: Registry, repo_name: str, mirror_factory: Callable[..., Mirror],
) -> None:
    """`.tags get` with nothing under it: the registry's own tag list, never a 500."""
    push_image(registry, repo_name, "v1", make_image({"tags": repo_name.encode()}))
    m = mirror_factory(registry.url, start=False)
    text = m.runmd_path.read_text()
    start = text.index(": .tags")
    end = text.index("```", start)
    m.runmd_path.write_text(text[:start] + ": .tags           get\n" + text[end:])
    dump = subprocess.run([ACR, "--runmd", str(m.runmd_path), "dump"], capture_output=True, text=True, check=True).stdout
    assert 'tags "get"  # no step answers: forwarded to the upstream as is' in dump, dump
    m.start()
    status, _, body = fetch(m.host, "GET", f"/v2/{repo_name}/tags/list", [])
    assert (status, json.loads(body)) == (200, {"name": repo_name, "tags": ["v1"]})
    # A streamed answer's log line is written once mitmproxy has sent the last byte.
    for _ in range(100):
        if f"GET tags {repo_name} -> 200" in m.log_text():
            break
        time.sleep(0.1)
    assert f"GET tags {repo_name} -> 200" in m.log_text(), m.log_text()
