"""`/livez`, `/readyz` and the systemd notifications, on real `acr mirror start` processes.

The heartbeat behind `/livez` is first checked alone, on a real event loop and a real thread
pool of one worker that the test blocks, with the clock injected. Then real mirrors: a
stand-in upstream that accepts connections and never answers holds every worker thread, which
must fail `/livez` and starve the watchdog until it lets go; `/readyz` follows the credentials
file as it is written, broken, expired and fixed, without a restart. The notification tests
listen on a unix datagram socket of their own, as systemd does, for both shapes of `acr
mirror start` (with `+ .engine`, the proxy in a child; without, the proxy in the main process).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import requests

from addons.core.liveness import Heartbeat
from addons.core.sdnotify import Notifier, socket_address, watchdog_interval
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import ClosedPort, free_port, port_open, wait_port
from tests.harness.procs import kill_group, wait_for

# --- the heartbeat -----------------------------------------------------------------------------


def test_a_blocked_worker_fails_the_heartbeat_and_it_recovers() -> None:
    now = [100.0]
    release = threading.Event()

    async def scenario() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        beat = Heartbeat(interval=0.01, limit=5.0, clock=lambda: now[0])
        seen = []
        busy = loop.run_in_executor(None, release.wait)  # the only worker is taken
        beat.start()
        await asyncio.sleep(0.05)  # a few beats: the job waits behind the blocked worker
        seen.append(beat.problems())
        now[0] += 6.0
        await asyncio.sleep(0.05)  # the loop beats on; the job still waits
        seen.append(beat.problems())
        release.set()
        await busy
        for _ in range(200):  # the job now runs and its answer reaches the loop
            if beat.job_since is None:
                break
            await asyncio.sleep(0.01)
        seen.append(beat.problems())
        beat.stop()
        now[0] += 6.0  # no beats any more: the loop is reported silent
        seen.append(beat.problems())
        return seen

    ok, blocked, recovered, silent = asyncio.run(scenario())
    assert ok == [] and recovered == []
    assert blocked == ["no worker thread answered for 6.0s"]
    assert silent and silent[0].startswith("the event loop did not run for")


# --- the notification protocol -------------------------------------------------------------------


def test_notify_socket_addresses_and_watchdog_period() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@acr/notify") == b"\0acr/notify"
    assert socket_address("") is None and socket_address("@") is None and socket_address("relative") is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "7"}, 7) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "8"}, 7) is None
    assert watchdog_interval({}, 7) is None and watchdog_interval({"WATCHDOG_USEC": "x"}, 7) is None


class Listener:
    """A unix datagram socket standing in for systemd's notification socket."""

    def __init__(self, address: str | bytes, check_port: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.2)
        self.name = "@" + address[1:].decode() if isinstance(address, bytes) else address
        self.check_port = check_port
        #: (time received, each line, whether the mirror's port accepted a connection right then)
        self.messages: list[tuple[float, list[str], bool]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, OSError):
                continue
            lines = data.decode().split("\n")
            accepts = "READY=1" in lines and self.check_port is not None and port_open("127.0.0.1", self.check_port)
            self.messages.append((time.monotonic(), lines, accepts))

    def lines(self) -> list[str]:
        return [line for _, lines, _ in self.messages for line in lines]

    def wait_for(self, line: str, count: int = 1, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.lines().count(line) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {line!r} within {timeout}s: {self.lines()}")
            time.sleep(0.05)

    def wait_prefix(self, prefix: str, after: float = 0.0, timeout: float = 60.0) -> float:
        """When the first line starting with `prefix` arrived after `after` (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            for t, lines, _ in list(self.messages):
                if t > after and any(line.startswith(prefix) for line in lines):
                    return t
            if time.monotonic() > deadline:
                raise AssertionError(f"no {prefix!r} within {timeout}s: {self.lines()}")
            time.sleep(0.05)

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def abstract_name() -> Iterator[bytes]:
    yield b"\0lifec-registry-test-" + os.urandom(6).hex().encode()


PLAIN_RUNMD = """\
``` start mirror
+ .runtime
: .mirror       {upstream}
+ .proxy        127.0.0.1:{port}
: .manifests    head, get
:   .login      access_token
: .blobs        get
:   .login      access_token
```
"""


def start_under_systemd(mirror: Mirror, notify: str, watchdog_usec: int, main_pid_is_watched: bool = True) -> subprocess.Popen[bytes]:
    """`acr mirror start` as systemd runs it: `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and
    `$WATCHDOG_PID` naming the main process (set by a shell that then becomes `acr`)."""
    env = {**os.environ, "NOTIFY_SOCKET": notify, "WATCHDOG_USEC": str(watchdog_usec), "PYTHONUNBUFFERED": "1"}
    pid = '"$$"' if main_pid_is_watched else "1"
    argv = ["sh", "-c", f'WATCHDOG_PID={pid} exec "$@"', "sh", ACR, "--runmd", str(mirror.runmd_path),
            "mirror", "start", "--hosts-dir", str(mirror.hosts_dir), *[a for s in mirror.sets for a in ("--set", s)]]
    log = open(mirror.log_path, "ab")
    proc = subprocess.Popen(argv, cwd=mirror.home, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


@pytest.mark.parametrize("shape", ["engine", "plain"])
def test_ready_after_the_port_accepts_watchdog_repeats_stopping_on_sigterm(
    tmp_path: Path, abstract_name: bytes, shape: str
) -> None:
    with ClosedPort() as upstream:
        port = free_port()
        runmd = None if shape == "engine" else PLAIN_RUNMD.replace("{upstream}", f"http://127.0.0.1:{upstream.port}")
        mirror = Mirror(tmp_path / "home", [f"http://127.0.0.1:{upstream.port}"], port=port, runmd=runmd, start=False)
        assert ("+ .engine" in mirror.runmd_path.read_text()) == (shape == "engine")
        listener = Listener(abstract_name, check_port=port)
        proc = start_under_systemd(mirror, listener.name, watchdog_usec=1_000_000)
        try:
            listener.wait_for("READY=1")
            wait_port("127.0.0.1", port, 5)
            ready_at = listener.wait_prefix("READY=1")
            for _ in range(3):  # the serving proxy's own pings (the engine also pings before)
                ready_at = listener.wait_prefix("WATCHDOG=1", after=ready_at)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            kill_group(proc)
            listener.close()
    lines = listener.lines()
    (ready,) = [m for m in listener.messages if "READY=1" in m[1]]
    assert ready[2], "READY=1 came before the mirror's port accepted connections"
    assert f"STATUS=serving on 127.0.0.1:{port}" in ready[1]
    assert lines.count("STOPPING=1") == 1, lines
    stopping = lines.index("STOPPING=1")
    assert "READY=1" in lines[:stopping] and "WATCHDOG=1" not in lines[stopping:], lines
    ready_at = ready[0]
    pings = [ready_at] + [t for t, ls, _ in listener.messages if "WATCHDOG=1" in ls and t > ready_at]
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert gaps and max(gaps) < 1.0, f"the watchdog (1 s) was fed too late: gaps {gaps}"


def test_no_watchdog_when_it_is_meant_for_another_process(tmp_path: Path, abstract_name: bytes) -> None:
    with ClosedPort() as upstream:
        runmd = PLAIN_RUNMD.replace("{upstream}", f"http://127.0.0.1:{upstream.port}")
        mirror = Mirror(tmp_path / "home", [], runmd=runmd, start=False)
        listener = Listener(abstract_name)
        proc = start_under_systemd(mirror, listener.name, watchdog_usec=200_000, main_pid_is_watched=False)
        try:
            listener.wait_for("READY=1")
            # Ten watchdog periods: a ping would have come.
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and "WATCHDOG=1" not in listener.lines():
                time.sleep(0.05)
        finally:
            kill_group(proc)
            listener.close()
    assert "WATCHDOG=1" not in listener.lines()


# --- /livez and the watchdog with blocked workers -------------------------------------------------


class SilentUpstream:
    """Accepts connections and never answers until `release()`: every request to it hangs."""

    def __init__(self) -> None:
        self.port = free_port()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.held: list[socket.socket] = []
        self.released = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            if self.released:
                conn.close()
            else:
                self.held.append(conn)

    def release(self) -> None:
        """Close every held connection, and each new one: the mirror's lookups fail at once."""
        self.released = True
        for conn in self.held:
            conn.close()
        self.held.clear()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.release()
        self.sock.close()


def poll(mirror: Mirror, path: str, status: int, timeout: float = 60.0) -> requests.Response:
    deadline = time.monotonic() + timeout
    while True:
        r = mirror.get(path, timeout=10)
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.1)


def test_livez_fails_while_every_worker_hangs_and_recovers(tmp_path: Path, abstract_name: bytes) -> None:
    upstream = SilentUpstream()
    listener = Listener(abstract_name)
    mirror = Mirror(tmp_path / "home", [f"http://127.0.0.1:{upstream.port}"],
                    sets=["acr_probe_timeout=2", "acr_upstream_timeout=60"], start=False)
    proc = start_under_systemd(mirror, listener.name, watchdog_usec=400_000)
    pool = concurrent.futures.ThreadPoolExecutor(16)
    try:
        listener.wait_for("READY=1")
        assert mirror.get("/livez").json() == {"status": "ok", "problems": []}
        listener.wait_for("WATCHDOG=1", count=2)
        # More hanging lookups than the mirror has worker threads.
        lookups = [pool.submit(requests.head, f"{mirror.url}/v2/app{i}/manifests/latest", timeout=90) for i in range(12)]
        r = poll(mirror, "/livez", 503)
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "fail" and r.json()["problems"][0].startswith("no worker thread answered for")
        assert mirror.get("/readyz").status_code == 503
        # The watchdog is no longer fed: the mirror says why instead.
        starving = listener.wait_prefix("STATUS=not answering: no worker thread answered")
        while time.monotonic() - starving < 1.0:  # five watchdog periods, still hanging
            assert mirror.get("/livez").status_code == 503
        released = time.monotonic()
        upstream.release()
        for f in lookups:
            f.result(timeout=60)
        r = poll(mirror, "/livez", 200)
        assert r.status_code == 200, r.text
        fed = listener.wait_prefix("WATCHDOG=1", after=released)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        kill_group(proc)
        listener.close()
        upstream.close()
    hungry = [t for t, ls, _ in listener.messages if "WATCHDOG=1" in ls and starving < t < released]
    assert not hungry, "the watchdog was fed while no worker answered"
    assert fed > released


# --- /readyz follows the credential ------------------------------------------------------------------


def jwt(exp: float) -> str:
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part({'exp': int(exp)})}.c2lnbmF0dXJl"


def test_readyz_follows_the_credentials_file_without_a_restart(tmp_path: Path) -> None:
    with ClosedPort() as upstream:
        mirror = Mirror(tmp_path / "home", [upstream.url], start=False)
        token = mirror.home / "access_token"
        try:
            mirror.start(timeout=60)
            # The port accepts before the chain's start hooks have all run: until then /readyz
            # says "not serving yet", as a kubelet would see it. No credentials file and no ACR
            # login to write one: anonymous pulls, ready.
            assert wait_for(lambda: mirror.get("/readyz").status_code == 200, timeout=30)
            assert mirror.get("/readyz").json() == {"status": "ok", "problems": []}
            token.write_text("\n")
            r = mirror.get("/readyz")
            assert (r.status_code, r.json()) == (503, {"status": "fail", "problems": ["access_token is unusable"]})
            token.write_text(jwt(time.time() - 120) + "\n")
            r = mirror.get("/readyz")
            assert r.status_code == 503 and r.json()["problems"][0].startswith("the refresh token in access_token expired")
            token.write_text(jwt(time.time() + 3600) + "\n")
            assert mirror.get("/readyz").status_code == 200
            assert mirror.head("/readyz").status_code == 200 and mirror.get("/livez").status_code == 200
            assert mirror.get("/livez").headers["Cache-Control"] == "no-store"
            assert direct_post(mirror, "/livez").status_code == 405
        finally:
            mirror.stop()
    assert jwt(time.time() + 3600) not in mirror.log_text()


def direct_post(mirror: Mirror, path: str) -> requests.Response:
    return requests.post(mirror.url + path, timeout=30, proxies={"http": "", "https": ""})


def test_probes_answer_loopback_clients_only(tmp_path: Path) -> None:
    from addons import catalog
    from addons.chain import AcrMirror
    from tests.harness.inprocess import drive
    from tests.test_endpoints import make_flow

    runmd = PLAIN_RUNMD.replace("{upstream}", "http://127.0.0.1:9").replace("{port}", "8578")
    mirror = AcrMirror(catalog.parse_text(runmd, str(tmp_path / "mirror.runmd")))
    for path in ("/livez", "/readyz"):
        flow = drive(mirror, make_flow(path, peer=("10.1.2.3", 40000)))
        assert flow.response is not None and flow.response.status_code == 403, path
        # Before `running` the proxy does not serve: not ready, but alive.
        flow = drive(mirror, make_flow(path, peer=("127.0.0.1", 40000)))
        assert flow.response.status_code == (503 if path == "/readyz" else 200), path
    assert json.loads(flow.response.content)["problems"] == ["the proxy is not serving yet"]


def test_a_runmd_loaded_again_says_ready_again_and_not_stopping(tmp_path: Path, abstract_name: bytes,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`:set acr_runmd=...` in mitmweb replaces the chain's addons while the mirror serves."""
    from mitmproxy import hooks
    from mitmproxy.test import taddons

    from addons.chain import AcrMirror

    listener = Listener(abstract_name)
    monkeypatch.setenv("NOTIFY_SOCKET", listener.name)
    first, second = tmp_path / "a.runmd", tmp_path / "b.runmd"
    for path, port in ((first, 8578), (second, 8579)):
        path.write_text(PLAIN_RUNMD.replace("{upstream}", "http://127.0.0.1:9").replace("{port}", str(port)))
    mirror = AcrMirror()

    async def reload() -> None:
        with taddons.context(mirror) as tctx:
            tctx.configure(mirror, acr_runmd=str(first))
            await tctx.master.addons.invoke_addon(mirror, hooks.RunningHook())  # `running` is async
            tctx.configure(mirror, acr_runmd=str(second))

    try:
        asyncio.run(reload())
        listener.wait_for("READY=1", count=2)
    finally:
        listener.close()
    assert "STATUS=serving on 127.0.0.1:8579" in listener.lines() and "STOPPING=1" not in listener.lines()
