"""Protocol helpers: grammar, digests, errors, upstreams, challenges, Accept, descriptors."""

from __future__ import annotations

import json

import pytest
from mitmproxy import http

from addons.registry import oci

SHA = "sha256:" + "a" * 64


# --- media types -------------------------------------------------------------


def test_default_accept_is_what_containerd_sends() -> None:
    assert oci.DEFAULT_ACCEPT == (
        "application/vnd.docker.distribution.manifest.v2+json, "
        "application/vnd.docker.distribution.manifest.list.v2+json, "
        "application/vnd.oci.image.manifest.v1+json, "
        "application/vnd.oci.image.index.v1+json, */*"
    )
    assert len(oci.MANIFEST_TYPES) == 4


@pytest.mark.parametrize(
    "media_type, expected",
    [
        (oci.OCI_INDEX, True),
        (oci.DOCKER_MANIFEST_LIST, True),
        ("Application/VND.oci.image.index.v1+json; charset=utf-8", True),
        (oci.OCI_MANIFEST, False),
        (oci.DOCKER_MANIFEST, False),
        ("", False),
    ],
)
def test_is_index(media_type: str, expected: bool) -> None:
    assert oci.is_index(media_type) is expected


# --- grammar -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["a", "library/alpine", "a/b/c", "foo.bar", "foo_bar", "foo__bar", "foo---bar", "0", "a1/b2.c3_d4"],
)
def test_valid_names(name: str) -> None:
    assert oci.valid_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Alpine",  # upper case
        "a/../b",
        "..",
        "a..b",
        "a___b",  # three underscores
        "a/",
        "/a",
        "a//b",
        "-a",
        "a-",
        "a.",
        "foo%2Fbar",  # encoded slash
        "foo%2fbar",
        "a b",
        "a\n",
        "a:b",
    ],
)
def test_invalid_names(name: str) -> None:
    assert not oci.valid_name(name)


def test_name_length_limit_counts_registry() -> None:
    name = "a" * 200
    assert oci.valid_name(name)
    assert not oci.valid_name("a" * 256)
    assert not oci.valid_name(name, registry="r" * 60)  # 60 + 1 + 200 > 255
    assert oci.valid_name(name, registry="r" * 54)  # exactly 255


@pytest.mark.parametrize("tag", ["latest", "v1.0.0", "_x", "A-b_c.d", "1", "a" * 128])
def test_valid_tags(tag: str) -> None:
    assert oci.valid_tag(tag)


@pytest.mark.parametrize("tag", ["", ".x", "-x", "a" * 129, "a:b", "a/b", "a b", "a\n", "ä"])
def test_invalid_tags(tag: str) -> None:
    assert not oci.valid_tag(tag)


@pytest.mark.parametrize(
    "digest",
    [
        SHA,
        "sha512:" + "0" * 128,
        "multihash+base58:QmRZxt2b1FVZPNqd8hsiykDL3TdBDeTSPX9Kv46HmX4Gx8",  # unregistered: grammar only
        "sha256+b64u:LCa0a2j_xo_5m0U8HTBBNBNCLXBkg7-g-YpeiGJm564",
    ],
)
def test_valid_digests(digest: str) -> None:
    assert oci.valid_digest(digest)


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:" + "A" * 64,  # upper-case hex
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha256:" + "g" * 64,
        "sha512:" + "0" * 64,
        "SHA256:" + "a" * 64,
        "sha256" + "a" * 64,
        ":" + "a" * 64,
        "sha256:",
        "sha256:" + "a" * 64 + "\n",
        "sha256::" + "a" * 64,
        "sha256/" + "a" * 64,
        "sha256:" + "a" * 32 + "%2F" + "a" * 29,
    ],
)
def test_invalid_digests(digest: str) -> None:
    assert not oci.valid_digest(digest)


def test_is_digest_tells_reference_kinds_apart() -> None:
    assert oci.is_digest(SHA)
    assert oci.is_digest("sha256:bogus")  # a digest reference, but not a valid one
    assert not oci.is_digest("latest")


# --- errors ------------------------------------------------------------------


def test_error_body_shape() -> None:
    body = json.loads(oci.error_body("MANIFEST_UNKNOWN", "no such tag", {"tag": "x"}))
    assert body == {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "no such tag", "detail": {"tag": "x"}}]}
    assert json.loads(oci.error_body("DENIED", "no")) == {
        "errors": [{"code": "DENIED", "message": "no"}]
    }


def test_error_response_get() -> None:
    r = oci.error_response(404, "MANIFEST_UNKNOWN", "manifest unknown", detail={"tag": "v1"})
    assert r.status_code == 404
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert json.loads(r.content)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert r.headers["Content-Length"] == str(len(r.content))


