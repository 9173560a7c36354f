"""`.host ADDR, CAPABILITIES`: the mirror's entry in containerd's hosts.toml.

Attribute lines under it set that entry's other hosts.toml keys:

    : .host           localhost:8578, resolve, pull
    :   .dial_timeout 2s
    :   .header       X-Mirror node-1
    :   .skip_verify
    :   .ca           /etc/ssl/mirror-ca.pem
    :   .default

`.default` also lists the entry in `_default/hosts.toml`, which containerd uses for every
registry that has no folder of its own. The last `.host` step of the runmd writes every file
(see addons.node.hostsfile), so `.mirror`, `.server` and `.https` may stand anywhere in `+ .runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from addons.node import hostsfile
from addons.node.containerd_config import DEFAULT_HOSTS_DIR
from addons.core.address import Address, parse_address
from addons.runmd.plugin import split_list
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

CAPABILITIES = ("pull", "resolve", "push")


@dataclass(frozen=True)
class HostEntry:
    address: Address
    capabilities: tuple[str, ...]


class Host(RuntimePlugin):
    plugin = "host"
    summary = "write hosts.toml so containerd pulls through ADDR with CAPABILITIES (pull, resolve)"
    attributes = hostsfile.HOST_ATTRIBUTES

    @classmethod
    def parse(cls, text: str) -> HostEntry:
        items = split_list(text)
        if not items:
            raise ValueError("expected 'ADDR, capabilities...', e.g. '.host localhost:8578, resolve, pull'")
        address = parse_address(items[0])
        caps = tuple(c.lower() for c in items[1:]) or ("pull", "resolve")
        for c in caps:
            if c not in CAPABILITIES:
                raise ValueError(f"unknown capability '{c}' (known: {', '.join(CAPABILITIES)})")
        if len(set(caps)) != len(caps):
            raise ValueError(f"a capability is listed twice in '{text}'")
        return HostEntry(address, caps)

    @classmethod
    def parse_attribute(cls, name: str, text: str) -> object:
        return hostsfile.parse_host_attribute(name, text)

    def run(self, runtime: Runtime) -> None:
        last = [s for _, s in runtime.compiled.document.steps("host")][-1]
        if last.id != self.step.id:
            logger.info("step %d: hosts.toml is written by the last .host step (%d)", self.step.id, last.id)
            return
        hosts_dir = runtime.hosts_dir or Path(DEFAULT_HOSTS_DIR)
        try:
            for line in hostsfile.install_all(runtime.compiled, runtime.work, hosts_dir):
                logger.info("%s", line)
        except hostsfile.HostsError as e:
            raise StepError(str(e)) from None
