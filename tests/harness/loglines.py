"""Reading the one log format's text lines (`TIME LEVEL logger: message`) in a command's output."""

from __future__ import annotations

import re
from typing import NamedTuple

TEXT_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (DEBUG|INFO|WARN|ERROR) ([\w.]+): (\S.*)$")
#: The time in front of a text line, as README excerpts compare it (it changes from run to run).
TEXT_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")


class LogLine(NamedTuple):
    time: str
    level: str
    logger: str
    message: str


def parse(line: str) -> LogLine | None:
    """The parts of a line in the one text format, or None for any other line."""
    m = TEXT_LINE.match(line)
    return LogLine(*m.groups()) if m else None
