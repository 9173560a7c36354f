"""A CRI client for one call, `ImageService/PullImage`, over containerd's socket: the way the
kubelet pulls, so the CRI plugin's own `registry.config_path` decides where the pull goes.

gRPC is HTTP/2 with a 5-byte frame before each message; `h2` (mitmproxy's own dependency, so
always installed) does the HTTP/2 and the two messages are small enough to encode by hand:
`PullImageRequest{image: ImageSpec{image: REF}}` -> `PullImageResponse{image_ref}`.
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from typing import Optional

import h2.config
import h2.connection
import h2.events

PULL_IMAGE = "/runtime.v1.ImageService/PullImage"


class CriError(Exception):
    """The call failed: grpc-status and grpc-message from the trailers."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(f"grpc-status {status}: {message}")
        self.status = status
        self.message = message


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _string_field(data: bytes, number: int) -> Optional[str]:
    """The first length-delimited field `number` of a protobuf message, as text."""
    i = 0
    while i < len(data):
        key, i = _read_varint(data, i)
        wire = key & 7
        if wire == 2:
            length, i = _read_varint(data, i)
            if key >> 3 == number:
                return data[i:i + length].decode()
            i += length
        elif wire == 0:
            _, i = _read_varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    return None


def unary(socket_path: str, method: str, request: bytes, timeout: float = 60.0) -> bytes:
    """One unary gRPC call over a unix socket; returns the response message bytes."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        sock.connect(socket_path)
        conn.initiate_connection()
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, [
            (":method", "POST"), (":scheme", "http"), (":path", method), (":authority", "localhost"),
            ("content-type", "application/grpc"), ("te", "trailers"),
        ])
        conn.send_data(stream, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        sock.sendall(conn.data_to_send())
        body = bytearray()
        meta: dict[str, str] = {}
        ended = False
        while not ended:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{method}: no answer within {timeout}s")
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{method}: connection closed before the call ended")
            for event in conn.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    meta.update({k: v for k, v in event.headers})
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
                elif isinstance(event, h2.events.StreamReset):
                    raise ConnectionError(f"{method}: stream reset ({event.error_code})")
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    finally:
        sock.close()
    status = meta.get("grpc-status", "?")
    if status != "0":
        raise CriError(status, urllib.parse.unquote(meta.get("grpc-message", "")))
    if len(body) < 5:
        return b""
    return bytes(body[5:5 + int.from_bytes(body[1:5], "big")])


def pull_image(socket_path: str, ref: str, timeout: float = 120.0) -> str:
    """CRI PullImage(ref) as the kubelet sends it; returns the image id containerd reports."""
    request = _field(1, _field(1, ref.encode()))
    response = unary(socket_path, PULL_IMAGE, request, timeout)
    image = _string_field(response, 1)
    if not image:
        raise CriError("0", f"PullImage({ref}) returned no image_ref")
    return image
