"""containerd's hosts.toml: `.mirror`, `.host` and its attribute lines, `.server`,
`.https` and `.default`, rendered exactly (golden files under tests/golden/hosts), installed
without ever losing a person's file, removed with that file put back, and used by a real
containerd to pull through a running `acr mirror start`.

Set LIFEC_UPDATE_GOLDEN=1 to rewrite the golden files after a deliberate change; review the diff.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Callable

import pytest

from addons import catalog

from addons.node import hostsfile
from addons.node.hostsfile import HostsError
from addons.runmd.syntax import RunmdError
from addons.runmd.runtime import Runtime, StepError
from tests.harness.aad import pem_of, self_signed
from tests.harness.containerd import Ctr
from tests.harness.images import make_image, push_image
from tests.harness.mirror import Mirror
from tests.harness.ports import ClosedPort
from tests.harness.registry import Registry

ACR = str(Path(sys.executable).with_name("acr"))
GOLDEN = Path(__file__).parent / "golden" / "hosts"
WORK = Path("/var/lib/acr/.work")  # a fixed work folder, so that `ca` paths are stable

CASES = {
    # The seed's example: one registry, the mirror on loopback.
    "seed": """
: .mirror       example.azurecr.io
: .host         localhost:8578, resolve, pull
""",
    # `.server` belongs to the `.mirror` above it; the other registry keeps its own server.
    "server": """
: .mirror       example.azurecr.io
: .server       http://127.0.0.1:9
: .mirror       http://127.0.0.1:5000
: .host         127.0.0.1:8578
""",
    # Every hosts.toml key an entry may carry.
    "keys": """
: .mirror       example.azurecr.io
: .host         localhost:8578, pull, resolve
:   .dial_timeout 500ms
:   .header     X-Node node-1
:   .header     X-Node node-2
:   .header     X-Mirror lifec
:   .skip_verify
:   .ca         /etc/ssl/mirror-ca.pem
:   .ca         /etc/ssl/extra-ca.pem
""",
    # TLS: https:// entries that trust the mirror's own certificate.
    "https": """
: .mirror       example.azurecr.io
: .https        mirror.pem
: .host         localhost:8578, resolve, pull
:   .dial_timeout 2s
""",
    # `.default`: the marked entries also catch every other registry, with no server line.
    "default": """
