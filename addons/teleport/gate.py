"""Whether this node can run a streamable (overlaybd) image: teleport's gate.

A teleported image's layers are overlaybd blobs. Only containerd's overlaybd snapshotter can
run them; overlayfs unpacks each into a directory holding one blob file, so a pod starts with
a broken root filesystem. In `auto` mode teleport answers a tag with the streamable image only
while this node streams: containerd's CRI snapshotter is overlaybd (with the layer annotations
passed on), the overlaybd proxy snapshotter is declared in config.toml, and its socket accepts
a connection. `always` trusts the operator; `never` serves every original.

The check reads one file and opens one unix socket: cheap, but blocking, so it never runs on
the event loop. It runs once when the mirror starts and then at most every 30 s: a request
that finds the verdict stale keeps using it and has it refreshed in the background, so a warm
request needs no thread hop. A change of verdict is logged once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from addons.node.containerd_config import DEFAULT_CONFIG
from addons.node.node_check import Unreadable, load_config, schema_of, streaming_missing
from addons.proxy.upstream import NeedsIO
from addons.runmd.plugin import parse_choice

logger = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
#: Seconds a verdict is used before it is checked again.
REFRESH = 30.0
CONNECT_TIMEOUT = 1.0


def parse_mode(text: str) -> str:
    return parse_choice(text, MODES, "teleport mode")


def socket_answers(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None when a unix socket at `address` accepts a connection; else why not (blocking)."""
    path = address.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            return f"the overlaybd snapshotter does not answer on {path} ({e.strerror or e.__class__.__name__})"
    return None


def node_missing(config: Path) -> str | None:
    """None when containerd (as `config` sets it up) streams overlaybd images; else what is
    missing, in one line (blocking: reads the file, connects to the snapshotter's socket)."""
    try:
        data = load_config(config)
    except FileNotFoundError:
        return f"no {config}: containerd runs with its default snapshotter (overlayfs)"
    except Unreadable as e:
        return str(e)
    schema = schema_of(data)
    if schema is None:
        return f"{config}: unknown config version {data.get('version')!r}"
    missing, address = streaming_missing(data, schema)
    if address is not None:
        refused = socket_answers(address)
        if refused:
            missing.append(refused)
    return "; ".join(missing) if missing else None


@dataclass(frozen=True)
class Verdict:
    #: What is missing for this node to stream, or None when it streams.
    missing: str | None
    checked_at: float

    @property
    def streams(self) -> bool:
        return self.missing is None


class Gate:
    """The node's verdict, shared by a mirror's teleport steps (one per `MirrorState`)."""

    def __init__(self, config: Path = DEFAULT_CONFIG, *, probe: Callable[[Path], str | None] = node_missing,
                 clock: Callable[[], float] = time.monotonic, refresh: float = REFRESH) -> None:
        self.config = config
        self.mode = "auto"
        self.probe = probe
        self.clock = clock
        self.refresh_after = refresh
        self.checks = 0
        self._verdict: Verdict | None = None
        self._lock = threading.Lock()
        self._refreshing = False

    def configure(self, config: Path) -> None:
        """Another config.toml: the verdict is checked again on next use."""
        if config != self.config:
            self.config = config
            self._verdict = None

    def verdict(self, io: bool) -> Verdict:
        """The node's verdict. With `io` (a worker thread) a stale or missing one is checked now;
        without (the event loop) a stale one is used while a background check refreshes it, and
        a missing one raises NeedsIO."""
        v = self._verdict
        if v is not None and self.clock() - v.checked_at < self.refresh_after:
            return v
        if io:
            return self.check()
        if v is None:
            raise NeedsIO("the node's snapshotter")
        self._refresh_in_background()
        return v

    def check(self) -> Verdict:
        """Check the node now (blocking) and log a change of verdict once."""
        missing = self.probe(self.config)
        v = Verdict(missing, self.clock())
        with self._lock:
            before = self._verdict
            self._verdict = v
            self.checks += 1
        if before is None or before.missing != missing:
            if missing is None:
                logger.info("teleport (%s): this node streams overlaybd images (%s)", self.mode, self.config)
            elif self.mode == "auto":
                logger.warning("teleport (auto): tag pulls get the original images: this node cannot stream "
                               "overlaybd images: %s", missing)
            else:
                logger.info("teleport (%s): this node cannot stream overlaybd images: %s", self.mode, missing)
        return v

    def _refresh_in_background(self) -> None:
        with self._lock:
            if self._refreshing:
                return
            self._refreshing = True

        def run() -> None:
            try:
                self.check()
            except Exception:  # a failed check keeps the last verdict; the next request tries again
                logger.exception("checking the node's snapshotter failed")
            finally:
                self._refreshing = False

        try:
            asyncio.get_running_loop().run_in_executor(None, run)
        except RuntimeError:  # no event loop in this thread: a thread of its own
            threading.Thread(target=run, name="teleport-gate", daemon=True).start()

    def public(self) -> dict[str, Any]:
        """For /status: the mode, and whether (and why not) this node streams."""
        out: dict[str, Any] = {"mode": self.mode, "containerd_config": str(self.config)}
        v = self._verdict
        if v is not None:
            out["node_streams"] = v.streams
            if v.missing:
                out["missing"] = v.missing
            out["checked_ago"] = round(self.clock() - v.checked_at, 1)
        return out
