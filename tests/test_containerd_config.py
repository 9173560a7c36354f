"""containerd's config.toml edited with tomlkit: golden files for containerd 1.x
(versions 1 and 2) and 2.x (version 3) configs with comments, `acr containerd configure` with
its dry run, backup and second run, the `.containerd-config` and `.node-check` steps, and a real
containerd 1.6 whose CRI pulls through the mirror because of the edited `config_path` alone.

Set LIFEC_UPDATE_GOLDEN=1 to rewrite the golden outputs after a deliberate change (and read the
diff before committing it).
"""

from __future__ import annotations

import difflib
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Optional

import pytest

from addons import catalog
from addons.node.containerd_config import (
    BACKUP_SUFFIX,
    SCHEMAS,
    ConfigError,
    SNAPSHOTTER_SOCKETS,
    configure_text,
)
from addons.node.node_check import check_node, parse_containerd_version
from addons.runmd.runtime import Runtime
from tests.harness.containerd import Containerd, write_hosts_toml
from tests.harness.cri import pull_image
from tests.harness.images import make_image, push_image
from tests.harness.ports import ClosedPort
from tests.harness.registry import Registry

ACR = str(Path(sys.executable).with_name("acr"))
GOLDEN = Path(__file__).parent / "golden" / "containerd"
UPDATE = os.environ.get("LIFEC_UPDATE_GOLDEN") == "1"
#: The keys an edit may change in place; every other line of the input must stay as it is.
EDITED_KEYS = ("config_path", "snapshotter", "disable_snapshot_annotations")


