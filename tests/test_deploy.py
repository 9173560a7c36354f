"""Deployment that is checked, not just written: every manifest of scripts/deploy against the
Kubernetes schemas (kubernetes-validate, strict: unknown fields are errors) of the releases
KUBERNETES_VERSIONS, the systemd unit with `systemd-analyze verify`, the DaemonSet's mounts,
privileges and probes, the Containerfile's entrypoint, and the least privilege the DaemonSet
gives (root without any capability) tried on a real mirror.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import requests
from ruamel.yaml import YAML

from addons.node import service
from addons.node.containerd_config import DEFAULT_HOSTS_DIR
from tests.harness.mirror import ACR
from tests.harness.ports import free_port, wait_port
from tests.harness.procs import kill_group
from tests.harness.replay import ROOT

DEPLOY = ROOT / "scripts" / "deploy"
#: The Kubernetes releases the manifests are checked against (kubernetes-validate 1.37 carries them).
KUBERNETES_VERSIONS = ("1.35.0", "1.36.0", "1.37.0")
NODE_HOME = "/var/lib/lifec-registry"


def documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for doc in YAML(typ="safe").load_all(path.read_text()):
            if doc:
                out.append((f"{path.name}:{doc['kind']}", doc))
    return out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_the_kubernetes_release(version: str) -> None:
    docs = documents()
    assert {name for name, _ in docs} >= {"daemonset.yaml:DaemonSet", "daemonset.yaml:ConfigMap"}
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} is not a valid {doc['kind']} for Kubernetes {version}: {e.message} at {list(e.path)}")


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package); the unit is only parsed as INI")
    home = tmp_path / "home"
    home.mkdir()
    # Another name than the real unit: a host may have lifec-registry.service masked or installed.
    unit = tmp_path / "lifec-registry-check.service"
    unit.write_text(service.render_unit(home, ACR))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and unit.name not in result.stderr, result.stderr


def daemonset() -> dict[str, Any]:
    return next(doc for name, doc in documents() if name == "daemonset.yaml:DaemonSet")


def test_the_daemonset_mounts_what_the_mirror_writes_and_reads() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    (mirror,) = pod["containers"]
    mounts = {m["mountPath"]: (volumes[m["name"]], bool(m.get("readOnly"))) for m in mirror["volumeMounts"]}
    # Written: the home (token, .work) and containerd's hosts folder.
    assert mounts[NODE_HOME] == (NODE_HOME, False)
    assert mounts[DEFAULT_HOSTS_DIR] == (DEFAULT_HOSTS_DIR, False)
    # Only read, by `.node-check`: containerd's config, overlaybd's config, binaries and socket.
    from addons.node import containerd_config, node_check

    for path in ("/etc/containerd", "/etc/overlaybd", "/opt/overlaybd",
                 str(Path(containerd_config.OVERLAYBD_SOCKET).parent)):
        assert mounts[path] == (path, True), path
    for binary in node_check.OVERLAYBD_BINARIES:
        assert any(binary.startswith(m + "/") for m in mounts), binary


def test_the_daemonset_runs_with_the_least_privilege() -> None:
    pod = daemonset()["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
        assert sc["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert not sc.get("privileged")


def test_the_daemonset_probes_livez_and_readyz_on_loopback() -> None:
    """The kubelet probes the pod IP unless told otherwise; the mirror answers probes on loopback only."""
    (mirror,) = daemonset()["spec"]["template"]["spec"]["containers"]
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for kind, path in expected.items():
        get = mirror[kind]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", 8578, path), kind
        # A probe that waits longer than the mirror's own limit (acr_probe_timeout, 5 s) sees its 503.
        assert mirror[kind]["timeoutSeconds"] >= 5, kind
    startup = mirror["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "the ACR login before serving gets 5 minutes"
    runmd = next(doc for name, doc in documents() if name == "daemonset.yaml:ConfigMap")["data"]["mirror.runmd"]
    assert "+ .proxy          127.0.0.1:8578" in runmd


def test_the_unit_is_type_notify_with_a_watchdog() -> None:
    text = service.render_unit(Path("/var/lib/lifec-registry"), ACR)
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=30s"):
        assert f"\n{line}\n" in text, line


def containerfile() -> str:
    return (DEPLOY / "Containerfile").read_text()


def test_the_containerfile_installs_the_repo_and_starts_the_mirror() -> None:
    text = containerfile()
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    assert entry, "an exec-form ENTRYPOINT"
    (mirror,) = daemonset()["spec"]["template"]["spec"]["containers"]
    assert json.loads(entry.group(1)) == mirror["command"] == ["acr", "--runmd", f"{NODE_HOME}/mirror.runmd", "mirror", "start"]
    assert re.search(r"^RUN python -m pip install --no-cache-dir /src", text, re.M)
    # What it copies exists in the repository (the build context is its root).
    for line in re.findall(r"^COPY (.+) /src/?\S*$", text, re.M):
        for name in line.split():
            assert (ROOT / name).exists(), name


def test_the_wheel_it_installs_holds_the_package_and_its_templates(tmp_path: Path) -> None:
    """What `pip install /src` in the Containerfile installs: built here the same way, offline."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("lifec_registry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "addons/cli.py" in names and "addons/node/hostswatch.py" in names
    assert any(n.endswith("data/share/lifec-registry/mirror.runmd.template") for n in names)
    assert any(n.endswith("data/share/lifec-registry/deploy/lifec-registry.service") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "acr = addons.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.e2e
def test_the_mirror_works_as_root_without_any_capability(tmp_path: Path) -> None:
    """The DaemonSet drops every capability: the mirror must still install hosts.toml and serve."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv (util-linux) to drop every capability")
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "127.0.0.1:9").mkdir(parents=True)
    (hosts_dir / "127.0.0.1:9" / "hosts.toml").write_text("server = 'http://127.0.0.1:9'\n")
    subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), "init", "--upstream", "http://127.0.0.1:9",
                    "--mirror-address", f"127.0.0.1:{port}"], check=True, capture_output=True)
    log = open(tmp_path / "mirror.log", "wb")
    proc = subprocess.Popen(
        [setpriv, "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs",
         ACR, "--runmd", str(home / "mirror.runmd"), "mirror", "start", "--hosts-dir", str(hosts_dir)],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "HOME": str(home), "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_port("127.0.0.1", port, 30)
        status = requests.get(f"http://127.0.0.1:{port}/status", timeout=10)
        assert status.status_code == 200, (tmp_path / "mirror.log").read_text()
        caps = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"^CapEff:\s+0+$", caps, re.M), "the mirror ran with capabilities"
        [routing] = status.json()["hosts_toml"]
        assert routing["routes_through_mirror"] and routing["state"] == "shared"
    finally:
        kill_group(proc)
        log.close()
