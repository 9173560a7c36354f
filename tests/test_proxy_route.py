"""The front door (`+ .proxy`): the path grammar as a pure function, then the routing hooks
driven through mitmproxy's test utilities over the chain that `AcrMirror` builds from a runmd.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy.test import taddons, tflow, tutils

from addons import catalog
from addons.chain import AcrMirror
from addons.core.offline import run_hooks_now
from addons.proxy.plugin import ProxyPlugin
from addons.proxy.front import Proxy, RouteError, Target, parse_target
from addons.proxy.tail import ProxyTail
from tests.harness.inprocess import drive

SHA = "sha256:" + "a" * 64

# --- parse_target ----------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/v2/", Target("ping")),
        ("/v2", Target("ping")),
        ("/v2/?ns=example.azurecr.io", Target("ping")),
        ("/v2/alpine/manifests/latest", Target("manifests", "alpine", "latest")),
        ("/v2/library/alpine/manifests/3.19_rc-1.x", Target("manifests", "library/alpine", "3.19_rc-1.x")),
        ("/v2/library/alpine/manifests/latest?ns=127.0.0.1%3A5000", Target("manifests", "library/alpine", "latest")),
        (f"/v2/a/b/c/manifests/{SHA}", Target("manifests", "a/b/c", SHA)),
        (f"/v2/library/alpine/blobs/{SHA}?ns=example.azurecr.io", Target("blobs", "library/alpine", SHA)),
        ("/v2/library/alpine/tags/list", Target("tags", "library/alpine")),
        ("/v2/library/alpine/tags/list?n=10&last=a", Target("tags", "library/alpine")),
        (f"/v2/library/alpine/referrers/{SHA}?artifactType=x", Target("referrers", "library/alpine", SHA)),
        # A repository may itself be called "manifests" or "blobs".
        ("/v2/manifests/manifests/latest", Target("manifests", "manifests", "latest")),
        ("/v2/x/blobs/blobs/" + SHA, Target("blobs", "x/blobs", SHA)),
    ],
)
def test_parse_target_accepts(path: str, expected: Target) -> None:
    assert parse_target(path) == expected


@pytest.mark.parametrize(
    "path, status, code",
    [
        # invalid repository names
        ("/v2/Library/alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library//alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/-alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/" + "a" * 256 + "/manifests/latest", 400, "NAME_INVALID"),
        # invalid tags
        ("/v2/alpine/manifests/-latest", 400, "TAG_INVALID"),
        ("/v2/alpine/manifests/.hidden", 400, "TAG_INVALID"),
        ("/v2/alpine/manifests/" + "t" * 129, 400, "TAG_INVALID"),
        # invalid digests
        ("/v2/alpine/manifests/sha256:abc", 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/sha256:" + "A" * 64, 400, "DIGEST_INVALID"),
        ("/v2/alpine/blobs/latest", 400, "DIGEST_INVALID"),
        ("/v2/alpine/referrers/latest", 400, "DIGEST_INVALID"),
        # percent-encoding
        ("/v2/library%2Falpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/alpine/manifests/lat%65st", 400, "NAME_INVALID"),
        # not the API
        ("/v3/", 404, "NOT_FOUND"),
        ("/", 404, "NOT_FOUND"),
        ("/v2x/alpine/manifests/latest", 404, "NOT_FOUND"),
        ("/v2/alpine/manifests/latest/", 404, "NOT_FOUND"),
        ("/v2/alpine/manifests/", 404, "NOT_FOUND"),
        ("/v2/alpine/tags/list/x", 404, "NOT_FOUND"),
        ("/v2/alpine/_catalog", 404, "NOT_FOUND"),
        # dot segments never reach a route
        ("/v2/../v2/alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/library/../alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/./alpine/manifests/latest", 400, "NAME_INVALID"),
        ("/v2/alpine/manifests/..", 400, "TAG_INVALID"),
        ("/v2/alpine/blobs/..", 400, "DIGEST_INVALID"),
        ("/v2/alpine/manifests/../blobs/" + SHA, 400, "NAME_INVALID"),
    ],
)
def test_parse_target_refuses(path: str, status: int, code: str) -> None:
    with pytest.raises(RouteError) as info:
        parse_target(path)
    assert (info.value.status, info.value.code) == (status, code)
    assert info.value.message


def test_parse_target_does_not_read_a_double_slash_as_a_host() -> None:
    with pytest.raises(RouteError) as info:
        parse_target("//evil.example/v2/alpine/manifests/latest")
    assert info.value.status == 404


# --- the hooks over the chain built from a runmd --------------------------------

ONE_UPSTREAM = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
+ .proxy        localhost:8578
: .manifests    head, get
: .blobs        get
```
"""

