"""What the proxy steps of one loaded runmd share: upstreams, settings, helpers, counters.

One `MirrorState` belongs to one loaded runmd; plugins get it at construction so that no
state lives in module globals (two mirrors in one process, as in tests, stay apart).
Per-request decisions live in each request's `RequestContext` (addons.proxy.context).
"""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http

from addons.proxy.context import RequestContext
from addons.registry.oci import Upstream

logger = logging.getLogger(__name__)


@dataclass
class Settings:
    """Mirror-wide settings that come from mitmproxy options (declared by the addons that use them)."""

    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    follow_redirects: bool = True
    #: Check a whole blob's bytes against its digest while they pass (cut the transfer on a mismatch).
    verify_blobs: bool = True
    discover_timeout: float = 5.0
    #: The platform teleport chooses for, as os/arch[/variant].
    platform: str = ""
    #: Teleport's mode from the `acr_teleport` option; empty: as mirror.runmd says.
    teleport_mode: str = ""
    #: containerd's config.toml that teleport's `auto` mode reads (`acr_containerd_config`).
    containerd_config: str = ""


@dataclass
class MirrorState:
    home: Path
    upstreams: dict[str, Upstream]
    settings: Settings = field(default_factory=Settings)
    #: Listen port -> the upstream (ns) every request on that port goes to (`.listen` under a `.mirror`).
    listen_upstreams: dict[int, str] = field(default_factory=dict)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Helpers shared by every route (HTTP session, token client, caches), made on first use.
    services: dict[str, Any] = field(default_factory=dict)
    #: The context of every routed request in flight; never in flow.metadata (saved to files).
    contexts: weakref.WeakKeyDictionary[http.HTTPFlow, RequestContext] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def upstream_for(self, ns: str | None) -> Upstream | None:
        """The upstream named by containerd's `ns`, or the only one when a client sends none."""
        if ns is None:
            if len(self.upstreams) == 1:
                return next(iter(self.upstreams.values()))
            return None
        return self.upstreams.get(ns.lower())

    def service(self, key: str, factory: Any) -> Any:
        """One shared helper object per mirror (token client, HTTP session), made on first use."""
        if key not in self.services:
            self.services[key] = factory()
        return self.services[key]
