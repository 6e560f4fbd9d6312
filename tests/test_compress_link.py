"""The TCP link: if these break, `compress serve` would die on a bad frame or `send` would report wrong bytes."""

from __future__ import annotations

import socket
import struct

import pytest
import torch
from test_compress_standin import StandInCaptioner, colour_dataset

from dmclip.compress import encode
from dmclip.compress.link import CaptionServer, LinkClient, parse_address
from dmclip.compress.pipeline import DecodeConfig, caption_handler, send_images
from dmclip.compress.selectors import build_selector
from dmclip.errors import DmclipError


def _server(**kw):
    return CaptionServer(caption_handler(StandInCaptioner(), DecodeConfig()), "127.0.0.1", 0,
                         idle_timeout=20.0, connection_timeout=10.0, **kw)


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
    assert server.stats.bytes_in == sum(r["wire_bytes_sent"] for r in rows)


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