TWO_UPSTREAMS = """\
``` start mirror
+ .runtime
: .mirror       http://127.0.0.1:5000
: .mirror       example.azurecr.io
+ .proxy        localhost:8578
: .manifests    head, get
```
"""


def make_mirror(text: str) -> AcrMirror:
    return AcrMirror(catalog.parse_text(text, "mirror.runmd"))


def make_flow(path: str, method: str = "GET", authority: str = "") -> http.HTTPFlow:
    """A flow as reverse mode hands it over: the placeholder target, a relative path."""
    req = tutils.treq(
        method=method.encode(),
        path=path.encode(),
        authority=authority.encode(),
        host="127.0.0.1",
        port=9,
        headers=http.Headers(((b"Host", b"localhost:8578"), (b"Accept", b"*/*"))),
        content=b"",
    )
    return tflow.tflow(req=req)


def error_of(flow: http.HTTPFlow) -> dict[str, Any]:
    assert flow.response is not None
    assert flow.response.headers["Content-Type"] == "application/json"
    body = json.loads(flow.response.content)
    (error,) = body["errors"]
    assert error["message"]
    return error


def test_chain_order_is_proxy_steps_then_tail() -> None:
    mirror = make_mirror(ONE_UPSTREAM)
    assert isinstance(mirror.addons[-1], ProxyTail)
    root = _proxy_index(mirror)
    assert all(not isinstance(a, ProxyPlugin) for a in mirror.addons[:root])  # endpoints in front
    assert [a.step.plugin for a in mirror.addons[root + 1:-1]] == ["manifests", "blobs"]
    names = [a.name for a in mirror.addons]
    assert len(set(names)) == len(names)


def test_chain_registers_in_a_mitmproxy_context() -> None:
    mirror = make_mirror(ONE_UPSTREAM)
    with taddons.context(mirror) as tctx:
        assert tctx.options.acr_runmd == ""
        for addon in mirror.addons:
            assert tctx.master.addons.get(addon.name) is addon


def test_ping_answers_200_empty_json() -> None:
    flow = drive(make_mirror(ONE_UPSTREAM), make_flow("/v2/"))
    assert flow.response is not None
    assert flow.response.status_code == 200
    assert json.loads(flow.response.content) == {}
    assert flow.response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert flow.request.url == "http://127.0.0.1:9/v2/"


def test_ping_head_has_no_body_and_the_get_length() -> None:
    flow = drive(make_mirror(ONE_UPSTREAM), make_flow("/v2/", "HEAD"))
    assert flow.response is not None
    assert flow.response.status_code == 200
    assert flow.response.content == b""
    assert flow.response.headers["Content-Length"] == "2"


def test_ping_post_is_405() -> None:
    flow = drive(make_mirror(ONE_UPSTREAM), make_flow("/v2/", "POST"))
    assert flow.response is not None and flow.response.status_code == 405
    assert "GET" in flow.response.headers["Allow"]


def test_unknown_ns_is_404_name_unknown_and_nothing_is_forwarded() -> None:
    flow = make_flow("/v2/library/alpine/manifests/latest?ns=other.example.com")
    url = flow.request.url
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None
    assert flow.response.status_code == 404
    assert error_of(flow)["code"] == "NAME_UNKNOWN"
    assert flow.request.url == url
    assert not flow.metadata["acr"].get("route")


