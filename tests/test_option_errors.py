"""Configuration errors come before anything changes: one line, a non-zero exit, nothing touched.

`acr mirror start --set ...` checks every option, mitmproxy's and the steps', on the master it
would serve with before its first runtime step: no node check, no login, no hosts.toml, nothing
"serving". `mitmdump -s "$(acr addon-path)"` stops the same way, with one error line and exit 1
(mitmproxy's own "Error logged during startup"), never a traceback. All real commands; the hosts
folder holds a hosts.toml of another tool's that must stay as it was.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from addons.cli import build_parser
from tests.harness.loglines import parse
from tests.harness.mirror import ACR
from tests.harness.ports import ClosedPort, free_port

MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
THEIRS = "server = 'http://127.0.0.1:9'\n"

NONE = "the mirror (mitmproxy's addons it runs, and its steps) has no such option"
#: (--set, the line `acr` prints, the line mitmdump logs or None where mitmdump has the option)
BAD = [
    ("acr_upstream_timout=60", "bad option: unknown option acr_upstream_timout: did you mean acr_upstream_timeout?",
     "bad option: unknown option acr_upstream_timout: did you mean acr_upstream_timeout?"),
    ("bogus=1", f"bad option: unknown option bogus: {NONE}", f"bad option: unknown option bogus: {NONE}"),
    ("acr_upstream_timeout=abc", "bad option: acr_upstream_timeout: expected a duration like 30s, 500ms or 2m, got 'abc'",
     "acr_upstream_timeout: expected a duration like 30s, 500ms or 2m, got 'abc'"),
    # mitmdump's, but of an addon the mirror's master leaves out
    ("anticache=true", f"bad option: unknown option anticache: {NONE}", None),
]


@pytest.fixture(scope="module")
def upstream() -> ClosedPort:
    with ClosedPort() as port:
        yield port


@pytest.fixture
def node(tmp_path: Path, upstream: ClosedPort) -> tuple[Path, Path]:
    """A mirror home with acr init's file (engine, node check, hosts.toml) and a hosts folder."""
    home = tmp_path / "home"
    home.mkdir()
    made = subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), "init", "--upstream",
                           f"http://127.0.0.1:{upstream.port}", "--mirror-address", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    hosts = tmp_path / "certs.d"
    (hosts / f"127.0.0.1:{upstream.port}").mkdir(parents=True)
    (hosts / f"127.0.0.1:{upstream.port}" / "hosts.toml").write_text(THEIRS)
    return home, hosts


def snapshot(*folders: Path) -> dict[str, str]:
    return {str(p): p.read_text() if p.is_file() else "" for folder in folders for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("option, line", [b[:2] for b in BAD], ids=[b[0] for b in BAD])
def test_acr_mirror_start_refuses_before_any_step(node: tuple[Path, Path], option: str, line: str) -> None:
    home, hosts = node
    before = snapshot(home, hosts)
    result = subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), "mirror", "start", "--hosts-dir", str(hosts),
                             "--set", "acr_connect_timeout=3", "--set", option],
                            cwd=home, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and result.stderr.splitlines() == [f"acr: {line}"], result.stderr
    assert snapshot(home, hosts) == before  # no .work/, no hosts.toml change


@pytest.mark.parametrize("option, line", [(b[0], b[2]) for b in BAD if b[2]], ids=[b[0] for b in BAD if b[2]])
def test_mitmdump_stops_with_one_line(node: tuple[Path, Path], option: str, line: str) -> None:
    home, hosts = node
    before = snapshot(home, hosts)
    script = subprocess.run([ACR, "addon-path"], capture_output=True, text=True, timeout=60).stdout.strip()
    result = subprocess.run([MITMDUMP, "-s", script, "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{free_port()}",
                             "--set", "connection_strategy=lazy", "--set", "acr_runmd=mirror.runmd",
                             "--set", f"acr_hosts_dir={hosts}", "--set", option],
                            cwd=home, capture_output=True, text=True, timeout=120)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and "error in script" not in out, out
    # mitmproxy's lines and the mirror's come in the one log format: the error is its message part.
    logs = [(parse(l), l) for l in out.splitlines()]
    assert [log.message for log, _ in logs if log and log.level == "ERROR"] == [line], out
    assert [log.message if log else l for log, l in logs if option.split("=")[0] in l] == [line], out
    # It stops before `running`: the error is the last line of the mirror's (the steps start
    # nothing, so the teleport gate never says what it would serve).
    assert [log.level for log, _ in logs if log and log.logger.startswith("addons.")][-1] == "ERROR", out
    assert snapshot(home, hosts) == before


@pytest.mark.parametrize("argv, runmd, registry", [
    (["init", "--registry", "b"], "mirror.runmd", "b"),
    (["--registry", "a", "init", "--registry", "b", "--runmd", "x.runmd"], "x.runmd", "b"),
    (["--registry", "a", "--runmd", "y.runmd", "init"], "y.runmd", "a"),
    (["dump", "-v", "--runmd", "z.runmd"], "z.runmd", None),
])
def test_global_options_go_before_or_after_the_command(argv: list[str], runmd: str, registry: str | None) -> None:
    args = build_parser().parse_args(argv)
    assert (args.runmd, args.registry) == (runmd, registry)
    assert args.verbose == ("-v" in argv)
