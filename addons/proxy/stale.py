"""The last answer the mirror gave for each tag, kept on disk for when the registry cannot answer.

During a registry outage containerd falls back from the mirror to the same dead registry, and
a pod with `imagePullPolicy: Always` cannot start although every byte of its image is on the
node. With the tag's last answer (digest, headers, body, and the teleport decision made then)
containerd finds the content locally and fetches nothing.

An entry is keyed by what decides the answer: upstream, repository, tag and the client's
`Accept` class (the set of media types it accepts), so one client's `Accept` never decides
another's answer. It lives in memory and, written atomically and owner-only, in one file per
entry under the mirror's work folder, so that it survives a restart during the outage.
Files are named by a hash of the key (a repository name never becomes a path). The store is
bounded (LIMIT_BYTES, LIMIT_ENTRIES): the least recently given or served answers go first.
An unchanged answer is written again at most every REFRESH seconds, and every write and
delete happens in the store's one writer thread, never on the event loop.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from addons.core.files import PRIVATE, atomic_write
from addons.registry import oci

logger = logging.getLogger(__name__)

#: Bytes of answers kept (bodies and headers; a manifest is a few KiB, so thousands of tags).
LIMIT_BYTES = 16 * 1024 * 1024
#: Answers kept, whatever their size.
LIMIT_ENTRIES = 4096
#: Seconds after which an answer given again unchanged is written again (its age restarts).
REFRESH = 60.0
#: Format of a stored entry; a file of another version is ignored.
VERSION = 1

Key = tuple[str, str, str, str]


def accept_class(accept: list[str]) -> str:
    """What of a client's `Accept` decides a registry's manifest answer: the media types, as a set."""
    return ",".join(sorted({oci.base_media_type(v) for v in accept}))


@dataclass
class Entry:
    """One tag's last answer: a 200 as the client got it, and what the mirror decided then."""

    key: Key
    #: When it was given (POSIX seconds).
    saved: float
    headers: dict[str, str]
    body: bytes
    #: The manifest the tag resolved to (media type, digest, body).
    resolved: tuple[str, str, bytes]
    #: The teleport decision of the answer (TeleportDecision.public()), if one was made.
    teleport: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return len(self.body) + len(self.resolved[2]) + sum(len(k) + len(v) for k, v in self.headers.items()) + 256

    def same_answer(self, other: Entry) -> bool:
        return (self.body, self.headers, self.resolved, self.teleport) == (other.body, other.headers, other.resolved, other.teleport)

    def to_json(self) -> bytes:
        media_type, digest, body = self.resolved
        return json.dumps({
            "version": VERSION, "key": list(self.key), "saved": self.saved, "headers": self.headers,
            "body": base64.b64encode(self.body).decode(),
            "resolved": {"media_type": media_type, "digest": digest,
                         "body": None if body == self.body else base64.b64encode(body).decode()},
            "teleport": self.teleport,
        }, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Entry:
        doc = json.loads(data)
        if doc.get("version") != VERSION:
            raise ValueError(f"version {doc.get('version')!r}")
        key = tuple(str(k) for k in doc["key"])
        if len(key) != 4:
            raise ValueError("bad key")
        body = base64.b64decode(doc["body"])
        resolved = doc["resolved"]
        resolved_body = body if resolved["body"] is None else base64.b64decode(resolved["body"])
        headers = {str(k): str(v) for k, v in doc["headers"].items()}
        teleport = doc.get("teleport")
        return cls(key, float(doc["saved"]), headers, body,  # type: ignore[arg-type]
                   (str(resolved["media_type"]), str(resolved["digest"]), resolved_body),
                   teleport if isinstance(teleport, dict) else None)


def file_name(key: Key) -> str:
    return hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:40] + ".json"


@dataclass
class Served:
    """What /status and /metrics say about stale answers."""

    by: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    last: dict[str, Any] | None = None


