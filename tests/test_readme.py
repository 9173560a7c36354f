"""The README shows what the commands really print, and cannot drift from them.

Each excerpt between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in README.md is made
here from the real command: the runmd `acr init` writes, the step `acr mirror start --id` must
name to skip the login (from `acr dump`), every subcommand of `acr --help` with its one line, and
the demo's own output (a real registry, mirror and containerd). Set LIFEC_UPDATE_README=1 to
rewrite the excerpts from the commands after a deliberate change; review the diff.

The first-ten-minutes errors are here as well: usage errors in one line with exit 2, a folder as
`--runmd`, `mitmdump -s acr_addons.py` without or with a bad `acr_runmd`, and the two scripts
saying how to get `acr` and `mitmdump` on PATH.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from addons import cli
from tests.harness.mirror import ACR
from tests.harness.ports import free_port, wait_port
from tests.harness.procs import kill_group
from tests.harness.replay import ROOT
from tests.harness.stargz import fuse_missing

README = ROOT / "README.md"
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
UPDATE = os.environ.get("LIFEC_UPDATE_README") == "1"
HINT = "acr and mitmdump are in .venv/bin: run '. .venv/bin/activate' to have them on PATH"


def excerpt(name: str, text: str | None = None) -> str:
    """The README's excerpt NAME; with `text`, the README with that excerpt replaced."""
    pattern = re.compile(rf"(<!-- generated: {name} -->\n)(.*?)(<!-- end: {name} -->)", re.S)
    readme = README.read_text()
    m = pattern.search(readme)
    assert m, f"README.md has no excerpt '{name}'"
    if text is None:
        return m.group(2)
    return readme[: m.start(2)] + text + readme[m.end(2):]


def check(name: str, generated: str, normalize=lambda s: s) -> None:
    if UPDATE:
        README.write_text(excerpt(name, generated))
    assert normalize(excerpt(name)) == normalize(generated), (
        f"README.md's '{name}' excerpt is not what the command prints; LIFEC_UPDATE_README=1 rewrites it"
    )


