"""Self-tests of the harness: if these pass, the real components speak the protocols the mirror's
tests rely on (token auth as ACR and the Docker spec do it, referrers via the tag schema, and
containerd pulling with hosts.toml)."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path
from typing import Callable

import pytest

from tests.conftest import HostsDir
from tests.harness.containerd import Containerd, Ctr
from tests.harness.images import (
    OCI_INDEX,
    Index,
    RegistryClient,
    basic_auth,
    get_manifest,
    host_platform,
    make_image,
    make_index,
    other_platform,
    parse_challenge,
    platform_string,
    push_image,
    push_index,
    push_random_blob,
    push_referrer,
    random_blob_digest,
    referrers_tag,
)
from tests.harness.ports import direct_session, port_open
from tests.harness.registry import Registry
from tests.harness.tokenserver import ACR_REFRESH_USER, REDACTED, TokenServer, decode_jwt

STREAMING = "application/vnd.azure.artifact.streaming.v1"
OVERLAYBD = "application/vnd.containerd.overlaybd.native.v1+json"


# --- containerd against the real registries -----------------------------------------


@pytest.mark.e2e
def test_containerd_pulls_from_token_registry_only_with_credentials(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer,
    tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    user, password = token_registry.credentials or ("", "")
    image = make_image({"etc/issue": repo_name.encode()})
    pushed = push_image(token_registry, repo_name, "v1", image)
    tmp_hosts_dir.write(token_registry.host, token_registry.url)
    ref = f"{token_registry.host}/{repo_name}:v1"
    token_server.clear_log()

    anonymous = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert anonymous.returncode != 0
    assert "insufficient_scope" in anonymous.stderr, anonymous.stderr
    wrong = containerd.pull(ref, hosts_dir=tmp_hosts_dir, user=f"{user}:not-{password}")
    assert wrong.returncode != 0
    assert containerd.image_target(ref) is None

    ok = containerd.pull(ref, hosts_dir=tmp_hosts_dir, user=f"{user}:{password}")
    assert ok.returncode == 0, ok.stderr
    assert containerd.image_target(ref) == image.digest == pushed["digest"]
    assert {image.config.digest, *(layer.digest for layer in image.layers)} <= (
        containerd.content_digests())
    # containerd with credentials uses the Docker OAuth2 POST, password redacted in the log.
    posts = [r for r in token_server.requests if r.method == "POST" and r.path == "/oauth2/token"]
    assert any(r.params.get("grant_type") == ["password"] and r.params.get("username") == [user]
               and r.params.get("password") == [REDACTED] for r in posts), token_server.requests
    assert password not in repr(token_server.requests)

    assert containerd.remove_image(ref).returncode == 0
    assert containerd.image_target(ref) is None
    assert image.config.digest not in containerd.content_digests()  # GC ran (--sync)


@pytest.mark.e2e
@pytest.mark.parametrize("oci", [True, False], ids=["oci-index", "docker-list"])
def test_containerd_pulls_host_platform_of_multiarch_index(
    containerd: Ctr, registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str, oci: bool,
) -> None:
    host, other = platform_string(host_platform()), other_platform()
    index: Index = make_index(
        [(p, make_image({"platform": f"{repo_name} {p}".encode()}, platform=p, oci=oci))
         for p in (other, host)], oci=oci)
    push_index(registry, repo_name, "multi", index)
    tmp_hosts_dir.write(registry.host, registry.url)
    ref = f"{registry.host}/{repo_name}:multi"

    result = containerd.pull(ref, hosts_dir=tmp_hosts_dir)
    assert result.returncode == 0, result.stderr
    assert containerd.image_target(ref) == index.digest
    content = containerd.content_digests()
    mine, theirs = index.for_platform(host), index.for_platform(other)
    assert {index.digest, mine.digest, mine.config.digest, mine.layers[0].digest} <= content
    assert theirs.digest not in content and theirs.layers[0].digest not in content


@pytest.mark.e2e
def test_containerd_falls_back_from_post_to_get_when_post_is_404(
    containerd: Ctr, token_registry: Registry, token_server: TokenServer,
    tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    user, password = token_registry.credentials or ("", "")
    image = make_image({"f": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    tmp_hosts_dir.write(token_registry.host, token_registry.url)
    token_server.post_not_found = True
    token_server.clear_log()

    result = containerd.pull(f"{token_registry.host}/{repo_name}:v1", hosts_dir=tmp_hosts_dir,
                             user=f"{user}:{password}")
    assert result.returncode == 0, result.stderr
    methods = [(r.method, r.has_authorization) for r in token_server.requests]
    assert methods[:2] == [("POST", False), ("GET", True)], token_server.requests
    assert token_server.count("token_post") >= 1 and token_server.count("token_get") >= 1


# --- referrers --------------------------------------------------------------------------


def test_referrers_are_listed_by_the_tag_schema(registry: Registry, repo_name: str) -> None:
    image = make_image({"app": b"subject"})
    push_image(registry, repo_name, "v1", image)
    streaming = push_referrer(registry, repo_name, image, STREAMING, {
        "streaming.format": "overlaybd", "streaming.platform.os": "linux",
        "streaming.platform.arch": host_platform()["architecture"], "streaming.version": "v1"})
    native = push_referrer(registry, repo_name, image, OVERLAYBD, {"org.example": "x"})
    push_referrer(registry, repo_name, image, OVERLAYBD, {"org.example": "x"})  # idempotent

    r = get_manifest(registry, repo_name, referrers_tag(image.digest), accept=OCI_INDEX)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == OCI_INDEX
    listed = r.json()["manifests"]
    assert listed == [streaming, native]
    assert listed[0]["artifactType"] == STREAMING
    assert listed[0]["annotations"]["streaming.format"] == "overlaybd"
    # each referrer's manifest names the subject, so a real referrers API could index it
    body = get_manifest(registry, repo_name, streaming["digest"]).json()
    assert body["subject"]["digest"] == image.digest and body["artifactType"] == STREAMING
    # docker-registry 2.8 has no referrers API: clients must fall back to the tag schema
    api = direct_session().get(f"{registry.url}/v2/{repo_name}/referrers/{image.digest}")
    assert api.status_code == 404


# --- token server: ACR and Docker flows --------------------------------------------------


def test_acr_exchange_refresh_access_flow_is_accepted_by_registry(
    token_server: TokenServer, token_registry: Registry, repo_name: str,
) -> None:
    image = make_image({"acr": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    aad = "aad-" + secrets.token_hex(16)
    token_server.aad_tokens[aad] = "someone@tenant"
    svc = token_server.service
    s = direct_session()
    manifest_url = f"{token_registry.url}/v2/{repo_name}/manifests/v1"

    challenge = s.get(manifest_url, headers={"Accept": image.media_type})
    assert challenge.status_code == 401
    scheme, params = parse_challenge(challenge.headers["WWW-Authenticate"])
    assert scheme == "bearer" and params["realm"] == token_server.realm
    assert params["service"] == svc == token_registry.host

    denied = s.post(f"{token_server.url}/oauth2/exchange", data={
        "grant_type": "access_token", "service": svc, "tenant": "t", "access_token": "nope"})
    assert denied.status_code == 401 and denied.json()["errors"][0]["code"] == "UNAUTHORIZED"

    ex = s.post(f"{token_server.url}/oauth2/exchange", data={
        "grant_type": "access_token", "service": svc, "tenant": "t", "access_token": aad})
    assert ex.status_code == 200 and set(ex.json()) == {"refresh_token"}
    refresh = ex.json()["refresh_token"]

    tok = s.post(token_server.realm, data={
        "grant_type": "refresh_token", "service": svc, "scope": params["scope"],
        "refresh_token": refresh})
    assert tok.status_code == 200 and set(tok.json()) == {"access_token"}
    access = tok.json()["access_token"]
    header, claims = decode_jwt(access)
    assert header["alg"] == "RS256" and header["x5c"]
    assert claims["aud"] == svc and claims["sub"] == "someone@tenant"
    assert claims["access"] == [{"type": "repository", "name": repo_name, "actions": ["pull"]}]

    got = s.get(manifest_url, headers={"Accept": image.media_type,
                                       "Authorization": f"Bearer {access}"})
    assert got.status_code == 200 and got.headers["Docker-Content-Digest"] == image.digest

    # ACR also takes the refresh token as the Basic password of the all-zero user on GET
    basic = s.get(token_server.realm, params={"service": svc, "scope": params["scope"]},
                  auth=(ACR_REFRESH_USER, refresh))
    assert basic.status_code == 200 and set(basic.json()) >= {"token", "access_token",
                                                              "expires_in", "issued_at"}
    got = s.get(manifest_url, headers={"Accept": image.media_type,
                                       "Authorization": f"Bearer {basic.json()['token']}"})
    assert got.status_code == 200

    log = repr(token_server.requests)
    assert aad not in log and refresh not in log and access not in log
    assert token_server.count("exchange") == 2 and token_server.count("exchange_denied") == 1


def test_docker_token_spec_get_and_oauth2_post(
    token_server: TokenServer, token_registry: Registry, repo_name: str,
) -> None:
    user, password = token_registry.credentials or ("", "")
    s = direct_session()
    svc = token_server.service
    scopes = [f"repository:{repo_name}:pull,push", "repository:other/repo:pull"]
    r = s.get(token_server.realm, params={"service": svc, "scope": scopes,
                                          "offline_token": "true"}, auth=(user, password))
    assert r.status_code == 200
    body = r.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == token_server.expires_in
    assert "refresh_token" in body
    _, claims = decode_jwt(body["token"])
    assert [a["name"] for a in claims["access"]] == [repo_name, "other/repo"]
    assert claims["access"][0]["actions"] == ["pull", "push"]

    r = s.post(token_server.realm, data={"grant_type": "password", "service": svc,
                                         "scope": " ".join(scopes), "username": user,
                                         "password": password, "access_type": "offline",
                                         "client_id": "harness"})
    assert r.status_code == 200
    assert {"access_token", "expires_in", "refresh_token"} <= set(r.json())
    r2 = s.post(token_server.realm, data={"grant_type": "refresh_token", "service": svc,
                                          "scope": scopes[0],
                                          "refresh_token": r.json()["refresh_token"]})
    assert r2.status_code == 200 and "access_token" in r2.json()

    bad = s.get(token_server.realm, params={"service": svc, "scope": scopes[0]},
                auth=(user, "wrong"))
    assert bad.status_code == 401
    bad = s.post(token_server.realm, data={"grant_type": "password", "service": svc,
                                           "username": user, "password": "wrong"})
    assert bad.status_code == 401


def test_post_not_found_knob_forces_get(token_server: TokenServer) -> None:
    s = direct_session()
    user, password = next(iter(token_server.users.items()))
    form = {"grant_type": "password", "service": token_server.service,
            "scope": "repository:a:pull", "username": user, "password": password}
    assert s.post(token_server.realm, data=form).status_code == 200
    token_server.post_not_found = True
    assert s.post(token_server.realm, data=form).status_code == 404
    get = s.get(token_server.realm, params={"service": token_server.service,
                                            "scope": "repository:a:pull"},
                auth=(user, password))
    assert get.status_code == 200 and get.json()["token"]
    assert [r.method for r in token_server.requests] == ["POST", "POST", "GET"]
    token_server.reset()
    assert not token_server.post_not_found and token_server.requests == []


def test_registry_verifies_token_signature_and_grants(
    token_server: TokenServer, token_registry: Registry, repo_name: str,
    token_server_factory: Callable[..., TokenServer],
) -> None:
    image = make_image({"sig": repo_name.encode()})
    push_image(token_registry, repo_name, "v1", image)
    s = direct_session()
    url = f"{token_registry.url}/v2/{repo_name}/manifests/v1"
    scope = f"repository:{repo_name}:pull"

    def status(token: str) -> int:
        return s.get(url, headers={"Accept": image.media_type,
                                   "Authorization": f"Bearer {token}"}).status_code

    user = next(iter(token_server.users))
    good, _ = token_server.access_token(user, token_server.service, [scope])
    assert status(good) == 200
    foreign = token_server_factory(service=token_server.service, issuer=token_server.issuer)
    forged, _ = foreign.access_token(user, token_server.service, [scope])
    assert status(forged) == 401  # right claims, key the registry does not trust
    wrong_aud, _ = token_server.access_token(user, "some-other-service", [scope])
    assert status(wrong_aud) == 401

    anon = s.get(token_server.realm, params={"service": token_server.service, "scope": scope})
    assert anon.status_code == 200 and decode_jwt(anon.json()["token"])[1]["access"] == []
    assert status(anon.json()["token"]) == 401
    token_server.anonymous_pull = True
    anon = s.get(token_server.realm, params={"service": token_server.service,
                                             "scope": f"repository:{repo_name}:pull,push"})
    assert decode_jwt(anon.json()["token"])[1]["access"][0]["actions"] == ["pull"]
    assert status(anon.json()["token"]) == 200


# --- htpasswd registry --------------------------------------------------------------------


def test_htpasswd_registry_refuses_without_credentials(
    htpasswd_registry: Registry, repo_name: str,
) -> None:
    user, password = htpasswd_registry.credentials or ("", "")
    image = make_image({"h": repo_name.encode()}, oci=False)
    push_image(htpasswd_registry, repo_name, "v1", image)
    s = direct_session()
    url = f"{htpasswd_registry.url}/v2/{repo_name}/manifests/v1"
    headers = {"Accept": image.media_type}
    r = s.get(url, headers=headers)
    assert r.status_code == 401 and parse_challenge(r.headers["WWW-Authenticate"])[0] == "basic"
    assert s.get(url, headers={**headers, "Authorization": basic_auth(user, "x")}
                 ).status_code == 401
    r = s.get(url, headers={**headers, "Authorization": basic_auth(user, password)})
    assert r.status_code == 200 and r.headers["Docker-Content-Digest"] == image.digest
    assert r.headers["Content-Type"] == image.media_type


# --- images --------------------------------------------------------------------------------


def test_images_are_deterministic_and_streamed_blobs_round_trip(
    registry: Registry, repo_name: str,
) -> None:
    assert make_image({"a": b"1"}).digest == make_image({"a": b"1"}).digest
    assert make_image({"a": b"1"}).digest != make_image({"a": b"2"}).digest
    size = 24 * 1024 * 1024 + 123
    digest, sent = push_random_blob(registry, repo_name, size, seed=7)
    assert sent == size and digest == random_blob_digest(7, size)
    h = hashlib.sha256()
    with direct_session().get(f"{registry.url}/v2/{repo_name}/blobs/{digest}", stream=True) as r:
        assert r.status_code == 200 and int(r.headers["Content-Length"]) == size
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
    assert "sha256:" + h.hexdigest() == digest
    with RegistryClient(registry.url) as client:
        for method in ("put", "post", "chunked"):
            data = f"{method}-{repo_name}".encode() * 50_000
            assert client.push_blob(repo_name, data, method=method, chunk_size=65536) == (
                "sha256:" + hashlib.sha256(data).hexdigest())
            assert client.blob_exists(repo_name, "sha256:" + hashlib.sha256(data).hexdigest())


# --- cleanup -------------------------------------------------------------------------------


def test_registry_stop_leaves_nothing_behind() -> None:
    reg = Registry("anonymous")
    proc = reg.proc
    assert proc is not None and port_open("127.0.0.1", reg.port)
    reg.stop()
    reg.stop()  # idempotent
    assert proc.poll() is not None
    assert not port_open("127.0.0.1", reg.port)
    assert not reg.dir.exists()


@pytest.mark.e2e
def test_containerd_stop_leaves_nothing_behind(
    registry: Registry, tmp_hosts_dir: HostsDir, repo_name: str,
) -> None:
    image = make_image({"x": repo_name.encode()})
    push_image(registry, repo_name, "v1", image)
    tmp_hosts_dir.write(registry.host, registry.url)
    daemon = Containerd()
    try:
        proc = daemon.proc
        assert daemon.pull(f"{registry.host}/{repo_name}:v1",
                           hosts_dir=tmp_hosts_dir).returncode == 0
    finally:
        daemon.stop()
    assert proc is not None and proc.poll() is not None
    assert not Path(daemon.address).exists() and not daemon.dir.exists()
    assert str(daemon.dir) not in Path("/proc/self/mountinfo").read_text()
