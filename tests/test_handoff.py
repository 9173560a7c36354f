"""What addons.core.mitm.handoff.hand_off relies on, pinned against the installed mitmproxy, in-process.

A mitmproxy master in reverse mode (on uvloop, as the mirror runs it) with one addon that answers
every request with a head whose body `hand_off` writes: the head and body arrive in order, the
connection stays usable (keep-alive, and mitmproxy's chunked terminator is held until the body is
written), a body that fails is cut before its end, and the flow's duration covers the body.
"""

from __future__ import annotations

import asyncio
import http.client as httpclient
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mitmproxy import http, options
from mitmproxy.tools.dump import DumpMaster

from addons.core.mitm.handoff import can_hand_off, hand_off
from addons.core.mitm.loop import run
from tests.harness.ports import free_port
from mitmproxy.test import tflow

BODY = os.urandom(3 * 1024 * 1024 + 17)


class Lane:
    """Answers `/whole`, `/cut` and `/chunked`; the body goes through `hand_off`."""

    def __init__(self) -> None:
        self.done: list[tuple[str, bool, float]] = []
        self.flows: list[http.HTTPFlow] = []
        self.handed: list[bool] = []

    def request(self, flow: http.HTTPFlow) -> None:
        flow.response = http.Response.make(200, b"", {"Content-Type": "application/octet-stream"})
        if flow.request.path == "/chunked":
            del flow.response.headers["Content-Length"]
            flow.response.headers["Transfer-Encoding"] = "chunked"
        else:
            flow.response.headers["Content-Length"] = str(len(BODY))

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        path = flow.request.path
        self.flows.append(flow)

        def body(sock: socket.socket) -> bool:
            time.sleep(0.2)  # the flow's duration must include the body
            if path == "/chunked":
                for i in range(0, len(BODY), 1 << 20):
                    part = BODY[i:i + (1 << 20)]
                    sock.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
                return True
            if path == "/cut":
                sock.sendall(BODY[:-1])
                return False
            sock.sendall(BODY)
            return True

        self.handed.append(hand_off(flow, body, lambda ok: self.done.append((path, ok, time.time()))))


def settled(addon: Lane, count: int) -> None:
    """Wait until the event loop ran the hand-offs' completions (they follow the last byte)."""
    for _ in range(500):
        if len(addon.done) >= count:
            return
        time.sleep(0.01)


@pytest.fixture
def lane() -> Iterator[tuple[Lane, int]]:
    addon, port = Lane(), free_port()
    started = threading.Event()
    held: dict[str, Any] = {}

    async def main() -> None:
        opts = options.Options()
        master = DumpMaster(opts, with_termlog=False, with_dumper=False)
        opts.update(mode=[f"reverse:http://127.0.0.1:9@127.0.0.1:{port}"], connection_strategy="lazy")
        master.addons.add(addon)
        held["master"], held["loop"] = master, asyncio.get_running_loop()
        started.set()
        await master.run()

    thread = threading.Thread(target=lambda: run(main()), daemon=True)
    thread.start()
    assert started.wait(10)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield addon, port
    finally:
        held["loop"].call_soon_threadsafe(held["master"].shutdown)
        thread.join(10)


def test_a_handed_off_body_follows_its_head_and_the_connection_stays_usable(lane: tuple[Lane, int]) -> None:
    addon, port = lane
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=30)
    for path in ("/whole", "/chunked", "/whole"):  # one keep-alive connection
        conn.request("GET", path)
        r = conn.getresponse()
        assert r.status == 200
        assert r.read() == BODY
    conn.close()
    settled(addon, 3)
    assert addon.handed == [True, True, True]
    assert [(p, ok) for p, ok, _ in addon.done] == [("/whole", True), ("/chunked", True), ("/whole", True)]
    for flow, (_, _, finished) in zip(addon.flows, addon.done):
        assert flow.response is not None
        # mitmproxy set timestamp_end when it wrote the head; the hand-off moves it past the body.
        assert flow.response.timestamp_end >= flow.response.timestamp_start + 0.2
        assert flow.response.timestamp_end <= finished


def test_a_body_that_fails_is_cut_before_its_end(lane: tuple[Lane, int]) -> None:
    addon, port = lane
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/cut")
    r = conn.getresponse()
    assert r.status == 200 and int(r.headers["Content-Length"]) == len(BODY)
    with pytest.raises(httpclient.IncompleteRead) as e:
        r.read()
    assert len(e.value.partial) < len(BODY)
    conn.close()
    settled(addon, 1)
    assert [(p, ok) for p, ok, _ in addon.done] == [("/cut", False)]


def test_without_a_live_client_connection_nothing_is_handed_off() -> None:
    from mitmproxy.test import taddons

    flow = tflow.tflow(resp=True)
    with taddons.context():
        assert can_hand_off(flow)  # a plain HTTP/1 client...
        assert not hand_off(flow, lambda sock: True)  # ...but no connection to write to
        flow.client_conn.tls = True
        assert not can_hand_off(flow)


def test_mitmproxy_writes_a_response_head_in_one_send_and_runs_responseheaders_before_it() -> None:
    """The two facts hand_off's writer shadow stands on (mitmproxy/proxy/layers/http)."""
    import inspect

    from mitmproxy.proxy.layers.http import HttpStream, _http1

    send = inspect.getsource(_http1.Http1Server.send)
    assert "raw = http1.assemble_response_head(response)\n            yield commands.SendData(self.conn, raw)" in send
    request_done = inspect.getsource(HttpStream.state_wait_for_request_headers) + inspect.getsource(HttpStream)
    assert "yield HttpResponseHeadersHook(self.flow)" in request_done


def test_a_client_that_asks_to_close_gets_the_whole_body_then_the_end(lane: tuple[Lane, int]) -> None:
    """mitmproxy closes its side right after the head (`Connection: close`): the hand-off's own
    copy of the socket keeps the connection until the body is out, then ends it."""
    addon, port = lane
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        c.sendall(b"GET /whole HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw = bytearray()
        while chunk := c.recv(1 << 20):
            raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == BODY
    settled(addon, 1)
    assert [(p, ok) for p, ok, _ in addon.done] == [("/whole", True)]
