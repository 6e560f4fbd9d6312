"""Wire codec: if these break, the bytes we report would not be what crosses the link, or the server
would crash (instead of replying with an error) on a damaged frame."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmclip.compress import codec
from dmclip.compress.codec import Payload, decode, encode, index_bits, payload_stats, quantize
from dmclip.errors import DmclipError


@st.composite
def payloads(draw):
    B = draw(st.integers(1, 3))
    N = draw(st.integers(0, 40))
    K = draw(st.integers(0 if N == 0 else 1, 40))
    W = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from(list(codec.DTYPES)))
    selector = draw(st.sampled_from([*codec.SELECTOR_IDS, "my-plugin", "ünï"]))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    vectors, scales = quantize(torch.randn(B, K, W, generator=g) * 3, dtype)
    cls = cls_scales = None
    if draw(st.booleans()):
        cls, cls_scales = quantize(torch.randn(B, W, generator=g), dtype)
    indices = None
    if K >= 1 and draw(st.booleans()):
        indices = torch.randint(0, K, (B, N), generator=g)
    return Payload(selector, N, vectors, scales, cls, cls_scales, indices)


def _same(a: Payload, b: Payload) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and x.dtype == y.dtype
                                              and torch.equal(x, y))
    return (a.selector == b.selector and a.n_tokens == b.n_tokens and eq(a.vectors, b.vectors)
            and eq(a.scales, b.scales) and eq(a.class_tokens, b.class_tokens)
            and eq(a.class_scales, b.class_scales) and eq(a.indices, b.indices))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payloads())
def test_round_trip_is_exact(payload):
    data = encode(payload)
    assert _same(decode(data), payload)
    assert encode(decode(data)) == data


@settings(max_examples=60, deadline=None)
@given(payloads())
def test_size_is_header_plus_data_plus_packed_indices(payload):
    B, K, W = payload.vectors.shape
    item = {"float16": 2, "float32": 4, "int8": 1}[payload.dtype]
    scale = 2 if payload.dtype == "int8" else 0
    expected = codec.HEADER_BYTES + codec.CRC_BYTES + B * K * (W * item + scale)
    if payload.selector not in codec.SELECTOR_IDS:
        expected += 1 + len(payload.selector.encode())
    if payload.class_tokens is not None:
        expected += B * (W * item + scale)
    if payload.indices is not None:
        expected += -(-B * payload.n_tokens * index_bits(K) // 8)
    assert len(encode(payload)) == expected


@settings(max_examples=300, deadline=None)
@given(payloads(), st.data())
def test_truncated_or_corrupted_bytes_raise_dmclip_error_only(payload, data):
    raw = encode(payload)
    cut = data.draw(st.integers(0, len(raw) - 1))
    with pytest.raises(DmclipError):
        decode(raw[:cut])
    position = data.draw(st.integers(0, len(raw) - 1))
    flipped = bytearray(raw)
    flipped[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(DmclipError):  # the CRC (or the header checks) catch any single bit flip
        decode(bytes(flipped))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_else(blob):
    try:
        decode(blob)
    except DmclipError:
        pass


# (offset, struct format) of every header field after the magic and the version
_FIELDS = [(5, "B"), (6, "B"), (7, "B"), (8, "H"), (10, "I"), (14, "I"), (18, "H"), (20, "B")]


@st.composite
def _damaged_frames(draw):
    """A valid frame with one header field set to another value, or body bytes changed, inserted or cut, then
    given a fresh CRC: what gets past the magic, version and checksum to the decoder's own checks."""
    raw = bytearray(encode(draw(payloads()))[:-codec.CRC_BYTES])
    damage = draw(st.sampled_from(["field", "byte", "insert", "cut"]))
    if damage == "field":
        offset, fmt = draw(st.sampled_from(_FIELDS))
        original = struct.unpack_from("<" + fmt, raw, offset)[0]
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        value = draw(st.one_of(st.integers(max(original - 2, 0), min(original + 2, top)), st.integers(0, top)))
        struct.pack_into("<" + fmt, raw, offset, value)
    elif damage == "byte" and len(raw) > codec.HEADER_BYTES:
        # the last byte often holds packed indices: changed, one may point past the K vectors
        position = draw(st.one_of(st.integers(codec.HEADER_BYTES, len(raw) - 1), st.just(len(raw) - 1)))
        raw[position] = draw(st.integers(0, 255))
    elif damage == "insert":
        position = draw(st.integers(codec.HEADER_BYTES, len(raw)))
        raw[position:position] = draw(st.binary(min_size=1, max_size=8))
    elif len(raw) > codec.HEADER_BYTES:
        start = draw(st.integers(codec.HEADER_BYTES, len(raw) - 1))
        del raw[start:start + draw(st.integers(1, 8))]
    return bytes(raw) + struct.pack("<I", zlib.crc32(raw))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged_frames())
