"""The stargz snapshotter's reads through the mirror: Range GETs without `ns`, one address per
upstream (`.listen`), `acr stargz configure` on real files, `.node-check`'s finding, and the
Range answers shown in the log line, mitmweb's comment and /metrics.

The snapshotter's reads are made here as it makes them (measured, see DESIGN.md section 6):
`GET /v2/<name>/blobs/<digest>` with a `Range` header and no `ns`, to the `host` its config
names. Real docker-registry instances answer them; their access logs show the reads came
through the mirror.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons import catalog
from addons.node import stargz_config
from addons.node.containerd_config import ConfigError
from addons.node.node_check import check_stargz
from addons.proxy.context import RequestContext, range_text
from addons.registry.oci import Upstream
from addons.registry.ranges import RangeRead, parse_content_range
from addons.runmd.runtime import Runtime
from addons.runmd.syntax import RunmdError
from tests.harness.images import push_random_blob
from tests.harness.mirror import ACR, Mirror
from tests.harness.ports import direct_session, free_port, wait_port
from tests.harness.registry import Registry
from tests.harness.tokenserver import TokenServer

UNBUFFERED = {"PYTHONUNBUFFERED": "1"}


def runmd(port: int, mirrors: list[tuple[str, int | None]], https: str = "") -> str:
    lines = ["```", "+ .runtime"]
    for url, listen in mirrors:
        lines.append(f": .mirror       {url}")
        if listen:
            lines.append(f": .listen       127.0.0.1:{listen}")
    if https:
        lines.append(f": .https        {https}")
    lines += ["+ .proxy        127.0.0.1:%d" % port, ": .manifests    head, get", ":   .login     access_token",
              ":   .authn     oauth2", ":   .resolve", ": .blobs        head, get", ":   .login     access_token",
              ":   .authn     oauth2", ":   .pull", "```", ""]
    return "\n".join(lines)


# --- Range answers ---------------------------------------------------------------------------------


def test_content_range_is_read() -> None:
    assert parse_content_range("bytes 0-1023/4096") == RangeRead(0, 1023, 4096)
    assert parse_content_range("bytes 100-199/*") == RangeRead(100, 199, None)
    for bad in (None, "", "bytes 5-1/10", "bytes 0-10/10", "items 0-1/2", "bytes */10"):
        assert parse_content_range(bad) is None
    assert range_text(RangeRead(0, 870_399, 71_303_168)) == "range 850 KiB of 68 MiB"
    assert range_text({"start": 0, "end": 1, "total": None}) == "range 2 B"


def test_mitmwebs_comment_leads_with_the_range() -> None:
    ctx = RequestContext(route="blobs", route_id=1, method="GET", name="app", reference="sha256:" + "a" * 64,
                         upstream=Upstream.from_spec("http://127.0.0.1:5000"))
    ctx.range = RangeRead(0, 870_399, 71_303_168)
    assert ctx.story().splitlines()[0] == "range 850 KiB of 68 MiB"
    assert ctx.public()["range"] == {"start": 0, "end": 870_399, "total": 71_303_168}


# --- `.listen`: one address per upstream ------------------------------------------------------------


@pytest.mark.parametrize("text, fragment", [
    ("```\n+ .runtime\n: .listen 127.0.0.1:8600\n: .mirror http://127.0.0.1:5000\n+ .proxy 127.0.0.1:8578\n```\n",
     "mirror.runmd:3: '.listen' must follow the '.mirror' it serves"),
    ("```\n+ .runtime\n: .mirror http://127.0.0.1:5000\n: .listen 127.0.0.1:8578\n+ .proxy 127.0.0.1:8578\n```\n",
     "mirror.runmd:4: port 8578 is already a listen address of this mirror"),
    ("```\n+ .runtime\n: .mirror http://127.0.0.1:5000\n: .listen 127.0.0.1:8600\n: .listen 127.0.0.1:8601\n"
     "+ .proxy 127.0.0.1:8578\n```\n", "mirror.runmd:5: 127.0.0.1:5000 already has a '.listen' address"),
    ("```\n+ .runtime\n: .mirror http://127.0.0.1:5000\n: .listen /tmp/x\n+ .proxy 127.0.0.1:8578\n```\n",
     "mirror.runmd:4: '.listen': expected HOST:PORT, got '/tmp/x'"),
])
def test_a_wrong_listen_line_names_itself(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "mirror.runmd").write_text(text)
    result = subprocess.run([ACR, "--runmd", str(tmp_path / "mirror.runmd"), "mirror", "serve"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line == f"acr: {tmp_path / fragment}"


def test_each_upstream_is_read_without_ns_on_its_own_address(
    registry: Registry, registry_factory: Callable[..., Registry], repo_name: str, tmp_path: Path,
) -> None:
    """Two real registries, each behind its own `.listen` address: a Range GET without `ns`
    reaches the registry of the address it came to, and only that one."""
    other = registry_factory()
    digest_a, size_a = push_random_blob(registry, repo_name, 2 << 20, seed=21)
    digest_b, size_b = push_random_blob(other, repo_name, 1 << 20, seed=22)
    port, listen_a, listen_b = free_port(), free_port(), free_port()
    home = tmp_path / "mirror"
    home.mkdir()
    m = Mirror(home, [registry.url], runmd=runmd(port, [(registry.url, listen_a), (other.url, listen_b)]),
               port=port, env=UNBUFFERED, args=["--hosts-dir", str(tmp_path / "certs.d")])
    try:
        for p in (listen_a, listen_b):
            wait_port("127.0.0.1", p, 15)
        since_a, since_b = registry.log_path.stat().st_size, other.log_path.stat().st_size
        with direct_session() as s:
            a = s.get(f"http://127.0.0.1:{listen_a}/v2/{repo_name}/blobs/{digest_a}",
                      headers={"Range": "bytes=1000-4095"}, timeout=30)
            b = s.get(f"http://127.0.0.1:{listen_b}/v2/{repo_name}/blobs/{digest_b}",
                      headers={"Range": "bytes=0-99"}, timeout=30)
            # Each address serves its own registry only: A's blob is not in B.
            wrong = s.get(f"http://127.0.0.1:{listen_b}/v2/{repo_name}/blobs/{digest_a}",
                          headers={"Range": "bytes=0-99"}, timeout=30)
            named_other = s.get(f"http://127.0.0.1:{listen_b}/v2/{repo_name}/blobs/{digest_a}"
                                f"?ns={registry.host.replace(':', '%3A')}", timeout=30)
            main = s.get(f"{m.url}/v2/{repo_name}/blobs/{digest_a}", headers={"Range": "bytes=0-99"}, timeout=30)
            metrics = s.get(f"{m.url}/metrics", timeout=30).text
        whole_a = direct_session().get(f"{registry.url}/v2/{repo_name}/blobs/{digest_a}", timeout=30).content
        assert a.status_code == 206 and a.content == whole_a[1000:4096]
        assert a.headers["Content-Range"] == f"bytes 1000-4095/{size_a}"
        assert b.status_code == 206 and len(b.content) == 100 and b.headers["Content-Range"] == f"bytes 0-99/{size_b}"
        assert wrong.status_code == 404
        assert named_other.status_code == 404 and named_other.json()["errors"][0]["code"] == "NAME_UNKNOWN"
        assert named_other.json()["errors"][0]["message"] == f"this address serves only {other.host}"
        assert main.status_code == 404 and "'.listen' address" in main.json()["errors"][0]["message"]
        time.sleep(0.2)  # the access log line is written once the registry finished the answer
        reads_a = re.findall(rf'"GET /v2/{repo_name}/blobs/{digest_a} HTTP/1\.1" 206',
                             registry.log_path.read_bytes()[since_a:].decode(errors="replace"))
        reads_b = re.findall(rf'"GET /v2/{repo_name}/blobs/(sha256:\w+) HTTP/1\.1" (\d+)',
                             other.log_path.read_bytes()[since_b:].decode(errors="replace"))
        assert len(reads_a) == 1 and reads_b == [(digest_b, "206"), (digest_a, "404")]
        log = m.log_text()
        assert f"GET blobs {repo_name}:{digest_a} -> 206 range 3.0 KiB of 2.0 MiB [{registry.host}]" in log
        assert f"GET blobs {repo_name}:{digest_b} -> 206 range 100 B of 1.0 MiB [{other.host}]" in log
        samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
        assert samples["acr_range_requests_total"] == 2 and samples["acr_range_bytes_total"] == 3196
    finally:
        m.stop()


def test_a_private_registry_streams_with_the_mirrors_identity(
    token_registry: Registry, token_server: TokenServer, repo_name: str, tmp_path: Path,
) -> None:
    """The snapshotter sends no credentials: with one upstream its Range GET (no `ns`) is
    authenticated by the mirror, while the registry refuses the same read made directly."""
    digest, size = push_random_blob(token_registry, repo_name, 1 << 20, seed=23)
    port = free_port()
    home = tmp_path / "mirror"
    home.mkdir()
    m = Mirror(home, [token_registry.url], runmd=runmd(port, [(token_registry.url, None)]), port=port,
               credentials=token_server.issue_refresh_token(), env=UNBUFFERED,
               args=["--hosts-dir", str(tmp_path / "certs.d")])
    try:
        direct = direct_session().get(f"{token_registry.url}/v2/{repo_name}/blobs/{digest}",
                                      headers={"Range": "bytes=0-99"}, timeout=30)
        assert direct.status_code == 401
        r = m.get(f"/v2/{repo_name}/blobs/{digest}", headers={"Range": "bytes=512-1023"})
        assert r.status_code == 206 and len(r.content) == 512
        assert r.headers["Content-Range"] == f"bytes 512-1023/{size}"
        assert f"GET blobs {repo_name}:{digest} -> 206 range 512 B of 1.0 MiB [{token_registry.host}]" in m.log_text()
    finally:
        m.stop()


# --- `acr stargz configure` ---------------------------------------------------------------------------

SNAPSHOTTER_CONFIG = """\
# containerd-stargz-grpc: on-demand reads only
no_background_fetch = true

