"""What the proxy steps of one loaded runmd share: upstreams, settings, helpers, counters.

One `MirrorState` belongs to one loaded runmd; plugins get it at construction so that no
state lives in module globals (two mirrors in one process, as in tests, stay apart). Its
shared helpers are typed fields, all made when the state is (addons.chain.build_state), so a
misspelt one is an AttributeError rather than a new empty table. Per-request decisions live
in each request's `RequestContext` (addons.proxy.context).
"""

from __future__ import annotations

import collections
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from mitmproxy import http

from addons.proxy.context import RequestContext
from addons.proxy.manifest_cache import ManifestCache
from addons.proxy.upstream import new_session
from addons.registry.auth import TokenClient
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


@dataclass(slots=True)
class MirrorState:
    home: Path
    upstreams: dict[str, Upstream]
    settings: Settings = field(default_factory=Settings)
    counters: collections.Counter[str] = field(default_factory=collections.Counter)
    #: The one pooled HTTP session of the mirror's own upstream requests, token grants included.
    session: requests.Session = field(default_factory=new_session)
    #: Upstream tokens by upstream and scope, fetched through `session`.
    tokens: TokenClient = field(init=False)
    #: Manifests by (upstream, repository, digest).
    manifests: ManifestCache = field(default_factory=ManifestCache)
    #: upstream ns -> "direct" or "redirect": where its blobs come from, as `.pull` learned it.
    blob_modes: dict[str, str] = field(default_factory=dict)
    #: A streamable manifest's digest -> the "name:tag" teleport served it for (the newest few).
    teleport_targets: dict[str, str] = field(default_factory=dict)
    #: Per hosts.toml the runmd installs, whether containerd goes through the mirror (first):
    #: set when the hosts folder is watched (addons.node.hostswatch).
    hosts_routing: Callable[[], list[dict[str, Any]]] | None = None
    #: What the teleport steps share (addons.teleport.discover.TeleportShared, read through
    #: `teleport_shared`): made by chain.build_state; this layer cannot name teleport's types.
    teleport: object | None = None
    #: The context of every routed request in flight; never in flow.metadata (saved to files).
    contexts: weakref.WeakKeyDictionary[http.HTTPFlow, RequestContext] = field(
        default_factory=weakref.WeakKeyDictionary
    )

    def __post_init__(self) -> None:
        self.tokens = TokenClient(session=self.session, timeout=self.settings.upstream_timeout)

    def upstream_for(self, ns: str | None) -> Upstream | None:
        """The upstream named by containerd's `ns`, or the only one when a client sends none."""
        if ns is None:
            if len(self.upstreams) == 1:
                return next(iter(self.upstreams.values()))
            return None
        return self.upstreams.get(ns.lower())

    def use_session(self, session: requests.Session) -> None:
        """Send every upstream request of this mirror, token grants included, through `session`."""
        self.session = session
        self.tokens.session = session