: .mirror       example.azurecr.io
: .host         127.0.0.1:8578, resolve, pull
:   .default
: .host         [::1]:8579, pull
""",
}


def compiled_of(body: str, home: Path = Path("/var/lib/acr")) -> catalog.Compiled:
    text = "``` start mirror\n+ .runtime\n" + body.strip("\n") + "\n```\n"
    return catalog.parse_text(text, str(home / "mirror.runmd"))


# --- rendering ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_hosts_toml(case: str) -> None:
    files = {f.folder: f.render() for f in hostsfile.plan(compiled_of(CASES[case]), WORK)}
    folder = GOLDEN / case
    if os.environ.get("LIFEC_UPDATE_GOLDEN"):
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.toml"):
            old.unlink()
        for name, text in files.items():
            (folder / f"{name}.toml").write_text(text)
    golden = {p.name[: -len(".toml")]: p.read_text() for p in folder.glob("*.toml")}
    assert files == golden
    for text in files.values():
        assert text.startswith(hostsfile.MARKER)
        tomllib.loads(text)  # valid TOML


def test_rendered_keys_have_the_types_containerd_reads() -> None:
    (f,) = hostsfile.plan(compiled_of(CASES["keys"]), WORK)
    doc = tomllib.loads(f.render())
    assert doc["server"] == "https://example.azurecr.io"
    entry = doc["host"]["http://localhost:8578"]
    assert entry == {
        "capabilities": ["pull", "resolve"],
        "dial_timeout": "500ms",
        "skip_verify": True,
        "ca": ["/etc/ssl/mirror-ca.pem", "/etc/ssl/extra-ca.pem"],
        "header": {"X-Node": ["node-1", "node-2"], "X-Mirror": ["lifec"]},
    }
    assert f.mode == 0o600  # headers may carry secrets


def test_https_entries_trust_the_served_certificate() -> None:
    (f,) = hostsfile.plan(compiled_of(CASES["https"]), WORK)
    entry = tomllib.loads(f.render())["host"]["https://localhost:8578"]
    assert entry["ca"] == str(WORK / "https" / "ca.pem")
    # A `.ca` of the entry's own wins over the served certificate.
    (f,) = hostsfile.plan(compiled_of(CASES["https"] + ":   .ca /etc/ssl/corp.pem\n"), WORK)
    assert tomllib.loads(f.render())["host"]["https://localhost:8578"]["ca"] == "/etc/ssl/corp.pem"


def test_default_folder_lists_only_marked_entries_and_no_server() -> None:
    files = {f.folder: f for f in hostsfile.plan(compiled_of(CASES["default"]), WORK)}
    assert sorted(files) == ["_default", "example.azurecr.io"]
    default = tomllib.loads(files["_default"].render())
    assert "server" not in default and list(default["host"]) == ["http://127.0.0.1:8578"]
    assert list(tomllib.loads(files["example.azurecr.io"].render())["host"]) == [
        "http://127.0.0.1:8578", "http://[::1]:8579"]


def test_no_host_step_means_no_file() -> None:
    assert hostsfile.plan(compiled_of(": .mirror example.azurecr.io"), WORK) == []


@pytest.mark.parametrize(
    "line, fragment",
    [
        (":   .dial_timeout soon", "duration"),
        (":   .dial_timeout 5", "duration"),
        (":   .header X-Only", "NAME VALUE"),
        (":   .header Bad:Name value", "invalid header name"),
        (":   .skip_verify maybe", "true/false"),
        (":   .ca", "CA certificate"),
    ],
)
def test_bad_attribute_lines_name_the_line(line: str, fragment: str) -> None:
    with pytest.raises(RunmdError) as info:
        compiled_of(": .mirror example.azurecr.io\n: .host localhost:8578\n" + line, Path("/x"))
    assert str(info.value).startswith("/x/mirror.runmd:5: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "body, fragment",
    [
        (": .mirror a.io\n: .host localhost:8578, pull, pull", "twice"),
        (": .mirror a.io\n: .host localhost:8578, delete", "unknown capability"),
        (": .mirror a.io\n: .server ftp://x", "unsupported scheme"),
        (": .mirror a.io\n: .https two files.pem", "one PEM file"),
    ],
)
def test_bad_steps_name_the_line(body: str, fragment: str) -> None:
    with pytest.raises(RunmdError) as info:
        compiled_of(body)
    assert fragment in str(info.value)


def test_server_without_a_mirror_above_is_refused(tmp_path: Path) -> None:
    compiled = compiled_of(": .server http://127.0.0.1:9\n: .mirror a.io\n: .host localhost:8578", tmp_path)
    with pytest.raises(HostsError, match="'.server' must follow the '.mirror'"):
        hostsfile.plan(compiled, WORK)
    with pytest.raises(StepError, match=r"^step 2 \(.server http://127.0.0.1:9\): '.server' must follow"):
        Runtime.for_document(compiled, tmp_path / "certs.d").run()


# --- installing and removing -----------------------------------------------------------------

USER_FILE = 'server = "https://registry.example"\n\n[host."https://corp-mirror:5000"]\n  capabilities = ["pull"]\n'
MIRROR_TABLE = '[host."http://127.0.0.1:8578"] # ' + hostsfile.hostsmerge.MARK + '\ncapabilities = ["pull", "resolve"]\n'


def a_file(folder: str = "example.azurecr.io", a: int = 0) -> hostsfile.HostsFile:
    """One of our files; `a` changes its server, as a new version of the runmd would."""
    host = hostsfile.MirrorHost("http://127.0.0.1:8578", ("pull", "resolve"))
    return hostsfile.HostsFile(folder, f"https://registry{a or ''}.example", (host,))


def test_install_adds_our_table_to_a_persons_file_and_remove_takes_only_it_out(tmp_path: Path) -> None:
    folder = tmp_path / "example.azurecr.io"
    folder.mkdir()
    (folder / "hosts.toml").write_text(USER_FILE)
    line = hostsfile.install(a_file(), tmp_path)
    assert line.endswith("the mirror's table added, the other entries kept as they were")
    merged = (folder / "hosts.toml").read_text()
    # Ours first (containerd tries tables in file order), the person's table and server untouched.
    assert merged == 'server = "https://registry.example"\n\n' + MIRROR_TABLE + '\n[host."https://corp-mirror:5000"]\n  capabilities = ["pull"]\n'
    # Installing again (the next start) changes nothing; a person's file never gets a backup.
    assert hostsfile.install(a_file(), tmp_path).endswith("unchanged (the mirror's table is in it)")
    assert (folder / "hosts.toml").read_text() == merged
    assert hostsfile.backups(folder) == []
    assert hostsfile.remove(tmp_path, "example.azurecr.io").endswith("the mirror's table taken out, the rest is as it was")
    assert (folder / "hosts.toml").read_text() == USER_FILE
    assert sorted(p.name for p in folder.iterdir()) == ["hosts.toml"]


def test_remove_of_a_whole_file_of_ours_puts_back_an_older_backup(tmp_path: Path) -> None:
    # Older versions replaced a person's file and kept it as hosts.toml.acr-backup: still restored.
    folder = tmp_path / "r.io"
    folder.mkdir()
    hostsfile.install(a_file("r.io"), tmp_path)
    (folder / "hosts.toml.acr-backup").write_text(USER_FILE)
    assert hostsfile.install(a_file("r.io", 2), tmp_path).endswith(": installed")
    assert hostsfile.install(a_file("r.io", 2), tmp_path).endswith(": unchanged")
    assert hostsfile.remove(tmp_path, "r.io").endswith("restored from hosts.toml.acr-backup")
    assert (folder / "hosts.toml").read_text() == USER_FILE


def test_remove_without_a_backup_deletes_ours_and_leaves_others(tmp_path: Path) -> None:
    hostsfile.install(a_file("a.io"), tmp_path)
    assert hostsfile.remove(tmp_path, "a.io").endswith(": removed")
    assert not (tmp_path / "a.io").exists()  # the folder we made goes too
    hostsfile.install(a_file("b.io"), tmp_path)
    (tmp_path / "b.io" / "ca.crt").write_text("someone's CA\n")
    hostsfile.remove(tmp_path, "b.io")
    assert sorted(p.name for p in (tmp_path / "b.io").iterdir()) == ["ca.crt"]
    assert hostsfile.remove(tmp_path, "b.io").endswith(": not installed")


def test_remove_leaves_a_persons_file_alone(tmp_path: Path) -> None:
    (tmp_path / "c.io").mkdir()
    (tmp_path / "c.io" / "hosts.toml").write_text(USER_FILE)
    assert hostsfile.remove(tmp_path, "c.io").endswith("no table of the mirror in it, left alone")
    assert (tmp_path / "c.io" / "hosts.toml").read_text() == USER_FILE


def test_install_is_atomic_and_readable(tmp_path: Path) -> None:
    hostsfile.install(a_file("d.io"), tmp_path)
    secret = hostsfile.MirrorHost("http://127.0.0.1:8578", ("pull",), hostsfile.HostOptions(headers=(("X-Key", ("k",)),)))
    hostsfile.install(hostsfile.HostsFile("d.io", None, (secret,)), tmp_path)
    names = [p.name for p in (tmp_path / "d.io").iterdir()]
    assert names == ["hosts.toml"]  # no temporary file left behind
    assert stat.S_IMODE((tmp_path / "d.io" / "hosts.toml").stat().st_mode) == 0o600


def test_host_step_generates_into_work_and_installs(tmp_path: Path) -> None:
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "example.azurecr.io").mkdir(parents=True)
    (hosts_dir / "example.azurecr.io" / "hosts.toml").write_text(USER_FILE)
    compiled = compiled_of(CASES["default"], tmp_path)
    Runtime.for_document(compiled, hosts_dir).run()
    work = tmp_path / ".work" / "etc" / "containerd" / "certs.d"
    assert (hosts_dir / "_default" / "hosts.toml").read_text() == (work / "_default" / "hosts.toml").read_text()
    # The person's file got our tables (both entries, first, in runmd order) and kept its own.
    merged = (hosts_dir / "example.azurecr.io" / "hosts.toml").read_text()
    assert hostsfile.hostsmerge.host_urls(merged) == ["http://127.0.0.1:8578", "http://[::1]:8579", "https://corp-mirror:5000"]
    assert hostsfile.hostsmerge.unmerge(merged) == USER_FILE


def test_only_the_last_host_step_writes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    compiled = compiled_of(CASES["default"], tmp_path)
    caplog.set_level("INFO")
    Runtime.for_document(compiled, tmp_path / "certs.d").run()
    installs = [r.getMessage() for r in caplog.records if r.getMessage().endswith(": installed")]
    assert len(installs) == 2
    assert any("written by the last .host step (4)" in r.getMessage() for r in caplog.records)


# --- .https ----------------------------------------------------------------------------------


def test_https_file_must_hold_the_key_of_its_certificate(tmp_path: Path) -> None:
    key, cert = self_signed("mirror", ip="127.0.0.1")
    other, _ = self_signed("other")
    good = pem_of(key, cert)
    cases = {
        "mismatch.pem": (pem_of(other, cert), "does not belong"),
        "nokey.pem": (good[good.index("-----BEGIN CERTIFICATE"):], "no PEM private key"),
        "nocert.pem": (good[: good.index("-----BEGIN CERTIFICATE")], "no PEM certificate"),
        "missing.pem": (None, "no file"),
    }
    for name, (text, fragment) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        compiled = compiled_of(f": .mirror a.io\n: .https {name}", tmp_path)
        with pytest.raises(StepError) as info:
            Runtime.for_document(compiled, tmp_path / "certs.d").run()
        assert fragment in str(info.value) and "\n" not in str(info.value)
        assert "PRIVATE KEY" not in str(info.value)
    (tmp_path / "good.pem").write_text(good)
    (tmp_path / "good.pem").chmod(0o600)
    Runtime.for_document(compiled_of(": .mirror a.io\n: .https good.pem", tmp_path), tmp_path / "certs.d").run()
    ca = (tmp_path / ".work" / "https" / "ca.pem").read_text()
    assert "BEGIN CERTIFICATE" in ca and "PRIVATE KEY" not in ca


# --- acr hosts ---------------------------------------------------------------------------------


def acr(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_acr_hosts_show_install_remove(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text("``` start mirror\n+ .runtime\n" + CASES["server"] + "```\n")
    hosts_dir = tmp_path / "certs.d"
    (hosts_dir / "example.azurecr.io").mkdir(parents=True)
    (hosts_dir / "example.azurecr.io" / "hosts.toml").write_text(USER_FILE)

    shown = acr(tmp_path, "hosts", "show", "--hosts-dir", str(hosts_dir))
    assert shown.returncode == 0, shown.stderr
    assert f"# --- {hosts_dir}/example.azurecr.io/hosts.toml (another tool's file: install adds the mirror's table to it)" in shown.stdout
    assert f"# --- {hosts_dir}/127.0.0.1:5000/hosts.toml (not installed)" in shown.stdout
    assert 'server = "http://127.0.0.1:9"' in shown.stdout
    assert not (hosts_dir / "127.0.0.1:5000").exists()  # show changes nothing

    installed = acr(tmp_path, "hosts", "install", "--hosts-dir", str(hosts_dir))
    assert installed.returncode == 0, installed.stderr
    assert installed.stdout.splitlines() == [
        f"{hosts_dir}/example.azurecr.io/hosts.toml: the mirror's table added, the other entries kept as they were",
        f"{hosts_dir}/127.0.0.1:5000/hosts.toml: installed",
    ]
    shown = acr(tmp_path, "hosts", "show", "--hosts-dir", str(hosts_dir)).stdout
    assert "(installed)" in shown and "(another tool's file, with the mirror's table in it)" in shown
    work = tmp_path / ".work" / "etc" / "containerd" / "certs.d" / "127.0.0.1:5000" / "hosts.toml"
    assert (hosts_dir / "127.0.0.1:5000" / "hosts.toml").read_text() == work.read_text()

    removed = acr(tmp_path, "hosts", "remove", "--hosts-dir", str(hosts_dir))
    assert removed.returncode == 0, removed.stderr
    assert (hosts_dir / "example.azurecr.io" / "hosts.toml").read_text() == USER_FILE
    assert not (hosts_dir / "127.0.0.1:5000").exists()


def test_acr_hosts_error_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(
        "``` start mirror\n+ .runtime\n: .server http://127.0.0.1:9\n: .host localhost:8578\n```\n")
    result = acr(tmp_path, "hosts", "install", "--hosts-dir", str(tmp_path / "certs.d"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == ["acr: mirror.runmd:3: '.server' must follow the '.mirror' whose server it sets"]


# --- a real containerd pulls through the installed file -----------------------------------------

MIRROR = """\
``` start mirror
+ .runtime
: .mirror       {registry}
: .server       {server}
: .host         127.0.0.1:{{port}}, resolve, pull
:   .dial_timeout 3s
{extra}
+ .proxy        127.0.0.1:{{port}}
: .manifests    head, get
:   .login      access_token
:   .authn      oauth2
:   .resolve    application/vnd.oci.image.index.v1+json
: .blobs        head, get
:   .login      access_token
:   .authn      oauth2
:   .pull
```
"""


@pytest.mark.e2e
@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
def test_containerd_pulls_through_the_installed_hosts_toml(
    tls: bool, containerd: Ctr, registry: Registry, repo_name: str, tmp_path: Path,
    closed_port: ClosedPort, mirror_factory: Callable[..., Mirror],
) -> None:
    image = make_image({"through.txt": b"via the installed hosts.toml\n"})
    push_image(registry, repo_name, "v1", image)
    push_image(registry, repo_name, "v2", make_image({"v2.txt": b"second\n"}))
    hosts_dir = tmp_path / "certs.d"
    # A person's file for this registry is there already; it must survive.
    (hosts_dir / registry.host).mkdir(parents=True)
    (hosts_dir / registry.host / "hosts.toml").write_text(f'server = "{closed_port.url}"\n')
    text = MIRROR.format(registry=registry.url, server=closed_port.url, extra=": .https mirror.pem" if tls else "")
    m = mirror_factory(registry.url, runmd=text, start=False,
                       args=["--hosts-dir", str(hosts_dir)], env={"PYTHONUNBUFFERED": "1"})
    if tls:
        key, cert = self_signed("lifec mirror", ip="127.0.0.1")
        (m.home / "mirror.pem").write_text(pem_of(key, cert))
        (m.home / "mirror.pem").chmod(0o600)
    m.start()
    installed = (hosts_dir / registry.host / "hosts.toml").read_text()
    scheme = "https" if tls else "http"
    assert f'[host."{scheme}://127.0.0.1:{m.port}"]' in installed
    assert f'server = "{closed_port.url}"' in installed
    # Merged into the person's file (our table marked), not replacing it: no backup needed.
    assert hostsfile.hostsmerge.marked_urls(installed) == [f"{scheme}://127.0.0.1:{m.port}"]
    assert not (hosts_dir / registry.host / "hosts.toml.acr-backup").exists()

    ref = f"{registry.host}/{repo_name}:v1"
    result = containerd.pull(ref, hosts_dir=hosts_dir)
    assert result.returncode == 0, result.stderr + m.log_text()[-3000:]
    assert containerd.image_target(ref) == image.digest
    assert f"manifests {repo_name}:v1" in m.log_text()  # it went through the mirror

    # Without the mirror, containerd falls back to `server`, a closed port: the file is what routed it.
    m.stop()
    failed = containerd.pull(f"{registry.host}/{repo_name}:v2", hosts_dir=hosts_dir, timeout=60)
    assert failed.returncode != 0

    removed = acr(m.home, "hosts", "remove", "--hosts-dir", str(hosts_dir))
    assert removed.returncode == 0, removed.stderr
    assert (hosts_dir / registry.host / "hosts.toml").read_text() == f'server = "{closed_port.url}"\n'