def test_error_response_head_has_no_body_but_get_length() -> None:
    get = oci.error_response(502, "UPSTREAM_UNAVAILABLE", "upstream down", method="GET")
    head = oci.error_response(502, "UPSTREAM_UNAVAILABLE", "upstream down", method="HEAD")
    assert head.content == b""
    assert head.raw_content == b""
    assert head.headers.get_all("content-length") == [str(len(get.content))]
    assert int(head.headers["Content-Length"]) > 0
    assert head.headers["Content-Type"] == "application/json"
    assert oci.error_response(404, "X", "y", method="head").content == b""


def test_make_response_answers_head_and_get_alike_but_for_the_body() -> None:
    headers = {"Content-Type": "text/plain", "X-Kept": "1"}
    get = oci.make_response(200, b"hello", headers, "GET")
    head = oci.make_response(200, b"hello", headers, "HEAD")
    assert get.raw_content == b"hello" and head.raw_content == b""
    assert head.headers.get_all("content-length") == get.headers.get_all("content-length") == ["5"]
    assert head.headers["X-Kept"] == get.headers["X-Kept"] == "1"
    assert headers == {"Content-Type": "text/plain", "X-Kept": "1"}  # the caller's dict is not touched


def test_error_response_extra_headers() -> None:
    r = oci.error_response(429, "TOOMANYREQUESTS", "slow down", headers={"Retry-After": "5"})
    assert r.headers["Retry-After"] == "5"


# --- upstreams ---------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, scheme, host",
    [
        ("example.azurecr.io", "https", "example.azurecr.io"),
        ("  Example.AzureCR.io  ", "https", "example.azurecr.io"),
        ("http://127.0.0.1:5000", "http", "127.0.0.1:5000"),
        ("https://h:443", "https", "h:443"),
        ("https://h:443/", "https", "h:443"),
        ("HTTPS://registry-1.docker.io", "https", "registry-1.docker.io"),
        ("localhost:5000", "https", "localhost:5000"),
        ("http://[::1]:5000", "http", "[::1]:5000"),
    ],
)
def test_upstream_from_spec(spec: str, scheme: str, host: str) -> None:
    u = oci.Upstream.from_spec(spec)
    assert (u.scheme, u.host, u.ns) == (scheme, host, host)
    assert u.base_url == f"{scheme}://{host}"
    assert u.url("/v2/") == f"{scheme}://{host}/v2/"
    assert u.url("v2/x") == f"{scheme}://{host}/v2/x"