def acr(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def init_runmd(tmp_path: Path) -> Path:
    result = acr(tmp_path, "--registry", "example", "init")
    assert result.returncode == 0, result.stderr
    return tmp_path / "mirror.runmd"


def runmd_blocks(text: str) -> str:
    """The fenced blocks of a runmd, verbatim and in order (its prose left out)."""
    blocks, inside = [], False
    current: list[str] = []
    for line in text.splitlines():
        if not inside and line.startswith("``` ") and len(line.split()) >= 2 and line.split()[1] != "runmd":
            inside, current = True, [line]
        elif inside:
            current.append(line)
            if line.strip() == "```":
                blocks.append("\n".join(current))
                inside = False
    return "\n\n".join(blocks)


def test_the_runmd_sample_is_what_init_writes(tmp_path: Path) -> None:
    blocks = runmd_blocks(init_runmd(tmp_path).read_text())
    assert ": .login-acr    example" in blocks
    check("init-runmd", f"~~~text\n{blocks}\n~~~\n")


def login_step(tmp_path: Path) -> int:
    dump = acr(tmp_path, "--runmd", str(init_runmd(tmp_path)), "dump").stdout
    return int(re.search(r"^\s*(\d+):\s+login-acr ", dump, re.M).group(1))


USAGE = """\
```sh
pip install -e .                      # gives `acr` and `mitmdump` (the scripts put them in .venv/bin)
acr --registry example init           # writes ./mirror.runmd for example.azurecr.io
acr init --upstream http://127.0.0.1:5000 --force   # any registry; http:// means plain HTTP
acr dump                              # the numbered steps of ./mirror.runmd
acr mirror start                      # run the runtime steps, then serve until SIGINT/SIGTERM
acr mirror start --id {after:<2}              # start at step {after}, after .login-acr (skip a login that already happened)
```
"""


def test_the_usage_skips_the_login_at_the_step_init_writes(tmp_path: Path) -> None:
    step = login_step(tmp_path)
    check("usage", USAGE.format(after=step + 1))
    # And that step really is the one after the login in what init writes.
    dump = acr(tmp_path, "--runmd", str(tmp_path / "mirror.runmd"), "dump").stdout
    assert re.search(rf"^\s*{step + 1}:\s+install \"access_token\"", dump, re.M)


def subcommands(parser: argparse.ArgumentParser, prefix: str = "acr") -> list[tuple[str, str]]:
    """(command, its help line) for every subcommand, depth first, in `--help` order."""
    out: list[tuple[str, str]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                command = f"{prefix} {name}"
                out.append((command, helps.get(name) or ""))
                out.extend(subcommands(sub, command))
        elif action.dest == "hosts_command":
            out.extend((f"{prefix} {c}", "") for c in action.choices)
    return out


def commands_section() -> str:
    lines = []
    commands = subcommands(cli.build_parser())
    width = max(len(c) for c, _ in commands) + 2
    for command, text in commands:
        if not text:
            text = {"acr hosts show": "print the hosts.toml files and whether they are installed",
                    "acr hosts install": "install them now (merged into files other tools wrote)",
                    "acr hosts remove": "take the mirror's tables (or its whole files) out again"}[command]
        lines.append(f"{command:<{width}}# {text}")
    return "```text\n" + "\n".join(lines) + "\n```\n"


def test_every_subcommand_of_acr_help_is_in_the_readme_with_one_line() -> None:
    section = commands_section()
    check("commands", section)
    shown = subprocess.run([ACR, "--help"], capture_output=True, text=True, timeout=60).stdout
    commands = [c for c, _ in subcommands(cli.build_parser())]
    top = {c.split()[1] for c in commands}
    assert top == {"init", "dump", "addon-path", "mirror", "service", "containerd", "overlaybd", "stargz", "hosts"}
    for name in top:
        assert re.search(rf"^    {name} ", shown, re.M), name  # as `acr --help` lists them
    assert {"acr mirror start", "acr mirror serve", "acr hosts remove", "acr service install"} <= set(commands)
    for command in commands:
        assert len(re.findall(rf"^{re.escape(command)} +# ", section, re.M)) == 1, command


# --- getting started with teleport ---------------------------------------------------------------------

#: A node's mirror of two registries, each with its own address for the stargz snapshotter.
STARGZ_RUNMD = """\
``` start mirror
+ .runtime
: .mirror       example.azurecr.io
: .listen       localhost:8579
: .mirror       docker.io
: .listen       localhost:8580
: .host         localhost:8578, resolve, pull
+ .proxy        localhost:8578
: .manifests    head, get
:   .login      access_token
:   .authn      oauth2
:   .resolve    application/vnd.oci.image.index.v1+json
:   .discover   application/vnd.azure.artifact.streaming.v1
:   .teleport   overlaybd, estargz, auto
: .blobs        head, get
:   .login      access_token
:   .authn      oauth2
:   .pull
```
"""


def estargz_referrer() -> dict[str, object]:
    """An eStargz copy made a referrer of its original, the way ACR links streamable copies."""
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.azure.artifact.streaming.v1",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + "c" * 64, "size": 1469},
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": "sha256:" + "e" * 64, "size": 71303168,
            "annotations": {"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "f" * 64,
                            "io.containers.estargz.uncompressed-size": "72351744"},
        }],
        "subject": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": "sha256:" + "a" * 64, "size": 529},
        "annotations": {"streaming.format": "estargz", "streaming.platform.os": "linux",
                        "streaming.platform.arch": "amd64"},
    }


def test_the_estargz_referrer_shown_is_one_teleport_serves() -> None:
    import json

    from addons.registry.oci import Descriptor
    from addons.teleport.teleport import estargz_layers_missing, referrer_format

    doc = estargz_referrer()
    check("estargz-referrer", "```json\n" + json.dumps(doc, indent=2) + "\n```\n")
    body = json.dumps(doc).encode()
    assert estargz_layers_missing(body) is None
    d = Descriptor(str(doc["mediaType"]), "sha256:" + "b" * 64, len(body), doc["annotations"],  # type: ignore[arg-type]
                   str(doc["artifactType"]))
    assert referrer_format(d) == "estargz" and d.artifact_type in cli.DEFAULT_ARTIFACT_TYPES


