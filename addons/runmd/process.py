"""`.process CMD`: run a program as a runtime step, its output streamed into the mirror's log.

```
: .process    setup-overlaybd --check
:   .arg      one argument, spaces and all
:   .flag     --config /etc/overlaybd/overlaybd.json
:   .env      LOG_LEVEL=debug
:   .timeout  2m
```
CMD is split like a shell would split it (quotes work) but no shell runs it: no globbing, no
pipes, no variables. `.arg` adds one argument verbatim, `.flag` adds a flag and its value (two
arguments), `.env` adds a variable to the mirror's environment for this program, `.timeout`
bounds it (default 10 minutes). The program runs in the runmd's folder. A non-zero exit fails the
step, and so the event, with one line that names the step.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from addons.runmd.children import ChildrenStopping, describe_exit
from addons.core.duration import format_duration, parse_duration
from addons.runmd.runtime import RuntimePlugin
from addons.runmd.syntax import Attribute
from addons.runmd.runtime import Runtime, StepError

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 600.0
_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    timeout: float = DEFAULT_TIMEOUT


def parse_program(text: str) -> tuple[str, ...]:
    """The program and its first arguments, split with shell quoting rules."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as e:
        raise ValueError(f"cannot split '{text}': {e}") from None
    if not argv:
        raise ValueError("expected a program to run, e.g. '.process containerd --version'")
    return argv


def parse_attribute(name: str, text: str) -> Any:
    """One qualifying line of `.process`: its value as the command builder uses it."""
    if name == "arg":
        if not text:
            raise ValueError("expected an argument, e.g. '.arg start'")
        return (text,)
    if name == "flag":
        parts = tuple(text.split(None, 1))
        if not parts or not parts[0].startswith("-"):
            raise ValueError(f"expected '--flag [VALUE]', got '{text}'")
        return parts
    if name == "env":
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not _ENV_KEY_RE.match(key):
            raise ValueError(f"expected KEY=VALUE, got '{text}'")
        return (key, value.strip())
    if name == "timeout":
        return parse_duration(text)
    raise ValueError(f"'.process' has no attribute '.{name}'")


def build_command(program: tuple[str, ...], attributes: Iterable[Attribute]) -> Command:
    """The argv, extra environment and timeout of a `.process` step, in the order written."""
    argv = list(program)
    env: list[tuple[str, str]] = []
    timeout = DEFAULT_TIMEOUT
    for attr in attributes:
        value = parse_attribute(attr.name, attr.input)
        if attr.name in ("arg", "flag"):
            argv.extend(value)
        elif attr.name == "env":
            env.append(value)
        elif attr.name == "timeout":
            timeout = value
    return Command(tuple(argv), tuple(env), timeout)


class Process(RuntimePlugin):
    plugin = "process"
    attributes = ("arg", "flag", "env", "timeout")

    @classmethod
    def parse(cls, text: str) -> tuple[str, ...]:
        return parse_program(text)

    @classmethod
    def parse_attribute(cls, name: str, text: str) -> Any:
        return parse_attribute(name, text)

    def run(self, runtime: Runtime) -> None:
        command = build_command(self.config, self.step.attributes)
        name = command.argv[0]
        env = {**os.environ, **dict(command.env)}
        try:
            proc = runtime.children.spawn(command.argv, cwd=runtime.home, env=env)
        except ChildrenStopping:
            raise StepError("not started: the mirror is stopping") from None
        except FileNotFoundError:
            raise StepError(f"no program '{name}' (not on PATH, nor in {runtime.home})") from None
        except OSError as e:
            raise StepError(f"cannot run '{name}': {e.strerror}") from None
        logger.info("step %d: started %s (pid %d)", self.step.id, shlex.join(command.argv), proc.pid)
        last: list[str] = []

        def line(text: str) -> None:
            logger.info("step %d %s| %s", self.step.id, name, text)
            if text.strip():
                last[:] = [text.strip()]

        try:
            code = runtime.children.stream(proc, line, timeout=command.timeout)
        except subprocess.TimeoutExpired:
            raise StepError(f"'{name}' did not finish within {format_duration(command.timeout)}: stopped it") from None
        if code != 0:
            detail = f": {last[0][:200]}" if last else ""
            raise StepError(f"'{name}' {describe_exit(code)}{detail}")
        logger.info("step %d: %s finished", self.step.id, name)
