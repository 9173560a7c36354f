"""The runtime root: steps that run once, in order, before the proxy serves."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.runmd.compile import Compiled
from addons.runmd.children import Children
from addons.runmd.plugin import Plugin
from addons.runmd.syntax import Root

logger = logging.getLogger(__name__)


class StepError(Exception):
    """A runtime step failed; the message names the step so the operator can `--id` past it."""


class RuntimeRoot(Plugin):
    plugin = "runtime"


class EngineRoot(Plugin):
    plugin = "engine"


class RuntimePlugin(Plugin):
    """A step of `+ .runtime`: runs once, blocking, before the proxy serves."""

    roots = frozenset({"runtime"})

    def run(self, runtime: "Runtime") -> None:
        raise NotImplementedError


@dataclass
class Runtime:
    """What runtime steps may touch: the runmd's folder, a work folder, containerd's hosts folder."""

    compiled: Compiled
    home: Path
    work: Path
    hosts_dir: Path | None = None
    #: Programs that steps started (`.process`): an engine stops them when it is stopped.
    children: Children = field(default_factory=Children)

    @classmethod
    def for_document(cls, compiled: Compiled, hosts_dir: Path | None = None) -> "Runtime":
        home = compiled.home
        return cls(compiled=compiled, home=home, work=home / ".work", hosts_dir=hosts_dir)

    def steps_from(self, start_id: int = 0, roots: Iterable[Root] | None = None) -> list[tuple[RuntimePlugin, Any]]:
        """The steps of `roots` (default: every `+ .runtime` of the file) from `start_id` on."""
        out: list[tuple[RuntimePlugin, Any]] = []
        chosen = self.compiled.document.roots("runtime") if roots is None else (r for r in roots if r.kind == "runtime")
        for root in chosen:
            for step in root.steps:
                if step.id >= start_id:
                    cls = self.compiled.classes[step.id]
                    assert issubclass(cls, RuntimePlugin)
                    out.append((cls(step, self.compiled.config(step)), step))
        return out

    def run(self, start_id: int = 0, roots: Iterable[Root] | None = None) -> int:
        """Run every runtime step (of `roots`, default all) whose id is at least `start_id`;
        return how many ran."""
        steps = self.steps_from(start_id, roots)
        for plugin, step in steps:
            logger.info("step %d: .%s %s", step.id, step.plugin, step.input)
            try:
                plugin.run(self)
            except StepError as e:
                raise StepError(f"step {step.id} (.{step.plugin} {step.input}): {e}") from None
        return len(steps)
