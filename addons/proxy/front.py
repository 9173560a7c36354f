"""`+ .proxy ADDR`: the mirror's front door.

Every request passes here first: the mirror refuses to be a forward proxy, answers the
`/v2/` ping, checks the path against the distribution spec's grammar, maps containerd's
`ns` to a configured upstream and hands the flow to the route that serves it. Anything it
refuses is refused before a single byte goes upstream.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from typing import Any

from mitmproxy import ctx, http

from addons.core.duration import seconds_option

from addons.registry import oci
from addons.registry.oci import Upstream
from addons.core.address import Address, parse_address
from addons.proxy.plugin import ProxyPlugin
from addons.runmd.syntax import Root, Step
from addons.proxy.context import ANSWERED, RequestContext, info, listen_origin, note, show_served_from
from addons.proxy.state import MirrorState


_PATH_RE = re.compile(r"^/v2/(?P<name>.+?)/(?:(?P<kind>manifests|blobs|referrers)/(?P<ref>[^/]+)|(?P<tags>tags)/list)$")
#: The digest algorithms a reference may use: resolve checks manifests against them; blob bytes
#: are streamed as they come (the client checks them against the digest it asked for).
DIGEST_ALGORITHMS = ("sha256", "sha512")
#: Request line and headers together; containerd sends about 1 KiB. mitmproxy itself has no
#: limit, and a client's `Accept` is passed upstream, so a larger request is refused here.
MAX_REQUEST_HEAD = 64 * 1024
#: The client's headers that go upstream with a blob or a tag list.
PASSED_HEADERS = ("range", "accept", "if-none-match")


class RouteError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Target:
    """What a request path asks for: the ping, or a route kind with a repository and reference."""

    kind: str
    name: str = ""
    reference: str = ""


def parse_target(path: str) -> Target:
    """Check a request path (with or without query) against the distribution API grammar."""
    # Not urlsplit: it would read a leading `//host` as a network location.
    raw = path.partition("?")[0]
    if raw in ("/v2", "/v2/"):
        return Target("ping")
    if not raw.startswith("/v2/"):
        raise RouteError(404, "NOT_FOUND", "not a registry API path (expected /v2/...)")
    if "%" in raw:
        raise RouteError(400, "NAME_INVALID", "percent-encoded characters are not allowed in the path")
    m = _PATH_RE.match(raw)
    if not m:
        raise RouteError(404, "NOT_FOUND", "unknown registry API path")
    name = m["name"]
    if not oci.valid_name(name):
        raise RouteError(400, "NAME_INVALID", "invalid repository name")
    if m["tags"]:
        return Target("tags", name)
    kind, ref = m["kind"], m["ref"]
    if kind == "manifests" and not oci.is_digest(ref):
        if not oci.valid_tag(ref):
            raise RouteError(400, "TAG_INVALID", "invalid tag")
    elif not oci.valid_digest(ref):
        raise RouteError(400, "DIGEST_INVALID", "invalid digest")
    elif ref.split(":", 1)[0] not in DIGEST_ALGORITHMS:
        # The mirror could not check such content: refuse before asking upstream.
        raise RouteError(400, "DIGEST_INVALID", f"unsupported digest algorithm (supported: {', '.join(DIGEST_ALGORITHMS)})")
    return Target(kind, name, ref)


def refuse(flow: http.HTTPFlow, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with the OCI error JSON; the reason is kept for mitmweb and the log."""
    flow.response = oci.error_response(status, code, message, method=flow.request.method)
    for k, v in (headers or {}).items():
        flow.response.headers[k] = v
    meta = info(flow)
    meta["refused"] = f"{status} {code}"
    meta["answered"] = "mirror"
    meta["why"] = message
    note(flow, "proxy", f"refused {status} {code}: {message}")
    flow.comment = "\n".join([f"refused {status} {code}", f"{ANSWERED}: {message}", *meta["steps"]])
    own = listen_origin(flow)
    if own is not None and flow.request.first_line_format == "relative":
        # Served by the mirror itself: show its own address, not reverse mode's placeholder.
        show_served_from(flow, own)


def upstream_prefix(path: str, upstreams: Mapping[str, Upstream]) -> tuple[str | None, str, str]:
    """`/v2/<registry-host>/<name>/...` -> (upstream ns, the prefix as sent, `/v2/<name>/...`)
    when the first component names a configured upstream and the rest is still an API path;
    else (None, "", path) unchanged.

    This is how clients that cannot send `ns` (skopeo, podman, CRI-O: a registries.conf mirror
    `location = "HOST:PORT/<registry-host>"`) say which upstream they mean. A path component
    cannot hold a port, so an upstream with a port is named by its host alone when no other
    upstream has that host. Only configured hosts are matched, so the mirror never reaches a
    host it was not told to serve, and a repository whose first component merely looks like
    a host stays a repository.
    """
    raw, sep, query = path.partition("?")
    if not raw.startswith("/v2/"):
        return None, "", path
    first, slash, rest = raw[4:].partition("/")
    if not slash or not _PATH_RE.match("/v2/" + rest):
        return None, "", path
    ns = prefix_upstream(first, upstreams)
    if ns is None:
        return None, "", path
    return ns, first, "/v2/" + rest + sep + query


