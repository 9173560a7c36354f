"""scripts/setup installs what each command needs, and the README says what that is.

`scripts/setup demo` (what ./scripts/demo runs) and `scripts/setup test` (./scripts/test) each
have their list of Debian packages: the README's first paragraph names exactly those, and every
program the tests or the demo start comes from a package in its list (or one Debian always has).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP = ROOT / "scripts" / "setup"
#: Programs started by name (in argv lists, not through shutil.which) by the tests' harness.
STARTED_BY_TESTS = ("docker-registry", "containerd", "ctr", "skopeo", "podman", "htpasswd", "promtool",
                    "containerd-stargz-grpc", "fusermount3")
STARTED_BY_DEMO = ("docker-registry", "containerd", "ctr")


def packages(name: str) -> list[str]:
    """The list scripts/setup installs for `name` (demo or test), as bash expands it."""
    text = SETUP.read_text()
    arrays = text[text.index("DEMO_PACKAGES=("):text.index("LOCK_WAIT=")]
    out = subprocess.run(["bash", "-c", f'{arrays}\necho "${{{name.upper()}_PACKAGES[@]}}"'],
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def readme_lists() -> tuple[set[str], set[str]]:
    text = (ROOT / "README.md").read_text()
    para = text[text.index("The demo: "):text.index("Each starts every server")]
    demo, _, tests = para.partition("The tests: ")
    return set(re.findall(r"`([a-z0-9.-]+)`", demo)) - {".venv"}, set(re.findall(r"`([a-z0-9.-]+)`", tests)) - {".venv"}


def test_the_readme_names_what_each_command_installs() -> None:
    demo, tests = readme_lists()
    assert demo == set(packages("demo"))
    assert demo | tests == set(packages("test"))


def package_of(program: str) -> str | None:
    """The Debian package that ships `program` on this machine, or None when it is not installed."""
    path = shutil.which(program)
    if path is None:
        return None
    resolved = str(Path(path).resolve())
    # With merged /usr, dpkg may know a program by its /bin path.
    for candidate in (path, resolved, resolved.removeprefix("/usr")):
        found = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
        if found.returncode == 0:
            return found.stdout.split(":", 1)[0].split(",")[0]
    return None


def always_there(package: str) -> bool:
    prio = subprocess.run(["dpkg-query", "-W", "-f=${Priority} ${Essential}", package], capture_output=True, text=True)
    return prio.stdout.split()[0] in ("required", "important") or prio.stdout.endswith("yes")


def programs_found_by_which() -> set[str]:
    found: set[str] = set()
    for path in [*(ROOT / "tests").rglob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        found.update(re.findall(r'shutil\.which\("([\w.+-]+)"\)', path.read_text()))
    return found


@pytest.mark.parametrize("command, programs", [
    ("test", sorted(programs_found_by_which() | set(STARTED_BY_TESTS))),
    ("demo", list(STARTED_BY_DEMO)),
])
def test_every_program_comes_from_the_commands_list(command: str, programs: list[str]) -> None:
    listed = set(packages(command))
    wrong = []
    for program in programs:
        package = package_of(program)
        if package is not None and package not in listed and not always_there(package):
            wrong.append(f"{program} ({package})")
    assert wrong == []
