"""The real CNCF distribution registry (Debian's ``docker-registry`` 2.8.2) on a loopback port.

Tests talk to the same registry code that serves much of the world, so the mirror is checked
against real challenges, real manifest validation and real error bodies, not our idea of them.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Literal, Optional

import requests

from .ports import LOOPBACK, direct_session, free_port
from .procs import kill_group
from .tokenserver import TokenServer

Mode = Literal["anonymous", "htpasswd", "token"]
REGISTRY_BIN = "docker-registry"


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd entry made by apache2-utils' htpasswd, the only hash 2.8 accepts."""
    out = subprocess.run(
        ["htpasswd", "-Bbn", user, password], check=True, capture_output=True, text=True
    ).stdout
    return out.strip()


class Registry:
    """``docker-registry serve`` with its own storage, config and log in a private folder.

    ``mode`` picks the auth: ``anonymous`` (none), ``htpasswd`` (Basic, bcrypt) or ``token``
    (Bearer via a ``TokenServer``). ``credentials`` is what the harness pushes with: the htpasswd
    user, or for token mode a user of the token server (default: its first user).
    """

    def __init__(
        self,
        mode: Mode = "anonymous",
        *,
        token_server: Optional[TokenServer] = None,
        credentials: Optional[tuple[str, str]] = None,
        port: Optional[int] = None,
        workdir: Optional[Path] = None,
        extra_config: Optional[dict[str, Any]] = None,
        timeout: float = 15.0,
    ) -> None:
        if shutil.which(REGISTRY_BIN) is None:
            raise FileNotFoundError(
                f"{REGISTRY_BIN} not found: install the Debian package docker-registry "
                "(scripts/test does)"
            )
        if mode == "token" and token_server is None:
            raise ValueError("token mode needs a token_server")
        self.mode: Mode = mode
        self.token_server = token_server
        self.port: int = port or free_port()
        self.host = f"{LOOPBACK}:{self.port}"
        self.url = f"http://{self.host}"
        self._own_dir = workdir is None
        self.dir: Path = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="lifec-reg-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.credentials: Optional[tuple[str, str]] = credentials

        auth: dict[str, Any] = {}
        if mode == "htpasswd":
            if self.credentials is None:
                self.credentials = ("tester", secrets.token_urlsafe(12))
            htfile = self.dir / "htpasswd"
            htfile.write_text(htpasswd_line(*self.credentials) + "\n")
            auth = {"htpasswd": {"realm": "lifec-test", "path": str(htfile)}}
        elif mode == "token":
            assert token_server is not None
            if self.credentials is None and token_server.users:
                self.credentials = next(iter(token_server.users.items()))
            auth = {
                "token": {
                    "realm": token_server.realm,
                    "service": token_server.service,
                    "issuer": token_server.issuer,
                    "rootcertbundle": str(token_server.cert_path),
                }
            }
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "formatter": "text", "fields": {"service": "registry"}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {
                "addr": f"{LOOPBACK}:{self.port}",
                "secret": secrets.token_hex(16),
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "health": {"storagedriver": {"enabled": False}},
        }
        if auth:
            config["auth"] = auth
        for key, value in (extra_config or {}).items():
            config[key] = value
        # JSON is YAML: no YAML library needed to write the config.
        self.config_path.write_text(json.dumps(config, indent=2))

        self._log = open(self.log_path, "ab")
        self.proc: Optional[subprocess.Popen[bytes]] = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,  # own process group: stop() kills it whole
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        """Return once ``/v2/`` answers (200, or 401 when auth is on), or fail with the log."""
        deadline = time.monotonic() + timeout
        with direct_session() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"docker-registry exited with {self.proc.returncode}:\n{self.log_text()}"
                    )
                try:
                    r = s.get(self.url + "/v2/", timeout=1)
                    if r.status_code in (200, 401):
                        return
                except requests.ConnectionError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"registry {self.url} not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        """The registry's log (warnings and the access log) for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill the process group, delete storage (and the folder if we made it); idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            kill_group(proc)
        if not self._log.closed:
            self._log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:  # keep config and log for debugging, drop blobs (they can be GiBs)
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Registry({self.mode!r}, url={self.url!r})"
