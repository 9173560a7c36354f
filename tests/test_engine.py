"""`+ .engine`: events run blocks in order, `--id` starts inside any event, `.loop`
restarts a crashed proxy after a back-off, SIGTERM ends everything with exit 0.

The engine runs as the operator runs it, `acr mirror start` in a subprocess; the proxy is its
supervised child, which these tests kill with SIGKILL. The loop's policy (back-off, which
failures are fatal) is also driven in-process with a stand-in proxy command, which is faster
and shows the delays exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from addons import catalog

from addons.runmd import engine
from addons.runmd.engine import Backoff, BackoffPolicy, Engine, EngineError
from addons.runmd.syntax import RunmdError
from addons.runmd.runtime import Runtime, StepError
from tests.harness.ports import free_port, port_open

ACR = str(Path(sys.executable).with_name("acr"))

#: Ids: 1 engine, 2-3 events, 4 loop, 5 runtime, 6 process, 7 runtime, 8 process, 9 mirror,
#: 10 proxy, 11 manifests, 12 blobs.
TWO_EVENTS = """\
# A mirror in two events

``` mirror
+ .engine
: .event        install
: .event        start
: .loop         100ms, 1s
```

``` install mirror
+ .runtime
: .process      touch installed
```

``` start mirror
+ .runtime
: .process      touch started
: .mirror       http://127.0.0.1:{upstream}
+ .proxy        127.0.0.1:{port}
: .manifests    head, get
: .blobs        get
```
"""

TWO_EVENTS_DUMP = [
    'block "mirror" (line 3)',
    "   1: engine",
    '   2:   event "install"',
    '   3:   event "start"',
    '   4:   loop "100ms, 1s"',
    'block "install mirror" (line 10)',
    "   5: runtime",
    '   6:   process "touch installed"',
    'block "start mirror" (line 15)',
    "   7: runtime",
    '   8:   process "touch started"',
    '   9:   mirror "http://127.0.0.1:{upstream}"',
    '  10: proxy "127.0.0.1:{port}"',
    '  11:   manifests "head, get"  # no step answers: forwarded to the upstream as is',
    '  12:   blobs "get"  # no step answers: forwarded to the upstream as is',
]


def write_runmd(folder: Path, text: str, **values: object) -> dict[str, int]:
    values = {"port": free_port(), "upstream": free_port(), **values}
    (folder / "mirror.runmd").write_text(text.format(**values))
    return values  # type: ignore[return-value]


def run_acr(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, start_new_session=True)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("acr: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


class Started:
    """`acr mirror start` in its own session, its output in a log file."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.log_path = cwd / "acr.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [ACR, "mirror", "start", *args], cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def proxy_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"serving on \S+ \(pid (\d+)\)", self.log())]

    def wait_for(self, predicate, what: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"acr exited with {self.proc.returncode} while waiting for {what}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout}s:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"acr did not exit within {timeout}s of {signal.Signals(sig).name}:\n{self.log()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for pid in self.proxy_pids():  # never leave a proxy behind, even when a test failed
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._log.close()


@contextlib.contextmanager
def started(cwd: Path, *args: str) -> Iterator[Started]:
    s = Started(cwd, *args)
    try:
        yield s
    finally:
        s.close()


def ping(port: int) -> bool:
    try:
        s = requests.Session()
        s.trust_env = False
        return s.get(f"http://127.0.0.1:{port}/v2/", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def gone(pid: int) -> bool:
    """The process no longer exists (reaped), or is a zombie nobody waits for."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"


# --- the seed's shape ------------------------------------------------------------------


def test_dump_shows_the_engine_its_events_and_every_step_numbered(tmp_path: Path) -> None:
    values = write_runmd(tmp_path, TWO_EVENTS)
    result = run_acr(tmp_path, "dump")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["# mirror.runmd", *(line.format(**values) for line in TWO_EVENTS_DUMP)]


def test_id_in_the_second_event_skips_the_first_then_sigterm_ends_cleanly(tmp_path: Path) -> None:
    values = write_runmd(tmp_path, TWO_EVENTS)
    with started(tmp_path, "--id", "7") as acr:
        acr.wait_for(lambda: ping(values["port"]), "answer to /v2/")
        assert (tmp_path / "started").exists()
        assert not (tmp_path / "installed").exists(), "step 6 of the first event ran"
        (pid,) = acr.proxy_pids()
        assert acr.terminate() == 0
        assert gone(pid)
        assert not port_open("127.0.0.1", values["port"])


def test_loop_restarts_a_killed_proxy_from_the_first_event_and_stops_on_sigterm(tmp_path: Path) -> None:
    values = write_runmd(tmp_path, TWO_EVENTS)
    with started(tmp_path) as acr:
        acr.wait_for(lambda: ping(values["port"]), "answer to /v2/")
        assert (tmp_path / "installed").exists() and (tmp_path / "started").exists()
        (first,) = acr.proxy_pids()
        (tmp_path / "installed").unlink()
        os.kill(first, signal.SIGKILL)
        acr.wait_for(lambda: len(acr.proxy_pids()) == 2 and ping(values["port"]), "restarted proxy", timeout=10)
        assert gone(first)
        assert (tmp_path / "installed").exists(), "the loop did not start over from the first event"
        log = acr.log()
        assert "the proxy was killed by SIGKILL" in log
        assert "starting over in 100ms" in log
        second = acr.proxy_pids()[1]
        assert acr.terminate() == 0
        assert gone(second)
        assert not port_open("127.0.0.1", values["port"])


def test_sigterm_during_a_process_step_stops_it_and_exits_zero(tmp_path: Path) -> None:
    text = "``` mirror\n+ .engine\n: .event install\n: .loop\n```\n\n``` install mirror\n+ .runtime\n: .process sh -c 'echo $$ > pid; exec sleep 60'\n```\n"
    (tmp_path / "mirror.runmd").write_text(text)
    with started(tmp_path) as acr:
        acr.wait_for(lambda: (tmp_path / "pid").exists() and (tmp_path / "pid").read_text().strip(), "the step's program")
        pid = int((tmp_path / "pid").read_text())
        assert acr.terminate() == 0
        assert gone(pid)


def test_a_step_failing_on_the_first_round_is_one_line_even_with_loop(tmp_path: Path) -> None:
    write_runmd(tmp_path, TWO_EVENTS.replace("touch installed", "sh -c 'echo no disk; exit 3'"))
    line = one_line_error(run_acr(tmp_path, "mirror", "start"))
    assert "step 6" in line and ".process" in line and "exited with 3" in line and "no disk" in line


SEVERAL = """\
``` a
+ .engine
: .event one
: .exit
```

``` one a
+ .runtime
: .process touch ran-a
```

``` b
+ .engine
: .event one
: .exit
```

``` one b
+ .runtime
: .process touch ran-b
```
"""


def test_several_engines_need_engine_name(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(SEVERAL)
    line = one_line_error(run_acr(tmp_path, "mirror", "start"))
    assert "'a'" in line and "'b'" in line and "--engine-name" in line
    line = one_line_error(run_acr(tmp_path, "mirror", "start", "--engine-name", "c"))
    assert "'c'" in line and "'a'" in line
    result = run_acr(tmp_path, "mirror", "start", "--engine-name", "b")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "ran-b").exists() and not (tmp_path / "ran-a").exists()


def test_id_outside_the_engine_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(SEVERAL)
    line = one_line_error(run_acr(tmp_path, "mirror", "start", "--engine-name", "b", "--id", "5"))
    assert "step 5" in line and "'b'" in line


# --- what does not compile -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("``` mirror\n+ .engine\n: .event install\n```\n", 3, "``` install mirror"),
        ("``` mirror\n+ .engine\n: .loop\n: .event x\n```\n``` x mirror\n+ .runtime\n```\n", 4, "never runs"),
        ("``` mirror\n+ .engine\n: .exit\n: .loop\n```\n", 4, "never runs"),
        ("``` mirror\n+ .engine\n```\n``` mirror\n+ .engine\n```\n", 5, "second engine"),
        ("``` mirror\n+ .engine\n: .loop 5s\n```\n", 3, ".loop"),
        ("``` mirror\n+ .engine\n: .loop 5s, 1s\n```\n", 3, "below"),
        ("``` mirror\n+ .engine\n: .event a b\n```\n", 3, "one block name"),
        ("``` mirror\n+ .engine\n: .process true\n```\n", 3, "unknown plugin"),
        ("``` mirror\n+ .engine\n: .event self\n```\n``` self mirror\n+ .engine\n```\n", 3, "engine itself"),
    ],
)
def test_engine_errors_name_the_line(text: str, line: int, fragment: str) -> None:
    with pytest.raises(RunmdError) as info:
        catalog.parse_text(text, "m.runmd")
    assert info.value.line == line, info.value
    assert fragment in str(info.value)


# --- policy, in-process ----------------------------------------------------------------


def test_backoff_doubles_is_capped_and_resets() -> None:
    b = Backoff(BackoffPolicy(1.0, 8.0))
    assert [b.after(True, 0.1) for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    assert b.after(False, 0.1) == 1  # a clean round
    assert [b.after(True, 0.1) for _ in range(2)] == [1, 2]
    assert b.after(True, 30.0) == 1  # it had served for a long while before this failure


def test_start_point_maps_every_id_of_an_event() -> None:
    compiled = catalog.parse_text(TWO_EVENTS.format(port=1, upstream=2), "m.runmd")
    spec = engine.select(compiled, None)
    assert spec is not None and [a.kind for a in spec.actions] == ["event", "event", "loop"]
    assert engine.start_point(spec, 0) == (0, 0)
    assert engine.start_point(spec, 1) == (0, 0)
    assert engine.start_point(spec, 3) == (1, 0)
    assert engine.start_point(spec, 6) == (0, 6)
    assert engine.start_point(spec, 8) == (1, 8)
    assert engine.start_point(spec, 11) == (1, 11)
    assert engine.start_point(spec, 4) == (2, 0)


FAKE_PROXY = """\
``` mirror
+ .engine
: .event start
{loop}
```

``` start mirror
+ .runtime
: .process sh -c 'test ! -e fail-now'
: .mirror http://127.0.0.1:9
+ .proxy 127.0.0.1:9
: .manifests get
```
"""


def test_loop_backs_off_on_proxy_errors_and_retries_steps_after_the_first_round(tmp_path: Path, caplog) -> None:
    path = tmp_path / "mirror.runmd"
    path.write_text(FAKE_PROXY.format(loop=": .loop 50ms, 400ms"))
    compiled = catalog.load(path)
    spec = engine.select(compiled, None)
    # The stand-in proxy leaves fail-now behind, where the `.process` step (run in the runmd's
    # folder) looks for it: round 1 fails in the proxy, every later round in the step.
    fake = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(tmp_path / 'fail-now')!r}).touch(); raise SystemExit(3)"]
    # The engine's clock moves only while it waits: however slow the machine, every round took
    # no time, so none counts as healthy, and the test waits for no back-off.
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> bool:
        now[0] += seconds
        waits.append(seconds)
        return len(waits) == 6  # then asked to stop

    e = Engine(spec, Runtime.for_document(compiled), fake, clock=lambda: now[0], sleep=sleep)
    caplog.set_level(logging.INFO)
    assert e.run(handle_signals=False) == 0
    assert e.rounds == 6 and waits == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    text = caplog.text
    assert "event 'start' (step 2) failed: the proxy exited with 3" in text
    assert text.count("event 'start' (step 2) failed: step 5 (.process sh -c 'test ! -e fail-now'): 'sh' exited with 1") == 5
    assert re.findall(r"starting over in (\S+)", text) == ["50ms", "100ms", "200ms", "400ms", "400ms", "400ms"]


def test_without_loop_a_proxy_error_ends_the_engine_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "mirror.runmd"
    path.write_text(FAKE_PROXY.format(loop=""))
    compiled = catalog.load(path)
    e = Engine(engine.select(compiled, None), Runtime.for_document(compiled), [sys.executable, "-c", "raise SystemExit(4)"])
    with pytest.raises(EngineError) as info:
        e.run(handle_signals=False)
    assert str(info.value) == "event 'start' (step 2): the proxy exited with 4"


def test_a_usage_error_of_the_proxy_is_not_retried(tmp_path: Path) -> None:
    path = tmp_path / "mirror.runmd"
    path.write_text(FAKE_PROXY.format(loop=": .loop 10ms, 10ms"))
    compiled = catalog.load(path)
    e = Engine(engine.select(compiled, None), Runtime.for_document(compiled), [sys.executable, "-c", "raise SystemExit(2)"])
    with pytest.raises(EngineError, match="exited with 2"):
        e.run(handle_signals=False)
    assert e.rounds == 1


def test_without_an_engine_a_step_error_is_still_a_step_error(tmp_path: Path) -> None:
    compiled = catalog.parse_text("```\n+ .runtime\n: .process false\n```\n", str(tmp_path / "m.runmd"))
    assert engine.select(compiled, None) is None
    with pytest.raises(StepError, match=r"^step 2 \(\.process false\): 'false' exited with 1$"):
        Runtime.for_document(compiled).run()
