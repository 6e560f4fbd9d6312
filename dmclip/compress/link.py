"""The frames of the edge -> server link over TCP, which both ends share (the server in
:mod:`dmclip.compress.server`, the edge's client in :mod:`dmclip.compress.client`):

    frame  = u32 big-endian body length + body
    request body  = one codec payload (dmclip.compress.codec.encode), or the JSON {"op": "info"}
    reply body    = UTF-8 JSON: {"ok": true, "captions": [...], "server_seconds": ..., "payload_crc": ...}
                                {"ok": true, "info": {"tokens": T, "width": W, "max_batch": ..., ...}}
                                or {"ok": false, "error": "...", "hint": "..."}

``payload_crc`` is the CRC-32 the request payload ends with: a reply names the request it answers.
"""

from __future__ import annotations

import socket
import struct
import time

from dmclip.errors import DmclipError

LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024
MAX_CONTROL = 4096  # bytes of a JSON control request
PROTOCOL = 2  # 1: payload frames only; 2: + the info op, payload_crc echo, hints
INFO_REQUEST = b'{"op": "info"}'


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:5000' -> ('127.0.0.1', 5000)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DmclipError(f"server address {text!r} is not host:port", "e.g. --server 127.0.0.1:5000")
    return host, int(port)


class FrameTimeout(Exception):
    """A frame did not arrive whole before its deadline."""


def read_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read n bytes; fewer only when the peer closed (returned as they are). Past ``deadline``
    (time.monotonic) raise FrameTimeout, however the bytes trickle in."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FrameTimeout()
            sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            if deadline is None:
                raise
            raise FrameTimeout() from None
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body
