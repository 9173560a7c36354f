"""`acr service install|uninstall`: the mirror as a systemd service on a node.

The unit (addons/templates/lifec-registry.service, filled in here) runs `acr --runmd
HOME/mirror.runmd mirror start` in HOME and restarts it when it fails. It is the same command
the Kubernetes DaemonSet (scripts/deploy/daemonset.yaml) runs, so a node behaves the same
whichever way it got the mirror. The runmd is checked before anything is written: a service that
could only fail to start is not installed.
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from addons.runmd.compile import Compiled
from addons.core.files import atomic_write
from addons.core.templates import template
from addons.runmd.syntax import RunmdError

DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_NAME = "lifec-registry"
RUNMD = "mirror.runmd"


class ServiceError(Exception):
    """One line for the operator."""


def template_text() -> str:
    """The unit template, from the package wherever it is installed."""
    try:
        return template("lifec-registry.service")
    except OSError:
        raise ServiceError("the unit template lifec-registry.service is not installed (reinstall the package)") from None


def acr_executable() -> str:
    """The `acr` next to this Python (a venv's), else the one on PATH."""
    beside = Path(sys.executable).with_name("acr")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("acr")
    if found:
        return str(Path(found).resolve())
    raise ServiceError("cannot find the 'acr' command to run (install the package first)")


def command(acr: str, home: Path) -> list[str]:
    """What the service runs: also the DaemonSet's container command (with acr on PATH)."""
    return [acr, "--runmd", str(home / RUNMD), "mirror", "start"]


def systemd_quote(arg: str) -> str:
    """One ExecStart word: `%` and `$` escaped, quoted when it holds blanks or quotes."""
    text = arg.replace("%", "%%").replace("$", "$$")
    if any(c in text for c in " \t\"'\\;"):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def unit_name(name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ServiceError(f"invalid unit name '{name}'")
    return name if name.endswith(".service") else f"{name}.service"


def check_home(home: Path, load: Callable[[Path], Compiled]) -> Path:
    """HOME/mirror.runmd exists, parses, and listens on loopback (the unit never allows remote)."""
    if any(c in str(home) for c in " \t\n\"'\\%$;"):
        raise ServiceError(f"'{home}': a home folder for a systemd unit must not contain blanks, quotes, '%', '$' or ';'")
    runmd = home / RUNMD
    if not runmd.is_file():
        raise ServiceError(f"{runmd} does not exist: run 'acr init' in {home} first")
    try:
        compiled = load(runmd)
    except RunmdError as e:
        raise ServiceError(str(e)) from None
    for root in compiled.document.roots("proxy"):
        address = compiled.config(root)
        if not address.loopback:
            raise ServiceError(
                f"{runmd}:{root.line}: '{address}' is not a loopback address; the service runs without "
                "--allow-remote"
            )
    return runmd


def render_unit(home: Path, acr: str) -> str:
    home = home.resolve()
    argv = command(acr, home)
    return string.Template(template_text()).substitute(
        home=str(home),
        runmd=str(home / RUNMD),
        command=" ".join(systemd_quote(a) for a in argv),
    )


def _systemctl(args: Sequence[str], dry_run: bool, out: list[str]) -> None:
    line = "systemctl " + " ".join(args)
    if dry_run:
        out.append(f"would run: {line}")
        return
    if shutil.which("systemctl") is None:
        raise ServiceError(f"systemctl not found: run '{line}' where systemd runs")
    result = subprocess.run(["systemctl", *args], capture_output=True, text=True)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(f"'{line}' failed: {detail[-1] if detail else f'exit {result.returncode}'}")
    out.append(f"ran: {line}")


def install(home: Path, unit_dir: Path, load: Callable[[Path], Compiled], name: str = DEFAULT_NAME, *,
            dry_run: bool = False, enable: bool = False, acr: str | None = None) -> list[str]:
    """Write the unit (and with `enable`, start it); returns the lines to print.

    `load` reads and checks the runmd (addons.catalog.load, one layer up).
    """
    home = home.resolve()
    check_home(home, load)
    unit = unit_name(name)
    text = render_unit(home, acr or acr_executable())
    path = unit_dir / unit
    out: list[str] = []
    if dry_run:
        out.append(f"would write {path}:")
        out.extend("    " + line for line in text.splitlines())
    else:
        if not unit_dir.is_dir():
            raise ServiceError(f"{unit_dir} is not a folder")
        old = path.read_text() if path.is_file() else None
        if old != text:
            try:
                atomic_write(path, text)
            except OSError as e:
                raise ServiceError(f"cannot write {path}: {e.strerror}") from None
            out.append(f"{'updated' if old is not None else 'wrote'} {path}")
        else:
            out.append(f"{path} is up to date")
    if enable:
        _systemctl(["daemon-reload"], dry_run, out)
        _systemctl(["enable", "--now", unit], dry_run, out)
    else:
        out.append(f"start it with: systemctl daemon-reload && systemctl enable --now {unit}")
    return out


def uninstall(unit_dir: Path, name: str = DEFAULT_NAME, *, dry_run: bool = False, disable: bool = False) -> list[str]:
    unit = unit_name(name)
    path = unit_dir / unit
    out: list[str] = []
    if disable:
        _systemctl(["disable", "--now", unit], dry_run, out)
    if not path.is_file():
        out.append(f"{path} is not installed")
    elif dry_run:
        out.append(f"would remove {path}")
    else:
        try:
            path.unlink()
        except OSError as e:
            raise ServiceError(f"cannot remove {path}: {e.strerror}") from None
        out.append(f"removed {path}")
    if disable:
        _systemctl(["daemon-reload"], dry_run, out)
    return out