def test_acr_stargz_configure_shown_is_what_it_prints(tmp_path: Path) -> None:
    check("stargz-runmd", "```text\n" + STARGZ_RUNMD + "```\n")
    (tmp_path / "mirror.runmd").write_text(STARGZ_RUNMD)
    config = tmp_path / "config.toml"
    out = acr(tmp_path, "stargz", "configure", "--config", str(config), "--dry-run")
    assert out.returncode == 0, out.stderr
    shown = out.stdout.replace(str(config), "/etc/containerd-stargz-grpc/config.toml")
    check("stargz-configure", "```text\n$ acr stargz configure --dry-run\n" + shown + "```\n")


# --- the demo's real output ---------------------------------------------------------------------


def normalize_demo(text: str) -> str:
    """Ports, clock times, durations and the bytes a lazy start happens to read vary (and with them
    a table's padding); containerd fetches the blobs in parallel, in any order."""
    text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z ", "", text)
    text = re.sub(r"\[\d\d:\d\d:\d\d\.\d+\] ", "", text)
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    text = re.sub(r"\d+\.\d+ MiB of (\S+ MiB) \(\d+\.\d+%\)", r"N MiB of \1 (N%)", text)
    text = re.sub(r"(?<=\S)  +", " ", text)
    lines = re.sub(r"\d+\.\d+ s\b", "N s", text).splitlines()
    blobs = iter(sorted(line for line in lines if " GET blobs " in line))
    return "\n".join(next(blobs) if " GET blobs " in line else line for line in lines)