def test_damaged_frames_with_a_valid_checksum_are_refused_or_decode_consistently(frame):
    """Either a DmclipError, or a payload whose header and size agree with the bytes: encoding it again gives
    the same frame (up to the unused bits that pad the packed indices to a byte)."""
    try:
        payload = decode(frame)
    except DmclipError:
        return
    again = encode(payload)
    assert len(again) == len(frame)
    assert again == frame or (payload.indices is not None and again[:-5] == frame[:-5])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 65535), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
       st.integers(0, 255))
def test_well_checksummed_garbage_headers_are_refused_cleanly(tail, sel, dtype, flags, B, N, K, W, bits):
    """A valid magic and CRC around nonsense fields: the length and field checks must still hold."""
    body = struct.pack("<4sBBBBHIIHB", codec.MAGIC, codec.VERSION, sel, dtype, flags, B, N, K, W, bits) + tail
    try:
        out = decode(body + struct.pack("<I", zlib.crc32(body)))
    except DmclipError:
        return
    assert out.vectors.shape == (B, K, W)  # whatever decodes is self-consistent


def test_bit_packing_is_lsb_first_and_tight():
    assert [index_bits(k) for k in (1, 2, 3, 4, 5, 8, 9, 256, 257)] == [0, 1, 2, 2, 3, 3, 4, 8, 9]
    packed = codec.pack_indices(np.array([1, 0, 3, 2]), 2)  # 01 00 11 10 -> 0b10110001
    assert packed == bytes([0b10_11_00_01])
    assert codec.unpack_indices(packed, 4, 2).tolist() == [1, 0, 3, 2]


def test_known_bytes_of_a_small_payload():
    """The layout of docs/wire-format.md, byte by byte."""
    p = Payload("kmeans", 4, torch.tensor([[[1.0, -2.0]]], dtype=torch.float16).repeat(1, 2, 1),
                indices=torch.tensor([[0, 1, 1, 0]]))
    raw = encode(p)
    assert raw[:4] == b"DMCZ" and raw[4] == 1 and raw[5] == 1 and raw[6] == 0 and raw[7] == 2
    assert struct.unpack_from("<HIIHB", raw, 8) == (1, 4, 2, 2, 1)
    assert raw[21:29] == np.array([1, -2, 1, -2], dtype="<f2").tobytes()
    assert raw[29] == 0b0110 and len(raw) == 21 + 8 + 1 + 4


def test_int8_quantisation_error_is_within_half_a_step():
    """Symmetric per vector: each vector's largest |value| is +-127 steps, every value within half a step (of the
    fp16 scale the receiver sees), and -x quantises to the negation of x."""
    values = torch.randn(2, 5, 32) * 4
    q, scale = quantize(values, "int8")
    back = codec.dequantize(q, scale)
    assert ((back - values).abs() <= scale.float().unsqueeze(-1) * 0.5 + 1e-6 * values.abs()).all()
    assert (q.abs().amax(-1) == 127).all()
    negated, negated_scale = quantize(-values, "int8")
    assert torch.equal(negated, -q) and torch.equal(negated_scale, scale)


def test_int8_vectors_of_small_values_come_back_within_half_a_step():
    """Below 127 x 2**-14 (~7.8e-3) a vector's scale is a float16 subnormal: the values still come back within
    half a step of the scale the receiver sees, with their sign, however small (down to float16's last step)."""
    for largest in (1e-2, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7):
        values = torch.tensor([[largest, -largest / 2, largest / 3, -largest, 0.0]])
        q, scale = quantize(values, "int8")
        back = codec.dequantize(q, scale)
        assert ((back - values).abs() <= scale.float() * 0.5 + 1e-6 * values.abs()).all(), (largest, back)
        assert (q.abs().amax(-1) <= 127).all() and torch.equal(quantize(-values, "int8")[0], -q)
    zero, zero_scale = quantize(torch.zeros(1, 3), "int8")
    assert not zero.any() and not zero_scale.any()