[cri_keychain]
enable_keychain = false  # no kubelet here

[[resolver.host."registry.example".mirrors]]
host = "cache.example:5000"
"""


def acr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, "--runmd", str(tmp_path / "mirror.runmd"), *args], capture_output=True, text=True,
                          timeout=60)


def test_acr_stargz_configure_adds_the_mirror_first_and_keeps_the_rest(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(runmd(8578, [("registry.example", 8579), ("http://127.0.0.1:5000", 8580)]))
    path = tmp_path / "config.toml"
    path.write_text(SNAPSHOTTER_CONFIG)
    path.chmod(0o640)
    dry = acr(tmp_path, "stargz", "configure", "--config", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == f"""\
--- {path}
+++ {path}
@@ -5,4 +5,12 @@
 enable_keychain = false  # no kubelet here
 
 [[resolver.host."registry.example".mirrors]]
+host = "127.0.0.1:8579"
+insecure = true
+
+[[resolver.host."registry.example".mirrors]]
 host = "cache.example:5000"
+
+[[resolver.host."127.0.0.1:5000".mirrors]]
+host = "127.0.0.1:8580"
+insecure = true
{path}: dry run, nothing written
then {stargz_config.RESTART_NOTE}
"""
    assert path.read_text() == SNAPSHOTTER_CONFIG
    done = acr(tmp_path, "stargz", "configure", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{path}: updated; the original is kept in {path}.acr-backup",
        '  resolver.host."registry.example": mirror 127.0.0.1:8579 (insecure: plain HTTP)',
        '  resolver.host."127.0.0.1:5000": mirror 127.0.0.1:8580 (insecure: plain HTTP)',
        stargz_config.RESTART_NOTE,
    ]
    assert (tmp_path / "config.toml.acr-backup").read_text() == SNAPSHOTTER_CONFIG
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    written = path.read_text()
    assert written.startswith(SNAPSHOTTER_CONFIG.split("[[resolver")[0])  # comments and other keys as they were
    again = acr(tmp_path, "stargz", "configure", "--config", str(path))
    assert again.stdout.strip() == f"{path}: no change (the stargz snapshotter reads through the mirror)"
    assert path.read_text() == written


def test_acr_stargz_configure_with_one_upstream_uses_the_proxy_address_and_https_is_not_insecure(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(runmd(8578, [("http://127.0.0.1:5000", None)]))
    path = tmp_path / "new" / "config.toml"
    done = acr(tmp_path, "stargz", "configure", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_text() == (f"{stargz_config.NEW_FILE}\n"
                                '[[resolver.host."127.0.0.1:5000".mirrors]]\nhost = "127.0.0.1:8578"\ninsecure = true\n')
    edit = stargz_config.configure_text(path.read_text(), [stargz_config.MirrorEntry("127.0.0.1:5000", "127.0.0.1:8578",
                                                                                       False)])
    assert edit.changes == ['resolver.host."127.0.0.1:5000": mirror 127.0.0.1:8578 insecure = false']
    assert 'host = "127.0.0.1:8578"\ninsecure = false\n' in edit.new


@pytest.mark.parametrize("text, fragment", [
    ("no_background_fetch = [", "not valid TOML"),
    ('[resolver.host."127.0.0.1:5000"]\nmirrors = "x"\n', 'resolver.host."127.0.0.1:5000".mirrors is not an array of tables'),
    ('resolver = 3\n', 'resolver.host."127.0.0.1:5000" is not a table'),
])
def test_a_snapshotter_config_that_cannot_be_edited_is_left_alone(tmp_path: Path, text: str, fragment: str) -> None:
    (tmp_path / "mirror.runmd").write_text(runmd(8578, [("http://127.0.0.1:5000", None)]))
    path = tmp_path / "config.toml"
    path.write_text(text)
    refused = acr(tmp_path, "stargz", "configure", "--config", str(path))
    assert refused.returncode == 1 and refused.stdout == ""
    assert len(refused.stderr.splitlines()) == 1 and fragment in refused.stderr and str(path) in refused.stderr
    assert path.read_text() == text and sorted(os.listdir(tmp_path)) == ["config.toml", "mirror.runmd"]


def test_several_upstreams_without_listen_are_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text(runmd(8578, [("http://127.0.0.1:5000", 8579), ("http://127.0.0.1:5001", None)]))
    refused = acr(tmp_path, "stargz", "configure", "--config", str(tmp_path / "config.toml"))
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.splitlines() == [
        f"acr: {tmp_path / 'mirror.runmd'} serves 2 registries and the stargz snapshotter's reads name none (no ns): "
        "add ': .listen HOST:PORT' under the '.mirror' of 127.0.0.1:5001"]
    assert not (tmp_path / "config.toml").exists()


# --- `.node-check`: does the stargz snapshotter read through the mirror? --------------------------------

STARGZ_NODE = '''version = 2
[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "stargz"
  disable_snapshot_annotations = false
[proxy_plugins.stargz]
  type = "snapshot"
  address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
'''


def test_node_check_says_when_the_stargz_snapshotter_does_not_read_through_the_mirror(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / "containerd.toml").write_text(STARGZ_NODE)
    sgz = tmp_path / "stargz.toml"
    sgz.write_text(SNAPSHOTTER_CONFIG)
    text = runmd(8578, [("http://127.0.0.1:5000", None)])
    (tmp_path / "mirror.runmd").write_text(
        "```\n+ .runtime\n: .node-check containerd.toml\n:   .stargz stargz.toml\n```\n" + text)
    compiled = catalog.load(tmp_path / "mirror.runmd")
    caplog.set_level(logging.INFO)
    runtime = Runtime.for_document(compiled)
    runtime.run(roots=list(compiled.document.roots("runtime"))[:1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (f"step 2: the stargz snapshotter reads 127.0.0.1:5000 straight from the registry, not through this mirror "
            f"({sgz} names no mirror 127.0.0.1:8578): run 'acr stargz configure --config {sgz}' and restart it") in warnings
    stargz_config.configure(sgz, stargz_config.entries(compiled))
    caplog.clear()
    runtime.run(roots=list(compiled.document.roots("runtime"))[:1])
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"step 2: the stargz snapshotter reads through this mirror ({sgz})" in infos
    data = {"proxy_plugins": {"stargz": {"type": "snapshot"}}}
    gone = check_stargz(data, tmp_path / "none.toml", compiled)
    assert gone is not None and not gone.ok and "does not exist" in gone.message
    assert check_stargz({}, sgz, compiled) is None  # no stargz in containerd: nothing to say
    sgz.write_text("x = [")
    broken = check_stargz(data, sgz, compiled)
    assert broken is not None and not broken.ok and "not valid TOML" in broken.message


def test_entries_without_a_proxy_are_an_error(tmp_path: Path) -> None:
    (tmp_path / "mirror.runmd").write_text("```\n+ .runtime\n: .mirror http://127.0.0.1:5000\n```\n")
    with pytest.raises(ConfigError, match="no '\\+ .proxy ADDR' block"):
        stargz_config.entries(catalog.load(tmp_path / "mirror.runmd"))
    with pytest.raises(RunmdError):
        catalog.parse_text("```\n+ .runtime\n: .listen 127.0.0.1:1\n```\n")
