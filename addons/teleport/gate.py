"""Which streamable format this node can run, if any: teleport's gate.

A teleported image only helps, or even works, with the snapshotter its format was made for.
overlaybd layers are blobs that only overlaybd's snapshotter can run (overlayfs unpacks each
into a directory holding one blob file, so a pod starts with a broken root filesystem).
eStargz layers are ordinary gzip tars that overlayfs unpacks too, but then the whole image is
downloaded, a little bigger, for nothing. So in `auto` mode teleport answers a tag only with a
copy in the format this node streams: containerd's CRI snapshotter is a streaming one
(`overlaybd` streams overlaybd images, `stargz` streams eStargz ones) with the layer
annotations passed on, that snapshotter is declared as a proxy plugin in config.toml, and its
socket accepts a connection. `always` trusts the operator; `never` serves every original.

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
from addons.node.node_check import (STREAMING_SNAPSHOTTERS, Unreadable, cri_snapshotter, load_config, schema_of,
                                    streaming_missing)
from addons.proxy.upstream import NeedsIO
from addons.runmd.plugin import parse_choice

logger = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
#: Seconds a verdict is used before it is checked again.
REFRESH = 30.0
CONNECT_TIMEOUT = 1.0


def parse_mode(text: str) -> str:
    return parse_choice(text, MODES, "teleport mode")


def socket_answers(address: str, snapshotter: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """None when a unix socket at `address` accepts a connection; else why not (blocking)."""
    path = address.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except OSError as e:
            return f"the {snapshotter} snapshotter does not answer on {path} ({e.strerror or e.__class__.__name__})"
    return None


@dataclass(frozen=True)
class NodeStreams:
    """What a node's containerd unpacks tag pulls with, as far as teleport is concerned."""

    #: CRI's snapshotter as config.toml names it (`overlayfs` when it names none).
    snapshotter: str
    #: The format this node streams (`overlaybd`, `estargz`), or None.
    format: str | None = None
    #: Why it streams nothing, in one line; None when it streams.
    missing: str | None = None


def node_streams(config: Path) -> NodeStreams:
    """Which format containerd (as `config` sets it up) streams, or what it lacks to stream one
    (blocking: reads the file, connects to the snapshotter's socket)."""
    try:
        data = load_config(config)
    except FileNotFoundError:
        return NodeStreams("overlayfs", missing=f"no {config}: containerd runs with its default snapshotter (overlayfs)")
    except Unreadable as e:
        return NodeStreams("unknown", missing=str(e))
    schema = schema_of(data)
    if schema is None:
        return NodeStreams("unknown", missing=f"{config}: unknown config version {data.get('version')!r}")
    snapshotter = cri_snapshotter(data, schema)
    fmt = STREAMING_SNAPSHOTTERS.get(snapshotter)
    if fmt is None:
        streaming = " or ".join(repr(s) for s in STREAMING_SNAPSHOTTERS)
        return NodeStreams(snapshotter, missing=(f"CRI's snapshotter is {snapshotter!r}, not a streaming one ({streaming}) "
                                                 f"({schema.dotted(schema.snapshotter)})"))
    missing, address = streaming_missing(data, schema, snapshotter)
    if address is not None:
        refused = socket_answers(address, snapshotter)
        if refused:
            missing.append(refused)
    if missing:
        return NodeStreams(snapshotter, missing="; ".join(missing))
    return NodeStreams(snapshotter, fmt)


@dataclass(frozen=True)
class Verdict:
    node: NodeStreams
    checked_at: float

    @property
    def format(self) -> str | None:
        """The format this node streams, or None."""
        return self.node.format

    @property
    def missing(self) -> str | None:
        return self.node.missing

    @property
    def streams(self) -> bool:
        return self.node.format is not None

    def describe(self) -> str:
        """What the node has, in a few words, for the `snapshotter` reason."""
        if self.node.format is not None:
            return f"this node streams {self.node.format} (CRI's snapshotter is {self.node.snapshotter!r})"
        return self.node.missing or f"CRI's snapshotter is {self.node.snapshotter!r}"


class Gate:
    """The node's verdict, shared by a mirror's teleport steps (one per `MirrorState`)."""

    def __init__(self, config: Path = DEFAULT_CONFIG, *, probe: Callable[[Path], NodeStreams] = node_streams,
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
        node = self.probe(self.config)
        v = Verdict(node, self.clock())
        with self._lock:
            before = self._verdict
            self._verdict = v
            self.checks += 1
        if before is None or before.node != node:
            if node.format is not None:
                logger.info("teleport (%s): this node streams %s images (%s snapshotter, %s)",
                            self.mode, node.format, node.snapshotter, self.config)
            elif self.mode == "auto":
                logger.warning("teleport (auto): tag pulls get the original images: this node streams no "
                               "teleported format: %s", node.missing)
            else:
                logger.info("teleport (%s): this node streams no teleported format: %s", self.mode, node.missing)
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
            out["snapshotter"] = v.node.snapshotter
            if v.format:
                out["format"] = v.format
            if v.missing:
                out["missing"] = v.missing
            out["checked_ago"] = round(self.clock() - v.checked_at, 1)
        return out
