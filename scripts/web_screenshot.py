"""The README's screenshot (docs/mitmweb-teleport.png), regenerated the way the tests make it.

The browser test in tests/test_web.py starts the registry with the OCI referrers API, runs
`acr mirror start --web`, pulls a teleported tag, a tag without referrer, a refused foreign
registry and a 32 MiB blob through it, checks mitmweb's flow list in headless Chromium and
photographs it with the teleported flow selected. This script runs just that test.

    .venv/bin/python scripts/web_screenshot.py
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    test = "tests/test_web.py::test_flow_list_in_a_real_browser"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", test], cwd=ROOT)
    if done.returncode == 0:
        print(f"wrote {ROOT / 'docs' / 'mitmweb-teleport.png'}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
