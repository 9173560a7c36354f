"""Debian's headless Chromium, to see a page the way a user's browser renders it.

Each run has a fresh profile folder (removed afterwards), talks to nothing but the page's own
server (no background networking, component updates or sync) and leaves nothing running:
`--dump-dom` prints the DOM once the page's scripts have run, `--screenshot` writes a PNG.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--force-device-scale-factor=1",
]
#: Virtual milliseconds the page may run before the DOM or the picture is taken: mitmweb fetches
#: its flows and options once its websocket is open.
BUDGET_MS = 10000


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], url: str, size: str) -> subprocess.CompletedProcess[str]:
    exe = browser()
    if exe is None:
        raise RuntimeError("chromium is not installed (scripts/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="lifec-chromium-") as profile:
        return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                               f"--virtual-time-budget={BUDGET_MS}", *args, url],
                              capture_output=True, text=True, timeout=120, check=True)


def dump_dom(url: str, size: str = "1800,700") -> str:
    """The page's DOM after its scripts ran."""
    return _run(["--dump-dom"], url, size).stdout


def screenshot(url: str, out: Path, size: str = "1800,560") -> Path:
    """A PNG of the page as rendered."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run([f"--screenshot={out}"], url, size)
    return out
