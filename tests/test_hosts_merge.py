"""hosts.toml shared with other node-local mirrors: our table merged into Spegel's, Dragonfly's
and hand-written files (first by default, `position last` or `position N`), the rest of the file
kept byte for byte, taken out again exactly, put back while the mirror runs when another tool
rewrites the file (unless `keep-out`), and a real containerd trying the hosts in file order.

The SPEGEL_* and DRAGONFLY_* texts have the exact shape those tools write: Spegel's
`templateHosts` (pkg/oci/containerd.go: single-quoted keys, `dial_timeout = '200ms'`, no final
newline, no `server` in `_default`) and dfinit's `add_registries`/`add_default_registry`
(dragonfly-client-init/src/container_runtime/containerd.rs, toml_edit output: a
`[host."URL".header]` sub-table with `X-Dragonfly-Registry`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
from pathlib import Path
from typing import Callable

import pytest
import requests
from mitmproxy.test import taddons

from addons import catalog
from addons.node import hostsfile, hostsmerge
from addons.node.hostswatch import HostsWatch
from addons.runmd.syntax import RunmdError
from tests.harness.containerd import Ctr
from tests.harness.images import make_image, push_image
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import ClosedPort
from tests.harness.registry import Registry

SPEGEL = (
    "server = 'https://registry-1.docker.io'\n"
    "\n"
    "[host.'http://10.0.0.5:30020']\n"
    "capabilities = ['pull', 'resolve']\n"
    "dial_timeout = '200ms'\n"
    "\n"
    "[host.'http://10.0.0.5:30021']\n"
    "capabilities = ['pull', 'resolve']\n"
    "dial_timeout = '200ms'"
)
SPEGEL_DEFAULT = "[host.'http://10.0.0.5:30020']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'"
DRAGONFLY = (
    'server = "https://registry-1.docker.io"\n'
    "\n"
    '[host."http://127.0.0.1:4001"]\n'
    'capabilities = ["pull", "resolve"]\n'
    "\n"
    '[host."http://127.0.0.1:4001".header]\n'
    'X-Dragonfly-Registry = "https://registry-1.docker.io"\n'
)
DRAGONFLY_DEFAULT = '[host."http://127.0.0.1:4001"]\ncapabilities = ["pull", "resolve"]\n'
HAND = (
    "# corp mirror first, then the registry\n"
    'server = "https://registry-1.docker.io"   # keep\n'
    "\n"
    "# the proxy in the DMZ\n"
    '[host."https://corp-mirror:5000"]\n'
    '  capabilities = ["pull"]\n'
    '  ca = "/etc/ssl/corp.pem"\n'
    "\n"
)
SHAPES = {
    "spegel": (SPEGEL, ["http://10.0.0.5:30020", "http://10.0.0.5:30021"]),
    "spegel-default": (SPEGEL_DEFAULT, ["http://10.0.0.5:30020"]),
    "dragonfly": (DRAGONFLY, ["http://127.0.0.1:4001"]),
    "dragonfly-default": (DRAGONFLY_DEFAULT, ["http://127.0.0.1:4001"]),
    "hand": (HAND, ["https://corp-mirror:5000"]),
}
OURS = "http://127.0.0.1:8578"


def hosts_file(position: int | None = 0, keep_out: bool = False, folder: str = "docker.io") -> hostsfile.HostsFile:
    host = hostsfile.MirrorHost(OURS, ("pull", "resolve"), hostsfile.HostOptions(dial_timeout="2s"), position, keep_out)
    return hostsfile.HostsFile(folder, "https://registry-1.docker.io", (host,))


def put(tmp_path: Path, text: str, folder: str = "docker.io") -> Path:
    (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    target = tmp_path / folder / "hosts.toml"
    target.write_bytes(text.encode())
    return target


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("position, where", [(0, 0), (None, -1), (1, 1)], ids=["first", "last", "position-2"])
def test_merge_keeps_the_other_tool_and_is_undone_exactly(
    tmp_path: Path, shape: str, position: int | None, where: int
) -> None:
    text, theirs = SHAPES[shape]
    target = put(tmp_path, text)
    f = hosts_file(position)
    assert "table added" in hostsfile.install(f, tmp_path)
    merged = target.read_text()
    order = hostsmerge.host_urls(merged)
    expected = list(theirs)
    expected.insert(len(theirs) if where == -1 else min(where, len(theirs)), OURS)
    assert order == expected
    # Every byte of theirs is still there, in order: taking our marked lines out gives the file back.
    our_block = hostsfile.block(f.hosts[0]).text
    assert our_block.splitlines()[0].endswith("# " + hostsmerge.MARK)
    assert our_block in merged
    # Installing twice changes nothing.
    assert hostsfile.install(f, tmp_path).endswith("unchanged (the mirror's table is in it)")
    assert target.read_text() == merged
    assert hostsfile.routing(f, tmp_path)["routes_through_mirror"] is True
    assert "the rest is as it was" in hostsfile.remove(tmp_path, "docker.io")
    back = target.read_text()
    if order[-1] == OURS and not text.endswith("\n"):
        # Spegel writes no final newline; a table after its last one needs one, and it stays.
        assert back == text + "\n"
    else:
        assert back == text
    assert list(tmp_path.joinpath("docker.io").iterdir()) == [target]  # no backup of their file


def test_our_table_goes_in_front_of_their_comment_and_values_stay_byte_for_byte(tmp_path: Path) -> None:
    target = put(tmp_path, HAND)
    hostsfile.install(hosts_file(), tmp_path)
    block = hostsfile.block(hosts_file().hosts[0]).text
    assert target.read_text() == HAND.replace("# the proxy in the DMZ\n", block + "\n# the proxy in the DMZ\n")


def test_our_table_ends_at_the_next_table_even_without_the_blank_line(tmp_path: Path) -> None:
    target = put(tmp_path, DRAGONFLY)
    hostsfile.install(hosts_file(), tmp_path)
    block = hostsfile.block(hosts_file().hosts[0]).text
    target.write_text(target.read_text().replace(block + "\n", block))  # a tool dropped the blank line
    hostsfile.remove(tmp_path, "docker.io")
    assert target.read_text() == DRAGONFLY


def test_a_file_that_is_not_toml_is_left_alone_with_one_line(tmp_path: Path) -> None:
    target = put(tmp_path, "server = 'https://x\n[host.'a']\n")
    with pytest.raises(hostsfile.HostsError) as info:
        hostsfile.install(hosts_file(), tmp_path)
    assert "not valid TOML" in str(info.value) and "\n" not in str(info.value)
    assert target.read_text() == "server = 'https://x\n[host.'a']\n"


def test_a_hand_edited_table_of_ours_is_not_guessed_at(tmp_path: Path) -> None:
    target = put(tmp_path, DRAGONFLY)
    hostsfile.install(hosts_file(), tmp_path)
    edited = target.read_text().replace('dial_timeout = "2s"\n', 'dial_timeout = "2s"\n\nskip_verify = true\n')
    target.write_text(edited)
    with pytest.raises(hostsfile.HostsError) as info:
        hostsfile.remove(tmp_path, "docker.io")
    assert "edited by hand" in str(info.value)
    assert target.read_text() == edited


def test_their_entry_for_our_address_is_kept_and_not_doubled(tmp_path: Path) -> None:
    text = f'[host."{OURS}"]\ncapabilities = ["pull"]\n'
    target = put(tmp_path, text)
    assert hostsfile.install(hosts_file(), tmp_path).endswith("unchanged (the mirror's table is in it)")
    assert target.read_text() == text
    assert hostsfile.routing(hosts_file(), tmp_path)["routes_through_mirror"] is True
    assert hostsfile.remove(tmp_path, "docker.io").endswith("no table of the mirror in it, left alone")


# --- .host inputs ------------------------------------------------------------------------------


def compiled_of(host_line: str, home: Path) -> catalog.Compiled:
    (home / "mirror.runmd").write_text(
        "``` start mirror\n+ .runtime\n: .mirror docker.io\n" + host_line + "\n```\n"
    )
    return catalog.load(str(home / "mirror.runmd"))


@pytest.mark.parametrize("line, position, keep_out", [
    (": .host 127.0.0.1:8578", 0, False),
    (": .host 127.0.0.1:8578, resolve, pull, position last", None, False),
    (": .host 127.0.0.1:8578, pull, position 3, keep-out", 2, True),
    (": .host 127.0.0.1:8578, position first, resolve", 0, False),
])
def test_host_inputs_position_and_keep_out(tmp_path: Path, line: str, position: int | None, keep_out: bool) -> None:
    [f] = hostsfile.plan(compiled_of(line, tmp_path))
    assert (f.hosts[0].position, f.hosts[0].keep_out) == (position, keep_out)


@pytest.mark.parametrize("line, fragment", [
    (": .host 127.0.0.1:8578, position 0", "position N' (N from 1)"),
    (": .host 127.0.0.1:8578, position middle", "got 'position middle'"),
    (": .host 127.0.0.1:8578, position last, position 2", "'position' is given twice"),
    (": .host 127.0.0.1:8578, keepout", "other inputs: position first|last|N, keep-out"),
])
def test_bad_host_inputs_name_the_line(tmp_path: Path, line: str, fragment: str) -> None:
    with pytest.raises(RunmdError) as info:
        compiled_of(line, tmp_path)
    assert str(info.value).startswith(f"{tmp_path}/mirror.runmd:4: ") and fragment in str(info.value)


# --- while the mirror runs: another tool rewrites the file ----------------------------------------


def watch_of(tmp_path: Path, line: str) -> tuple[HostsWatch, Path]:
    home = tmp_path / "home"
    home.mkdir()
    watch = HostsWatch(compiled_of(line, home))
    watch.hosts_dir = tmp_path / "certs.d"
    return watch, tmp_path / "certs.d" / "docker.io" / "hosts.toml"


def test_a_rewrite_by_another_tool_is_logged_once_and_our_table_put_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch, target = watch_of(tmp_path, ": .host 127.0.0.1:8578, resolve, pull")
    [f] = watch.files()
    hostsfile.install(f, watch.hosts_dir)
    watch.check()  # the first look only remembers
    caplog.set_level(logging.INFO)
    target.write_text(SPEGEL)  # Spegel starts and writes the file whole
    watch.check()
    watch.check()
    rewritten = [r for r in caplog.records if "was rewritten" in r.getMessage()]
    assert len(rewritten) == 1 and "putting the mirror's table back" in rewritten[0].getMessage()
    assert hostsmerge.host_urls(target.read_text()) == [OURS, "http://10.0.0.5:30020", "http://10.0.0.5:30021"]
    [status] = watch.routing()
    assert status["routes_through_mirror"] and status["first"] and status["state"] == "shared"
    # Spegel takes the whole folder away: the mirror's own file comes back.
    target.unlink()
    watch.check()
    assert hostsfile.is_ours(target.read_bytes())


def test_keep_out_only_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watch, target = watch_of(tmp_path, ": .host 127.0.0.1:8578, resolve, pull, keep-out")
    [f] = watch.files()
    hostsfile.install(f, watch.hosts_dir)
    watch.check()
    caplog.set_level(logging.INFO)
    target.write_text(DRAGONFLY)
    watch.check()
    watch.check()
    assert [r.getMessage() for r in caplog.records if "was rewritten" in r.getMessage()] == [
        f"{target} was rewritten and no longer lists the mirror; keep-out: leaving it so"
    ]
    assert target.read_text() == DRAGONFLY
    [status] = watch.routing()
    assert status["routes_through_mirror"] is False and status["hosts"] == ["http://127.0.0.1:4001"]


def test_the_watch_runs_off_the_event_loop_at_its_interval(tmp_path: Path) -> None:
    watch, target = watch_of(tmp_path, ": .host 127.0.0.1:8578")
    [f] = watch.files()
    hosts_dir = watch.hosts_dir
    hostsfile.install(f, hosts_dir)

    async def run() -> None:
        with taddons.context(watch) as tctx:
            tctx.configure(watch, acr_hosts_dir=str(hosts_dir), acr_hosts_check="0.05")
            watch.running()
            await asyncio.sleep(0.3)
            target.write_text(DRAGONFLY)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if OURS in hostsmerge.host_urls(target.read_text()):
                    break
            watch.done()

    asyncio.run(run())
    assert hostsmerge.host_urls(target.read_text()) == [OURS, "http://127.0.0.1:4001"]


def test_check_interval_is_at_most_30_seconds(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    watch, _ = watch_of(tmp_path, ": .host 127.0.0.1:8578")
    with taddons.context(watch) as tctx:
        for text, seconds in (("30", 30.0), ("0.5", 0.5), ("500ms", 0.5), ("30s", 30.0)):
            tctx.configure(watch, acr_hosts_check=text)
            assert watch.interval == seconds
        for bad in ("31", "1m", "0", "soon", "-1"):
            with pytest.raises(exceptions.OptionsError, match="acr_hosts_check"):
                tctx.configure(watch, acr_hosts_check=bad)
        assert watch.interval == 30.0


# --- a real containerd: this mirror first, then the other mirror, then server ------------------------

RUNMD = """\
``` start mirror
+ .runtime
: .mirror       {registry}
: .host         127.0.0.1:{{port}}, resolve, pull
{extra}
+ .proxy        127.0.0.1:{{port}}
: .manifests    head, get
:   .resolve    application/vnd.oci.image.index.v1+json
: .blobs        head, get
:   .pull
```
"""


@pytest.mark.e2e
def test_containerd_tries_the_mirror_then_the_other_mirror_then_server(
    containerd: Ctr, registry: Registry, repo_name: str, tmp_path: Path, closed_port: ClosedPort,
    mirror_factory: Callable[..., Mirror], registry_factory: Callable[..., Registry],
) -> None:
    """Spegel's file shape, with a second real registry as 'the other mirror' and `server` closed."""
    other = registry_factory("anonymous")
    hosts_dir = tmp_path / "certs.d"
    folder = hosts_dir / registry.host
    folder.mkdir(parents=True)
    spegel_like = (
        f"server = '{closed_port.url}'\n\n[host.'{other.url}']\ncapabilities = ['pull', 'resolve']\ndial_timeout = '200ms'"
    )
    (folder / "hosts.toml").write_text(spegel_like)
    # v1 is in the upstream the mirror serves; v2 only in the other mirror (the mirror answers 404).
    v1 = make_image({"v1.txt": b"through this mirror\n"})
    push_image(registry, repo_name, "v1", v1)
    v2 = make_image({"v2.txt": b"from the other mirror\n"})
    push_image(other, repo_name, "v2", v2)
    v3 = make_image({"v3.txt": b"from the other mirror, this mirror down\n"})
    push_image(other, repo_name, "v3", v3)
    m = mirror_factory(registry.url, runmd=RUNMD.format(registry=registry.url, extra=""), start=False,
                       args=["--hosts-dir", str(hosts_dir)])
    m.start()
    assert hostsmerge.host_urls((folder / "hosts.toml").read_text()) == [f"http://127.0.0.1:{m.port}", other.url]

    r = containerd.pull(f"{registry.host}/{repo_name}:v1", hosts_dir=hosts_dir)
    assert r.returncode == 0, r.stderr
    assert containerd.image_target(f"{registry.host}/{repo_name}:v1") == v1.digest
    assert f"manifests {repo_name}:v1" in m.log_text()
    assert f"/v2/{repo_name}/manifests/v1" not in other.log_text()  # the mirror answered first

    r = containerd.pull(f"{registry.host}/{repo_name}:v2", hosts_dir=hosts_dir)
    assert r.returncode == 0, r.stderr
    assert containerd.image_target(f"{registry.host}/{repo_name}:v2") == v2.digest
    assert f"manifests {repo_name}:v2" in m.log_text()  # asked first, answered 404

    status = json.loads(requests.get(f"{m.url}/status", timeout=10).text)
    [hosts] = status["hosts_toml"]
    assert hosts["routes_through_mirror"] and hosts["first"] and hosts["hosts"][1] == other.url

    m.stop()  # the mirror is down: the other mirror still serves
    r = containerd.pull(f"{registry.host}/{repo_name}:v3", hosts_dir=hosts_dir)
    assert r.returncode == 0, r.stderr
    assert containerd.image_target(f"{registry.host}/{repo_name}:v3") == v3.digest

    other.stop()  # both mirrors down: containerd goes on to `server`, a closed port, and fails
    r = containerd.pull(f"{registry.host}/{repo_name}:v1-missing", hosts_dir=hosts_dir, timeout=60)
    assert r.returncode != 0
    assert str(closed_port.port) in r.stderr + r.stdout

    removed = subprocess.run([ACR, "--runmd", str(m.runmd_path), "hosts", "remove",
                              "--hosts-dir", str(hosts_dir)], capture_output=True, text=True, timeout=60)
    assert removed.returncode == 0, removed.stderr
    assert (folder / "hosts.toml").read_text() == spegel_like
