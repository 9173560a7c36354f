"""The `acr` command as an operator runs it: a subprocess from the venv, in a scratch folder.

`acr mirror start` and `mitmdump -s acr_addons.py` are started for real on free loopback
ports; every process is started in its own session and killed in `finally`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from addons.teleport.teleport import TeleportConfig
from addons import catalog
from tests.harness.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed", allow_module_level=True)
    return found


ACR = _tool("acr")
MITMDUMP = _tool("mitmdump")


def run_acr(cwd: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ACR, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, start_new_session=True
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("acr: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def runmd_lines(path: Path) -> list[str]:
    return [line.rstrip() for line in path.read_text().splitlines()]


# --- acr init --------------------------------------------------------------------


def test_init_writes_an_acr_mirror_runmd(tmp_path: Path) -> None:
    result = run_acr(tmp_path, "--registry", "example", "init")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "mirror.runmd"
    lines = runmd_lines(path)
    assert ": .login-acr    example" in lines
    assert ": .install      access_token" in lines
    assert ": .mirror       example.azurecr.io" in lines
    assert ": .host         localhost:8578, resolve, pull" in lines
    assert "+ .proxy          localhost:8578" in lines
    compiled = catalog.load(path)
    runtime = [s.plugin for r in compiled.document.roots("runtime") for s in r.steps]
    # The install event's node check runs first, then the start event's steps.
    assert runtime == ["node-check", "login-acr", "install", "mirror", "host"]
    proxy = [s.plugin for r in compiled.document.roots("proxy") for s in r.steps]
    assert proxy == ["manifests", "login", "authn", "resolve", "discover", "teleport", "blobs", "login", "authn", "pull", "tags", "login", "authn", "pull"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    path = tmp_path / "mirror.runmd"
    path.write_text("mine\n")
    result = run_acr(tmp_path, "--registry", "example", "init")
    assert_one_line_error(result, "--force")
    assert path.read_text() == "mine\n"

    result = run_acr(tmp_path, "--registry", "example", "init", "--force")
    assert result.returncode == 0, result.stderr
    assert ": .login-acr    example" in runmd_lines(path)


def test_init_with_upstream_leaves_acr_login_out(tmp_path: Path) -> None:
    result = run_acr(tmp_path, "init", "--upstream", "http://127.0.0.1:5000")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "mirror.runmd"
    text = path.read_text()
    assert ".login-acr" not in text
    assert ": .mirror       http://127.0.0.1:5000" in runmd_lines(path)
    compiled = catalog.load(path)
    (_, mirror), = compiled.document.steps("mirror")
    assert compiled.config(mirror).base_url == "http://127.0.0.1:5000"


def test_init_with_registry_and_upstream_still_leaves_acr_login_out(tmp_path: Path) -> None:
    result = run_acr(tmp_path, "--registry", "example", "init", "--upstream", "http://127.0.0.1:5000")
    assert result.returncode == 0, result.stderr
    assert ".login-acr" not in (tmp_path / "mirror.runmd").read_text()


def test_init_options_take_effect(tmp_path: Path) -> None:
    result = run_acr(
        tmp_path,
        "--registry", "example",
        "--registry-host", "azurecr.cn",
        "init",
        "--mirror-address", "127.0.0.1:9000",
        "--artifact-type", "application/vnd.azure.artifact.streaming.v1",
        "--artifact-type", "dadi.image.v1",
        "--teleport-format", "OverlayBD",
    )
    assert result.returncode == 0, result.stderr
    compiled = catalog.load(tmp_path / "mirror.runmd")
    steps = {s.plugin: s for _, s in compiled.document.steps()}
    assert steps["login-acr"].input == "example"
    assert steps["mirror"].input == "example.azurecr.cn"
    assert steps["host"].input == "127.0.0.1:9000, resolve, pull"
    assert [r.input for r in compiled.document.roots("proxy")] == ["127.0.0.1:9000"]
    assert steps["discover"].input == "application/vnd.azure.artifact.streaming.v1, dadi.image.v1"
    assert steps["teleport"].input == "OverlayBD, auto"
    assert compiled.config(steps["teleport"]) == TeleportConfig(("overlaybd",), "auto")


def test_an_option_of_a_mitmproxy_addon_the_mirror_does_not_run_is_a_one_line_error(tmp_path: Path) -> None:
    """The mirror's master leaves out mitmdump's playback and rewriting addons: their options
    are refused at start instead of doing nothing."""
    result = run_acr(tmp_path, "init", "--upstream", "http://127.0.0.1:5000", "--mirror-address", f"127.0.0.1:{free_port()}")
    assert result.returncode == 0, result.stderr
    result = run_acr(tmp_path, "--runmd", str(tmp_path / "mirror.runmd"), "mirror", "serve", "--set", "anticache=true")
    assert_one_line_error(result, "bad option", "anticache")


def test_init_with_a_teleport_format_the_mirror_rejects_writes_nothing(tmp_path: Path) -> None:
    result = run_acr(tmp_path, "init", "--upstream", "http://127.0.0.1:5000", "--teleport-format", "stargz")
    assert_one_line_error(result, "unknown format 'stargz'")
    assert not (tmp_path / "mirror.runmd").exists()


def test_init_without_registry_or_upstream_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run_acr(tmp_path, "init"), "--registry")
    assert not (tmp_path / "mirror.runmd").exists()


def test_init_honours_runmd_path(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    result = run_acr(tmp_path, "--runmd", "conf/node.runmd", "--registry", "example", "init")
    assert result.returncode == 0, result.stderr
    assert ": .mirror       example.azurecr.io" in runmd_lines(tmp_path / "conf" / "node.runmd")
    assert not (tmp_path / "mirror.runmd").exists()


def test_init_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    result = run_acr(tmp_path, "--runmd", "missing/mirror.runmd", "--registry", "example", "init")
    assert_one_line_error(result, "missing")


# --- acr dump --------------------------------------------------------------------

SMALL = """\
# Node mirror

