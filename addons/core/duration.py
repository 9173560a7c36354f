"""Durations written in runmd inputs, attributes and options: `30`, `0.5`, `30s`, `500ms`, `2m`, `1h`."""

from __future__ import annotations

import re

from mitmproxy.exceptions import OptionsError

_DURATION_RE = re.compile(r"^(?P<n>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str, *, zero: bool = False) -> float:
    """Seconds, from a number with an optional unit (seconds when none); positive unless `zero`."""
    m = _DURATION_RE.match(text.strip().lower())
    if not m:
        raise ValueError(f"expected a duration like 30s, 500ms or 2m, got '{text}'")
    seconds = float(m["n"]) * _UNITS[m["unit"] or "s"]
    if seconds == 0 and not zero:
        raise ValueError(f"a duration must be positive, got '{text}'")
    return seconds


def format_duration(seconds: float) -> str:
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def seconds_option(text: str, option: str, *, zero: bool = False, maximum: float | None = None) -> float:
    """A duration option. Options are strings: mitmproxy's --set cannot parse floats."""
    try:
        value = parse_duration(text, zero=zero)
    except ValueError as e:
        raise OptionsError(f"{option}: {e}") from None
    if maximum is not None and value > maximum:
        raise OptionsError(f"{option} must be at most {format_duration(maximum)}, got '{text}'")
    return value
