"""A node that streams overlaybd (or eStargz) images, as far as the mirror can tell: containerd's
config.toml says so and the snapshotter's socket accepts connections.

overlaybd is not in Debian, so its snapshotter cannot run here. What the mirror checks is the
config (CRI's snapshotter, the annotations, `[proxy_plugins.overlaybd]`) and that the socket
the config names accepts a connection: `StreamingNode` writes such a config.toml (containerd
1.x's schema, version 2, or 2.x's, version 3) and holds a listening unix socket at the address
it declares (a listening socket, nothing more: no gRPC). `stop()` closes it, so a test can take
the snapshotter away.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from pathlib import Path
from typing import Optional

CONFIG_V2 = """\
version = 2

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "{snapshotter}"
  disable_snapshot_annotations = false

[proxy_plugins.{snapshotter}]
  type = "snapshot"
  address = "{socket}"
"""

CONFIG_V3 = """\
version = 3

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "{snapshotter}"

[proxy_plugins.{snapshotter}]
  type = "snapshot"
  address = "{socket}"
"""


class StreamingNode:
    """config.toml of an overlaybd (or stargz) node, and a listening socket standing in for the snapshotter."""

    def __init__(self, version: int = 2, *, listen: bool = True, snapshotter: str = "overlaybd") -> None:
        # Short path: a unix socket's path must fit in sun_path (108 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="lifec-obd-", dir="/tmp"))
        self.socket_path = self.dir / f"{snapshotter}.sock"
        self.config = self.dir / "config.toml"
        self.config.write_text((CONFIG_V2 if version == 2 else CONFIG_V3).format(socket=self.socket_path, snapshotter=snapshotter))
        self._sock: Optional[socket.socket] = None
        if listen:
            self.start()

    def start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(self.socket_path))
        s.listen(16)
        self._sock = s
        # Accept and drop each connection, so that checks never fill the backlog.
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    @staticmethod
    def _accept(s: socket.socket) -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            conn.close()

    def stop(self) -> None:
        """Close the socket (the snapshotter stopped); the file stays, as a crashed one leaves it."""
        if self._sock is not None:
            self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StreamingNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