class StaleStore:
    """Tag answers by key, in memory and in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, limit_bytes: int = LIMIT_BYTES, limit_entries: int = LIMIT_ENTRIES,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = folder
        self.limit_bytes = limit_bytes
        self.limit_entries = limit_entries
        self.clock = clock
        self.size = 0
        self.served = Served()
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[Key, Entry] = collections.OrderedDict()
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None
        self._load()

    # -- memory -------------------------------------------------------------------------

    def get(self, key: Key) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: Entry) -> None:
        """Keep `entry` as its tag's last answer; written to disk unless an unchanged answer was
        written less than REFRESH seconds ago."""
        if entry.size > self.limit_bytes:
            return
        with self._lock:
            old = self._entries.get(entry.key)
            if old is not None and old.same_answer(entry) and entry.saved - old.saved < REFRESH:
                self._entries.move_to_end(entry.key)
                return
            if old is not None:
                self.size -= old.size
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            self.size += entry.size
            evicted = self._evict()
        self._submit(self._write, entry)
        for key in evicted:
            self._submit(self._unlink, key)

    def drop(self, upstream: str, name: str, tag: str) -> int:
        """Forget every answer for a tag the registry says no longer exists; how many there were."""
        with self._lock:
            keys = [k for k in self._entries if k[:3] == (upstream, name, tag)]
            for key in keys:
                self.size -= self._entries.pop(key).size
        for key in keys:
            self._submit(self._unlink, key)
        return len(keys)

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> list[Key]:
        out = []
        while self._entries and (self.size > self.limit_bytes or len(self._entries) > self.limit_entries):
            key, old = self._entries.popitem(last=False)
            self.size -= old.size
            out.append(key)
        return out

    # -- disk ---------------------------------------------------------------------------

    def _load(self) -> None:
        """The answers a previous run kept, oldest first (so the newest survive eviction)."""
        try:
            names = [n for n in os.listdir(self.folder) if n.endswith(".json")]
        except FileNotFoundError:
            return
        except OSError as e:
            logger.warning("stale answers in %s not read: %s", self.folder, e)
            return
        loaded = []
        for name in names:
            path = self.folder / name
            try:
                entry = Entry.from_json(path.read_bytes())
                if file_name(entry.key) != name:
                    raise ValueError("file name does not match its key")
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
                logger.warning("stale answer %s ignored: %s", path, e.__class__.__name__)
                continue
            loaded.append(entry)
        loaded.sort(key=lambda e: e.saved)
        with self._lock:
            for entry in loaded:
                self._entries[entry.key] = entry
                self.size += entry.size
            evicted = self._evict()
        for key in evicted:
            self._submit(self._unlink, key)

    def _submit(self, fn: Callable[[Any], None], arg: Any) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="acr-stale")
            writer = self._writer
        writer.submit(fn, arg)

    def _write(self, entry: Entry) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
            atomic_write(self.folder / file_name(entry.key), entry.to_json(), PRIVATE, folder_mode=0o700)
        except OSError as e:
            logger.warning("stale answer for %s:%s not written: %s", entry.key[1], entry.key[2], e)

    def _unlink(self, key: Key) -> None:
        try:
            (self.folder / file_name(key)).unlink(missing_ok=True)
        except OSError as e:
            logger.warning("stale answer for %s:%s not removed: %s", key[1], key[2], e)

    def flush(self) -> None:
        """Wait for the writes so far (tests, shutdown)."""
        with self._lock:
            writer = self._writer
        if writer is not None:
            writer.submit(lambda: None).result()

    def close(self) -> None:
        with self._lock:
            writer, self._writer = self._writer, None
        if writer is not None:
            writer.shutdown(wait=True)

    # -- what was served ------------------------------------------------------------------

    def count(self, upstream: str, reason: str, what: dict[str, Any]) -> None:
        with self._lock:
            self.served.by[(upstream, reason)] += 1
            self.served.last = what

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"kept": len(self._entries), "bytes": self.size, "answers": sum(self.served.by.values()),
                    "last": self.served.last}
