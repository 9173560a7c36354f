"""What the proxy steps share: the upstreams, the HTTP session, the token client, counters.

One `MirrorState` belongs to one loaded runmd; plugins get it at construction so that no
state lives in module globals (two mirrors in one process, as in tests, stay apart).
Per-request decisions live in `flow.metadata["acr"]`, plain data only, because mitmproxy
saves metadata into flow files and mitmweb shows it.
"""

from __future__ import annotations

import collections
import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mitmproxy import http

from addons.registry.oci import Upstream

logger = logging.getLogger(__name__)

META = "acr"


@dataclass
class Settings:
    """Mirror-wide settings that come from mitmproxy options (see addons.chain)."""

    upstream_timeout: float = 30.0
    connect_timeout: float = 5.0
    follow_redirects: bool = True
    discover_timeout: float = 5.0
    #: The platform teleport chooses for, as os/arch[/variant].
    platform: str = ""


@dataclass
class MirrorState:
    home: Path
    upstreams: dict[str, Upstream]
    settings: Settings = field(default_factory=Settings)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    #: Helpers shared by every route (HTTP session, token client), made on first use.
    services: dict[str, Any] = field(default_factory=dict)
    #: Per-flow objects that must never enter flow.metadata, which is saved to flow files:
    #: credentials, authorizers, the manifest body behind a HEAD answer.
    private: weakref.WeakKeyDictionary[http.HTTPFlow, dict[str, Any]] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def upstream_for(self, ns: str | None) -> Upstream | None:
        """The upstream named by containerd's `ns`, or the only one when a client sends none."""
        if ns is None:
            if len(self.upstreams) == 1:
                return next(iter(self.upstreams.values()))
            return None
        return self.upstreams.get(ns.lower())

    def private_of(self, flow: http.HTTPFlow) -> dict[str, Any]:
        return self.private.setdefault(flow, {})

    def service(self, key: str, factory: Any) -> Any:
        """One shared helper object per mirror (token client, HTTP session), made on first use."""
        if key not in self.services:
            self.services[key] = factory()
        return self.services[key]


def info(flow: http.HTTPFlow) -> dict[str, Any]:
    """The flow's decision record (created empty)."""
    return flow.metadata.setdefault(META, {})


def note(flow: http.HTTPFlow, step: str, decision: str) -> None:
    """Record one step's decision, in order, for mitmweb, flow files and `acr.why`."""
    info(flow).setdefault("steps", []).append(f"{step}: {decision}")
