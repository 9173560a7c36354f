"""addons.proxy.relay: a blob body copied to the client and checked against its digest on the way."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import threading
from typing import Any

import pytest

from addons.proxy.relay import MAX_CHUNK as CHUNK, BlobBody, checkable

DATA = os.urandom(5 * CHUNK + 123)
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class Raw:
    """What `requests.Response.raw` offers the relay: urllib3's response around http.client's."""

    def __init__(self, data: bytes) -> None:
        self._fp = io.BytesIO(data)
        self.released = False

    def release_conn(self) -> None:
        self.released = True


class Resp:
    def __init__(self, data: bytes) -> None:
        self.raw = Raw(data)
        self.closed = False

    def close(self) -> None:
        self.closed = True


def copy(body: BlobBody) -> tuple[bool, bytes]:
    """Run `body.write` into one end of a socket pair; return its verdict and what arrived."""
    a, b = socket.socketpair()
    got = bytearray()

    def drain() -> None:
        while chunk := b.recv(1 << 20):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        ok = body.write(a)
    finally:
        a.close()
        reader.join()
        b.close()
    return ok, bytes(got)


def test_a_matching_blob_is_copied_whole_and_its_connection_reused() -> None:
    resp: Any = Resp(DATA)
    body = BlobBody(resp, len(DATA), DIGEST)
    assert copy(body) == (True, DATA)
    assert resp.raw.released and not resp.closed
    assert "digest checked" in body.summary()


@pytest.mark.parametrize("upstream", [DATA[:-1] + bytes([DATA[-1] ^ 1]), DATA[:1000] + b"x" + DATA[1001:]])
def test_bytes_that_do_not_match_the_digest_are_cut_before_the_last_chunk(upstream: bytes) -> None:
    resp: Any = Resp(upstream)
    body = BlobBody(resp, len(upstream), DIGEST)
    ok, got = copy(body)
    assert not ok
    assert len(got) < len(DATA) and DATA.startswith(got[:1000])
    assert resp.closed and not resp.raw.released
    assert "do not match" in body.error


def test_an_upstream_that_sends_fewer_bytes_than_announced_is_cut() -> None:
    body = BlobBody(Resp(DATA[:-500]), len(DATA), DIGEST)  # type: ignore[arg-type]
    ok, got = copy(body)
    assert not ok and len(got) < len(DATA)
    assert "upstream sent" in body.error


def test_a_range_answer_passes_unchecked() -> None:
    part = DATA[100:100 + 3 * CHUNK]
    assert copy(BlobBody(Resp(part), len(part), None)) == (True, part)  # type: ignore[arg-type]


def test_a_chunked_body_is_rechunked_and_its_last_chunk_held_until_checked() -> None:
    ok, got = copy(BlobBody(Resp(DATA), None, DIGEST))  # type: ignore[arg-type]
    assert ok
    decoded, rest = bytearray(), got
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        decoded += rest[:n]
        assert rest[n:n + 2] == b"\r\n"
        rest = rest[n + 2:]
    assert bytes(decoded) == DATA
    bad = DATA[:-1] + b"\0"
    ok, got = copy(BlobBody(Resp(bad), None, DIGEST))  # type: ignore[arg-type]
    assert not ok and DATA[-CHUNK:] not in got


def test_checkable_digests() -> None:
    assert checkable(DIGEST) == DIGEST
    assert checkable("sha512:" + "a" * 128) is not None
    assert checkable("md5:abc") is None and checkable("sha256:") is None


def _stream(activity: Any, chunks: list[bytes]) -> bytes:
    """What mitmproxy sends for a streamed body: each chunk through the callable, then b""."""
    out = bytearray()
    for chunk in [*chunks, b""]:
        result = activity(chunk)
        out += result if isinstance(result, bytes) else b"".join(result)
    return bytes(out)


def test_a_blob_streamed_by_mitmproxy_is_checked_and_a_mismatch_cut_before_the_last_chunk() -> None:
    """The path of clients on TLS or HTTP/2, whose bodies mitmproxy streams."""
    from addons.proxy.stream import Activity

    chunks = [DATA[:1000], DATA[1000:CHUNK], DATA[CHUNK:]]
    cut: list[bool] = []
    assert _stream(Activity(digest=DIGEST, cut=lambda: cut.append(True)), chunks) == DATA and not cut
    bad = [chunks[0], b"x" + chunks[1][1:], chunks[2]]
    activity = Activity(digest=DIGEST, cut=lambda: cut.append(True))
    assert _stream(activity, bad) == bad[0] + bad[1]  # the last chunk never goes out
    assert cut == [True] and activity.mismatch and activity.done
    assert _stream(Activity(), bad) == b"".join(bad)  # unchecked (Range, HEAD): passed as is


def test_buffers_shrink_as_more_blobs_stream_at_once_and_stay_within_the_budget() -> None:
    from addons.proxy.relay import BUFFER_BUDGET, MAX_CHUNK, MIN_CHUNK, RING, Budget

    budget = Budget()
    sizes = [budget.enter() for _ in range(64)]
    assert sizes[0] == MAX_CHUNK  # a lone pull reads in the largest chunks
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] == MIN_CHUNK
    assert MIN_CHUNK * RING * 64 <= BUFFER_BUDGET  # 64 pulls together fit in the budget
    for _ in range(64):
        budget.leave()
    assert budget.active == 0 and budget.enter() == MAX_CHUNK
