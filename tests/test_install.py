"""The installed package is enough: the wheel installed three ways runs from a folder outside the
checkout.

One wheel is built (`pip wheel --no-deps`, offline, from a copy of the sources) and installed with `--no-deps`:
- into a fresh venv (no system site-packages);
- with `pip install --user` on the venv's base Python, HOME and PYTHONUSERBASE in a temporary folder;
- system-wide, standing in: `pip install --prefix` into a temporary folder, whose site-packages is on
  PYTHONPATH the way /usr/local's is on a Debian Python's path.
The dependencies (mitmproxy, requests, ...) come from the project's venv, added after the install's
own site-packages (a .pth file, or PYTHONPATH), and `mitmdump` is the launcher pip would write.
Each install then runs `acr init --registry NAME` (the option after the command), `acr dump`,
`acr service install --dry-run` (the unit template) and the README's offline replay command
`mitmdump -n -r rec/client.mitm -s "$(acr addon-path)" ...` exactly as the README writes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.wheel import build_wheel

ROOT = Path(__file__).resolve().parent.parent
REPLAY = ROOT / "tests" / "replay"
#: The project's venv: where the installs get their dependencies.
DEPS = sysconfig.get_paths()["purelib"]
BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
MITMDUMP_LAUNCHER = "#!{python}\nimport sys\nfrom mitmproxy.tools.main import mitmdump\nsys.exit(mitmdump())\n"


@dataclass
class Install:
    """One install of the wheel: its bin folder, where the package landed, and its environment."""

    kind: str
    bin: Path
    site: Path
    env: dict[str, str]

    def run(self, cwd: Path, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout)


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def base_env(tmp: Path, bin_dir: Path) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    # Nothing of the checkout or the test run's environment: no PYTHONPATH, no venv on PATH.
    return {"HOME": str(home), "PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def finish(kind: str, bin_dir: Path, python: str, site: Path, env: dict[str, str]) -> Install:
    launcher = bin_dir / "mitmdump"
    launcher.write_text(MITMDUMP_LAUNCHER.format(python=python))
    launcher.chmod(0o755)
    return Install(kind, bin_dir, site, env)


def install_venv(tmp: Path, wheel: Path) -> Install:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    pip("--python", python, "install", "-q", "--no-deps", "--no-index", str(wheel))
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "lifec-test-deps.pth").write_text(DEPS + "\n")
    return finish("venv", venv / "bin", python, site, base_env(tmp, venv / "bin"))


def install_user(tmp: Path, wheel: Path) -> Install:
    userbase = tmp / "userbase"
    env = base_env(tmp, userbase / "bin")
    env["PYTHONUSERBASE"] = str(userbase)
    pip("--python", BASE_PYTHON, "install", "-q", "--user", "--no-deps", "--no-index", "--break-system-packages",
        str(wheel), env={**os.environ, **env})
    site = Path(subprocess.run([BASE_PYTHON, "-c", "import site; print(site.getusersitepackages())"],
                               capture_output=True, text=True, check=True, env=env).stdout.strip())
    (site / "lifec-test-deps.pth").write_text(DEPS + "\n")
    return finish("user", userbase / "bin", BASE_PYTHON, site, env)


def install_prefix(tmp: Path, wheel: Path) -> Install:
    prefix = tmp / "prefix"
    pip("--python", BASE_PYTHON, "install", "-q", "--prefix", str(prefix), "--no-deps", "--no-index",
        "--break-system-packages", str(wheel))
    (site,) = {p.parent for p in prefix.rglob("addons/cli.py")}
    env = base_env(tmp, prefix / "bin")
    env["PYTHONPATH"] = f"{site.parent}:{DEPS}"
    return finish("prefix", prefix / "bin", BASE_PYTHON, site.parent, env)


@pytest.fixture(scope="module", params=["venv", "user", "prefix"])
def installed(request: pytest.FixtureRequest, wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Install:
    tmp = tmp_path_factory.mktemp(f"install-{request.param}")
    return {"venv": install_venv, "user": install_user, "prefix": install_prefix}[request.param](tmp, wheel)


def outside(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    assert ROOT not in work.resolve().parents
    return work


def test_acr_init_and_dump_from_the_install(installed: Install, tmp_path: Path) -> None:
    work = outside(tmp_path)
    acr = str(installed.bin / "acr")
    init = installed.run(work, acr, "init", "--registry", "example")
    assert init.returncode == 0, init.stderr
    assert "example.azurecr.io" in (work / "mirror.runmd").read_text()
    dump = installed.run(work, acr, "dump")
    assert dump.returncode == 0, dump.stderr
    assert dump.stdout.startswith("# mirror.runmd\n") and 'login-acr "example"' in dump.stdout
    unit = installed.run(work, acr, "service", "install", "--home", str(work), "--unit-dir", str(tmp_path / "units"),
                         "--dry-run")
    assert unit.returncode == 0, unit.stderr
    # The unit runs the installed `acr` (found beside its Python, or on PATH).
    assert f"    ExecStart={installed.bin / 'acr'} --runmd {work}/mirror.runmd mirror start\n" in unit.stdout, unit.stdout


def test_the_addon_script_is_the_installed_one(installed: Install, tmp_path: Path) -> None:
    found = installed.run(outside(tmp_path), str(installed.bin / "acr"), "addon-path")
    assert found.returncode == 0, found.stderr
    path = Path(found.stdout.strip())
    assert path == installed.site / "addons" / "acr_addons.py" and path.is_file()


def readme_replay_command() -> str:
    """The README's offline replay, as written, with its optional report asked for."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"^mitmdump -n -r rec/client\.mitm .*?\n(?:  .*\n)*", text, re.M)
    assert m, "README.md has no offline replay command"
    command = m.group(0).replace("\\\n", " ")
    assert "[--set acr_replay_report=report.json]" in command
    return command.replace("[--set acr_replay_report=report.json]", "--set acr_replay_report=report.json")


def test_the_readmes_replay_command_runs_from_the_install(installed: Install, tmp_path: Path) -> None:
    work = outside(tmp_path)
    (work / "rec").mkdir()
    shutil.copy(REPLAY / "acr-client.mitm", work / "rec" / "client.mitm")
    shutil.copy(REPLAY / "acr-upstream.mitm", work / "rec" / "upstream.mitm")
    shutil.copy(REPLAY / "mirror.runmd", work / "mirror.runmd")
    done = installed.run(work, "bash", "-c", readme_replay_command())
    assert (work / "report.json").is_file(), done.stdout + done.stderr
    report = json.loads((work / "report.json").read_text())
    session = json.loads((REPLAY / "acr-session.json").read_text())
    assert report["checked"] == session["flows"]["client"] and report["changed"] == 0, report
