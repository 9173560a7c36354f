"""Base classes of runmd plugins: what the catalog needs to check a step and build it.

A plugin class parses its own input (a pure classmethod, so `acr dump` and the tests can
check a file without starting anything) and is then either a runtime step (run once, in
order, when the mirror starts) or a proxy step (a mitmproxy addon bound to one route).
"""

from __future__ import annotations

import logging
from pathlib import PurePosixPath
from typing import Any, ClassVar

from addons.runmd.syntax import Step

logger = logging.getLogger(__name__)


def split_list(text: str) -> list[str]:
    """Split a comma-separated plugin input into trimmed, non-empty items."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_relative_file(text: str, plugin: str) -> str:
    """A file name relative to the runmd's folder; absolute paths and '..' are refused."""
    if not text:
        raise ValueError(f"expected a file name, e.g. '.{plugin} access_token'")
    p = PurePosixPath(text)
    if p.is_absolute() or ".." in p.parts or len(text.split()) > 1:
        raise ValueError(f"expected a file name relative to the runmd's folder, got '{text}'")
    return text


def parse_choice(text: str, choices: tuple[str, ...], what: str, default: str | None = None) -> str:
    """One word of a step's input out of `choices` (case-insensitive), or `default` when empty."""
    word = text.strip().lower() or (default or "")
    if word not in choices:
        raise ValueError(f"unknown {what} '{text.strip()}' (expected: {', '.join(choices)})")
    return word


class Plugin:
    """A runmd plugin: its name, where it may stand, and how it reads its input."""

    plugin: ClassVar[str] = ""
    roots: ClassVar[frozenset[str]] = frozenset()
    #: Names of lines (`: .arg ...`) that qualify this step instead of being steps.
    attributes: ClassVar[tuple[str, ...]] = ()

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
