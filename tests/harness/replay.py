"""Recorded sessions (tests/replay/) and the tools to replay them.

* `http_pull`: what containerd 1.6 sends a mirror for `ctr images pull` (HEAD the tag, GET the
  manifest by the digest the HEAD reported, the platform's manifest of an index, the config and
  layers), with every fetch checked against its digest: a client for the replay tests that needs
  no root and no daemon.
* `ReplayServer`: `mitmdump --server-replay` answering as the recorded ACR (and its storage host),
  each origin on a loopback port, with `acr_rehost` pointing the recorded realm and redirects
  at those ports. Requests that are not in the recording get 404.
* `check_pull`: a pull's outcome against the session's expectation file; a list of what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import requests

from .ports import direct_session, free_port, wait_port
from .procs import kill_group

ROOT = Path(__file__).resolve().parents[2]
REPLAY_DIR = ROOT / "tests" / "replay"
MITMDUMP = str(Path(sys.executable).with_name("mitmdump"))
SESSION = "acr-session.json"
CLIENT_FLOWS = "acr-client.mitm"
UPSTREAM_FLOWS = "acr-upstream.mitm"
RUNMD = "mirror.runmd"
#: The mirror address written in tests/replay/mirror.runmd (the recorded client flows' host).
RUNMD_ADDRESS = "127.0.0.1:8578"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
#: containerd 1.6's one comma-joined Accept for manifests.
ACCEPT = ", ".join((
    "application/vnd.docker.distribution.manifest.v2+json", DOCKER_LIST,
    "application/vnd.oci.image.manifest.v1+json", OCI_INDEX, "*/*",
))
#: Form fields that carry the mirror's credential in a token request: ignored when matching.
SECRET_FORM_FIELDS = ("refresh_token", "password", "access_token")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class PullResult:
    resolved: str = ""
    media_type: str = ""
    manifest: str = ""
    blobs: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def http_pull(mirror_url: str, ns: Optional[str], repo: str, ref: str, platform: str = "linux/amd64",
              timeout: float = 30.0) -> PullResult:
    """containerd's requests for a pull, against a mirror (see the module docstring)."""
    out = PullResult()
    s = direct_session()
    query = {"ns": ns} if ns else {}

    def get(method: str, path: str, accept: Optional[str] = None) -> requests.Response:
        r = s.request(method, mirror_url + path, params=query, headers={"Accept": accept} if accept else {},
                      timeout=timeout, allow_redirects=True)
        out.requests.append(f"{method} {path} -> {r.status_code}")
        return r

    with s:
        head = get("HEAD", f"/v2/{repo}/manifests/{ref}", ACCEPT)
        if head.status_code != 200:
            out.errors.append(f"HEAD {ref}: {head.status_code}")
            return out
        out.resolved = head.headers.get("Docker-Content-Digest", "")
        out.media_type = head.headers.get("Content-Type", "")
        digest = out.resolved
        while True:
            r = get("GET", f"/v2/{repo}/manifests/{digest}", ACCEPT)
            if r.status_code != 200 or sha256(r.content) != digest:
                out.errors.append(f"GET manifest {digest}: {r.status_code}")
                return out
            doc = r.json()
            if doc.get("mediaType") in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
                os_, arch = platform.split("/")[:2]
                match = [m for m in doc["manifests"]
                         if (m.get("platform") or {}).get("os") == os_ and (m.get("platform") or {}).get("architecture") == arch]
                if not match:
                    out.errors.append(f"no {platform} manifest in the index")
                    return out
                digest = match[0]["digest"]
                continue
            out.manifest = digest
            break
        for d in [doc["config"], *doc.get("layers", [])]:
            r = get("GET", f"/v2/{repo}/blobs/{d['digest']}")
            if r.status_code != 200 or sha256(r.content) != d["digest"]:
                out.errors.append(f"GET blob {d['digest']}: {r.status_code}")
                continue
            out.blobs[d["digest"]] = len(r.content)
    return out


def session_info(folder: Path = REPLAY_DIR) -> dict[str, Any]:
    return json.loads((folder / SESSION).read_text())


def check_pull(result: PullResult, expect: dict[str, Any]) -> list[str]:
    """What differs between a pull and the recorded session's outcome (empty: the same)."""
    problems = list(result.errors)
    if result.resolved != expect["teleport"]["to"]:
        problems.append(f"teleport: the tag resolved to {result.resolved or '-'}, "
                        f"recorded {expect['teleport']['to']} (teleported from {expect['teleport']['from']})")
    if result.manifest and result.manifest != expect["teleport"]["to"]:
        problems.append(f"manifest: pulled {result.manifest}, recorded {expect['teleport']['to']}")
    want = expect["blobs"]
    if result.blobs != want:
        problems.append(f"blobs: pulled {sorted(result.blobs)}, recorded {sorted(want)}")
    return problems


def replay_runmd(upstream: str, address: str, folder: Path = REPLAY_DIR, *, teleport: bool = True) -> str:
    """tests/replay/mirror.runmd pointed at `upstream` and listening on `address`."""
    from addons import catalog

    text = (folder / RUNMD).read_text()
    doc = catalog.parse_text(text, str(folder / RUNMD)).document
    lines = text.splitlines()
    for _, step in doc.steps("mirror"):
        lines[step.line - 1] = lines[step.line - 1].replace(step.input, upstream, 1)
    text = "\n".join(lines).replace(RUNMD_ADDRESS, address) + "\n"
    if not teleport:
        text = "\n".join(line for line in text.splitlines() if ".teleport" not in line) + "\n"
    return text


class ReplayServer:
    """`mitmdump --server-replay` as the recorded registry and storage hosts, on loopback."""

    def __init__(self, flows: Path, origins: Sequence[str], log: Path, *, extra: Sequence[str] = ()) -> None:
        self.flows = flows
        self.ports = {origin: free_port() for origin in origins}
        self.log_path = log
        self.extra = list(extra)
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def url(self, origin: str) -> str:
        return f"http://127.0.0.1:{self.ports[origin]}"

    def start(self, timeout: float = 20.0) -> "ReplayServer":
        cmd = [MITMDUMP, "-q"]
        for origin, port in self.ports.items():
            cmd += ["--mode", f"reverse:{origin}@127.0.0.1:{port}"]
        cmd += [
            "--set", "connection_strategy=lazy",
            "--server-replay", str(self.flows),
            "--set", "server_replay_extra=404",
            "--set", "server_replay_reuse=true",
            "--set", "keepserving=true",
            "-s", str(ROOT / "scripts" / "rehost.py"),
            "--set", "acr_rehost=" + ",".join(f"{o}={self.url(o)}" for o in self.ports),
        ]
        for name in SECRET_FORM_FIELDS:
            cmd += ["--set", f"server_replay_ignore_payload_params={name}"]
        cmd += self.extra
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "HOME": str(self.log_path.parent)}  # mitmproxy's confdir, not the user's
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=env, cwd=ROOT)
        try:
            for port in self.ports.values():
                wait_port("127.0.0.1", port, timeout)
        except Exception:
            self.stop()
            raise RuntimeError(f"replay server did not start:\n{self.log_text()[-3000:]}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
            self.proc = None
            self._log.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "ReplayServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
