"""The one duration parser behind runmd attributes (`.timeout`, `.loop`) and the mirror's options."""

from __future__ import annotations

import pytest
from mitmproxy.exceptions import OptionsError

from addons.core.duration import format_duration, parse_duration, seconds_option


@pytest.mark.parametrize("text, seconds", [
    ("30", 30.0), ("0.5", 0.5), (".25", 0.25), ("30s", 30.0), ("500ms", 0.5), ("2m", 120.0), ("1h", 3600.0),
    (" 5 S ", 5.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "1d", "1e3", "inf", "nan", "5 5"])
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="^expected a duration like 30s, 500ms or 2m, got '"):
        parse_duration(text)


def test_zero_only_where_it_means_off() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        parse_duration("0s")
    assert parse_duration("0", zero=True) == 0.0


def test_options_name_themselves_in_one_line() -> None:
    assert seconds_option("2m", "acr_x") == 120.0
    with pytest.raises(OptionsError, match="^acr_x: expected a duration like 30s, 500ms or 2m, got 'x'$"):
        seconds_option("x", "acr_x")
    with pytest.raises(OptionsError, match="^acr_x must be at most 30s, got '31'$"):
        seconds_option("31", "acr_x", maximum=30)


def test_format() -> None:
    assert [format_duration(s) for s in (0.05, 1, 90.5)] == ["50ms", "1s", "90.5s"]
