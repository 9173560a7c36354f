"""`acr overlaybd configure` changes only the keys it owns: every other byte of overlaybd.json stays.

The file below is the one overlaybd ships (src/example_config/overlaybd.json: 4-space indent, its
keys in its order). Each case runs the real command and compares the written file and the dry
run's diff byte for byte with what changing only `credentialConfig.mode` and `.path` gives.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from addons.core import jsonedit
from tests.harness.mirror import ACR

SHIPPED = """\
{
    "logConfig": {
        "logLevel": 1,
        "logPath": "/var/log/overlaybd.log"
    },
    "cacheConfig": {
        "cacheType": "file",
        "cacheDir": "/opt/overlaybd/registry_cache",
        "cacheSizeGB": 4
    },
    "gzipCacheConfig": {
        "enable": true,
        "cacheDir": "/opt/overlaybd/gzip_cache",
        "cacheSizeGB": 4
    },
    "credentialConfig": {
        "mode": "file",
        "path": "/opt/overlaybd/cred.json"
    },
    "ioEngine": 0,
    "download": {
        "enable": true,
        "delay": 600,
        "delayExtra": 30,
        "maxMBps": 100
    },
    "p2pConfig": {
        "enable": false,
        "address": "localhost:19145/dadip2p"
    },
    "exporterConfig": {
        "enable": false,
        "uriPrefix": "/metrics",
        "port": 9863,
        "updateInterval": 60000000
    },
    "enableAudit": true,
    "auditPath": "/var/log/overlaybd-audit.log",
    "registryFsVersion": "v2"
}
"""
PORT = 8591
URL = f"http://127.0.0.1:{PORT}/auth"
OLD_CRED = '    "credentialConfig": {\n        "mode": "file",\n        "path": "/opt/overlaybd/cred.json"\n    },\n'
NEW_CRED = f'    "credentialConfig": {{\n        "mode": "http",\n        "path": "{URL}"\n    }},\n'
#: What an operator's edits leave that json.dumps would rewrite: an array on one line, a float
#: written as 1e3, an escaped slash, a blank line, and a tab before a member.
HAND_EDITED = SHIPPED.replace('"cacheSizeGB": 4\n    },\n    "gzip', '"cacheSizeGB": 4,\n        "sizes": [1, 2]\n    },\n\n    "gzip').replace(
    '"delay": 600', '"delay": 6e2').replace('"/metrics"', '"\\/metrics"').replace('    "ioEngine"', '\t"ioEngine"')
#: overlaybd's older layout: credentials from `credentialFilePath`, no `credentialConfig` at all.
LEGACY = SHIPPED.replace(OLD_CRED, '    "credentialFilePath": "/opt/overlaybd/cred.json",\n')


def acr(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ACR, "--runmd", str(home / "mirror.runmd"), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("home")
    made = acr(home, "init", "--upstream", "http://127.0.0.1:9", "--mirror-address", f"localhost:{PORT}")
    assert made.returncode == 0, made.stderr
    return home


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines()[2:] if line[:1] in "+-"]


@pytest.mark.parametrize("original", [SHIPPED, HAND_EDITED], ids=["shipped", "hand-edited"])
def test_only_mode_and_path_change(home: Path, tmp_path: Path, original: str) -> None:
    path = tmp_path / "overlaybd.json"
    path.write_text(original)
    dry = acr(home, "overlaybd", "configure", "--config", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert changed_lines(dry.stdout) == [
        '-        "mode": "file",', '-        "path": "/opt/overlaybd/cred.json"',
        '+        "mode": "http",', f'+        "path": "{URL}"',
    ]
    done = acr(home, "overlaybd", "configure", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() == original.replace(OLD_CRED, NEW_CRED).encode()


def test_a_file_without_credential_config_gets_it_after_its_last_key(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "overlaybd.json"
    path.write_text(LEGACY)
    done = acr(home, "overlaybd", "configure", "--config", str(path))
    assert done.returncode == 0, done.stderr
    added = f',\n    "credentialConfig": {{\n        "mode": "http",\n        "path": "{URL}"\n    }}\n}}\n'
    assert path.read_text() == LEGACY.removesuffix("\n}\n") + added


@pytest.mark.parametrize("text, expected", [
    ('{"a": 1}', '{"a": 1, "c": {"mode": "http"}}'),
    ("{}", '{"c": {"mode": "http"}}'),
    ('{\n  "c": null\n}\n', '{\n  "c": {\n    "mode": "http"\n  }\n}\n'),
    ('{"c": {"mode": "file", "timeout": 3}}', '{"c": {"mode": "http", "timeout": 3}}'),
    ('{\n\t"c": {\n\t\t"timeout": 3\n\t}\n}', '{\n\t"c": {\n\t\t"timeout": 3,\n\t\t"mode": "http"\n\t}\n}'),
    ('{"c": {"mode": "a"}, "c": {"mode": "b", "x": [1,2]}}', '{"c": {"mode": "a"}, "c": {"mode": "http", "x": [1,2]}}'),
])
def test_set_members_edits_only_the_values_it_sets(text: str, expected: str) -> None:
    new = jsonedit.set_members(text, ("c",), {"mode": "http"})
    assert new == expected
    want = json.loads(text)
    want["c"] = {**(want.get("c") or {}), "mode": "http"}
    assert json.loads(new) == want
