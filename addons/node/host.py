"""`.host ADDR, CAPABILITIES`: the mirror's entry in containerd's hosts.toml.

Attribute lines under it set that entry's other hosts.toml keys:

    : .host           localhost:8578, resolve, pull
    :   .dial_timeout 2s
    :   .header       X-Mirror node-1
    :   .skip_verify
    :   .ca           /etc/ssl/mirror-ca.pem
    :   .default

After the capabilities, two more inputs say how the entry lives next to other node-local
mirrors (Spegel, Dragonfly) whose file is already there: `position first` (the default),
`position last` or `position N` (before their N-th host table, counted from 1) places our table
among theirs; `keep-out` tells the running mirror not to put its table back when another tool
rewrites the file (it only logs it):

    : .host           127.0.0.1:8578, resolve, pull, position last, keep-out

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
    #: 0 first, n before the other file's n-th host table (0-based), None last.
    position: int | None = 0
    keep_out: bool = False


def parse_position(text: str) -> int | None:
    """`first`, `last` or a 1-based place among the file's other host tables."""
    word = text.strip().lower()
    if word == "first":
        return 0
    if word == "last":
        return None
    if word.isdigit() and int(word) >= 1:
        return int(word) - 1
    raise ValueError(f"expected 'position first', 'position last' or 'position N' (N from 1), got 'position {text.strip()}'")


class Host(RuntimePlugin):
    plugin = "host"
    attributes = hostsfile.HOST_ATTRIBUTES

    @classmethod
    def parse(cls, text: str) -> HostEntry:
        items = split_list(text)
        if not items:
            raise ValueError("expected 'ADDR, capabilities...', e.g. '.host localhost:8578, resolve, pull'")
        address = parse_address(items[0])
        caps: list[str] = []
        position: int | None = 0
        placed = keep_out = False
        for item in items[1:]:
            word = item.lower()
            if word.split()[0] == "position":
                if placed:
                    raise ValueError(f"'position' is given twice in '{text}'")
                position, placed = parse_position(item[len("position"):]), True
            elif word in ("keep-out", "keep_out"):
                keep_out = True
            elif word in CAPABILITIES:
                if word in caps:
                    raise ValueError(f"a capability is listed twice in '{text}'")
                caps.append(word)
            else:
                raise ValueError(
                    f"unknown capability '{item}' (known: {', '.join(CAPABILITIES)}; "
                    "other inputs: position first|last|N, keep-out)"
                )
        return HostEntry(address, tuple(caps) or ("pull", "resolve"), position, keep_out)

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
