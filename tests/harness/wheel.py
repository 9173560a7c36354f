"""The package's wheel, built offline from a clean copy of what the Containerfile copies.

An in-tree `pip wheel ROOT` shares ROOT/build/ with any other build running at the same time (two
test workers) and packs modules left there by earlier builds that no longer exist; a copy of
the sources in a folder of its own has neither problem.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: What scripts/deploy/Containerfile copies into /src before `pip install /src`.
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "addons")


def build_wheel(out: Path) -> Path:
    """Build the wheel into `out` (a fresh folder) and return its path."""
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"pip wheel failed:\n{done.stderr}")
    (wheel,) = out.glob("lifec_registry-*.whl")
    return wheel
