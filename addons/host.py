"""`.host ADDR, CAPABILITIES`: the mirror's entry in containerd's hosts.toml."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from addons.address import Address, parse_address
from addons.plugin import RuntimePlugin, split_list
from addons.runtime import Runtime

logger = logging.getLogger(__name__)

CAPABILITIES = ("pull", "resolve", "push")


@dataclass(frozen=True)
class HostEntry:
    address: Address
    capabilities: tuple[str, ...]


class Host(RuntimePlugin):
    plugin = "host"
    summary = "write hosts.toml so containerd pulls through ADDR with CAPABILITIES (pull, resolve)"

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
        return HostEntry(address, caps)

    def run(self, runtime: Runtime) -> None:
        logger.warning(
            "step %d: .host is not implemented yet: write hosts.toml for %s by hand",
            self.step.id, self.config.address,
        )
