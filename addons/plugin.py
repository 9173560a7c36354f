"""Base classes of runmd plugins: what the catalog needs to check a step and build it.

A plugin class parses its own input (a pure classmethod, so `acr dump` and the tests can
check a file without starting anything) and is then either a runtime step (run once, in
order, when the mirror starts) or a proxy step (a mitmproxy addon bound to one route).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

from mitmproxy import http

from addons.runmd import Step

if TYPE_CHECKING:
    from addons.runtime import Runtime
    from addons.state import MirrorState

logger = logging.getLogger(__name__)


def split_list(text: str) -> list[str]:
    """Split a comma-separated plugin input into trimmed, non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


class Plugin:
    """A runmd plugin: its name, where it may stand, and how it reads its input."""

    plugin: ClassVar[str] = ""
    roots: ClassVar[frozenset[str]] = frozenset()
    #: Names of lines (`: .arg ...`) that qualify this step instead of being steps.
    attributes: ClassVar[tuple[str, ...]] = ()
    #: One line for `acr dump --plugins` and error messages.
    summary: ClassVar[str] = ""

    @classmethod
    def parse(cls, text: str) -> Any:
        """Check and convert the step's input; raise ValueError with what was expected."""
        if text:
            raise ValueError(f"'.{cls.plugin}' takes no input, got '{text}'")
        return None

    def __init__(self, step: Step, config: Any) -> None:
        self.step = step
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.step.id}: .{self.plugin} {self.step.input!r}>"


class RuntimePlugin(Plugin):
    """A step of `+ .runtime`: runs once, blocking, before the proxy serves."""

    roots = frozenset({"runtime"})

    def run(self, runtime: Runtime) -> None:
        raise NotImplementedError


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