def lookup(data: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        data = data[key]
    return data


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert path.exists(), f"no golden file {path}: run with LIFEC_UPDATE_GOLDEN=1 once"
    expected = path.read_text()
    assert text == expected, "".join(difflib.unified_diff(expected.splitlines(True), text.splitlines(True), str(path), "now"))


def assert_only_additions_and_edited_keys(old: str, new: str) -> None:
    """Comments and unrelated settings byte for byte: lines are only added, or one of the
    keys we set changes its value in place."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        assert op != "delete", a[i1:i2]
        if op == "replace":
            assert i2 - i1 <= j2 - j1, (a[i1:i2], b[j1:j2])
            for line in a[i1:i2]:
                assert line.strip().split("=")[0].strip() in EDITED_KEYS, line


CASES = [
    ("v2-default", 2),  # containerd 1.6's own `containerd config default`
    ("v2-commented", 2),
    ("v2-out-of-order", 2),
    ("v1-legacy", 1),
    ("v3-commented", 3),
]


@pytest.mark.parametrize("snapshotter", [None, "overlaybd", "stargz"], ids=["config_path", "overlaybd", "stargz"])
@pytest.mark.parametrize(("name", "version"), CASES, ids=[c[0] for c in CASES])
def test_golden(name: str, version: int, snapshotter: Optional[str]) -> None:
    source = (GOLDEN / f"{name}.toml").read_text()
    edit = configure_text(source, hosts_dir="/etc/containerd/certs.d", snapshotter=snapshotter)
    check_golden(f"{name}{'.' + snapshotter if snapshotter else ''}.out.toml", edit.new)
    assert edit.changed and edit.schema.version == version
    assert_only_additions_and_edited_keys(source, edit.new)
    schema = SCHEMAS[version]
    data = tomllib.loads(edit.new)
    assert lookup(data, schema.registry)["config_path"] == "/etc/containerd/certs.d"
    if snapshotter:
        assert data["proxy_plugins"][snapshotter] == {"type": "snapshot", "address": SNAPSHOTTER_SOCKETS[snapshotter]}
        table = lookup(data, schema.snapshotter)
        assert table["snapshotter"] == snapshotter and table["disable_snapshot_annotations"] is False
    # Idempotent: the second run changes nothing, not even whitespace.
    again = configure_text(edit.new, hosts_dir="/etc/containerd/certs.d", snapshotter=snapshotter)
    assert not again.changed and again.new == edit.new and again.changes == []


@pytest.mark.skipif(shutil.which("containerd") is None, reason="containerd is not installed")
@pytest.mark.parametrize("name", ["v1-legacy", "v2-default", "v2-commented", "v2-out-of-order"])
@pytest.mark.parametrize("snapshotter", ["overlaybd", "stargz"])
def test_containerd_1x_reads_what_the_golden_files_set(name: str, snapshotter: str) -> None:
    """containerd's own parser (`config dump` merges the file into its defaults) sees the
    CRI settings where we put them, for every containerd 1.x schema."""
    dump = subprocess.run(
        ["containerd", "--config", str(GOLDEN / f"{name}.{snapshotter}.out.toml"), "config", "dump"],
        capture_output=True, text=True, timeout=30,
    )
    assert dump.returncode == 0, dump.stderr
    cri = tomllib.loads(dump.stdout)["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == "/etc/containerd/certs.d"
    assert cri["containerd"]["snapshotter"] == snapshotter
    assert cri["containerd"]["disable_snapshot_annotations"] is False
    assert tomllib.loads(dump.stdout)["proxy_plugins"][snapshotter]["type"] == "snapshot"


def test_golden_missing_file_becomes_a_minimal_version_2() -> None:
    edit = configure_text(None, hosts_dir="/etc/containerd/certs.d")
    check_golden("missing.out.toml", edit.new)
    data = tomllib.loads(edit.new)
    assert data["version"] == 2
    assert data["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_config_path_already_set_is_kept_unless_a_folder_is_asked_for() -> None:
    text = '\nversion = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"  # both\n'
    kept = configure_text(text)
    assert not kept.changed and kept.hosts_dirs == ("/etc/containerd/certs.d", "/etc/docker/certs.d")
    assert not configure_text(text, hosts_dir="/etc/docker/certs.d").changed
    moved = configure_text(text, hosts_dir="/srv/certs.d")
    assert moved.new == text.replace("/etc/containerd/certs.d:/etc/docker/certs.d", "/srv/certs.d")
    assert moved.changes == ["plugins.\"io.containerd.grpc.v1.cri\".registry.config_path: "
                             "'/etc/containerd/certs.d:/etc/docker/certs.d' -> '/srv/certs.d'"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n  endpoint = ["https://m"]\n', "mirrors"),
        ('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.configs."r.io".tls]\n  insecure_skip_verify = true\n', "tls"),
        ("version = 4\n", "unsupported config version 4"),
        ("version = 2\n[plugins\n", "not valid TOML"),
        ('version = 2\nplugins = "none"\n', "is not a table"),
    ],
)
def test_what_cannot_be_edited_safely_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        configure_text(text)


def test_disabled_cri_is_noted() -> None:
    edit = configure_text('disabled_plugins = ["cri"]\nversion = 2\n')
    assert edit.changed and any("disabled_plugins" in n for n in edit.notes)


# --- acr containerd configure -------------------------------------------------------------


def acr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, *args], capture_output=True, text=True, timeout=30)


def test_cli_dry_run_backup_idempotence_and_restart_note(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    original = (GOLDEN / "v2-commented.toml").read_text()
    config.write_text(original)
    config.chmod(0o640)
    backup = tmp_path / f"config.toml{BACKUP_SUFFIX}"

    dry = acr("containerd", "configure", "--config", str(config), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"--- {config}\n+++ {config}\n@@ ")
    assert '+    config_path = "/etc/containerd/certs.d"\n' in dry.stdout
    assert "dry run, nothing written" in dry.stdout and "restart containerd" in dry.stdout
    assert config.read_text() == original and not backup.exists()

    first = acr("containerd", "configure", "--config", str(config))
    assert first.returncode == 0, first.stderr
    assert f"{config}: updated (version 2, containerd 1.x schema); the original is kept in {backup}" in first.stdout
    assert "restart containerd" in first.stdout and "hosts.toml files in that folder are re-read on every pull" in first.stdout
    assert backup.read_text() == original
    assert config.read_text() == (GOLDEN / "v2-commented.out.toml").read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", f"config.toml{BACKUP_SUFFIX}"]

    second = acr("containerd", "configure", "--config", str(config))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines()[0] == f"{config}: no change (version 2, containerd 1.x schema)"
    assert "restart" not in second.stdout

    third = acr("containerd", "configure", "--config", str(config), "--hosts-dir", "/srv/certs.d", "--snapshotter", "overlaybd")
    assert third.returncode == 0, third.stderr
    assert "--hosts-dir /srv/certs.d" in third.stdout  # where the mirror must now write
    assert backup.read_text() == original, "the backup of the first original was overwritten"
    assert tomllib.loads(config.read_text())["proxy_plugins"]["overlaybd"]["type"] == "snapshot"


def test_cli_creates_a_missing_file_and_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "etc" / "containerd" / "config.toml"
    made = acr("containerd", "configure", "--config", str(config), "--hosts-dir", "/srv/certs.d")
    assert made.returncode == 0, made.stderr
    assert f"{config}: created" in made.stdout
    assert tomllib.loads(config.read_text())["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/srv/certs.d"
    assert not config.with_name(config.name + BACKUP_SUFFIX).exists()

    bad = tmp_path / "bad.toml"
    bad.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n  endpoint = ["https://m"]\n')
    result = acr("containerd", "configure", "--config", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith(f"acr: {bad}: ")
    assert "mirrors" in result.stderr
    assert not bad.with_name(bad.name + BACKUP_SUFFIX).exists()


# --- the runtime steps -----------------------------------------------------------------


def test_containerd_config_step_points_config_path_at_the_mirrors_hosts_dir(tmp_path: Path, caplog) -> None:
    config = tmp_path / "config.toml"
    config.write_text((GOLDEN / "v3-commented.toml").read_text())
    (tmp_path / "mirror.runmd").write_text(
        f"```\n+ .runtime\n: .containerd-config {config}\n:   .snapshotter overlaybd\n```\n"
    )
    compiled = catalog.load(tmp_path / "mirror.runmd")
    caplog.set_level(logging.INFO)
    Runtime.for_document(compiled, tmp_path / "certs.d").run()
    data = tomllib.loads(config.read_text())
    assert data["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == str(tmp_path / "certs.d")
    assert data["plugins"]["io.containerd.cri.v1.images"]["snapshotter"] == "overlaybd"
    assert any(r.levelno == logging.WARNING and "restart containerd" in r.getMessage() for r in caplog.records)


def fake_containerd(folder: Path, version_line: str) -> str:
    script = folder / "containerd"
    script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
    script.chmod(0o755)
    return str(script)


def test_node_check_says_what_is_missing_and_what_is_there(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    socket_path = tmp_path / "overlaybd.sock"
    binary = tmp_path / "overlaybd-snapshotter"
    old = fake_containerd(tmp_path, "containerd github.com/containerd/containerd 1.4.12 7b11cfaa")

    findings = check_node(config, "/etc/containerd/certs.d", containerd=old, overlaybd_socket=socket_path, overlaybd_binaries=(str(binary),))
    messages = [(f.ok, f.message) for f in findings]
    assert messages[0] == (False, "containerd 1.4.12 is too old: hosts.toml (config_path) needs 1.5 or newer")
    assert not messages[1][0] and "no " + str(config) in messages[1][1] and "acr containerd configure" in messages[1][1]
    assert not messages[2][0] and "overlaybd is not installed" in messages[2][1]

    config.write_text((GOLDEN / "v2-default.toml").read_text())
    assert "config_path is not set" in check_node(config, "/x", containerd=old, overlaybd_socket=socket_path)[1].message

    config.write_text((GOLDEN / "v2-default.overlaybd.out.toml").read_text())
    binary.touch()
    findings = check_node(config, "/srv/certs.d", containerd=fake_containerd(tmp_path, "containerd containerd.io 1.7.27 05044ec"),
                          overlaybd_socket=socket_path, overlaybd_binaries=(str(binary),))
    assert findings[0].ok and findings[0].message == "containerd 1.7.27"
    assert not findings[1].ok and "--hosts-dir /etc/containerd/certs.d" in findings[1].message
    assert not findings[2].ok and "not running" in findings[2].message

    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(socket_path))
        findings = check_node(config, "/etc/containerd/certs.d", containerd=old, overlaybd_socket=socket_path)
    assert [f.ok for f in findings[1:]] == [True, True]

    assert not check_node(config, "/x", containerd=str(tmp_path / "nope"))[0].ok


def test_containerd_version_lines_in_the_wild() -> None:
    assert parse_containerd_version("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3") == (1, 6, 20)
    assert parse_containerd_version("containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6a") == (2, 0, 4)
    assert parse_containerd_version("containerd containerd.io 1.7.27 05044ec0a9a75232cad458027ca83437aae3f4da") == (1, 7, 27)
    assert parse_containerd_version("nonsense") is None


def test_node_check_step_never_fails(tmp_path: Path, caplog) -> None:
    (tmp_path / "mirror.runmd").write_text(f"```\n+ .runtime\n: .node-check {tmp_path / 'none.toml'}\n```\n")
    caplog.set_level(logging.INFO)
    assert Runtime.for_document(catalog.load(tmp_path / "mirror.runmd")).run() == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("none.toml" in w for w in warnings) and any("still starts" in w for w in warnings)


# --- a real containerd 1.6 reads the edited config -----------------------------------------

BASE_CONFIG = """\
# A node's containerd: private folders for this test, CRI on, and no config_path yet.
version = 2
root = "{root}"
state = "{state}"

[grpc]
  address = "{address}"   # its own socket

[ttrpc]
  address = "{address}.ttrpc"

[plugins]
  [plugins."io.containerd.metadata.v1.bolt"]
    content_sharing_policy = "isolated"
  [plugins."io.containerd.internal.v1.opt"]
    path = "{dir}/opt"
  [plugins."io.containerd.grpc.v1.cri"]
    disable_tcp_service = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "{dir}/cni/bin"
      conf_dir = "{dir}/cni/net.d"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "{snapshotter}"   # the node's choice
"""


class ConfiguredContainerd(Containerd):
    """The harness daemon, but started from a config.toml that `acr containerd configure`
    edited: nothing in this config names the hosts folder except what acr wrote."""

    def _write_config(self, snapshotter: str) -> None:
        self.config_path.write_text(BASE_CONFIG.format(
            root=self.root, state=self.state, address=self.address, dir=self.dir, snapshotter=snapshotter,
        ))
        backup = self.config_path.with_name(self.config_path.name + BACKUP_SUFFIX)
        backup.unlink(missing_ok=True)  # the native fallback writes a new original
        result = subprocess.run(
            [ACR, "containerd", "configure", "--config", str(self.config_path), "--hosts-dir", str(self.dir / "node-certs.d")],
            capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert "restart containerd" in result.stdout


@pytest.mark.e2e
def test_containerd_cri_pulls_through_the_mirror_with_the_edited_config_path(
    registry: Registry, closed_port: ClosedPort, mirror_factory: Callable[..., Any], repo_name: str, tmp_path: Path,
) -> None:
    image = make_image({"etc/issue": b"pulled through the mirror by CRI\n"})
    push_image(registry, repo_name, "v1", image)
    # `.host` in the template writes elsewhere: the hosts.toml that matters is the one below.
    mirror = mirror_factory(registry.url, args=["--hosts-dir", str(tmp_path / "scratch-certs.d")])
    with ConfiguredContainerd() as daemon:
        edited = tomllib.loads(daemon.config_path.read_text())
        hosts_dir = edited["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"]
        assert hosts_dir == str(daemon.dir / "node-certs.d")
        # server: a closed port, so the pull can only succeed through the mirror.
        write_hosts_toml(hosts_dir, registry.host, closed_port.url, [(mirror.url, ("pull", "resolve"))])
        image_id = pull_image(daemon.address, f"{registry.host}/{repo_name}:v1", timeout=60)
        assert image_id == image.config.digest
        assert daemon.client("k8s.io").image_target(f"{registry.host}/{repo_name}:v1") == image.digest
    log = mirror.log_text()
    assert f"{repo_name}" in log and "manifests" in log, log[-2000:]
