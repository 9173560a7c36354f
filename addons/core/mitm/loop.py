"""The mirror's event loop and upstream read sizes (leans on mitmproxy internals; see the package).

Where the time goes when blobs stream (py-spy over `acr mirror start` streaming a 1 GiB blob,
scripts/bench): the mirror's own addons do no per-chunk work (a streamed response is
`stream = True`, no callable), and logging is one line per request. What costs is mitmproxy's
per-chunk path: every `reader.read(65535)` of an upstream connection becomes one `DataReceived`
event that walks the layer stack, h11's receive buffer and the client writer. About 4 s of CPU
per GiB on plain asyncio with 64 KiB chunks; 2 s with both adjustments below (each alone gives
~3 s).

1. `run(main)`: run the mirror's event loop on uvloop when it is installed (plain asyncio
   otherwise). Faster transports and loop; nothing in mitmproxy's reverse mode needs the
   default loop.
2. `ReadSize`: an addon that makes each *upstream* connection read up to `READ_SIZE` (1 MiB)
   per event instead of 64 KiB. Mechanism, exactly: in its `server_connected` hook, which
   mitmproxy awaits after it stored the new connection's `ConnectionIO(reader, writer)` in the
   client's `ConnectionHandler.transports` and *before* `handle_connection` starts reading
   (mitmproxy/proxy/server.py, `open_connection`), it finds that `asyncio.StreamReader` through
   the `proxyserver` addon's `connections[client.id]` (the table mitmproxy's own `inject`
   commands use) and

   - shadows the instance's `read` with one that asks for `max(n, READ_SIZE)` bytes, and
   - raises the reader's `_limit` from 64 KiB to `BUFFER_LIMIT` (256 KiB). asyncio pauses the
     socket once more than 2 × limit bytes are buffered, so the buffer never exceeds
     512 KiB + one socket read (256 KiB) < READ_SIZE: every read takes the whole buffer and
     `del buffer[:n]` never has to move a remainder (with limit = 1 MiB it did, and uvloop
     plus 1 MiB reads got *slower* than either alone).

Why it is safe: it touches only upstream connections of this process; the only consumer of
that reader is `handle_connection`, which hands each chunk to the layers whatever its size
(h11 and the TLS layer take any size); back-pressure is unchanged (`drain_writers` after every
chunk, the transport paused above 2 × limit); memory is bounded per connection (≤ 768 KiB
buffered plus the chunk in flight, so RSS stays flat in blob size); and when mitmproxy's
internals are not what this expects (no `proxyserver`, no transport entry, a reader that is
not an `asyncio.StreamReader`, e.g. mitmproxy_rs streams) it does nothing, which is just the
stock behaviour.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from mitmproxy.proxy import server_hooks

from addons.core.mitm.handoff import connection_io

#: Bytes one upstream read may return (mitmproxy reads 65535).
READ_SIZE = 1 << 20
#: asyncio.StreamReader's limit for upstream readers (default 64 KiB; see the module docstring).
BUFFER_LIMIT = 256 * 1024

T = TypeVar("T")


def loop_factory() -> Any:
    """uvloop's loop factory when uvloop is installed, else None (asyncio's default loop)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def enlarge_reads(reader: asyncio.StreamReader, size: int = READ_SIZE, limit: int = BUFFER_LIMIT) -> bool:
    """Make `reader.read(n)` return up to `size` bytes; False if it was already done."""
    if "read" in vars(reader):
        return False
    reader._limit = max(reader._limit, limit)  # type: ignore[attr-defined]
    class_read = type(reader).read

    async def read(n: int = -1) -> bytes:
        return await class_read(reader, size if 0 < n < size else n)

    reader.read = read  # type: ignore[method-assign]
    return True


class ReadSize:
    """Upstream connections read up to READ_SIZE bytes per event (see the module docstring)."""

    name = "acr-read-size"

    def __init__(self, size: int = READ_SIZE, limit: int = BUFFER_LIMIT) -> None:
        self.size = size
        self.limit = limit

    def server_connected(self, data: server_hooks.ServerConnectionHookData) -> None:
        reader = upstream_reader(data)
        if isinstance(reader, asyncio.StreamReader):
            enlarge_reads(reader, self.size, self.limit)


def upstream_reader(data: server_hooks.ServerConnectionHookData) -> object | None:
    """The reader mitmproxy's connection handler uses for `data.server`, if it can be found."""
    return getattr(connection_io(data.client, data.server), "reader", None)
