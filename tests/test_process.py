"""`.process CMD`: a program run as a runtime step, no shell, its output streamed line
by line into the mirror's log, a non-zero exit one line naming the step."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from addons import catalog
from addons.runmd.process import DEFAULT_TIMEOUT, Command, build_command, parse_attribute, parse_program
from addons.runmd.syntax import Attribute, RunmdError
from addons.runmd.runtime import Runtime, StepError
from tests.harness.ports import free_port

ACR = str(Path(sys.executable).with_name("acr"))


def attrs(*pairs: tuple[str, str]) -> list[Attribute]:
    return [Attribute(name, text, line) for line, (name, text) in enumerate(pairs, start=10)]


# --- parsing -----------------------------------------------------------------------------


def test_program_is_split_with_quotes_but_never_by_a_shell() -> None:
    assert parse_program("lifec") == ("lifec",)
    assert parse_program("sh -c 'echo a; echo b'") == ("sh", "-c", "echo a; echo b")
    assert parse_program("ls *.toml $HOME") == ("ls", "*.toml", "$HOME")
    for bad in ("", "'unclosed"):
        with pytest.raises(ValueError):
            parse_program(bad)


def test_attributes_build_the_command_in_order() -> None:
    command = build_command(
        ("lifec",),
        attrs(
            ("flag", "--runmd-path lib/overlaybd/setup env"),
            ("arg", "start now"),
            ("flag", "--verbose"),
            ("env", "LOG_LEVEL = debug"),
            ("env", "EMPTY="),
            ("timeout", "2m"),
        ),
    )
    assert command == Command(
        argv=("lifec", "--runmd-path", "lib/overlaybd/setup env", "start now", "--verbose"),
        env=(("LOG_LEVEL", "debug"), ("EMPTY", "")),
        timeout=120.0,
    )
    assert build_command(("x",), []).timeout == DEFAULT_TIMEOUT


@pytest.mark.parametrize(
    ("name", "text"),
    [("arg", ""), ("flag", "verbose"), ("flag", ""), ("env", "NOEQUALS"), ("env", "1BAD=x"), ("timeout", "soon"), ("timeout", "0")],
)
def test_bad_attributes_are_refused(name: str, text: str) -> None:
    with pytest.raises(ValueError):
        parse_attribute(name, text)


def test_attributes_attach_to_the_step_and_take_no_ids() -> None:
    text = "```\n+ .runtime\n: .process lifec\n:   .flag --engine-name linux\n:   .arg start\n:   .env A=b\n: .mirror example.azurecr.io\n```\n"
    compiled = catalog.parse_text(text, "m.runmd")
    (_, step), = compiled.document.steps("process")
    assert step.id == 2
    assert [(a.name, a.input, a.line) for a in step.attributes] == [
        ("flag", "--engine-name linux", 4), ("arg", "start", 5), ("env", "A=b", 6),
    ]
    (_, mirror), = compiled.document.steps("mirror")
    assert mirror.id == 3


def test_a_bad_attribute_names_its_line() -> None:
    with pytest.raises(RunmdError) as info:
        catalog.parse_text("```\n+ .runtime\n: .process lifec\n:   .env nope\n```\n", "m.runmd")
    assert info.value.line == 4 and ".env" in str(info.value)


# --- running -----------------------------------------------------------------------------


def runtime_for(tmp_path: Path, body: str) -> Runtime:
    path = tmp_path / "mirror.runmd"
    path.write_text("```\n+ .runtime\n" + body + "```\n")
    return Runtime.for_document(catalog.load(path))


def test_output_is_logged_line_by_line_as_it_comes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The first line is in the log while the program still runs: it waits for a file that the
    test writes only after it saw that line."""
    runtime = runtime_for(
        tmp_path,
        ": .process sh -c 'echo ready; echo \"to stderr $GREETING\" >&2; "
        "while [ ! -e go ]; do sleep 0.02; done; printf \"done\\n\\nlast\"'\n"
        ":   .env GREETING=hi\n",
    )
    caplog.set_level(logging.INFO, logger="addons.runmd.process")
    result: dict = {}
    t = threading.Thread(target=lambda: result.setdefault("ran", runtime.run()), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while "step 2 sh| ready" not in caplog.text:
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.02)
    assert "sh| done" not in caplog.text
    (tmp_path / "go").touch()  # in the runmd's folder, where the program runs
    t.join(10)
    assert result == {"ran": 1}
    lines = [r.getMessage() for r in caplog.records if "sh|" in r.getMessage()]
    assert lines == ["step 2 sh| ready", "step 2 sh| to stderr hi", "step 2 sh| done", "step 2 sh| ", "step 2 sh| last"]


def test_a_non_zero_exit_fails_with_one_line_naming_the_step(tmp_path: Path) -> None:
    runtime = runtime_for(tmp_path, ": .mirror example.azurecr.io\n: .process sh -c 'echo working; echo disk full >&2; exit 7'\n")
    with pytest.raises(StepError) as info:
        runtime.run()
    assert str(info.value) == "step 3 (.process sh -c 'echo working; echo disk full >&2; exit 7'): 'sh' exited with 7: disk full"


def test_a_missing_program_and_a_timeout_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(StepError, match=r"^step 2 \(\.process no-such-program-x\): no program 'no-such-program-x'"):
        runtime_for(tmp_path, ": .process no-such-program-x\n").run()
    start = time.monotonic()
    with pytest.raises(StepError, match=r"^step 2 \(\.process sleep 30\): 'sleep' did not finish within 300ms: stopped it$"):
        runtime_for(tmp_path, ": .process sleep 30\n:   .timeout 300ms\n").run()
    assert time.monotonic() - start < 10


def test_acr_mirror_start_fails_with_one_line_and_the_output_in_the_log(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(
        "```\n+ .runtime\n: .process sh -c 'echo checking the node; exit 3'\n"
        f"+ .proxy 127.0.0.1:{free_port()}\n: .manifests get\n```\n"
    )
    result = subprocess.run([ACR, "mirror", "start"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert any(line.endswith(" INFO addons.runmd.process: step 2 sh| checking the node") for line in result.stderr.splitlines())
    errors = [line for line in result.stderr.splitlines() if line.startswith("acr: ")]
    assert errors == ["acr: step 2 (.process sh -c 'echo checking the node; exit 3'): 'sh' exited with 3: checking the node"]
