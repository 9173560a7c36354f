"""Keeps the mirror in containerd's hosts.toml while it runs, next to other node-local mirrors.

Spegel rewrites every file of the hosts folder when it starts, Dragonfly's dfinit writes its
registries' files whole: either turns this mirror off without a word. `HostsWatch` looks at
each file the runmd asks for (every `acr_hosts_check` seconds, 30 by default, in a thread, never
on the event loop). When a file changed since the last look and no longer lists the mirror, it
logs that once and puts the mirror's table back (merged, so the other tool's tables stay), unless
every `.host` of the file says `keep-out`. `/status` shows per file whether containerd is routed
through the mirror (`routing`).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from mitmproxy import ctx

from addons.core.duration import seconds_option
from addons.node import hostsfile
from addons.node.containerd_config import DEFAULT_HOSTS_DIR
from addons.runmd.compile import Compiled

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL = 30.0


class HostsWatch:
    """Notices another tool rewriting our hosts.toml files and puts the mirror's table back."""

    name = "acr-hosts-watch"

    def __init__(self, compiled: Compiled) -> None:
        self.compiled = compiled
        self.work = compiled.home / ".work"
        self.hosts_dir: Path | None = None
        self.interval = DEFAULT_INTERVAL
        #: What each file held at the last look (None: missing), by folder.
        self.seen: dict[str, bytes | None] = {}
        self._task: asyncio.Task[None] | None = None

    def load(self, loader: Any) -> None:
        loader.add_option(
            "acr_hosts_dir", str, "",
            "containerd's hosts folder the mirror installed its hosts.toml into; set, the mirror puts its "
            "table back when another tool rewrites a file (acr mirror start sets it).",
        )
        loader.add_option(
            "acr_hosts_check", str, str(int(DEFAULT_INTERVAL)),
            "Seconds between two looks at the installed hosts.toml files (at most 30).",
        )

    def configure(self, updated: set[str]) -> None:
        if "acr_hosts_check" in updated:
            self.interval = seconds_option(ctx.options.acr_hosts_check, "acr_hosts_check", maximum=DEFAULT_INTERVAL)
        if "acr_hosts_dir" in updated:
            self.hosts_dir = Path(ctx.options.acr_hosts_dir) if ctx.options.acr_hosts_dir else None
            self.seen.clear()

    def running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.loop(), name=self.name)

    def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def files(self) -> list[hostsfile.HostsFile]:
        try:
            return hostsfile.plan(self.compiled, self.work)
        except hostsfile.HostsError:
            return []

    def routing(self) -> list[dict[str, Any]]:
        """Blocking: per planned hosts.toml, whether it sends containerd through the mirror."""
        hosts_dir = self.hosts_dir or Path(DEFAULT_HOSTS_DIR)
        return [hostsfile.routing(f, hosts_dir) for f in self.files()]

    def check(self) -> None:
        """Blocking: one look at every file; the first look only remembers what is there."""
        if self.hosts_dir is None:
            return
        for f in self.files():
            target = self.hosts_dir / f.folder / hostsfile.FILE_NAME
            try:
                current: bytes | None = target.read_bytes()
            except FileNotFoundError:
                current = None
            except OSError as e:
                current = f"unreadable: {e}".encode()
            first = f.folder not in self.seen
            if not first and current == self.seen[f.folder]:
                continue
            self.seen[f.folder] = current
            if first or hostsfile.routing(f, self.hosts_dir)["routes_through_mirror"]:
                continue
            if all(h.keep_out for h in f.hosts):
                logger.warning("%s was rewritten and no longer lists the mirror; keep-out: leaving it so", target)
                continue
            logger.warning("%s was rewritten and no longer lists the mirror; putting the mirror's table back", target)
            try:
                logger.info("%s", hostsfile.install(f, self.hosts_dir))
            except hostsfile.HostsError as e:
                logger.error("%s", e)
                continue
            try:
                self.seen[f.folder] = target.read_bytes()
            except OSError:
                pass

    async def loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.check)
            except Exception as e:  # a look that fails must not end the watch
                logger.error("looking at the hosts.toml files failed: %s", e)
            await asyncio.sleep(self.interval)
