"""A real edge -> server link over TCP: length-prefixed frames carrying the wire codec's bytes.

    frame  = u32 big-endian body length + body
    request body  = one codec payload (dmclip.compress.codec.encode)
    reply body    = UTF-8 JSON: {"ok": true, "captions": [...], "server_seconds": ...}
                                or {"ok": false, "error": "..."}

A malformed payload gets an error reply and the connection stays usable; a frame whose length is
absurd, or that ends early, gets an error reply and the connection is closed (its boundaries are
lost). Either way the server goes on serving other requests and connections.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dmclip.compress.codec import Payload, decode
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)
LENGTH = struct.Struct(">I")
MAX_FRAME = 64 * 1024 * 1024


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:5000' -> ('127.0.0.1', 5000)."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DmclipError(f"server address {text!r} is not host:port", "e.g. --server 127.0.0.1:5000")
    return host, int(port)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    """Read n bytes; fewer only when the peer closed (returned as they are)."""
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


@dataclass
class ServerStats:
    requests: int = 0
    errors: int = 0
    connections: int = 0
    bytes_in: int = 0  # on the wire, length prefixes included
    bytes_out: int = 0
    server_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        times = self.server_seconds
        return {"requests": self.requests, "errors": self.errors, "connections": self.connections,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "mean_server_ms": 1000 * sum(times) / len(times) if times else None}


class CaptionServer:
    """Serve ``handler(payload) -> dict`` (e.g. {"captions": [...]}) on host:port, one connection at a time.

    Stops after ``max_requests`` frames, after ``idle_timeout`` seconds without a connection, or on ``stop()``.
    ``port=0`` picks a free port (see ``.port`` after construction).
    """

    def __init__(self, handler: Callable[[Payload], dict], host: str = "127.0.0.1", port: int = 0, *,
                 max_requests: int | None = None, idle_timeout: float | None = None,
                 connection_timeout: float = 30.0, max_frame: int = MAX_FRAME):
        self.handler = handler
        self.max_requests, self.idle_timeout = max_requests, idle_timeout
        self.connection_timeout, self.max_frame = connection_timeout, max_frame
        self.stats = ServerStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise DmclipError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              "choose another --port, or stop the process that holds it") from None
        self._sock.listen(8)
        self._sock.settimeout(0.2)  # so the accept loop notices stop() and the idle timeout
        self.host, self.port = self._sock.getsockname()[:2]

    # ---- lifecycle
    def start(self) -> CaptionServer:
        """Serve in a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.serve, name="dmclip-compress-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _done(self) -> bool:
        return self._stop.is_set() or (self.max_requests is not None and self.stats.requests >= self.max_requests)

    def serve(self) -> ServerStats:
        """Accept and serve connections until a stop condition holds; returns the statistics."""
        last_activity = time.monotonic()
        try:
            while not self._done():
                if self.idle_timeout is not None and time.monotonic() - last_activity > self.idle_timeout:
                    log.info("no connection for %.1f s: stopping", self.idle_timeout)
                    break
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                self.stats.connections += 1
                with conn:
                    self._serve_connection(conn, peer)
                last_activity = time.monotonic()
        finally:
            self._sock.close()
        return self.stats

    # ---- one connection
    def _reply(self, conn: socket.socket, obj: dict) -> bool:
        body = json.dumps(obj).encode("utf-8")
        try:
            conn.sendall(_frame(body))
        except OSError:
            return False
        self.stats.bytes_out += LENGTH.size + len(body)
        return True

    def _error(self, conn: socket.socket, message: str) -> bool:
        self.stats.errors += 1
        log.warning("refused a request: %s", message)
        return self._reply(conn, {"ok": False, "error": message})

    def _serve_connection(self, conn: socket.socket, peer) -> None:
        conn.settimeout(self.connection_timeout)
        while not self._done():
            try:
                head = _read_exact(conn, LENGTH.size)
                if not head:
                    return  # the peer closed between frames: the normal end
                self.stats.bytes_in += len(head)
                if len(head) < LENGTH.size:
                    self._error(conn, "truncated frame: the length prefix ended early")
                    return
                (length,) = LENGTH.unpack(head)
                if length > self.max_frame:
                    self._error(conn, f"frame of {length} bytes is larger than the limit ({self.max_frame})")
                    return  # frame boundaries are lost: close this connection
                body = _read_exact(conn, length)
                self.stats.bytes_in += len(body)
            except (TimeoutError, OSError) as exc:
                log.warning("connection from %s dropped: %s", peer, exc)
                return
            self.stats.requests += 1
            if len(body) < length:
                self._error(conn, f"truncated frame: {len(body)} of {length} bytes arrived")
                return
            start = time.perf_counter()
            try:
                payload = decode(body)
                result = dict(self.handler(payload))
            except DmclipError as exc:
                if not self._error(conn, exc.message):
                    return
                continue
            except Exception as exc:  # noqa: BLE001 - a bad request must never take the server down
                log.exception("handler failed")
                if not self._error(conn, f"server error: {type(exc).__name__}: {exc}"):
                    return
                continue
            seconds = time.perf_counter() - start
            self.stats.server_seconds.append(seconds)
            if not self._reply(conn, {"ok": True, "server_seconds": seconds, **result}):
                return


class LinkClient:
    """The edge side: send frames, read replies, count bytes on the wire and round-trip time."""

    def __init__(self, address: str | tuple[str, int], timeout: float = 60.0):
        self.host, self.port = parse_address(address) if isinstance(address, str) else address
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=timeout)
        except OSError as exc:
            raise DmclipError(f"cannot connect to {self.host}:{self.port} ({exc.strerror or exc})",
                              "start the server first: dmclip compress serve --model ... --port P") from None

    def request(self, body: bytes) -> dict:
        """Send one frame, wait for the reply -> {"reply": dict, "rtt_seconds", "bytes_sent", "bytes_received"}."""
        start = time.perf_counter()
        try:
            self._sock.sendall(_frame(body))
            head = _read_exact(self._sock, LENGTH.size)
            if len(head) < LENGTH.size:
                raise DmclipError("the server closed the connection without a reply", "check the server's log")
            (length,) = LENGTH.unpack(head)
            if length > MAX_FRAME:
                raise DmclipError(f"reply of {length} bytes is larger than the limit", "is this a dmclip server?")
            reply_body = _read_exact(self._sock, length)
        except OSError as exc:
            raise DmclipError(f"link to {self.host}:{self.port} failed ({exc})", "check the server is running") from None
        rtt = time.perf_counter() - start
        if len(reply_body) < length:
            raise DmclipError("the server's reply was cut short", "check the server's log")
        try:
            reply = json.loads(reply_body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DmclipError("the server's reply is not JSON", "is this a dmclip compress server?") from None
        return {"reply": reply, "rtt_seconds": rtt, "bytes_sent": LENGTH.size + len(body),
                "bytes_received": LENGTH.size + length}

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests: truncated or garbage frames)."""
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
