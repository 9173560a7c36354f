"""The base class of `+ .proxy` steps: a mitmproxy addon bound to one route."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from mitmproxy import http

from addons.proxy.state import MirrorState
from addons.runmd.plugin import Plugin
from addons.runmd.syntax import Step

logger = logging.getLogger(__name__)


class ProxyPlugin(Plugin):
    """A step of `+ .proxy`: a mitmproxy addon that acts only on flows of its route."""

    roots = frozenset({"proxy"})
    #: Route kinds this plugin may be placed under.
    routes: ClassVar[frozenset[str]] = frozenset({"manifests", "blobs", "tags"})

    def __init__(self, step: Step, config: Any, route: Step | None, state: MirrorState) -> None:
        super().__init__(step, config)
        self.route = route
        self.state = state
        # mitmproxy requires unique addon names; a plugin may appear under several routes.
        self.name = f"acr-{step.id}-{self.plugin}"

    def claims(self, flow: http.HTTPFlow) -> bool:
        """The guard every hook starts with: a live, unanswered flow of this step's route."""
        if flow.response or flow.error or not flow.live:
            return False
        acr = flow.metadata.get("acr")
        return bool(acr) and self.route is not None and acr.get("route_id") == self.route.id
