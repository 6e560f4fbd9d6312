"""The server end of the link: ``CaptionServer`` answers frames (:mod:`dmclip.compress.link`) on host:port.

Limits (docs/compress.md, "Serving: what a server accepts, limits, concurrency"): a payload must fit the
server's model (:class:`codec.Accepts`, checked from its header before anything is decoded); a connection
that sends nothing, or does not finish a frame, within ``connection_timeout`` gets an error reply and is
closed; at most ``max_connections`` are served at once and the next one gets an error reply; frames longer
than the largest payload that can fit are refused from their length prefix. A malformed payload gets an error reply and the connection stays
usable; a frame whose length is absurd, or that ends early, gets an error reply and the connection is
closed (its boundaries are lost). Either way the server goes on serving other requests and connections.

Each connection has its own thread; requests go through one queue to one model thread
(:class:`dmclip.compress.batching.ModelQueue`), which captions the requests that arrived together (up to
``batch_images`` images) in one decoder call.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass, field

from dmclip.compress.batching import ModelQueue
from dmclip.compress.codec import MAGIC, Accepts, decode, payload_crc
from dmclip.compress.link import LENGTH, MAX_CONTROL, MAX_FRAME, PROTOCOL, FrameTimeout, frame, read_exact
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)


@dataclass
class ServerStats:
    requests: int = 0  # payload frames (info requests not counted)
    errors: int = 0
    connections: int = 0
    refused_connections: int = 0  # over max_connections: answered "busy" and closed
    timeouts: int = 0  # connections closed for sending nothing / not finishing a frame in time
    decoder_calls: int = 0
    images: int = 0  # captioned
    bytes_in: int = 0  # on the wire, length prefixes included
    bytes_out: int = 0
    server_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        times = self.server_seconds
        return {"requests": self.requests, "errors": self.errors, "connections": self.connections,
                "refused_connections": self.refused_connections, "timeouts": self.timeouts,
                "decoder_calls": self.decoder_calls, "images": self.images,
                "mean_images_per_decoder_call": self.images / self.decoder_calls if self.decoder_calls else None,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
                "mean_server_ms": 1000 * sum(times) / len(times) if times else None}


class CaptionServer:
    """Serve ``handler`` on host:port: many connections at once, requests captioned by one model thread.

    ``handler`` is either a callable ``payload -> dict`` (e.g. {"captions": [...]}), run one request at a
    time, or an object with ``restore(payload) -> tokens`` and ``caption(tokens) -> list[str]`` (what
    ``endpoints.caption_handler`` returns), whose concurrent requests are captioned together. Its
    ``accepts`` (a :class:`codec.Accepts`), if it has one, is checked against every payload's header.

    Stops after ``max_requests`` frames, after ``idle_timeout`` seconds without a connection, or on ``stop()``
    (and on KeyboardInterrupt in ``serve()``): it stops accepting, answers the requests already read, closes
    the connections and returns. ``port=0`` picks a free port (see ``.port`` after construction).
    """

    def __init__(self, handler, host: str = "127.0.0.1", port: int = 0, *,
                 max_requests: int | None = None, idle_timeout: float | None = None,
                 connection_timeout: float = 30.0, max_frame: int = MAX_FRAME, max_connections: int = 16,
                 batch_images: int = 32, batch_wait: float = 0.002, accepts: Accepts | None = None):
        if max_connections < 1 or batch_images < 1 or connection_timeout <= 0:
            raise DmclipError("max_connections and batch_images must be >= 1, connection_timeout > 0",
                              "e.g. --max-connections 16 --connection-timeout 30")
        self.handler = handler
        self.accepts = accepts if accepts is not None else getattr(handler, "accepts", None)
        self.max_requests, self.idle_timeout = max_requests, idle_timeout
        self.connection_timeout, self.max_connections = connection_timeout, max_connections
        self.batch_images, self.batch_wait = batch_images, batch_wait
        # a frame longer than the longest payload that can fit is refused from its length prefix alone
        self.max_frame = min(max_frame, self.accepts.max_payload_bytes()) if self.accepts else max_frame
        self.stats = ServerStats()
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._queue: ModelQueue | None = None
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as exc:
            self._sock.close()
            raise DmclipError(f"cannot listen on {host}:{port} ({exc.strerror or exc})",
                              "choose another --port, or stop the process that holds it") from None
        self._sock.listen(64)
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

    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def info(self) -> dict:
        """What the server reads and its limits (the reply to {"op": "info"})."""
        return {"protocol": PROTOCOL, "accepts": self.accepts.as_dict() if self.accepts else None,
                "max_frame": self.max_frame, "max_connections": self.max_connections,
                "connection_timeout": self.connection_timeout, "batch_images": self.batch_images}

    def _add(self, **counts) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self.stats, key, getattr(self.stats, key) + value)

    def _done(self) -> bool:
        return self._stop.is_set() or (self.max_requests is not None and self.stats.requests >= self.max_requests)

    def serve(self) -> ServerStats:
        """Accept and serve connections until a stop condition holds; returns the statistics."""
        self._queue = ModelQueue(self.handler, self.batch_images, self.batch_wait, self._add,
                                  peers=lambda: self.active_connections)
        last_activity = time.monotonic()
        try:
            while not self._done():
                if self.active_connections:
                    last_activity = time.monotonic()
                elif self.idle_timeout is not None and time.monotonic() - last_activity > self.idle_timeout:
                    log.info("no connection for %.1f s: stopping", self.idle_timeout)
                    break
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    break
                self._accept(conn, peer)
                last_activity = time.monotonic()
        finally:
            self._shutdown()
        return self.stats

    def _accept(self, conn: socket.socket, peer) -> None:
        with self._lock:
            busy = len(self._conns) >= self.max_connections
            if not busy:
                self.stats.connections += 1
                thread = threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                                          name=f"dmclip-compress-conn-{peer[1]}")
                self._conns[conn] = thread
        if busy:
            self._add(refused_connections=1)
            # answered from the accept loop: the reply is tiny, and a short timeout bounds a peer that reads nothing
            self._error(conn, f"server busy: {self.max_connections} connections are open (its limit)",
                        "retry later, or start the server with a higher --max-connections", timeout=1.0)
            conn.close()
            return
        thread.start()

    def _shutdown(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            conns = list(self._conns.items())
        for conn, _ in conns:
            try:  # wakes a thread waiting for the next frame; a reply still being written goes out
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        deadline = time.monotonic() + 5.0
        for _, thread in conns:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if self._queue is not None:
            self._queue.close(max(deadline - time.monotonic(), 0.1))

    # ---- one connection
    def _reply(self, conn: socket.socket, obj: dict, timeout: float | None = None) -> bool:
        body = json.dumps(obj).encode("utf-8")
        try:  # a peer that never reads its replies cannot hold a thread
            conn.settimeout(timeout or self.connection_timeout)
            conn.sendall(frame(body))
        except OSError:
            return False
        self._add(bytes_out=LENGTH.size + len(body))
        return True

    def _error(self, conn: socket.socket, message: str, hint: str | None = None, *, timeout: float | None = None,
               **extra) -> bool:
        self._add(errors=1)
        log.warning("refused a request: %s", message)
        return self._reply(conn, {"ok": False, "error": message, **({"hint": hint} if hint else {}), **extra},
                           timeout)

    def _serve_connection(self, conn: socket.socket, peer) -> None:
        try:
            with conn:
                while not self._done() and self._serve_frame(conn, peer):
                    pass
        finally:
            with self._lock:
                self._conns.pop(conn, None)

    def _serve_frame(self, conn: socket.socket, peer) -> bool:
        """Read one frame and answer it; False when the connection is to be closed."""
        try:
            head = read_exact(conn, LENGTH.size, time.monotonic() + self.connection_timeout)
            if not head:
                return False  # the peer closed between frames: the normal end
            self._add(bytes_in=len(head))
            if len(head) < LENGTH.size:
                self._error(conn, "truncated frame: the length prefix ended early")
                return False
            (length,) = LENGTH.unpack(head)
            if length > self.max_frame:
                self._error(conn, f"frame of {length} bytes is larger than the limit ({self.max_frame})",
                            "send one payload per frame that fits the server's model (see its info)")
                return False  # frame boundaries are lost: close this connection
            body = read_exact(conn, length, time.monotonic() + self.connection_timeout)
            self._add(bytes_in=len(body))
        except FrameTimeout:
            self._add(timeouts=1)
            self._error(conn, f"no complete frame within {self.connection_timeout:g} s: closing the connection",
                        "send a request soon after connecting, and each frame whole")
            return False
        except OSError as exc:
            log.warning("connection from %s dropped: %s", peer, exc)
            return False
        if len(body) < length:
            self._add(requests=1)
            self._error(conn, f"truncated frame: {len(body)} of {length} bytes arrived")
            return False
        if body[:1] == b"{":  # control requests are not counted: --max-requests counts payload frames
            return self._control(conn, body)
        self._add(requests=1)
        return self._request(conn, body)

    def _control(self, conn: socket.socket, body: bytes) -> bool:
        try:
            op = json.loads(body.decode("utf-8")).get("op") if len(body) <= MAX_CONTROL else None
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            op = None
        if op == "info":
            return self._reply(conn, {"ok": True, "info": self.info()})
        return self._error(conn, "unknown control request (the one known is {\"op\": \"info\"})",
                           "send a codec payload, or {\"op\": \"info\"}")

    def _request(self, conn: socket.socket, body: bytes) -> bool:
        start = time.perf_counter()
        crc = payload_crc(body) if body[:4] == MAGIC else None
        echo = {"payload_crc": crc} if crc is not None else {}
        try:
            payload = decode(body, self.accepts.check if self.accepts else None)
            job = self._queue.submit(payload)
            while not job.done.wait(0.5):
                if not self._queue.alive():
                    raise DmclipError("the server's model thread stopped", "restart the server")
            if job.error is not None:
                raise job.error
            result = dict(job.result)
        except DmclipError as exc:
            return self._error(conn, exc.message, exc.hint, **echo)
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the server down
            log.error("handler failed", exc_info=exc)
            return self._error(conn, f"server error: {type(exc).__name__}: {exc}", **echo)
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.server_seconds.append(seconds)
        return self._reply(conn, {"ok": True, "server_seconds": seconds, **echo, **result})
