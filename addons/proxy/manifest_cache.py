"""The mirror's manifests by digest, kept in memory within a byte budget."""

from __future__ import annotations

import collections
import threading

from addons.registry.oci import Manifest

CACHE_BYTES = 64 * 1024 * 1024


class ManifestCache:
    """Manifests by (upstream, repository, digest), bounded in bytes, least recently used out."""

    def __init__(self, limit: int = CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._items: collections.OrderedDict[tuple[str, str, str], Manifest] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str]) -> Manifest | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def put(self, key: tuple[str, str, str], manifest: Manifest) -> None:
        if manifest.size > self.limit:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = manifest
            self.size += manifest.size
            while self.size > self.limit:
                _, old = self._items.popitem(last=False)
                self.size -= old.size
