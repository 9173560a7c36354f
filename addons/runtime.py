"""The runtime root: steps that run once, in order, before the proxy serves."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.catalog import Compiled
from addons.plugin import Plugin, RuntimePlugin

logger = logging.getLogger(__name__)


class StepError(Exception):
    """A runtime step failed; the message names the step so the operator can `--id` past it."""


class RuntimeRoot(Plugin):
    plugin = "runtime"
    summary = "steps run once, in order, when the mirror starts"


class EngineRoot(Plugin):
    plugin = "engine"
    summary = "a sequence of blocks to run (events)"


@dataclass
class Runtime:
    """What runtime steps may touch: the runmd's folder, a work folder, containerd's hosts folder."""

    compiled: Compiled
    home: Path
    work: Path
    hosts_dir: Path | None = None

    @classmethod
    def for_document(cls, compiled: Compiled, hosts_dir: Path | None = None) -> "Runtime":
        home = compiled.home
        return cls(compiled=compiled, home=home, work=home / ".work", hosts_dir=hosts_dir)

    def steps_from(self, start_id: int = 0) -> list[tuple[RuntimePlugin, Any]]:
        out: list[tuple[RuntimePlugin, Any]] = []
        for root in self.compiled.document.roots("runtime"):
            for step in root.steps:
                if step.id >= start_id:
                    cls = self.compiled.classes[step.id]
                    assert issubclass(cls, RuntimePlugin)
                    out.append((cls(step, self.compiled.config(step)), step))
        return out

    def run(self, start_id: int = 0) -> int:
        """Run every runtime step whose id is at least `start_id`; return how many ran."""
        steps = self.steps_from(start_id)
        for plugin, step in steps:
            logger.info("step %d: .%s %s", step.id, step.plugin, step.input)
            try:
                plugin.run(self)
            except StepError as e:
                raise StepError(f"step {step.id} (.{step.plugin} {step.input}): {e}") from None
        return len(steps)
