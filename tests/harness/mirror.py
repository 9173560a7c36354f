"""A real `acr mirror start` process for end-to-end tests.

The mirror runs as the operator runs it: a subprocess of the installed `acr` command with a
runmd written by `acr init --upstream`, so the tests exercise the CLI, the runmd and the chain
together. Its log is kept for assertions (no token may appear in it) and for debugging.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import requests

from tests.harness.ports import direct_session, free_port, wait_port
from tests.harness.procs import descendants, kill_group

ACR = str(Path(sys.executable).with_name("acr"))


def acr_init(*argv: str) -> None:
    """`acr init` with these arguments, run in this process: the same parser and command as the
    installed `acr` (tests/test_cli.py runs that one), without paying for a second interpreter
    that imports mitmproxy (about 1.5 s of CPU) for every mirror a test starts."""
    from addons import cli

    args = cli.build_parser().parse_args(list(argv))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = args.func(args)
        except cli.CliError as e:
            raise RuntimeError(f"acr {' '.join(argv)}: {e}") from None
    if code != 0:
        raise RuntimeError(f"acr {' '.join(argv)} exited with {code}: {out.getvalue()}")


class Mirror:
    """`acr mirror start` on a free loopback port, serving `upstreams` (URLs like http://127.0.0.1:5000)."""

    def __init__(
        self,
        home: Path,
        upstreams: Sequence[str],
        *,
        credentials: Optional[str] = None,
        runmd: Optional[str] = None,
        port: Optional[int] = None,
        sets: Sequence[str] = (),
        args: Sequence[str] = (),
        env: Optional[dict[str, str]] = None,
        start: bool = True,
    ) -> None:
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.runmd_path = self.home / "mirror.runmd"
        self.log_path = self.home / "mirror.log"
        self.sets = list(sets)
        self.args = list(args)
        self.env = env
        self.proc: Optional[subprocess.Popen[bytes]] = None
        if runmd is None:
            acr_init("--runmd", str(self.runmd_path), "init", "--upstream", upstreams[0],
                     "--mirror-address", f"127.0.0.1:{self.port}", "--force")
            text = self.runmd_path.read_text()
            for extra in upstreams[1:]:
                text = text.replace(f": .mirror       {upstreams[0]}", f": .mirror       {upstreams[0]}\n: .mirror       {extra}", 1)
            self.runmd_path.write_text(text)
        else:
            self.runmd_path.write_text(runmd.replace("{port}", str(self.port)))
        if credentials is not None:
            token = self.home / "access_token"
            fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(credentials + "\n")
        if start:
            self.start()

    @property
    def hosts_dir(self) -> Path:
        """Where this mirror's `.host` steps install hosts.toml (a folder of the test's own)."""
        return self.home / "certs.d"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        # With `--set`, `acr mirror start` builds the master once to check the options before
        # its runtime steps, and the engine's proxy child builds it again: on a busy machine that
        # can take longer than 15 s.
        cmd = [ACR, "--runmd", str(self.runmd_path), "mirror", "start", *self.args]
        if "--hosts-dir" not in self.args:
            # `.host` installs hosts.toml: never into the machine's /etc/containerd/certs.d.
            cmd += ["--hosts-dir", str(self.hosts_dir)]
        for s in self.sets:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self.env or {})}
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            cmd, cwd=self.home, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
        try:
            wait_port("127.0.0.1", self.port, timeout)
        except Exception:
            self.stop()
            raise RuntimeError(f"mirror did not start:\n{self.log_text()[-3000:]}") from None

    def serving_pid(self) -> int:
        """The process that runs mitmproxy: the `acr mirror serve` child that an engine
        supervises, or `acr mirror start` itself when the runmd has no engine."""
        assert self.proc is not None
        for pid in descendants(self.proc.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"serve" in argv and b"mirror" in argv:
                return pid
        return self.proc.pid

    def stop(self) -> Optional[int]:
        if self.proc is None:
            return None
        kill_group(self.proc)
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def get(self, path: str, **kwargs) -> requests.Response:
        return direct_session().get(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def head(self, path: str, **kwargs) -> requests.Response:
        return direct_session().head(self.url + path, timeout=kwargs.pop("timeout", 30), **kwargs)

    def __enter__(self) -> "Mirror":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
