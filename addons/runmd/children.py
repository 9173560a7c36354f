"""Programs the mirror starts: the proxy under an engine, and `.process` steps.

Each child runs in a session of its own, so a signal meant for the mirror (Ctrl-C in a
terminal, SIGTERM from systemd or a test's process-group kill) reaches the mirror alone and
the mirror decides how its children stop. Each child also asks the kernel to send it SIGTERM
when the mirror dies (PR_SET_PDEATHSIG): even a SIGKILLed mirror leaves no orphan proxy behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
try:  # loaded before any fork: the child must not import or look anything up
    _libc: ctypes.CDLL | None = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
except OSError:  # not Linux: children simply do not follow the mirror's death
    _libc = None


def _die_with(parent: int) -> Callable[[], None]:
    """The child side of the fork: SIGTERM when the parent goes, and it may be gone already."""

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def describe_exit(code: int) -> str:
    """`exited with 3` or `was killed by SIGKILL`, for one-line errors."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


class Children:
    """The children that are running now, so that a stop request can reach all of them.

    `stop` is called from signal handlers, which Python runs in the main thread between two
    bytecodes of whatever it was doing: so no lock is taken on that path (a lock the main
    thread already held would never be released), only a flag set and signals sent."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen[bytes]] = set()
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """True once the mirror is asked to stop; no new child starts after that."""
        return self._stopping

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start argv (no shell). With `capture`, stdout and stderr come back as one pipe;
        without, the child writes straight into the mirror's own stdout and stderr.
        OSError (no such program, not executable) reaches the caller unchanged."""
        if self._stopping:
            raise ChildrenStopping()
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
        self._running.add(proc)
        if self._stopping:  # asked to stop while it was starting
            signal_group(proc, signal.SIGTERM)
        return proc

    def signal_all(self, sig: int = signal.SIGTERM) -> None:
        """Send sig to every running child's process group (its own children too)."""
        for proc in list(self._running):
            signal_group(proc, sig)

    def stop(self) -> None:
        """Refuse new children and ask the running ones to stop (SIGTERM)."""
        self._stopping = True
        self.signal_all(signal.SIGTERM)

    def sleep(self, seconds: float) -> bool:
        """Sleep, waking early when asked to stop; True when asked to stop."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.05))
        return True

    def wait(self, proc: subprocess.Popen[bytes], *, timeout: float | None = None, grace: float = 10.0) -> int:
        """Wait for proc to exit. Past `timeout`, or `grace` seconds after a stop request, it
        gets SIGTERM and then SIGKILL; TimeoutExpired tells the caller it ran out of time."""
        start = time.monotonic()
        stop_seen: float | None = None
        timed_out: float | None = None
        try:
            while True:
                try:
                    return proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if timed_out is None and timeout is not None and now - start > timeout:
                    timed_out = now
                    signal_group(proc, signal.SIGTERM)
                if stop_seen is None and self._stopping:
                    stop_seen = now
                    signal_group(proc, signal.SIGTERM)
                first = min(t for t in (stop_seen, timed_out, float("inf")) if t is not None)
                if now - first > grace:
                    signal_group(proc, signal.SIGKILL)
        finally:
            if proc.returncode is not None:
                self._running.discard(proc)
                if timed_out is not None and not self._stopping:
                    raise subprocess.TimeoutExpired(proc.args, timeout or 0)

    def stream(
        self,
        proc: subprocess.Popen[bytes],
        line: Callable[[str], None],
        *,
        timeout: float | None = None,
        grace: float = 5.0,
    ) -> int:
        """Hand each line the child prints to `line` as it comes, then wait for its exit."""
        assert proc.stdout is not None
        reader = threading.Thread(target=_pump, args=(proc.stdout, line), daemon=True)
        reader.start()
        try:
            code = self.wait(proc, timeout=timeout, grace=grace)
        finally:
            # The child is gone; what its own children still hold open must not block us.
            reader.join(timeout=2.0)
        return code


class ChildrenStopping(Exception):
    """A child was to start after the mirror was asked to stop."""


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pump(stream, line: Callable[[str], None]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            try:
                line(text)
            except Exception:  # a logging failure must not stall the child on a full pipe
                pass
    finally:
        stream.close()