@pytest.mark.parametrize("dtype, width", [("float16", 2), ("float32", 4), ("int8", 1)])
def test_each_wire_dtype_is_what_quantize_returns(dtype, width):
    q, scale = quantize(torch.randn(2, 3), dtype)
    assert q.dtype == codec._TORCH_DTYPES[dtype] and q.element_size() == width
    assert (scale is None) == (dtype != "int8")


def test_stats_count_vectors_and_index_bytes():
    p = Payload("kmeans", 256, torch.zeros(2, 8, 768, dtype=torch.float16),
                class_tokens=torch.zeros(2, 768, dtype=torch.float16), indices=torch.zeros(2, 256, dtype=torch.long))
    stats = payload_stats(p)
    assert stats["communication_efficiency"] == pytest.approx(9 / 257)
    assert stats["index_bytes_per_image"] == 96  # 256 tokens x 3 bits
    assert stats["bytes_per_image"] == 21 + 4 + 9 * 768 * 2 + 96
    assert stats["bytes_per_image_without_indices"] == stats["bytes_per_image"] - 96


def test_encode_refuses_inconsistent_payloads():
    with pytest.raises(DmclipError):
        encode(Payload("none", 3, torch.zeros(1, 2, 4), indices=torch.tensor([[0, 1, 2]])))  # index 2 >= K
    with pytest.raises(DmclipError):
        encode(Payload("none", 3, torch.zeros(1, 2, 4, dtype=torch.float64)))
    with pytest.raises(DmclipError):
        decode("not bytes")  # type: ignore[arg-type]


def test_a_server_refuses_a_header_before_the_body_is_read():
    """The accept hook sees the header of a payload whose body was never sent (a million tokens claimed)."""
    accepts = codec.Accepts(tokens=17, width=6, max_batch=2)
    body = struct.pack("<4sBBBBHIIHB", codec.MAGIC, codec.VERSION, 1, 0, 3, 3, 2**20, 1, 6, 0)
    with pytest.raises(DmclipError) as refused:
        decode(body + struct.pack("<I", zlib.crc32(body)), accepts.check)
    message = refused.value.message
    assert "1048577 tokens per image (N=1048576 + class token), expected 17" in message
    assert "3 images in one request, expected at most 2" in message
    fits = Payload("kmeans", 16, quantize(torch.rand(1, 2, 6), "float16")[0],
                   class_tokens=quantize(torch.rand(1, 6), "float16")[0], indices=torch.zeros(1, 16, dtype=torch.long))
    accepts.check(fits.header)
    assert decode(encode(fits), accepts.check).n_tokens == 16


def test_more_vectors_than_tokens_is_refused_with_expected_and_got():
    """K > N: a sender claiming more vectors per image than its encoder has tokens would make the server
    restore a longer sequence than its own images give; the header alone is refused, naming both numbers."""
    accepts = codec.Accepts(tokens=17, width=6)
    vectors, _ = quantize(torch.rand(1, 17, 6), "float16")
    cls, _ = quantize(torch.rand(1, 6), "float16")
    too_many = Payload("none", 16, vectors, class_tokens=cls)
    assert too_many.header.total_tokens == 17 and too_many.header.k == 17  # fits in every other way
    with pytest.raises(DmclipError) as refused:
        decode(encode(too_many), accepts.check)
    assert refused.value.message == ("payload does not fit this server's model: "
                                     "K=17 vectors per image for N=16 tokens, expected K <= N")
    every_token = Payload("none", 16, vectors[:, :16], class_tokens=cls)
    assert decode(encode(every_token), accepts.check).vectors.shape == (1, 16, 6)




_LARGEST = [(codec.MAX_BATCH, 0, 1, 0), (1, codec.MAX_TOKENS, 1, codec.MAX_TOKENS), (1, 1, codec.MAX_WIDTH, 1)]


@pytest.mark.parametrize("B, K, W, N", _LARGEST)
def test_the_largest_batch_k_width_and_n_the_header_holds_are_sent(B, K, W, N):
    payload = Payload("none", N, torch.zeros(B, K, W, dtype=torch.float16))
    assert decode(encode(payload)).vectors.shape == (B, K, W)


@pytest.mark.parametrize("B, K, W, N", [(codec.MAX_BATCH + 1, 0, 1, 0), (1, codec.MAX_TOKENS + 1, 1, 0),
                                        (1, 1, codec.MAX_WIDTH + 1, 1), (1, 1, 1, codec.MAX_TOKENS + 1),
                                        (1, 1, 0, 1), (0, 1, 1, 1)])
