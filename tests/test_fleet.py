"""The mirror on every node: the systemd unit (`acr service install`) and the DaemonSet manifest.

Both must be well-formed (the unit read as systemd reads INI-style files; the manifest as YAML,
with the fields a node needs) and must start the very same command, `acr --runmd
HOME/mirror.runmd mirror start`, from the home folder they mount or name.
"""

from __future__ import annotations

import configparser
import os
import shlex
import stat
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from addons import catalog, cli

from addons.node import service
from tests.harness.replay import ROOT

DEPLOY = ROOT / "scripts" / "deploy"
DAEMONSET = DEPLOY / "daemonset.yaml"
NODE_HOME = "/var/lib/lifec-registry"
ACR = "/opt/lifec/bin/acr"


def read_unit(text: str) -> configparser.ConfigParser:
    """systemd's format is INI-like: sections, `Key=Value`, `#` comments, repeatable keys."""
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                       comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string(text)
    return parser


def exec_argv(unit: configparser.ConfigParser) -> list[str]:
    return shlex.split(unit["Service"]["ExecStart"].replace("%%", "%").replace("$$", "$"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "node"
    folder.mkdir()
    assert cli.main(["--runmd", str(folder / "mirror.runmd"), "init", "--upstream", "http://127.0.0.1:5000",
                     "--mirror-address", "127.0.0.1:8578"]) == 0
    return folder


def test_the_unit_runs_acr_mirror_start_in_its_home(home: Path) -> None:
    unit = read_unit(service.render_unit(home, ACR))
    assert set(unit.sections()) == {"Unit", "Service", "Install"}
    s = unit["Service"]
    assert exec_argv(unit) == [ACR, "--runmd", str(home / "mirror.runmd"), "mirror", "start"]
    assert exec_argv(unit) == service.command(ACR, home)
    assert s["WorkingDirectory"] == str(home)
    # systemd waits for READY=1 and restarts a mirror that stops feeding its watchdog.
    assert s["Restart"] == "on-failure" and s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["KillMode"] == "mixed" and s["UMask"] == "0077"
    assert "network-online.target" in unit["Unit"]["After"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert f"HOME={home}" in s["Environment"]


def test_exec_start_words_are_quoted_for_systemd() -> None:
    assert service.systemd_quote("/opt/my venv/bin/acr") == '"/opt/my venv/bin/acr"'
    assert service.systemd_quote("100%") == "100%%" and service.systemd_quote("$HOME") == "$$HOME"
    unit = read_unit(service.render_unit(Path("/srv/mirror"), "/opt/my venv/bin/acr"))
    assert exec_argv(unit)[0] == "/opt/my venv/bin/acr"


def test_acr_service_install_writes_the_unit(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    units = tmp_path / "units"
    units.mkdir()
    assert cli.main(["service", "install", "--home", str(home), "--unit-dir", str(units), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would write" in out and "ExecStart=" in out and not any(units.iterdir())
    assert cli.main(["--runmd", str(home / "mirror.runmd"), "service", "install", "--unit-dir", str(units)]) == 0
    path = units / "lifec-registry.service"
    assert f"wrote {path}" in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    unit = read_unit(path.read_text())
    assert exec_argv(unit)[1:] == ["--runmd", str(home / "mirror.runmd"), "mirror", "start"]
    assert Path(exec_argv(unit)[0]).name == "acr" and os.access(exec_argv(unit)[0], os.X_OK)
    assert cli.main(["service", "install", "--home", str(home), "--unit-dir", str(units)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert cli.main(["service", "uninstall", "--unit-dir", str(units)]) == 0
    assert not path.exists() and "removed" in capsys.readouterr().out


def test_service_install_refuses_what_could_only_fail(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    units = tmp_path / "units"
    units.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["service", "install", "--home", str(empty), "--unit-dir", str(units)]) == 1
    assert "run 'acr init'" in capsys.readouterr().err
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "mirror.runmd").write_text((home / "mirror.runmd").read_text().replace("127.0.0.1:8578", "0.0.0.0:8578"))
    assert cli.main(["service", "install", "--home", str(remote), "--unit-dir", str(units)]) == 1
    assert "not a loopback address" in capsys.readouterr().err
    spaced = tmp_path / "with space"
    spaced.mkdir()
    (spaced / "mirror.runmd").write_text((home / "mirror.runmd").read_text())
    assert cli.main(["service", "install", "--home", str(spaced), "--unit-dir", str(units)]) == 1
    assert "must not contain blanks" in capsys.readouterr().err
    assert not any(units.iterdir())


def test_service_enable_runs_systemctl(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    fake = bin_dir / "systemctl"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    units = tmp_path / "units"
    units.mkdir()
    assert cli.main(["service", "install", "--home", str(home), "--unit-dir", str(units), "--enable"]) == 0
    assert cli.main(["service", "uninstall", "--unit-dir", str(units), "--disable"]) == 0
    assert calls.read_text().splitlines() == [
        "daemon-reload", "enable --now lifec-registry.service",
        "disable --now lifec-registry.service", "daemon-reload",
    ]


# --- the DaemonSet ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, Any]:
    docs = [d for d in YAML(typ="safe").load_all(DAEMONSET.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "DaemonSet"}
    for d in docs:
        assert d["apiVersion"] in ("v1", "apps/v1") and d["metadata"]["name"] == "lifec-registry"
    return by_kind


def test_the_daemonset_is_well_formed(manifests: dict[str, Any]) -> None:
    ds = manifests["DaemonSet"]
    spec = ds["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    pod = spec["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"] + pod.get("initContainers", []):
        for mount in container["volumeMounts"]:
            assert mount["name"] in volumes, mount
    (mirror,) = pod["containers"]
    mounts = {m["mountPath"]: m for m in mirror["volumeMounts"]}
    hosts = mounts["/etc/containerd/certs.d"]
    assert volumes[hosts["name"]]["hostPath"]["path"] == "/etc/containerd/certs.d" and not hosts.get("readOnly")
    home = mounts[NODE_HOME]
    assert volumes[home["name"]]["hostPath"]["path"] == NODE_HOME and not home.get("readOnly")
    assert mirror["workingDir"] == NODE_HOME
    assert {"name": "HOME", "value": NODE_HOME} in mirror["env"]
    security = mirror["securityContext"]
    assert security["privileged"] is False and security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == 0  # the hosts folder is root's


def test_the_daemonset_and_the_unit_start_the_same_command(manifests: dict[str, Any]) -> None:
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    (mirror,) = pod["containers"]
    unit = read_unit(service.render_unit(Path(NODE_HOME), ACR))
    assert mirror["command"][0] == "acr" and Path(exec_argv(unit)[0]).name == "acr"
    assert mirror["command"][1:] == exec_argv(unit)[1:] == ["--runmd", f"{NODE_HOME}/mirror.runmd", "mirror", "start"]
    assert unit["Service"]["WorkingDirectory"] == mirror["workingDir"]
    # The runmd comes from the ConfigMap, copied into the home before the mirror starts.
    (init,) = pod["initContainers"]
    assert init["command"][-1] == f"{NODE_HOME}/mirror.runmd"


def test_the_configmap_pipeline_listens_on_loopback(manifests: dict[str, Any], tmp_path: Path) -> None:
    text = manifests["ConfigMap"]["data"]["mirror.runmd"]
    compiled = catalog.parse_text(text, str(tmp_path / "mirror.runmd"))
    (proxy,) = compiled.document.roots("proxy")
    address = compiled.config(proxy)
    assert address.loopback
    upstreams = [compiled.config(s).ns for _, s in compiled.document.steps("mirror")]
    assert upstreams == ["example.azurecr.io"]
    hosts = [compiled.config(s) for _, s in compiled.document.steps("host")]
    assert hosts, "the pipeline installs hosts.toml"
    (mirror,) = manifests["DaemonSet"]["spec"]["template"]["spec"]["containers"]
    paths = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for name, path in paths.items():
        get = mirror[name]["httpGet"]
        assert get["host"] == "127.0.0.1" and get["port"] == address.port and get["path"] == path


def test_the_deploy_folder_holds_the_daemonset_the_containerfile_and_the_monitoring() -> None:
    # Exactly these: each is checked here, in tests/test_deploy.py or (the dashboard and the alert
    # rules in grafana/ and prometheus/) in tests/test_monitoring.py; a new file needs its test.
    assert sorted(p.name for p in DEPLOY.iterdir()) == ["Containerfile", "daemonset.yaml", "grafana", "prometheus"]
    # The unit is a template `acr service install` fills in, so it ships inside the package.
    assert service.template_text().startswith("# lifec-registry: the registry mirror for containerd")