``` start mirror
: work_dir .symbol .world/x
+ .runtime
: .mirror       http://127.0.0.1:5000
: .host         localhost:8578, resolve, pull
+ .proxy        localhost:8578
: .manifests    head, get
:   .login      access_token
: .blobs        get
:   .pull
```
"""

SMALL_DUMP = [
    'block "start mirror" (line 3)',
    '     work_dir .symbol ".world/x"',
    "  1: runtime",
    '  2:   mirror "http://127.0.0.1:5000"',
    '  3:   host "localhost:8578, resolve, pull"',
    '  4: proxy "localhost:8578"',
    '  5:   manifests "head, get"  # no step answers: forwarded to the upstream as is',
    '  6:     login "access_token"',
    '  7:   blobs "get"',
    "  8:     pull",
]


def test_dump_prints_numbered_steps(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(SMALL)
    result = run_acr(tmp_path, "dump")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["# mirror.runmd", *SMALL_DUMP]


def test_dump_honours_runmd_path(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "node.runmd").write_text(SMALL)
    result = run_acr(tmp_path, "--runmd", "conf/node.runmd", "dump")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["# conf/node.runmd", *SMALL_DUMP]


def test_dump_of_the_seed_pads_ids(tmp_path: Path) -> None:
    assert run_acr(tmp_path, "--registry", "example", "init").returncode == 0
    result = run_acr(tmp_path, "dump")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The seed's shape, an engine over the install and start events, ids running on.
    assert [line.split(" (line ")[0] for line in lines[1:7]] == [
        'block "mirror"', "   1: engine", '   2:   event "install"', '   3:   event "start"', "   4:   loop",
        'block "install mirror"',
    ]
    assert "   7: runtime" in lines
    assert '   8:   login-acr "example"' in lines
    assert '  19:   blobs "head, get"' in lines
    assert '  22:     pull "client"' in lines  # ACR: containerd follows storage redirects itself


# --- one-line errors -------------------------------------------------------------

BAD = "``` start mirror\n+ .runtime\n: .frobnicate x\n```\n"


def _runmd(port: int, host: str = "localhost", *, install: bool = False, upstream_port: int = 9) -> str:
    install_line = ": .install      somefile\n" if install else ""
    return (
        "# test mirror\n\n"
        "``` start mirror\n"
        "+ .runtime\n"
        f"{install_line}"
        f": .mirror       http://127.0.0.1:{upstream_port}\n"
        f"+ .proxy        {host}:{port}\n"
        ": .manifests    head, get\n"
        ": .blobs        get\n"
        "```\n"
    )


@pytest.mark.parametrize("command", [["dump"], ["mirror", "start"]])
def test_missing_runmd_is_one_line(tmp_path: Path, command: list[str]) -> None:
    assert_one_line_error(run_acr(tmp_path, *command), "mirror.runmd")


@pytest.mark.parametrize("command", [["dump"], ["mirror", "start"]])
def test_malformed_runmd_is_one_line_with_file_and_line(tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "mirror.runmd").write_text(BAD)
    line = assert_one_line_error(run_acr(tmp_path, *command), ".frobnicate")
    assert line.startswith("acr: mirror.runmd:3: ")


def test_unknown_id_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(_runmd(free_port()))
    assert_one_line_error(run_acr(tmp_path, "mirror", "start", "--id", "99"), "99")


def test_non_loopback_address_needs_allow_remote(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(_runmd(free_port(), host="0.0.0.0"))
    assert_one_line_error(run_acr(tmp_path, "mirror", "start"), "0.0.0.0", "--allow-remote")


def test_missing_install_file_fails_naming_the_step(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(_runmd(free_port(), install=True))
    result = run_acr(tmp_path, "mirror", "start")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("acr: ")]
    assert len(errors) == 1, result.stderr
    assert "step 2" in errors[0] and ".install" in errors[0] and "somefile" in errors[0]
    assert not (tmp_path / ".work" / "somefile").exists()


# --- serving -------------------------------------------------------------------


@contextlib.contextmanager
def started(argv: list[str], cwd: Path, port: int, timeout: float = 20) -> Iterator[subprocess.Popen[bytes]]:
    """Start a server process and wait until it accepts connections on 127.0.0.1:port."""
    out = open(cwd / "server.out", "wb")
    err = open(cwd / "server.err", "wb")
    proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv} exited {proc.returncode} before listening:\n{_logs(cwd)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{argv} did not listen on {port} within {timeout}s:\n{_logs(cwd)}")
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        out.close()
        err.close()


def _logs(cwd: Path) -> str:
    return "".join(
        (cwd / name).read_text(errors="replace") if (cwd / name).exists() else "" for name in ("server.out", "server.err")
    )


def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def assert_ping(port: int) -> None:
    status, headers, body = get(port, "/v2/")
    assert status == 200
    assert json.loads(body) == {}
    assert headers["content-type"] == "application/json"
    assert headers["docker-distribution-api-version"] == "registry/2.0"


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals, cwd: Path) -> int:
    proc.send_signal(sig)
    try:
        return proc.wait(timeout=8)
    except subprocess.TimeoutExpired:
        pytest.fail(f"no exit within 8 s of {sig.name}:\n{_logs(cwd)}")


def listeners(port: int) -> set[str]:
    """The local addresses of sockets listening on `port`, from /proc/net/tcp{,6}."""
    found: set[str] = set()
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        table = Path("/proc/net") / name
        if not table.exists():
            continue
        for row in table.read_text().splitlines()[1:]:
            fields = row.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word of the address in host byte order.
            packed = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
            found.add(socket.inet_ntop(family, packed))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_mirror_start_serves_on_loopback_and_exits_cleanly_on_signal(tmp_path: Path, sig: signal.Signals) -> None:
    port = free_port()
    (tmp_path / "mirror.runmd").write_text(_runmd(port, install=True, upstream_port=free_port()))
    (tmp_path / "somefile").write_text("s3cret\n")
    with started([ACR, "mirror", "start"], tmp_path, port) as proc:
        assert_ping(port)
        if sys.platform.startswith("linux"):
            assert listeners(port) == {"127.0.0.1"}
        installed = tmp_path / ".work" / "somefile"
        assert installed.read_text() == "s3cret\n"
        assert stat.S_IMODE(installed.stat().st_mode) == 0o600
        assert stop(proc, sig, tmp_path) == 0


def test_mirror_start_id_skips_earlier_runtime_steps(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "mirror.runmd").write_text(_runmd(port, install=True, upstream_port=free_port()))
    # Ids: 1 runtime, 2 install, 3 mirror, 4 proxy. No somefile: the install step would fail.
    with started([ACR, "mirror", "start", "--id", "3"], tmp_path, port) as proc:
        assert_ping(port)
        assert not (tmp_path / ".work" / "somefile").exists()
        assert stop(proc, signal.SIGTERM, tmp_path) == 0


def test_mirror_start_on_a_taken_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "mirror.runmd").write_text(_runmd(port))
        result = run_acr(tmp_path, "mirror", "start", timeout=20)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("acr: ")]
    assert len(errors) == 1 and str(port) in errors[0], result.stderr


def raw_request(port: int, data: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def test_mitmdump_with_acr_addons_serves_the_same_chain(tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "mirror.runmd").write_text(_runmd(port, upstream_port=free_port()))
    argv = [
        MITMDUMP,
        "-s", str(ROOT / "acr_addons.py"),
        "--mode", f"reverse:http://127.0.0.1:9@127.0.0.1:{port}",
        "--set", "connection_strategy=lazy",
        "--set", f"acr_runmd={tmp_path / 'mirror.runmd'}",
    ]
    with started(argv, tmp_path, port) as proc:
        assert_ping(port)
        status, body = raw_request(
            port, b"GET http://example.com/v2/ HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"
        )
        assert status == 400
        (error,) = json.loads(body)["errors"]
        assert error["code"] and error["message"]
        # A routed request that no step answers is refused by the tail, never sent to the placeholder.
        status, _, _ = get(port, "/v2/library/alpine/manifests/latest?ns=other.example.com")
        assert status == 404
        assert stop(proc, signal.SIGTERM, tmp_path) == 0


def test_acr_help_does_not_import_mitmproxy_or_the_plugins() -> None:
    """`acr --help` and usage errors answer at once: the plugins (and mitmproxy under them, about
    1.5 s of CPU) load only for a command that reads a runmd or serves."""
    import sys

    probe = ("import sys, addons.cli; "
             "print(sorted(m for m in sys.modules if m.startswith(('mitmproxy.addons', 'mitmproxy.proxy', 'mitmproxy.http', "
             "'mitmproxy.master', 'addons.proxy', 'addons.catalog'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[]", out
    assert run_acr(Path.cwd(), "--help").returncode == 0
