"""A real edge -> server link over TCP: length-prefixed frames carrying the wire codec's bytes.

    frame  = u32 big-endian body length + body
    request body  = one codec payload (dmclip.compress.codec.encode), or the JSON {"op": "info"}
    reply body    = UTF-8 JSON: {"ok": true, "captions": [...], "server_seconds": ..., "payload_crc": ...}
                                {"ok": true, "info": {"tokens": T, "width": W, "max_batch": ..., ...}}
                                or {"ok": false, "error": "...", "hint": "..."}

``payload_crc`` is the CRC-32 the request payload ends with: a reply names the request it answers.

Limits (docs/compress.md, "Serving"): a payload must fit the server's model (:class:`codec.Accepts`,
checked from its header before anything is decoded); a connection that sends nothing, or does not finish a
frame, within ``connection_timeout`` gets an error reply and is closed; at most ``max_connections`` are
served at once and the next one gets an error reply; frames longer than the largest payload that can fit
are refused from their length prefix. A malformed payload gets an error reply and the connection stays
usable; a frame whose length is absurd, or that ends early, gets an error reply and the connection is
closed (its boundaries are lost). Either way the server goes on serving other requests and connections.

Each connection has its own thread; requests go through one queue to one model thread, which captions
the requests that arrived together (up to ``batch_images`` images) in one decoder call.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dmclip.compress.codec import MAGIC, Accepts, Payload, decode, payload_crc
from dmclip.errors import DmclipError

log = logging.getLogger(__name__)
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


class _Timeout(Exception):
    pass


def _read_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """Read n bytes; fewer only when the peer closed (returned as they are). Past ``deadline``
    (time.monotonic) raise _Timeout, however the bytes trickle in."""
    chunks, got = [], 0
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Timeout()
            sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except TimeoutError:
            if deadline is None:
                raise
            raise _Timeout() from None
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


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


class _Job:
    """One request waiting for the model thread."""

    def __init__(self, payload: Payload, tokens: torch.Tensor | None):
        self.payload, self.tokens = payload, tokens
        self.result: dict | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()


class _ModelQueue:
    """One thread owns the model. It takes the jobs that are waiting (up to ``batch_images`` images,
    waiting ``batch_wait`` s for more once it has one) and captions jobs whose restored sequences have the
    same length in one call; each job gets back its own rows. The short wait lets clients that send at
    about the same time share a call instead of falling out of step (measured in docs/compress.md). It is
    skipped once it holds a job from every open connection (``peers()``): a connection has at most one
    request in flight, so no other can come, and a lone client never waits."""

    def __init__(self, handler, batch_images: int, batch_wait: float, stats_add: Callable[..., None],
                 peers: Callable[[], int] | None = None):
        self.handler, self.batch_images, self.batch_wait = handler, batch_images, batch_wait
        self.peers = peers
        self.batched = callable(getattr(handler, "restore", None)) and callable(getattr(handler, "caption", None))
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._stats_add = stats_add
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dmclip-compress-model", daemon=True)
        self._thread.start()

    def submit(self, payload: Payload) -> _Job:
        """Restore in the caller's thread (cheap: the payload fits the model) and queue the job."""
        job = _Job(payload, self.handler.restore(payload) if self.batched else None)
        self._queue.put(job)
        return job

    def close(self, timeout: float) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _take(self) -> list[_Job]:
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        jobs, images = [first], first.payload.batch
        deadline = time.monotonic() + self.batch_wait
        while images < self.batch_images:
            if self.peers is not None and len(jobs) >= self.peers() and self._queue.empty():
                break
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0.0)) \
                    if self.batch_wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            jobs.append(job)
            images += job.payload.batch
        return jobs

    def _run(self) -> None:
        # after stop, the jobs already queued are still answered: their connections wait for them
        while not (self._stop.is_set() and self._queue.empty()):
            jobs = self._take()
            if not self.batched:
                for job in jobs:
                    self._finish([job], lambda j=job: [dict(self.handler(j.payload))])
                continue
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(tuple(job.tokens.shape[1:]), []).append(job)
            for group in groups.values():
                self._caption(group)

    def _caption(self, group: list[_Job]) -> None:
        def call() -> list[dict]:
            tokens = torch.cat([j.tokens for j in group]) if len(group) > 1 else group[0].tokens
            captions = list(self.handler.caption(tokens))
            out, start = [], 0
            for job in group:
                out.append({"captions": captions[start:start + job.payload.batch],
                            "restored_tokens": tokens.shape[1], "decoder_batch": tokens.shape[0]})
                start += job.payload.batch
            return out

        if not self._finish(group, call) and len(group) > 1:
            for job in group:  # one request that breaks the model must not fail the others batched with it
                job.error = None
                self._finish([job], lambda j=job: [self._caption_one(j)])

    def _caption_one(self, job: _Job) -> dict:
        return {"captions": list(self.handler.caption(job.tokens)), "restored_tokens": job.tokens.shape[1],
                "decoder_batch": job.payload.batch}

    def _finish(self, jobs: list[_Job], call: Callable[[], list[dict]]) -> bool:
        try:
            results = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting connection, which replies
            for job in jobs:
                job.error = exc
            if len(jobs) == 1:
                jobs[0].done.set()
            return False
        self._stats_add(decoder_calls=1, images=sum(j.payload.batch for j in jobs))
        for job, result in zip(jobs, results):
            job.result = result
            job.done.set()
        return True


class CaptionServer:
    """Serve ``handler`` on host:port: many connections at once, requests captioned by one model thread.

    ``handler`` is either a callable ``payload -> dict`` (e.g. {"captions": [...]}), run one request at a
    time, or an object with ``restore(payload) -> tokens`` and ``caption(tokens) -> list[str]`` (what
    ``pipeline.caption_handler`` returns), whose concurrent requests are captioned together. Its
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
        self._queue: _ModelQueue | None = None
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
        self._queue = _ModelQueue(self.handler, self.batch_images, self.batch_wait, self._add,
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
            conn.sendall(_frame(body))
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
            head = _read_exact(conn, LENGTH.size, time.monotonic() + self.connection_timeout)
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
            body = _read_exact(conn, length, time.monotonic() + self.connection_timeout)
            self._add(bytes_in=len(body))
        except _Timeout:
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
                if not self._queue._thread.is_alive():
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
            try:
                self._sock.sendall(_frame(body))
            except OSError:
                pass  # a server that refused us (busy) may have replied and closed already: read that reply
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
        if not isinstance(reply, dict):
            raise DmclipError("the server's reply is not a JSON object", "is this a dmclip compress server?")
        return {"reply": reply, "rtt_seconds": rtt, "bytes_sent": LENGTH.size + len(body),
                "bytes_received": LENGTH.size + length}

    def info(self) -> dict:
        """The server's info: what its model reads ("accepts") and its limits."""
        reply = self.request(INFO_REQUEST)["reply"]
        if not reply.get("ok") or not isinstance(reply.get("info"), dict):
            raise DmclipError(f"the server did not answer the info request ({reply.get('error', 'no info')})",
                              "run the same dmclip version on the edge and the server")
        return reply["info"]

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests: truncated or garbage frames)."""
        self._sock.sendall(data)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