@pytest.mark.e2e
def test_what_the_demo_shows_is_its_real_output(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    if not fuse_missing():  # the README shows the real lazy start; elsewhere the demo shows the swap alone
        start = out.index("==> containerd pulls")
        end = out.index("\n", out.index("==> TELEPORTED"))
        check("demo", "```text\n" + out[start:end + 1] + "```\n", normalize_demo)
    # Every path cleans up: the demo folder is gone, the logs are where the last lines say.
    work = re.search(r"==> working in (\S+)", out).group(1)
    assert not Path(work).exists()
    logs = "containerd.log, mirror.log, registry.log" + ("" if fuse_missing() else ", stargz.log")
    assert f"==> logs of this run: .demo-logs/ ({logs})" in out
    assert out.rstrip().endswith("==> " + HINT)


def test_the_demo_cleans_up_when_it_fails(tmp_path: Path) -> None:
    # No docker-registry on PATH: the registry cannot start, the demo fails and still cleans up.
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True,
                            timeout=600, env=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    work = re.search(r"==> working in (\S+)", result.stdout).group(1)
    assert not Path(work).exists()
    assert "==> demo FAILED: FileNotFoundError: docker-registry not found" in result.stdout
    assert "==> logs of this run: .demo-logs/" in result.stdout
    assert result.stdout.rstrip().endswith("==> " + HINT)


def test_scripts_test_says_how_to_get_the_commands_on_path() -> None:
    result = subprocess.run([str(ROOT / "scripts" / "test"), "--co", "-q", "tests/test_oci.py"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1] == "==> " + HINT
    assert ". .venv/bin/activate" in README.read_text().split("## What the demo shows")[0]


# --- errors a newcomer meets first -------------------------------------------------------------


@pytest.mark.parametrize("args, fragment", [
    (["bogus"], "invalid choice: 'bogus'"),
    (["mirror", "start", "--id", "x"], "argument --id: invalid int value: 'x' (see 'acr mirror start --help')"),
    (["hosts"], "the following arguments are required"),
    (["mirror"], "the following arguments are required: COMMAND (see 'acr mirror --help')"),
])
def test_usage_errors_are_one_line_with_exit_2(tmp_path: Path, args: list[str], fragment: str) -> None:
    result = acr(tmp_path, *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("acr: ") and fragment in result.stderr


def test_init_over_an_existing_file_is_a_usage_error(tmp_path: Path) -> None:
    init_runmd(tmp_path)
    result = acr(tmp_path, "--registry", "example", "init")
    assert result.returncode == 2 and result.stderr == "acr: mirror.runmd exists; use --force to overwrite it\n"


@pytest.mark.parametrize("args", [["dump"], ["init", "--force", "--upstream", "http://127.0.0.1:5000"], ["hosts", "show"],
                                  ["mirror", "start"]])
def test_a_folder_as_runmd_is_one_line(tmp_path: Path, args: list[str]) -> None:
    result = acr(tmp_path, "--runmd", str(tmp_path), *args)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "is a folder" in result.stderr
    assert "Error" not in result.stderr and f"{tmp_path}/mirror.runmd" in result.stderr


def mitmdump(cwd: Path, port: int, *sets: str) -> subprocess.Popen[str]:
    argv = [MITMDUMP, "-s", str(ROOT / "acr_addons.py"), "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
            "--set", "connection_strategy=lazy"]
    for s in sets:
        argv += ["--set", s]
    return subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@pytest.mark.parametrize("case", ["no-runmd", "bad-runmd"])
def test_mitmdump_refuses_to_serve_without_a_runmd_it_can_load(tmp_path: Path, case: str) -> None:
    sets = []
    if case == "bad-runmd":
        (tmp_path / "bad.runmd").write_text("``` start mirror\n+ .proxy 127.0.0.1:8578\n: .bogus\n```\n")
        sets = ["acr_runmd=bad.runmd"]
    proc = mitmdump(tmp_path, free_port(), *sets)
    try:
        out, _ = proc.communicate(timeout=120)  # it stops by itself
    finally:
        kill_group(proc)
    assert "Traceback" not in out and "error in script" not in out, out
    errors = [line for line in out.splitlines() if "runmd" in line and "Loading script" not in line]
    if case == "no-runmd":
        assert errors == [errors[0]] and errors[0].endswith(
            "no runmd to serve: pass --set acr_runmd=FILE, or start where ./mirror.runmd is (acr init writes one)"), out
    else:
        assert len(errors) == 1 and errors[0].endswith(
            f"{tmp_path}/bad.runmd:3: unknown plugin '.bogus' under '+ .proxy' (known: authn, blobs, discover, "
            "login, manifests, pull, resolve, tags, teleport)"), out


def test_mitmdump_serves_mirror_runmd_of_its_folder_without_acr_runmd(tmp_path: Path) -> None:
    port = free_port()
    result = acr(tmp_path, "init", "--upstream", "http://127.0.0.1:9", "--mirror-address", f"127.0.0.1:{port}")
    assert result.returncode == 0, result.stderr
    proc = mitmdump(tmp_path, port)
    try:
        wait_port("127.0.0.1", port, 60)
        for _ in range(100):
            status = requests.get(f"http://127.0.0.1:{port}/status", timeout=10)
            if status.status_code == 200:
                break
        assert status.json()["runmd"] == str(tmp_path / "mirror.runmd")
    finally:
        kill_group(proc)
        out = proc.stdout.read() if proc.stdout else ""
    assert "acr_runmd is not set: serving ./mirror.runmd" in out


def test_the_probe_answers_shown_are_real(tmp_path: Path) -> None:
    """The probes and a non-root /auth, from curl against a real mirror with an unusable
    credentials file; ports shown as the README's (8578 for the mirror, 5000 for the registry)."""
    import shutil

    from tests.harness.mirror import Mirror
    from tests.harness.ports import ClosedPort

    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("curl") is None:
        pytest.skip("needs root, setpriv (util-linux) and curl")
    with ClosedPort() as registry:
        mirror = Mirror(tmp_path / "home", [registry.url], start=False)
        (mirror.home / "access_token").write_text("\n")
        blob = "sha256:" + "a" * 64
        commands = [
            ["curl", "-s", f"{mirror.url}/livez"],
            ["curl", "-s", "-w", "%{http_code}\\n", f"{mirror.url}/readyz"],
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl", "-s", "-w", "\\n%{http_code}\\n",
             f"{mirror.url}/auth?remote_url={registry.url}/v2/app/blobs/{blob}"],
        ]
        out = []
        try:
            mirror.start(timeout=60)
            for argv in commands:
                shown = " ".join(f"'{a}'" if "%" in a or "?" in a else a for a in argv)
                result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                out.append(f"$ {shown}\n{result.stdout}")
        finally:
            mirror.stop()
    text = "".join(out).replace(str(mirror.port), "8578").replace(str(registry.port), "5000")
    assert '"status": "ok"' in text and "access_token is unusable" in text and '"DENIED"' in text
    check("probes", "```text\n" + text + "```\n")
