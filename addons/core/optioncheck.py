"""One line for an option that nobody declared, naming the closest one that exists.

mitmproxy keeps an unknown `--set` aside in case an addon declares it later; once the mirror's
addons are loaded, what is left is a typo or an option of something that is not there.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_option(name: str, known: Iterable[str]) -> str:
    """`unknown option NAME`, with the closest known option when one is close enough."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    if close:
        return f"unknown option {name}: did you mean {close[0]}?"
    return f"unknown option {name}: the mirror (mitmproxy's addons it runs, and its steps) has no such option"