def test_no_ns_with_one_upstream_is_routed() -> None:
    mirror = make_mirror(ONE_UPSTREAM)
    flow = make_flow("/v2/library/alpine/manifests/latest")
    with taddons.context(mirror):
        run_hooks_now([mirror.addons[_proxy_index(mirror)]], flow, ("requestheaders",))
    assert flow.response is None
    meta = flow.metadata["acr"]
    assert meta["route"] == "manifests"
    assert meta["upstream"] == "http://127.0.0.1:5000"
    assert meta["ns"] == "127.0.0.1:5000"
    assert (meta["name"], meta["reference"]) == ("library/alpine", "latest")
    manifests_step = mirror.addons[_proxy_index(mirror) + 1].step
    assert meta["route_id"] == manifests_step.id
    json.dumps(flow.metadata)  # plain data only: it is saved into flow files


@pytest.mark.parametrize("ns", ["127.0.0.1:5000", "127.0.0.1%3A5000"])
def test_ns_naming_the_upstream_is_routed(ns: str) -> None:
    flow = make_flow(f"/v2/library/alpine/blobs/{SHA}?ns={ns}")
    mirror = make_mirror(ONE_UPSTREAM)
    with taddons.context(mirror):
        run_hooks_now([mirror.addons[_proxy_index(mirror)]], flow, ("requestheaders",))
    assert flow.response is None
    assert flow.metadata["acr"]["route"] == "blobs"
    assert flow.metadata["acr"]["upstream"] == "http://127.0.0.1:5000"


def test_routed_flow_that_no_step_answers_goes_to_its_upstream_as_is() -> None:
    """A route with no step that answers forwards (as `acr dump` says), never a 500."""
    flow = make_flow("/v2/library/alpine/manifests/latest?ns=127.0.0.1%3A5000&x=1")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.metadata["acr"]["route"] == "manifests"
    assert flow.metadata["acr"]["forward"] is True
    assert flow.response is None
    assert flow.request.url == "http://127.0.0.1:5000/v2/library/alpine/manifests/latest?x=1"


def test_no_ns_with_two_upstreams_is_404() -> None:
    flow = make_flow("/v2/library/alpine/manifests/latest")
    drive(make_mirror(TWO_UPSTREAMS), flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert error_of(flow)["code"] == "NAME_UNKNOWN"


def test_ns_picks_one_of_two_upstreams() -> None:
    mirror = make_mirror(TWO_UPSTREAMS)
    flow = make_flow("/v2/library/alpine/manifests/latest?ns=example.azurecr.io")
    with taddons.context(mirror):
        run_hooks_now([mirror.addons[_proxy_index(mirror)]], flow, ("requestheaders",))
    assert flow.response is None
    assert flow.metadata["acr"]["upstream"] == "https://example.azurecr.io"


def test_head_on_a_get_only_route_is_405_with_allow() -> None:
    flow = make_flow(f"/v2/library/alpine/blobs/{SHA}", "HEAD")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None and flow.response.status_code == 405
    assert flow.response.headers["Allow"] == "GET"
    assert flow.response.content == b""


def test_route_kind_not_in_the_runmd_is_404() -> None:
    flow = make_flow("/v2/library/alpine/tags/list")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None and flow.response.status_code == 404
    assert "errors" in json.loads(flow.response.content)


def test_referrers_are_not_routed_without_a_route() -> None:
    flow = make_flow(f"/v2/library/alpine/referrers/{SHA}")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None and flow.response.status_code == 404


def test_absolute_form_is_400() -> None:
    flow = make_flow("/v2/", authority="example.com")
    assert flow.request.first_line_format == "absolute"
    url = flow.request.url
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow)["code"]
    assert flow.request.url == url


def test_invalid_path_is_refused_before_routing() -> None:
    flow = make_flow("/v2/library%2Falpine/manifests/latest")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow)["code"] == "NAME_INVALID"


def test_head_error_has_empty_body_and_the_get_content_length() -> None:
    path = "/v2/library/alpine/manifests/latest?ns=other.example.com"
    get = drive(make_mirror(ONE_UPSTREAM), make_flow(path, "GET"))
    head = drive(make_mirror(ONE_UPSTREAM), make_flow(path, "HEAD"))
    assert get.response is not None and head.response is not None
    assert head.response.status_code == get.response.status_code == 404
    assert get.response.content
    assert head.response.content == b""
    assert head.response.headers["Content-Length"] == str(len(get.response.content))
    assert head.response.headers["Content-Type"] == get.response.headers["Content-Type"]


