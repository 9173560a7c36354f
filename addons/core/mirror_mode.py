"""mitmproxy's `mirror:` proxy mode: reverse mode whose targets are the mirror's registries.

containerd names the registry of each request in `?ns=`, so the mirror routes every request
itself (`flow.request.url` is set by its steps) and reverse mode's one fixed target is never
used. Rather than a placeholder address that would show in the log (`reverse proxy to ...
listening at`) and in mitmweb's status bar, the mode names the registries the mirror serves:
`mirror:https://example.azurecr.io,http://127.0.0.1:5000@127.0.0.1:8578`. Reverse mode's
fixed target is the first of them: with `connection_strategy=lazy` nothing connects to it
unless a step routes a request there. Flow files keep reverse mode (`portable`), which every
mitmproxy reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from mitmproxy.net import server_spec
from mitmproxy.proxy import layer, layers
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.mode_servers import AsyncioServerInstance
from mitmproxy.proxy.mode_specs import TCP, ProxyMode, ReverseMode


class MirrorMode(ReverseMode):
    """A registry mirror of the registries in its data, comma-separated (`type_name` `mirror`)."""

    description = "registry mirror"

    def __post_init__(self) -> None:
        upstreams = [u.strip() for u in self.data.split(",") if u.strip()]
        if not upstreams:
            raise ValueError("a registry mirror needs at least one upstream registry")
        for upstream in upstreams:
            server_spec.parse(upstream, default_scheme="https")
        self.scheme, self.address = server_spec.parse(upstreams[0], default_scheme="https")
        self.transport_protocol = TCP
        self.description = f"registry mirror of {', '.join(upstreams)}"


class MirrorInstance(AsyncioServerInstance[MirrorMode]):
    def make_top_layer(self, context: Context) -> layer.Layer:
        return layers.modes.ReverseProxy(context)


def portable(mode: ProxyMode) -> ProxyMode:
    """The mode a flow file keeps: stock mitmproxy cannot read `mirror:`, so a mirror's flows
    are saved as reverse mode to its first upstream, at the same address."""
    if not isinstance(mode, MirrorMode):
        return mode
    first = mode.data.split(",", 1)[0].strip()
    listen = f"@{mode.custom_listen_host or ''}:{mode.custom_listen_port}" if mode.custom_listen_port else ""
    return ProxyMode.parse(f"reverse:{first}{listen}")


def spec(upstreams: Sequence[str], listen_host: str, listen_port: int) -> str:
    """The `mode` option's value for a mirror of `upstreams` (URLs) listening at host:port."""
    return f"mirror:{','.join(upstreams)}@{listen_host}:{listen_port}"