def prefix_upstream(component: str, upstreams: Mapping[str, Upstream]) -> str | None:
    """The configured upstream a path prefix names: by host[:port], or by a host that only one has."""
    host = component.lower()
    if host in upstreams:
        return host
    same = [ns for ns, u in upstreams.items() if u.hostname.lower() == host]
    return same[0] if len(same) == 1 else None


def head_size(req: http.Request) -> int:
    """The size of a request's head as it came: request line and header lines."""
    return len(req.method) + len(req.path) + 12 + sum(len(k) + len(v) + 4 for k, v in req.headers.fields)


def _named(headers: http.Headers, names: tuple[str, ...]) -> list[str]:
    """The header names of `names` a message carries, spelled as it sent them (cheaper than
    decoding every header through `items()`)."""
    wanted = {n.encode() for n in names}
    seen: dict[bytes, str] = {}
    for raw, _ in headers.fields:
        lower = raw.lower()
        if lower in wanted and lower not in seen:
            seen[lower] = raw.decode("latin-1")
    return list(seen.values())


class Proxy(ProxyPlugin):
    plugin = "proxy"

    @classmethod
    def parse(cls, text: str) -> Address:
        return parse_address(text)

    def __init__(self, root: Root, config: Address, routes: dict[str, tuple[Step, frozenset[str]]], state: MirrorState) -> None:
        # The root is not under a route: it sees every flow.
        super().__init__(Step(root.id, "proxy", root.input, root.line), config, None, state)
        #: route kind -> (route step, methods served)
        self.routes = routes

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_upstream_timeout", str, "30",
            "Seconds to wait for an upstream answer before answering the client with 504.",
        )
        loader.add_option(
            "acr_connect_timeout", str, "5",
            "Seconds to wait for an upstream connection before answering the client with 502.",
        )

    def configure(self, updated: set[str]) -> None:
        settings = self.state.settings
        if "acr_upstream_timeout" in updated:
            settings.upstream_timeout = seconds_option(ctx.options.acr_upstream_timeout, "acr_upstream_timeout")
            self.state.tokens.timeout = settings.upstream_timeout
        if "acr_connect_timeout" in updated:
            settings.connect_timeout = seconds_option(ctx.options.acr_connect_timeout, "acr_connect_timeout")

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        self.state.counters["requests"] += 1
        req = flow.request
        if req.first_line_format != "relative":
            # Absolute-form means a client uses us as a forward proxy: never.
            return refuse(flow, 400, "UNSUPPORTED", "this is a registry mirror, not an HTTP proxy")
        if head_size(req) > MAX_REQUEST_HEAD:
            return refuse(flow, 431, "UNSUPPORTED", f"request line and headers are larger than {MAX_REQUEST_HEAD // 1024} KiB")
        query = req.query.fields  # parsed once: every lookup of `req.query` parses the path again
        ns = next((v for k, v in query if k == "ns"), None)
        chosen, prefix, path = upstream_prefix(req.path, self.state.upstreams) if ns is None else (None, "", req.path)
        try:
            target = parse_target(path)
        except RouteError as e:
            return refuse(flow, e.status, e.code, e.message)
        if target.kind == "ping":
            if req.method not in ("GET", "HEAD"):
                return refuse(flow, 405, "UNSUPPORTED", "method not allowed", {"Allow": "GET, HEAD"})
            flow.response = oci.make_response(
                200, b"{}", {"Content-Type": "application/json", oci.API_VERSION_HEADER: oci.API_VERSION}, req.method
            )
            info(flow).update(route="ping", answered="mirror")
            flow.comment = f"ping\n{ANSWERED}"
            if (own := listen_origin(flow)) is not None:
                show_served_from(flow, own)
            return
        upstream = self.state.upstream_for(chosen or ns)
        if upstream is None:
            if ns is None:
                return refuse(flow, 404, "NAME_UNKNOWN",
                              "no ns given and more than one upstream is configured (use ?ns= or /v2/<registry-host>/<name>)")
            return refuse(flow, 404, "NAME_UNKNOWN", f"registry '{ns[:100]}' is not mirrored here")
        route = self.routes.get(target.kind)
        if route is None:
            return refuse(flow, 404, "UNSUPPORTED", f"{target.kind} are not served by this mirror")
        step, methods = route
        if req.method not in methods:
            allow = ", ".join(sorted(methods))
            return refuse(flow, 405, "UNSUPPORTED", f"{req.method} is not served for {target.kind}", {"Allow": allow})
        ctx = RequestContext(
            route=target.kind,
            route_id=step.id,
            method=req.method,
            name=target.name,
            reference=target.reference,
            upstream=upstream,
            accept=oci.accept_values(req.headers),
            query=[(k, v) for k, v in query if k != "ns"],
            ns_sent=ns,
            prefix=prefix or None,
            if_none_match=req.headers.get_all("if-none-match"),
            pass_headers={k: req.headers[k] for k in _named(req.headers, PASSED_HEADERS)},
        )
        ctx.note("proxy", f"{target.kind} {target.name}:{target.reference} via {upstream.ns}")
        self.state.contexts[flow] = ctx
        ctx.publish(flow)
