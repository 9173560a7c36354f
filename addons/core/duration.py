"""Durations written in runmd inputs and attributes: `30`, `30s`, `500ms`, `2m`, `1h`."""

from __future__ import annotations

import re

from mitmproxy.exceptions import OptionsError

_DURATION_RE = re.compile(r"^(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds, from a number with an optional unit (seconds when none); must be positive."""
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"expected a duration like 30s, 500ms or 2m, got '{text}'")
    seconds = float(m["n"]) * _UNITS[m["unit"] or "s"]
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got '{text}'")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def seconds_option(text: str, option: str) -> float:
    """A positive number of seconds. Options are strings: mitmproxy's --set cannot parse floats."""
    try:
        value = float(text)
    except ValueError:
        raise OptionsError(f"{option}: expected seconds, got '{text}'") from None
    if not value > 0 or value == float("inf"):
        raise OptionsError(f"{option} must be a positive number of seconds")
    return value