def test_one_past_a_wire_limit_is_refused_by_encode(B, K, W, N):
    """A DmclipError naming the shape, not a struct error nor a frame every server refuses."""
    with pytest.raises(DmclipError, match="outside what the wire carries"):
        encode(Payload("none", N, torch.zeros(B, K, W, dtype=torch.float16)))


def test_class_tokens_of_another_shape_or_dtype_are_refused():
    vectors = torch.zeros(2, 3, 4, dtype=torch.float16)
    for cls in (torch.zeros(2, 5, dtype=torch.float16), torch.zeros(1, 4, dtype=torch.float16),
                torch.zeros(2, 4, dtype=torch.float32)):
        with pytest.raises(DmclipError, match="class tokens must be"):
            encode(Payload("none", 3, vectors, class_tokens=cls))


def test_int8_payloads_split_into_images_that_decode_to_their_rows():
    """What the link sends per image, and what payload_stats measures: each image's own vectors, scales,
    class token and class scale."""
    g = torch.Generator().manual_seed(0)
    vectors, scales = quantize(torch.randn(3, 4, 5, generator=g), "int8")
    cls, cls_scales = quantize(torch.randn(3, 5, generator=g), "int8")
    payload = Payload("kmeans", 6, vectors, scales, cls, cls_scales, torch.randint(0, 4, (3, 6), generator=g))
    images = payload.split()
    assert len(images) == 3
    for i, image in enumerate(images):
        row = Payload("kmeans", 6, vectors[i:i + 1], scales[i:i + 1], cls[i:i + 1], cls_scales[i:i + 1],
                      payload.indices[i:i + 1])
        assert _same(decode(encode(image)), row)
    per_image = 21 + 4 + 5 * (5 + 2) + 2  # header, CRC, 5 vectors of 5 bytes + an fp16 scale, 6 x 2-bit indices
    assert payload_stats(payload)["bytes_per_image"] == per_image


def test_stats_of_a_payload_without_indices_or_class_token():
    stats = payload_stats(Payload("topk-norm", 1, torch.zeros(2, 1, 8, dtype=torch.float16)))
    assert stats == {"vectors_sent": 1, "tokens": 1, "communication_efficiency": 1.0,
                     "bytes_per_image": 21 + 4 + 16, "index_bytes_per_image": 0,
                     "bytes_per_image_without_indices": 21 + 4 + 16}
    assert payload_stats(Payload("topk-norm", 4, torch.zeros(1, 2, 8)))["index_bytes_per_image"] == 0


def test_a_frame_cut_inside_the_selector_name_says_so():
    body = bytearray(encode(Payload("my-plugin", 1, torch.zeros(1, 1, 2, dtype=torch.float16)))[:-4])
    cut = bytes(body[:codec.HEADER_BYTES + 4])  # the length byte (9) and 3 of the name's 9 bytes
    with pytest.raises(DmclipError, match="payload truncated: selector name needs 9 bytes at offset 22, 3 left"):
        decode(cut + struct.pack("<I", zlib.crc32(cut)))


def _header(**changes):
    fields = {"selector": "kmeans", "dtype": "float16", "batch": 2, "n_tokens": 16, "k": 4, "width": 6,
              "has_class": True, "has_indices": True}
    return codec.Header(**{**fields, **changes})


@pytest.mark.parametrize("changes, reason", [
    ({"has_class": False}, "16 tokens per image (N=16), expected 17"),
    ({"width": 7}, "vectors 7 wide, expected 6"),
    ({"batch": 3}, "3 images in one request, expected at most 2"),
    ({"dtype": "int8"}, "dtype int8, expected one of float16, float32"),
    ({"selector": "tome"}, "selector 'tome', expected one of kmeans, none"),
])
def test_a_server_names_each_reason_it_refuses_a_header(changes, reason):
    accepts = codec.Accepts(tokens=17, width=6, max_batch=2, dtypes=("float16", "float32"),
                            selectors=("kmeans", "none"))
    accepts.check(_header())  # max_batch images are accepted
    with pytest.raises(DmclipError) as refused:
        accepts.check(_header(**changes))
    assert refused.value.message == "payload does not fit this server's model: " + reason


