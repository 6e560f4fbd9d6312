"""`dmclip compress load`: concurrent edges against a `compress serve` on this machine.

Each client opens one connection and sends its requests one after another (the next when the reply to the
last has come); the clients run at once. Reported: replies per second, latency percentiles (round trip,
client side), bytes per second on the wire (both directions, length prefixes included), errors, and
replies that do not match their request (``payload_crc`` echoed by the server differs, or a caption
differs from the expected one when the caller gives one). Loopback only, bounded in clients, requests and
time: this measures a server, it is not for other people's hosts.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from dmclip.compress.client import LinkClient
from dmclip.compress.codec import Accepts, Payload, encode, payload_crc, quantize
from dmclip.compress.link import parse_address
from dmclip.errors import DmclipError

MAX_CLIENTS = 64
MAX_REQUESTS = 10_000  # per client
POOL = 64  # distinct requests prepared per client; more requests cycle through them
# (client, i) -> (payload bytes, expected captions or None)
RequestMaker = Callable[[int, int], tuple[bytes, list[str] | None]]


def loopback_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """host:port -> (host, port), refusing anything but this machine (a literal loopback address or localhost)."""
    host, port = parse_address(address) if isinstance(address, str) else address
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise DmclipError(f"the load generator only targets this machine; {host} is not a loopback address",
                          "run it next to the server: --server 127.0.0.1:PORT")
    return host.strip("[]"), port


def synthetic_requests(accepts: Accepts, k: int = 8, dtype: str = "float16", seed: int = 0) -> RequestMaker:
    """Requests that fit ``accepts``: one image each, k-means shaped (k random centroids, random indices),
    class token first when the model has one; a different payload for every (client, i)."""
    if dtype not in accepts.dtypes:
        raise DmclipError(f"the server does not accept dtype {dtype}", f"use --dtype {accepts.dtypes[0]}")
    has_class = accepts.tokens >= 2
    n = accepts.tokens - 1 if has_class else accepts.tokens
    k = max(1, min(k, n))
    name = "kmeans" if "kmeans" in accepts.selectors else accepts.selectors[0]

    def make(client: int, i: int) -> tuple[bytes, None]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + client * 10_007 + i)
        vectors, scales = quantize(torch.randn(1, k, accepts.width, generator=g), dtype)
        cls, cls_scales = quantize(torch.randn(1, accepts.width, generator=g), dtype) if has_class else (None, None)
        indices = torch.randint(0, k, (1, n), generator=g)
        return encode(Payload(name, n, vectors, scales, cls, cls_scales, indices)), None

    return make


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def check_bounds(clients: int, requests: int, time_limit: float = 60.0, timeout: float = 30.0) -> None:
    if not 1 <= clients <= MAX_CLIENTS:
        raise DmclipError(f"--clients {clients} is out of range", f"use 1 to {MAX_CLIENTS} clients")
    if not 1 <= requests <= MAX_REQUESTS:
        raise DmclipError(f"--requests {requests} is out of range", f"use 1 to {MAX_REQUESTS} requests per client")
    if not 0 < time_limit <= 3600 or not 0 < timeout <= 600:
        raise DmclipError("--time-limit must lie in (0, 3600] s and --timeout in (0, 600] s", "e.g. --time-limit 60")


def run_load(address, clients: int, requests: int, *, make: RequestMaker | None = None, k: int = 8,
             dtype: str = "float16", seed: int = 0, timeout: float = 30.0, time_limit: float = 60.0) -> dict:
    """``clients`` connections, ``requests`` each, at once; stops sending after ``time_limit`` s."""
    host, port = loopback_address(address)
    check_bounds(clients, requests, time_limit, timeout)
    with LinkClient((host, port), timeout=timeout) as probe:
        info = probe.info()
    if make is None:
        if not info.get("accepts"):
            raise DmclipError("the server does not say what payloads it reads", "serve with `dmclip compress serve`")
        make = synthetic_requests(Accepts.from_dict(info["accepts"]), k, dtype, seed)
    pools = [[make(c, i) for i in range(min(requests, POOL))] for c in range(clients)]

    lock = threading.Lock()
    totals: Counter = Counter()
    latencies: list[float] = []
    messages: Counter = Counter()
    start = threading.Event()
    ready = threading.Barrier(clients + 1, timeout=timeout + 5)
    deadline = [0.0]

    def client(c: int) -> None:
        local, sent, lat = Counter(), 0, []
        try:
            conn = LinkClient((host, port), timeout=timeout)
        except DmclipError as exc:
            conn, local["failed_connections"] = None, 1
            with lock:
                messages[exc.message] += 1
        try:
            ready.wait()
        except threading.BrokenBarrierError:
            pass
        start.wait(timeout + 5)
        try:
            for i in range(requests if conn is not None else 0):
                if time.monotonic() > deadline[0]:
                    break
                body, expected = pools[c][i % len(pools[c])]
                sent += 1
                try:
                    answer = conn.request(body)
                except DmclipError as exc:  # no reply on this connection: it is gone
                    local["lost"] += 1
                    with lock:
                        messages[exc.message] += 1
                    break
                reply = answer["reply"]
                lat.append(answer["rtt_seconds"])
                local["bytes_sent"] += answer["bytes_sent"]
                local["bytes_received"] += answer["bytes_received"]
                if not reply.get("ok"):
                    local["errors"] += 1
                    with lock:
                        messages[str(reply.get("error"))[:200]] += 1
                elif reply.get("payload_crc") != payload_crc(body) or (
                        expected is not None and reply.get("captions") != expected):
                    local["mismatched"] += 1
                else:
                    local["ok"] += 1
        finally:
            if conn is not None:
                conn.close()
            local["sent"] += sent
            local["not_sent"] += requests - sent
            with lock:
                totals.update(local)
                latencies.extend(lat)

    threads = [threading.Thread(target=client, args=(c,), daemon=True, name=f"dmclip-load-{c}")
               for c in range(clients)]
    for t in threads:
        t.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    t0 = time.monotonic()
    deadline[0] = t0 + time_limit
    start.set()
    for t in threads:  # each request is bounded by `timeout`, and no request starts after the time limit
        t.join(time_limit + timeout + 5)
    seconds = time.monotonic() - t0
    replies = totals["ok"] + totals["errors"] + totals["mismatched"]
    ms = [1000 * v for v in latencies]
    return {
        "server": f"{host}:{port}", "clients": clients, "requests_per_client": requests,
        "sent": totals["sent"], "replies": replies, "ok": totals["ok"], "errors": totals["errors"],
        "mismatched": totals["mismatched"], "lost": totals["lost"], "not_sent": totals["not_sent"],
        "failed_connections": totals["failed_connections"], "seconds": seconds,
        "requests_per_s": replies / seconds if seconds > 0 else None,
        "p50_ms": _percentile(ms, 50), "p95_ms": _percentile(ms, 95), "p99_ms": _percentile(ms, 99),
        "mean_ms": sum(ms) / len(ms) if ms else None,
        "bytes_sent": totals["bytes_sent"], "bytes_received": totals["bytes_received"],
        "bytes_per_s": (totals["bytes_sent"] + totals["bytes_received"]) / seconds if seconds > 0 else None,
        "error_messages": dict(messages.most_common(10)), "server_info": info,
    }