@pytest.mark.parametrize(
    "spec, problem",
    [
        ("", "empty"),
        ("https://", "empty host"),
        ("https://h/v2", "path"),
        ("h/x", "path"),
        ("https://h?x=1", "query"),
        ("https://h#f", "fragment"),
        ("https://user:pw@h", "user information"),
        ("https://h:0", "port"),
        ("https://h:65536", "port"),
        ("https://h:http", "port"),
        ("https://h:", "port"),
        ("ftp://h", "scheme"),
        ("https://bad_host", "host"),
        ("https://[::1", "IPv6"),
        ("https://[zz]:1", "IPv6"),
    ],
)
def test_upstream_from_spec_rejects(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        oci.Upstream.from_spec(spec)


def test_upstream_userinfo_not_echoed() -> None:
    with pytest.raises(ValueError) as e:
        oci.Upstream.from_spec("https://user:s3cret@h")
    assert "s3cret" not in str(e.value)


def test_upstream_is_hashable_and_hostname() -> None:
    a = oci.Upstream.from_spec("http://127.0.0.1:5000")
    assert {a: 1}[oci.Upstream("http", "127.0.0.1:5000")] == 1
    assert a.hostname == "127.0.0.1"
    assert oci.Upstream.from_spec("[::1]:5000").hostname == "::1"


# --- challenges --------------------------------------------------------------


def test_parse_bearer() -> None:
    [c] = oci.parse_challenge(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.docker.io/token"
    assert c.service == "registry.docker.io"
    assert c.scope == "repository:library/alpine:pull"


def test_parse_basic_case_insensitive() -> None:
    [c] = oci.parse_challenge('BASIC REALM="Registry Realm"')
    assert c.scheme == "basic"
    assert c.realm == "Registry Realm"


def test_parse_nasty_quoting() -> None:
    header = (
        'Bearer realm="https://a.example/token?x=1,y=2", service = "svc \\"quoted\\", too",'
        ' scope="repository:a/b:pull,push" ,  Basic realm=plain, Negotiate abc+/==,'
        ' Digest realm="x\\\\y", nonce="n"'
    )
    bearer, basic, negotiate, digest = oci.parse_challenge(header)
    assert bearer.realm == "https://a.example/token?x=1,y=2"
    assert bearer.service == 'svc "quoted", too'
    assert bearer.scope == "repository:a/b:pull,push"
    assert basic.scheme == "basic" and basic.realm == "plain"
    assert negotiate.scheme == "negotiate" and negotiate.token68 == "abc+/==" and not negotiate.params
    assert digest.params == {"realm": "x\\y", "nonce": "n"}


def test_parse_bare_schemes_and_empty() -> None:
    assert oci.parse_challenge("") == []
    assert oci.parse_challenge(" , ") == []
    assert [c.scheme for c in oci.parse_challenge("Basic, Bearer")] == ["basic", "bearer"]
    [c] = oci.parse_challenge('Bearer realm=""')
    assert c.realm == ""
    assert c.service is None


def test_parse_repeated_header_lines_joined() -> None:
    challenges = oci.parse_challenge('Basic realm="a", Bearer realm="b",service="s"')
    assert [(c.scheme, c.realm) for c in challenges] == [("basic", "a"), ("bearer", "b")]
    assert challenges[1].service == "s"


@pytest.mark.parametrize(
    "header",
    [
        'Bearer realm="unterminated',
        "Bearer realm=https://a/token",  # unquoted value with characters a token cannot hold
        '"quoted" realm="x"',
    ],
)
def test_parse_rejects_garbage(header: str) -> None:
    with pytest.raises(ValueError):
        oci.parse_challenge(header)


# --- Accept ------------------------------------------------------------------


def test_accept_values_keeps_every_header_line() -> None:
    headers = http.Headers(
        [
            (b"Accept", b"application/vnd.oci.image.index.v1+json, application/json"),
            (b"Host", b"x"),
            (b"accept", b"application/vnd.docker.distribution.manifest.v2+json,APPLICATION/JSON, ,"),
        ]
    )
    assert oci.accept_values(headers) == [
        "application/vnd.oci.image.index.v1+json",
        "application/json",
        "application/vnd.docker.distribution.manifest.v2+json",
    ]


def test_accept_values_from_containerd() -> None:
    headers = http.Headers(accept=oci.DEFAULT_ACCEPT)
    assert oci.accept_values(headers) == [*oci.MANIFEST_TYPES, "*/*"]
    assert oci.accept_values({"Accept": "a/b, c/d"}) == ["a/b", "c/d"]
    assert oci.accept_values(http.Headers()) == []


def test_merge_accept() -> None:
    assert oci.merge_accept(["a/b", "*/*"], [oci.DOCKER_MANIFEST_LIST]) == (
        f"a/b, {oci.DOCKER_MANIFEST_LIST}, */*"
    )
    assert oci.merge_accept(["a/b"], ["a/b, c/d"]) == "a/b, c/d"
    assert oci.merge_accept([], []) == oci.DEFAULT_ACCEPT


# --- descriptors -------------------------------------------------------------


def test_descriptor_round_trip() -> None:
    data = {
        "mediaType": oci.OCI_MANIFEST,
        "digest": SHA,
        "size": 1234,
        "annotations": {"streaming.format": "overlaybd"},
        "artifactType": "application/vnd.azure.artifact.streaming.v1",
        "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"},
    }
    d = oci.Descriptor.from_json(data)
    assert d.media_type == oci.OCI_MANIFEST
    assert d.platform is not None and d.platform.architecture == "arm64"
    assert d.annotations == {"streaming.format": "overlaybd"}
    assert (d.digest, d.size, d.artifact_type) == (SHA, 1234, "application/vnd.azure.artifact.streaming.v1")
    assert d.platform == oci.Platform(architecture="arm64", os="linux", variant="v8")
    assert oci.Descriptor.from_json(dict(data)) == d


def test_descriptor_minimal() -> None:
    d = oci.Descriptor.from_json({"mediaType": oci.OCI_EMPTY, "digest": SHA, "size": 2})
    assert (d.media_type, d.digest, d.size) == (oci.OCI_EMPTY, SHA, 2)
    assert d.annotations is None and d.artifact_type is None and d.platform is None


@pytest.mark.parametrize(
    "change, field",
    [
        ({"mediaType": 5}, "mediaType"),
        ({"mediaType": ""}, "mediaType"),
        ({"digest": "sha256:nothex"}, "digest"),
        ({"size": -1}, "size"),
        ({"size": "12"}, "size"),
        ({"size": True}, "size"),
        ({"size": 1.5}, "size"),
        ({"annotations": {"a": 1}}, "annotations"),
        ({"annotations": []}, "annotations"),
        ({"artifactType": 3}, "artifactType"),
        ({"platform": {"os": "linux"}}, "platform"),
        ({"urls": "http://x"}, "urls"),
    ],
)
def test_descriptor_rejects(change: dict, field: str) -> None:
    data = {"mediaType": oci.OCI_MANIFEST, "digest": SHA, "size": 1, **change}
    with pytest.raises(ValueError, match=field):
        oci.Descriptor.from_json(data)


def test_descriptor_rejects_non_object() -> None:
    with pytest.raises(ValueError):
        oci.Descriptor.from_json([])


# --- scopes ------------------------------------------------------------------


def test_scope_for() -> None:
    assert oci.scope_for("library/alpine") == "repository:library/alpine:pull"
    assert oci.scope_for("a", ("pull", "push")) == "repository:a:pull,push"
    with pytest.raises(ValueError):
        oci.scope_for("a b:push")