def test_a_flow_that_already_has_a_response_is_left_alone() -> None:
    flow = make_flow("/v2/nope/tags/list?ns=other.example.com")
    flow.response = http.Response.make(204, b"")
    drive(make_mirror(ONE_UPSTREAM), flow)
    assert flow.response.status_code == 204
    assert "acr" not in flow.metadata


def _proxy_index(mirror: AcrMirror) -> int:
    """Where the `.proxy` root stands in the chain (front addons such as /auth come before it)."""
    return next(i for i, a in enumerate(mirror.addons) if isinstance(a, Proxy))


# --- clients that cannot send ns: the registry host as a path prefix --------------------------


def _routed(mirror: AcrMirror, path: str) -> http.HTTPFlow:
    flow = make_flow(path)
    with taddons.context(mirror):
        run_hooks_now([mirror.addons[_proxy_index(mirror)]], flow, ("requestheaders",))
    return flow


@pytest.mark.parametrize("prefix, upstream", [
    ("example.azurecr.io", "https://example.azurecr.io"),
    ("EXAMPLE.azurecr.io", "https://example.azurecr.io"),
    ("127.0.0.1:5000", "http://127.0.0.1:5000"),
])
def test_a_configured_registry_host_as_path_prefix_selects_the_upstream(prefix: str, upstream: str) -> None:
    flow = _routed(make_mirror(TWO_UPSTREAMS), f"/v2/{prefix}/library/alpine/manifests/latest")
    assert flow.response is None
    meta = flow.metadata["acr"]
    assert (meta["upstream"], meta["name"], meta["reference"]) == (upstream, "library/alpine", "latest")
    assert meta["prefix"] == prefix  # as sent: a next-page link keeps it


def test_a_prefix_also_routes_with_one_upstream() -> None:
    flow = _routed(make_mirror(ONE_UPSTREAM), "/v2/127.0.0.1:5000/demo/app/blobs/sha256:" + "a" * 64)
    assert flow.response is None
    assert (flow.metadata["acr"]["name"], flow.metadata["acr"]["route"]) == ("demo/app", "blobs")


@pytest.mark.parametrize("path, name", [
    # A first component that looks like a host but is not configured stays part of the repository.
    ("/v2/docker.io/library/alpine/manifests/latest", "docker.io/library/alpine"),
    # A configured host with nothing behind it is the repository itself, not a prefix.
    ("/v2/example.azurecr.io/manifests/latest", "example.azurecr.io"),
])
def test_a_prefix_that_is_not_a_configured_upstream_stays_a_repository(path: str, name: str) -> None:
    flow = _routed(make_mirror(ONE_UPSTREAM), path)
    assert flow.response is None
    assert flow.metadata["acr"]["name"] == name
    assert flow.metadata["acr"]["upstream"] == "http://127.0.0.1:5000"


def test_an_unconfigured_host_prefix_is_never_proxied_to() -> None:
    """Never an open proxy: a host:port prefix that is not configured is an invalid name."""
    flow = _routed(make_mirror(TWO_UPSTREAMS), "/v2/127.0.0.1:6000/library/alpine/manifests/latest")
    assert flow.response is not None and flow.response.status_code == 400
    assert error_of(flow)["code"] == "NAME_INVALID"
    flow = _routed(make_mirror(TWO_UPSTREAMS), "/v2/evil.example.com/library/alpine/manifests/latest")
    assert flow.response is not None and flow.response.status_code == 404
    assert "more than one upstream" in error_of(flow)["message"]


def test_ns_wins_over_a_path_that_starts_with_a_host() -> None:
    flow = _routed(make_mirror(TWO_UPSTREAMS), "/v2/127.0.0.1:5000/x/manifests/v1?ns=example.azurecr.io")
    assert flow.response is not None and error_of(flow)["code"] == "NAME_INVALID"


def test_an_upstream_with_a_port_is_named_by_its_host_when_no_other_has_it() -> None:
    """registries.conf locations cannot carry a port in a path component."""
    flow = _routed(make_mirror(TWO_UPSTREAMS), "/v2/127.0.0.1/library/alpine/manifests/latest")
    assert flow.response is None
    assert flow.metadata["acr"]["upstream"] == "http://127.0.0.1:5000"
    assert flow.metadata["acr"]["prefix"] == "127.0.0.1"
