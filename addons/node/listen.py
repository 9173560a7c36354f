"""`.listen ADDRESS` under a `.mirror`: one more listen address, on which every request goes to that registry.

containerd names the registry it means in `?ns=`, and skopeo or podman in a path prefix; the
stargz snapshotter does neither. Its lazy reads (HTTP Range GETs of layer blobs) arrive as
`/v2/<name>/blobs/<digest>` with no `ns`, and a mirror `host` holding a path is refused by it.
With one upstream that is no question; with several, each upstream gets an address of its
own, and `acr stargz configure` tells the snapshotter, per registry, which address to read
through. The address is one more listener of the same mirror: same chain, same credentials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from addons.core.address import Address, parse_address
from addons.registry.oci import Upstream
from addons.runmd.compile import Compiled
from addons.runmd.runtime import Runtime, RuntimePlugin, StepError
from addons.runmd.syntax import RunmdError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpstreamListen:
    """An upstream and the address on which the mirror serves only it."""

    upstream: Upstream
    address: Address


def upstream_listens(compiled: Compiled) -> list[UpstreamListen]:
    """Each `.listen` with the `.mirror` above it, in file order; RunmdError for a `.listen`
    with no `.mirror` above it, a second `.listen` for one registry, or a port used twice."""
    out: list[UpstreamListen] = []
    proxy_ports = {compiled.config(r).port: r.line for r in compiled.document.roots("proxy")}
    current: Upstream | None = None
    for root in compiled.document.roots("runtime"):
        for step in root.steps:
            if step.plugin == "mirror":
                current = compiled.config(step)
            elif step.plugin == "listen":
                address: Address = compiled.config(step)
                if current is None:
                    raise RunmdError(compiled.path, step.line, "'.listen' must follow the '.mirror' it serves")
                if any(u.upstream.ns == current.ns for u in out):
                    raise RunmdError(compiled.path, step.line, f"{current.ns} already has a '.listen' address")
                if address.port in proxy_ports or any(u.address.port == address.port for u in out):
                    raise RunmdError(compiled.path, step.line,
                                     f"port {address.port} is already a listen address of this mirror")
                out.append(UpstreamListen(current, address))
    return out


class Listen(RuntimePlugin):
    plugin = "listen"

    @classmethod
    def parse(cls, text: str) -> Address:
        return parse_address(text)

    def run(self, runtime: Runtime) -> None:
        for u in upstream_listens(runtime.compiled):
            if u.address == self.config:
                logger.info("requests on %s go to %s (no ns needed: the stargz snapshotter's reads)",
                            u.address, u.upstream.ns)
                return
        raise StepError("'.listen' must follow the '.mirror' it serves")