def test_accepts_travels_in_the_info_reply_and_bounds_every_frame_that_fits():
    accepts = codec.Accepts(tokens=17, width=6, max_batch=3, dtypes=("float32",), selectors=("kmeans", "x" * 255))
    assert codec.Accepts.from_dict(json.loads(json.dumps(accepts.as_dict()))) == accepts
    for broken in ({}, {**accepts.as_dict(), "width": "wide"}, {**accepts.as_dict(), "dtypes": None}):
        with pytest.raises(DmclipError, match="info reply is incomplete"):
            codec.Accepts.from_dict(broken)
    # the longest frame that fits: float32, a 255-byte name, every patch token a vector, indices, max_batch images
    largest = Payload("x" * 255, 16, torch.zeros(3, 16, 6), class_tokens=torch.zeros(3, 6),
                      indices=torch.zeros(3, 16, dtype=torch.long))
    accepts.check(largest.header)
    assert len(encode(largest)) <= accepts.max_payload_bytes() <= len(encode(largest)) + 3 * (8 + 10)


def test_payload_crc_is_the_checksum_a_frame_ends_with():
    raw = encode(Payload("none", 1, torch.zeros(1, 1, 2, dtype=torch.float16)))
    assert codec.payload_crc(raw) == zlib.crc32(raw[:-4])
    header_only = encode(Payload("none", 0, torch.zeros(1, 0, 3, dtype=torch.float16)))
    assert len(header_only) == codec.HEADER_BYTES + 4 and codec.payload_crc(header_only) == zlib.crc32(header_only[:-4])
    assert codec.payload_crc(raw[:codec.HEADER_BYTES + 3]) is None  # shorter than a header and a CRC
    assert codec.payload_crc(codec.HEADER_BYTES * b"\0" + raw[-4:]) is None  # not a payload


def test_a_named_selector_has_1_to_255_utf8_bytes():
    vectors = torch.zeros(1, 1, 2, dtype=torch.float16)
    for name in ("x", "é" * 127 + "x"):  # 1 and 255 bytes
        assert decode(encode(Payload(name, 1, vectors))).selector == name
    nothing_else = decode(encode(Payload("my-plugin", 0, torch.zeros(1, 0, 3, dtype=torch.float16))))
    assert nothing_else.selector == "my-plugin" and nothing_else.vectors.shape == (1, 0, 3)  # the name ends the body
    for name in ("", "x" * 256, "é" * 128):
        with pytest.raises(DmclipError, match="must be 1..255 UTF-8 bytes"):
            encode(Payload(name, 1, vectors))


@pytest.mark.parametrize("B, K, W, N, bits, tail", [(0, 1, 1, 0, 0, 0), (1, 1, 0, 0, 0, 0),
                                                    (1, 0, 1, codec.MAX_TOKENS + 1, 0, 0),
                                                    (1, codec.MAX_TOKENS + 1, 1, 0, 0, 2 * (codec.MAX_TOKENS + 1))])
def test_a_header_past_the_wire_limits_is_refused_even_when_the_length_agrees(B, K, W, N, bits, tail):
    """No batch, no width, or N or K past 2**20: what encode never writes is refused, not decoded."""
    body = struct.pack("<4sBBBBHIIHB", codec.MAGIC, codec.VERSION, 0, 0, 0, B, N, K, W, bits) + bytes(tail)
    with pytest.raises(DmclipError, match="is not valid"):
        decode(body + struct.pack("<I", zlib.crc32(body)))


def test_a_named_selector_frame_that_ends_at_its_header_says_so():
    body = struct.pack("<4sBBBBHIIHB", codec.MAGIC, codec.VERSION, codec.NAMED_SELECTOR, 0, 0, 1, 0, 0, 1, 0)
    with pytest.raises(DmclipError, match="payload truncated: selector name length needs 1 bytes at offset 21, 0 left"):
        decode(body + struct.pack("<I", zlib.crc32(body)))


@settings(max_examples=40, deadline=None)
@given(payloads())
def test_the_accept_hook_sees_the_header_the_payload_was_sent_with(payload):
    seen = []
    decode(encode(payload), seen.append)
    assert seen == [payload.header]


def test_an_index_equal_to_k_is_refused():
    """K = 3 vectors need 2-bit indices, which can also say 3: a frame that does is refused, not decoded."""
    raw = bytearray(encode(Payload("kmeans", 4, torch.zeros(1, 3, 2, dtype=torch.float16),
                                   indices=torch.tensor([[0, 1, 2, 2]])))[:-4])
    raw[-1] = 0b11_10_01_00  # indices 0, 1, 2, 3
    with pytest.raises(DmclipError, match="an index points past the 3 vectors sent"):
        decode(bytes(raw) + struct.pack("<I", zlib.crc32(raw)))
