"""The TCP link: if these break, `compress serve` would die on a bad frame or `send` would report wrong bytes."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import zlib

import pytest
import torch
from helpers.compress_standin import StandInCaptioner, colour_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from dmclip.compress import Payload, codec, encode
from dmclip.compress.batching import ModelQueue
from dmclip.compress.client import LinkClient
from dmclip.compress.codec import payload_crc, quantize
from dmclip.compress.config import DecodeConfig
from dmclip.compress.endpoints import caption_handler, send_images
from dmclip.compress.link import INFO_REQUEST, parse_address
from dmclip.compress.load import loopback_address, run_load
from dmclip.compress.selectors import build_selector
from dmclip.compress.server import CaptionServer
from dmclip.errors import DmclipError


def _server(**kw):
    return CaptionServer(caption_handler(StandInCaptioner(), DecodeConfig()), "127.0.0.1", 0,
                         **{"idle_timeout": 20.0, "connection_timeout": 10.0, **kw})


def _valid_frame_body():
    model = StandInCaptioner()
    image = colour_dataset(1)[0]["image"].unsqueeze(0)
    return encode(build_selector("kmeans", k=2).compress(model.encode_image_tokens(image)))


def test_garbage_gets_an_error_reply_then_a_valid_payload_gets_a_caption():
    with _server(max_requests=3) as server, LinkClient(("127.0.0.1", server.port), timeout=10) as client:
        bad = client.request(b"\x00garbage that is not a payload")
        assert bad["reply"]["ok"] is False and "magic" in bad["reply"]["error"]
        good = client.request(_valid_frame_body())
        assert good["reply"]["ok"] is True and good["reply"]["captions"] == ["a red square"]
        assert good["reply"]["restored_tokens"] == 17
        corrupted = bytearray(_valid_frame_body())
        corrupted[30] ^= 0xFF
        assert client.request(bytes(corrupted))["reply"]["ok"] is False
    assert server.stats.requests == 3 and server.stats.errors == 2


def test_a_truncated_frame_is_refused_and_the_server_keeps_serving():
    with _server(max_requests=2) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            raw.sendall(struct.pack(">I", 500) + b"only a few bytes")
            raw.shutdown(socket.SHUT_WR)  # the frame ends early
            head = raw.recv(4)
            reply = raw.recv(struct.unpack(">I", head)[0])
            assert b"truncated" in reply
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            assert client.request(_valid_frame_body())["reply"]["ok"] is True


def test_an_oversized_length_prefix_is_refused():
    with _server(max_requests=1, max_frame=1000) as server:
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            assert client.request(b"x" * 2000)["reply"]["ok"] is False


def test_send_images_reports_bytes_on_the_wire_and_latency():
    samples = colour_dataset(3)
    with _server(max_requests=3) as server:
        rows = send_images(StandInCaptioner(), build_selector("kmeans", k=4), [s["image"] for s in samples],
                           ("127.0.0.1", server.port))
    assert [r["caption"] for r in rows] == [s["captions"][0] for s in samples]
    for row in rows:
        # header 21 + CRC 4 + class token and 4 centroids (5 x 6 fp16) + 16 indices x 2 bits; + 4-byte frame length
        assert row["payload_bytes"] == 21 + 4 + 5 * 6 * 2 + 4
        assert row["wire_bytes_sent"] == row["payload_bytes"] + 4
        assert row["rtt_ms"] > 0
    # + the one info request a connection starts with
    assert server.stats.bytes_in == sum(r["wire_bytes_sent"] for r in rows) + 4 + len(INFO_REQUEST)


def test_addresses_and_unreachable_servers_are_user_errors():
    assert parse_address("127.0.0.1:5000") == ("127.0.0.1", 5000)
    for text in ("127.0.0.1", "host:port", ":80", "127.0.0.1:70000"):
        with pytest.raises(DmclipError):
            parse_address(text)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DmclipError):
        LinkClient(("127.0.0.1", port), timeout=2)


def test_width_mismatch_is_refused_by_the_handler():
    handler = caption_handler(StandInCaptioner(), DecodeConfig())
    payload = build_selector("none").compress(torch.randn(1, 5, 7))
    with pytest.raises(DmclipError):
        handler(payload)


# ------------------------------------------------------------------------------ limits and hostile clients


def _fits(reply: dict) -> bool:
    return reply["ok"] is True and reply["captions"] == ["a red square"]


def _attack_payload(n: int = 2**20) -> bytes:
    """Well formed, valid CRC, a few dozen bytes: k-means with K = 1 over n patch tokens (indices of 0 bits)."""
    vectors, _ = quantize(torch.rand(1, 1, 6), "float16")
    cls, _ = quantize(torch.rand(1, 6), "float16")
    return encode(Payload("kmeans", n, vectors, None, cls, None, torch.zeros(1, n, dtype=torch.long)))


def test_a_payload_claiming_a_million_tokens_is_refused_from_its_header_in_milliseconds():
    body = _attack_payload()
    assert len(body) < 100
    with _server(max_requests=2) as server, LinkClient(("127.0.0.1", server.port), timeout=10) as client:
        start = time.monotonic()
        reply = client.request(body)["reply"]
        seconds = time.monotonic() - start
        assert reply["ok"] is False
        assert "1048577 tokens per image (N=1048576 + class token), expected 17" in reply["error"]
        assert "\n" not in reply["error"] and reply["hint"]
        assert reply["payload_crc"] == payload_crc(body)
        assert seconds < 0.5, f"refusal took {1000 * seconds:.0f} ms"  # decoding it would take seconds
        assert _fits(client.request(_valid_frame_body())["reply"])
    assert server.stats.decoder_calls == 1


def test_a_payload_of_another_width_is_refused_and_the_server_keeps_serving():
    wide = encode(build_selector("kmeans", k=2).compress(torch.rand(1, 17, 7)))
    with _server(max_requests=2) as server, LinkClient(("127.0.0.1", server.port), timeout=10) as client:
        reply = client.request(wide)["reply"]
        assert reply["ok"] is False and "vectors 7 wide, expected 6" in reply["error"]
        assert _fits(client.request(_valid_frame_body())["reply"])


def test_more_vectors_than_tokens_is_refused_and_the_server_keeps_serving():
    tokens = StandInCaptioner().encode_image_tokens(colour_dataset(1)[0]["image"].unsqueeze(0))  # (1, 17, 6)
    vectors, _ = quantize(torch.cat([tokens[:, 1:], tokens[:, 1:2]], 1), "float16")  # 17 vectors, 16 patches
    cls, _ = quantize(tokens[:, 0], "float16")
    with _server(max_requests=2) as server, LinkClient(("127.0.0.1", server.port), timeout=10) as client:
        reply = client.request(encode(Payload("none", 16, vectors, class_tokens=cls)))["reply"]
        assert reply["ok"] is False and "K=17 vectors per image for N=16 tokens, expected K <= N" in reply["error"]
        assert _fits(client.request(_valid_frame_body())["reply"])
    assert server.stats.decoder_calls == 1


def test_a_batch_over_the_limit_is_refused_and_the_server_keeps_serving():
    handler = caption_handler(StandInCaptioner(), DecodeConfig(), max_batch=4)
    images = torch.stack([s["image"] for s in colour_dataset(5)])
    five = encode(build_selector("kmeans", k=2).compress(StandInCaptioner().encode_image_tokens(images)))
    with CaptionServer(handler, max_requests=2, connection_timeout=10.0) as server, \
            LinkClient(("127.0.0.1", server.port), timeout=10) as client:
        reply = client.request(five)["reply"]
        assert reply["ok"] is False and "5 images in one request, expected at most 4" in reply["error"]
        assert _fits(client.request(_valid_frame_body())["reply"])


def test_an_idle_or_stalled_connection_is_answered_and_closed_within_its_timeout():
    with CaptionServer(caption_handler(StandInCaptioner(), DecodeConfig()), connection_timeout=0.5) as server:
        for opening in (b"", struct.pack(">I", 100) + b"ten bytes."):  # nothing at all / half a frame
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
                raw.sendall(opening)
                start = time.monotonic()
                head = raw.recv(4)  # blocks until the server gives up on us
                reply = json.loads(raw.recv(struct.unpack(">I", head)[0]))
                closed = raw.recv(1) == b""
                seconds = time.monotonic() - start
            assert reply["ok"] is False and "no complete frame within 0.5 s" in reply["error"]
            assert closed and 0.4 <= seconds < 3.0, seconds
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            assert _fits(client.request(_valid_frame_body())["reply"])
    assert server.stats.timeouts == 2


def _wait_until_idle(server: CaptionServer) -> None:
    """Until the server has seen every client close (bounded): the next one must not be over its cap."""
    for _ in range(500):
        if server.active_connections == 0:
            return
        time.sleep(0.01)


def test_a_connection_over_the_cap_gets_a_busy_reply_not_a_hang():
    with _server(max_connections=1) as server:
        with LinkClient(("127.0.0.1", server.port), timeout=10) as first:
            assert _fits(first.request(_valid_frame_body())["reply"])  # first is being served
            with LinkClient(("127.0.0.1", server.port), timeout=10) as second:
                start = time.monotonic()
                reply = second.request(_valid_frame_body())["reply"]
                assert time.monotonic() - start < 5.0
            assert reply["ok"] is False and "server busy: 1 connections are open" in reply["error"]
        _wait_until_idle(server)
        with LinkClient(("127.0.0.1", server.port), timeout=10) as third:
            assert _fits(third.request(_valid_frame_body())["reply"])
    assert server.stats.refused_connections == 1


def test_a_stalled_client_does_not_hold_up_the_others():
    with _server() as server, socket.create_connection(("127.0.0.1", server.port), timeout=10) as stalled:
        stalled.sendall(struct.pack(">I", 1000) + b"a frame that never ends")
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            start = time.monotonic()
            assert _fits(client.request(_valid_frame_body())["reply"])
            assert time.monotonic() - start < 5.0  # the stalled one holds its connection for 10 s


def test_info_says_what_the_server_reads_and_send_refuses_a_mismatch_before_sending():
    class BigStandIn(StandInCaptioner):
        image_size = 32  # 8 x 8 patches: 65 tokens, where the server's model has 17

    with _server() as server:
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            info = client.info()
        assert info["accepts"]["tokens"] == 17 and info["accepts"]["width"] == 6
        assert info["max_connections"] == 16 and info["accepts"]["max_batch"] == 16
        image = torch.zeros(3, 32, 32, dtype=torch.uint8)
        with pytest.raises(DmclipError, match="65 tokens per image .*expected 17"):
            send_images(BigStandIn(), build_selector("kmeans", k=2), [image], ("127.0.0.1", server.port))
    assert server.stats.requests == 0  # refused on the edge: nothing was sent


def test_concurrent_requests_are_captioned_together_and_each_gets_its_own_rows():
    entered, gate, calls = threading.Event(), threading.Event(), []

    class Gated:
        def restore(self, payload):
            return payload.vectors.float()

        def caption(self, tokens):
            calls.append(tokens.shape[0])
            entered.set()
            gate.wait(10)
            return [f"{v:.0f}" for v in tokens[:, 0, 0].tolist()]

    def payload(value: float) -> Payload:
        return Payload("none", 1, torch.full((1, 1, 2), value))

    model = ModelQueue(Gated(), batch_images=8, batch_wait=0.0, stats_add=lambda **kw: None)
    try:
        first = model.submit(payload(1))
        assert entered.wait(10)  # the model thread is busy with the first request
        rest = [model.submit(payload(v)) for v in (2, 3)]
        gate.set()
        for job in (first, *rest):
            assert job.done.wait(10) and job.error is None
    finally:
        model.close(5)
    assert calls == [1, 2]
    assert [j.result["captions"] for j in (first, *rest)] == [["1"], ["2"], ["3"]]
    assert rest[0].result["decoder_batch"] == 2


def test_load_generator_gets_every_reply_and_each_matches_its_request():
    samples = colour_dataset(6)
    model, selector = StandInCaptioner(), build_selector("kmeans", k=2)
    bodies = [encode(selector.compress(model.encode_image_tokens(s["image"].unsqueeze(0)))) for s in samples]

    def make(client: int, i: int):
        j = (client + i) % len(samples)  # neighbouring requests name different colours
        return bodies[j], [samples[j]["captions"][0]]

    with _server() as server:
        result = run_load(("127.0.0.1", server.port), clients=4, requests=6, make=make, timeout=10, time_limit=60)
    assert result["ok"] == 24 and result["replies"] == 24
    assert result["errors"] == result["mismatched"] == result["lost"] == result["not_sent"] == 0
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["requests_per_s"] > 0 and result["bytes_per_s"] > 0
    assert server.stats.images == 24


def test_load_command_against_a_server_on_loopback(tmp_path, capsys):
    from dmclip.cli.main import main

    with _server() as server:
        argv = ["compress", "load", "--server", f"127.0.0.1:{server.port}", "--clients", "2", "--requests", "3",
                "--k", "4", "--runs-dir", str(tmp_path)]
        assert main(argv) == 0
    result = json.loads(next(tmp_path.rglob("results.json")).read_text())
    assert result["ok"] == 6 and result["errors"] == result["mismatched"] == result["lost"] == 0
    out = capsys.readouterr().out
    assert "6 of 6 requests answered ok" in out and "p95" in out
    with pytest.raises(DmclipError, match="not a loopback address"):
        loopback_address("192.0.2.7:5000")


@pytest.fixture(scope="module")
def fuzzed_server():
    with _server(connection_timeout=5.0) as server:
        yield server


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda head, tail: head + tail, st.just(b"DMCZ\x01"), st.binary(max_size=120))))
def test_fuzzed_frames_get_a_reply_and_never_stop_the_server(fuzzed_server, body):
    with LinkClient(("127.0.0.1", fuzzed_server.port), timeout=10) as client:
        reply = client.request(body)["reply"]
        assert (reply["ok"] is False and reply["error"]) or "info" in reply  # hypothesis does find {"op":"info"}
        assert _fits(client.request(_valid_frame_body())["reply"])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 255), st.integers(0, 2), st.integers(0, 3), st.integers(1, 40), st.integers(0, 2**20),
       st.integers(0, 2**20), st.integers(1, 65535), st.binary(max_size=64))
def test_fuzzed_checksummed_headers_are_refused_or_fit(fuzzed_server, sel, dtype, flags, B, N, K, W, tail):
    bits = codec.index_bits(K) if flags & 2 else 0
    body = struct.pack("<4sBBBBHIIHB", codec.MAGIC, codec.VERSION, sel, dtype, flags, B, N, K, W, bits) + tail
    frame = body + struct.pack("<I", zlib.crc32(body))
    with LinkClient(("127.0.0.1", fuzzed_server.port), timeout=10) as client:
        start = time.monotonic()
        reply = client.request(frame)["reply"]
        assert time.monotonic() - start < 5.0
        assert reply["ok"] is False or len(reply["captions"]) == B


def test_forty_concurrent_garbage_connections_each_get_an_error_reply():
    replies, barrier = [], threading.Barrier(40, timeout=10)

    def garbage(i: int) -> None:
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            barrier.wait()
            replies.append(client.request(b"\x00this is garbage, not a payload: number %d" % i)["reply"])

    with _server(max_connections=8) as server:
        threads = [threading.Thread(target=garbage, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        assert len(replies) == 40 and not any(r["ok"] for r in replies)
        assert all("magic" in r["error"] or "server busy" in r["error"] for r in replies)
        assert server.stats.refused_connections == sum("server busy" in r["error"] for r in replies)
        _wait_until_idle(server)
        with LinkClient(("127.0.0.1", server.port), timeout=10) as client:
            assert _fits(client.request(_valid_frame_body())["reply"])
