"""The wire codec: the exact bytes that cross the edge -> server link (docs/wire-format.md).

A :class:`Payload` is what a selector sends for a batch of B images; ``encode`` turns it into bytes,
``decode`` turns bytes back into an identical payload (bit for bit) or raises :class:`DmclipError`.
All integers are little-endian.

    offset size  field
    0      4     magic b"DMCZ"
    4      1     version (1)
    5      1     selector id (0 none, 1 kmeans, 2 random, 3 topk-norm, 4 pool, 5 tome, 255 named)
    6      1     dtype (0 float16, 1 float32, 2 int8 + one float16 scale per vector)
    7      1     flags (bit 0: class tokens present, bit 1: indices present)
    8      2     B  images
    10     4     N  patch tokens per image before compression
    14     4     K  vectors per image sent (centroids / kept / pooled / merged tokens)
    18     2     W  vector width
    20     1     index bits b (ceil(log2 K) when indices are present, else 0)
    21     -     [selector id 255 only] u8 name length + UTF-8 name
    then   class tokens (B, W) and their scales (B,) for int8     [flag bit 0]
           vectors (B, K, W) and their scales (B, K) for int8
           indices (B, N), each b bits, LSB first, packed, padded to a whole byte   [flag bit 1]
    last 4 CRC-32 of every byte before it
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dmclip.errors import DmclipError

MAGIC = b"DMCZ"
VERSION = 1
SELECTOR_IDS = {"none": 0, "kmeans": 1, "random": 2, "topk-norm": 3, "pool": 4, "tome": 5}
NAMED_SELECTOR = 255
DTYPES = {"float16": 0, "float32": 1, "int8": 2}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}
_NUMPY_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4"), "int8": np.dtype("i1")}
_HEADER = struct.Struct("<4sBBBBHIIHB")  # magic .. index bits: 21 bytes
HEADER_BYTES = _HEADER.size
CRC_BYTES = 4
MAX_BATCH, MAX_TOKENS, MAX_WIDTH = 65535, 2**20, 65535
_BAD_HINT = "the bytes are not a dmclip compress payload (truncated, corrupted, or from another version)"


def index_bits(k: int) -> int:
    """Bits per index for ``k`` possible values: ceil(log2 k) (0 when k == 1: nothing to say)."""
    return 0 if k <= 1 else math.ceil(math.log2(k))


@dataclass
class Payload:
    """What the edge sends for a batch of B images, already in its wire dtype.

    ``vectors`` (B, K, W) float16 / float32 / int8; for int8 ``scales`` (B, K) float16 holds each vector's
    scale (value = int8 * scale). ``class_tokens`` (B, W) (+ ``class_scales`` (B,)) when the encoder has a
    class token, sent verbatim. ``indices`` (B, N) int64 in [0, K) when each patch token is to be replaced by
    its vector on the server (k-means' "expand" restore), else None.
    """

    selector: str
    n_tokens: int  # N: patch tokens per image before compression (class token not counted)
    vectors: torch.Tensor
    scales: torch.Tensor | None = None
    class_tokens: torch.Tensor | None = None
    class_scales: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)  # edge-side only (never on the wire): timings, k-means inertia

    @property
    def dtype(self) -> str:
        for name, tdtype in _TORCH_DTYPES.items():
            if self.vectors.dtype == tdtype:
                return name
        raise DmclipError(f"payload vectors have dtype {self.vectors.dtype}, not one the wire carries",
                          f"use one of {', '.join(DTYPES)}")

    @property
    def batch(self) -> int:
        return self.vectors.shape[0]

    @property
    def width(self) -> int:
        return self.vectors.shape[2]

    @property
    def sent_vectors(self) -> int:
        """Vectors sent per image (class token included)."""
        return self.vectors.shape[1] + (1 if self.class_tokens is not None else 0)

    @property
    def total_tokens(self) -> int:
        """Tokens per image the encoder emitted (class token included)."""
        return self.n_tokens + (1 if self.class_tokens is not None else 0)

    @property
    def header(self) -> Header:
        """The header this payload is sent with (what a server checks before decoding it)."""
        return Header(self.selector, self.dtype, self.batch, self.n_tokens, self.vectors.shape[1], self.width,
                      self.class_tokens is not None, self.indices is not None)

    def split(self) -> list[Payload]:
        """One payload per image (what the link sends)."""
        def pick(t, i):
            return None if t is None else t[i:i + 1]

        return [Payload(self.selector, self.n_tokens, self.vectors[i:i + 1], pick(self.scales, i),
                        pick(self.class_tokens, i), pick(self.class_scales, i), pick(self.indices, i))
                for i in range(self.batch)]


# ------------------------------------------------------------------------------------- quantisation


def quantize(values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float (..., W) -> (wire tensor, scales (...) float16 or None). int8 is symmetric per vector."""
    if dtype not in DTYPES:
        raise DmclipError(f"wire dtype {dtype!r} is not supported", f"use one of {', '.join(DTYPES)}")
    values = values.detach().float()
    if dtype != "int8":
        return values.to(_TORCH_DTYPES[dtype]), None
    exact = values.abs().amax(-1) / 127.0
    scale = exact.to(torch.float16)  # the receiver only ever sees the fp16 scale: quantise against that one
    # a subnormal fp16 scale can round far below the exact one (8.9e-8 -> 6.0e-8): round it up, so no value
    # lies past 127 steps and saturates
    coarse = (scale < torch.finfo(torch.float16).tiny) & (scale.float() < exact)
    scale = torch.where(coarse, torch.nextafter(scale, torch.full_like(scale, math.inf)), scale)
    safe = torch.where(scale > 0, scale.float(), 1.0)  # an all-zero vector: every value is 0 steps
    q = torch.round(values / safe.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(values: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    """Wire tensor -> float32."""
    if values.dtype == torch.int8:
        return values.float() * scales.float().unsqueeze(-1)
    return values.float()


# ------------------------------------------------------------------------------------------ bit packing


def pack_indices(indices: np.ndarray, bits: int) -> bytes:
    """Unsigned ints < 2**bits -> ``bits`` bits each, least significant bit first, padded to a byte."""
    if bits == 0 or indices.size == 0:
        return b""
    flat = indices.reshape(-1).astype(np.uint32)
    planes = ((flat[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)  # (n, bits)
    return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def unpack_indices(data: bytes, count: int, bits: int) -> np.ndarray:
    if bits == 0:
        return np.zeros(count, dtype=np.int64)
    planes = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))
    return planes.reshape(count, bits).astype(np.int64) @ weights


def packed_index_bytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


# -------------------------------------------------------------------------------------------- encode


def _check(payload: Payload) -> None:
    v = payload.vectors
    if v.dim() != 3:
        raise DmclipError(f"payload vectors must be (B, K, W), got {tuple(v.shape)}", "fix the selector's compress()")
    B, K, W = v.shape
    if not (1 <= B <= MAX_BATCH and 0 <= K <= MAX_TOKENS and 1 <= W <= MAX_WIDTH and 0 <= payload.n_tokens <= MAX_TOKENS):
        raise DmclipError(f"payload shape B={B}, K={K}, W={W}, N={payload.n_tokens} is outside what the wire carries",
                          f"B <= {MAX_BATCH}, K and N <= {MAX_TOKENS}, 1 <= W <= {MAX_WIDTH}")
    dtype = payload.dtype
    if (dtype == "int8") != (payload.scales is not None):
        raise DmclipError("int8 vectors need scales (and only int8 ones)", "build payloads with codec.quantize")
    if payload.scales is not None and tuple(payload.scales.shape) != (B, K):
        raise DmclipError(f"scales must be (B, K) = {(B, K)}, got {tuple(payload.scales.shape)}", "use codec.quantize")
    if payload.class_tokens is not None:
        if tuple(payload.class_tokens.shape) != (B, W) or payload.class_tokens.dtype != v.dtype:
            raise DmclipError(f"class tokens must be (B, W) = {(B, W)} in {dtype}", "use codec.quantize on them too")
        if (dtype == "int8") != (payload.class_scales is not None):
            raise DmclipError("int8 class tokens need class_scales", "use codec.quantize")
    if payload.indices is not None:
        idx = payload.indices
        if tuple(idx.shape) != (B, payload.n_tokens):
            raise DmclipError(f"indices must be (B, N) = {(B, payload.n_tokens)}, got {tuple(idx.shape)}",
                              "one index per patch token")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= K):
            raise DmclipError(f"indices must lie in [0, {K})", "an index names one of the K vectors sent")


def _tensor_bytes(t: torch.Tensor, dtype: str) -> bytes:
    return t.detach().cpu().contiguous().numpy().astype(_NUMPY_DTYPES[dtype], copy=False).tobytes()


def encode(payload: Payload) -> bytes:
    """Payload -> bytes (see the module docstring for the layout)."""
    _check(payload)
    B, K, W = payload.vectors.shape
    dtype = payload.dtype
    has_indices = payload.indices is not None
    bits = index_bits(K) if has_indices else 0
    flags = (1 if payload.class_tokens is not None else 0) | (2 if has_indices else 0)
    selector_id = SELECTOR_IDS.get(payload.selector, NAMED_SELECTOR)
    parts = [_HEADER.pack(MAGIC, VERSION, selector_id, DTYPES[dtype], flags, B, payload.n_tokens, K, W, bits)]
    if selector_id == NAMED_SELECTOR:
        name = payload.selector.encode("utf-8")
        if not 1 <= len(name) <= 255:
            raise DmclipError(f"selector name {payload.selector!r} must be 1..255 UTF-8 bytes", "use a shorter name")
        parts += [bytes([len(name)]), name]
    if payload.class_tokens is not None:
        parts.append(_tensor_bytes(payload.class_tokens, dtype))
        if dtype == "int8":
            parts.append(_tensor_bytes(payload.class_scales, "float16"))
    parts.append(_tensor_bytes(payload.vectors, dtype))
    if dtype == "int8":
        parts.append(_tensor_bytes(payload.scales, "float16"))
    if has_indices:
        parts.append(pack_indices(payload.indices.cpu().numpy(), bits))
    body = b"".join(parts)
    return body + struct.pack("<I", zlib.crc32(body))


# -------------------------------------------------------------------------------------------- decode


class _Reader:
    def __init__(self, data: bytes, pos: int):
        self.data, self.pos = data, pos

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise DmclipError(f"payload truncated: {what} needs {n} bytes at offset {self.pos}, "
                              f"{max(len(self.data) - self.pos, 0)} left", _BAD_HINT)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def array(self, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
        """The next array; only read once the frame's length is checked against its header."""
        npd = _NUMPY_DTYPES[dtype]
        count = int(np.prod(shape))
        out = np.frombuffer(self.data, dtype=npd, count=count, offset=self.pos).reshape(shape).copy()
        self.pos += count * npd.itemsize
        return torch.from_numpy(out)


@dataclass(frozen=True)
class Header:
    """The fixed fields of a payload (what ``decode`` knows before it reads any vector)."""

    selector: str
    dtype: str
    batch: int  # B
    n_tokens: int  # N
    k: int  # K vectors per image sent
    width: int  # W
    has_class: bool
    has_indices: bool

    @property
    def total_tokens(self) -> int:
        """Tokens per image the sender's encoder emitted (class token included)."""
        return self.n_tokens + (1 if self.has_class else 0)


def _crc(data: bytes) -> int:
    return struct.unpack("<I", data[-CRC_BYTES:])[0]


def payload_crc(data: bytes) -> int | None:
    """The CRC-32 a payload ends with (the link echoes it in the reply, so a reply names its request)."""
    return _crc(data) if len(data) >= HEADER_BYTES + CRC_BYTES and data[:4] == MAGIC else None


def decode(data: bytes, accept: Callable[[Header], None] | None = None) -> Payload:
    """Bytes -> Payload. Anything malformed raises DmclipError (never another exception).

    ``accept(header)`` runs once the header is read and checked, before any vector or index is read or
    allocated: a server refuses a payload that does not fit its model there (:meth:`Accepts.check`).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DmclipError(f"decode expects bytes, got {type(data).__name__}", "pass the received frame")
    data = bytes(data)
    if len(data) < HEADER_BYTES + CRC_BYTES:
        raise DmclipError(f"payload truncated: {len(data)} bytes is shorter than a header", _BAD_HINT)
    body, crc = data[:-CRC_BYTES], _crc(data)
    magic, version, selector_id, dtype_id, flags, B, N, K, W, bits = _HEADER.unpack_from(body, 0)
    if magic != MAGIC:
        raise DmclipError(f"bad magic {magic!r} (expected {MAGIC!r})", _BAD_HINT)
    if version != VERSION:
        raise DmclipError(f"payload version {version} is not supported (this dmclip reads version {VERSION})",
                          "run the same dmclip version on the edge and the server")
    if zlib.crc32(body) != crc:
        raise DmclipError("payload checksum mismatch (CRC-32)", _BAD_HINT)
    names = {v: k for k, v in SELECTOR_IDS.items()}
    dtypes = {v: k for k, v in DTYPES.items()}
    if dtype_id not in dtypes:
        raise DmclipError(f"unknown dtype id {dtype_id}", _BAD_HINT)
    if flags & ~3:
        raise DmclipError(f"unknown flags {flags:#x}", _BAD_HINT)
    if not (B >= 1 and W >= 1 and N <= MAX_TOKENS and K <= MAX_TOKENS):
        raise DmclipError(f"payload shape B={B}, N={N}, K={K}, W={W} is not valid", _BAD_HINT)
    dtype = dtypes[dtype_id]
    has_class, has_indices = bool(flags & 1), bool(flags & 2)
    if bits != (index_bits(K) if has_indices else 0):
        raise DmclipError(f"index width {bits} bits does not match K={K}", _BAD_HINT)
    reader = _Reader(body, HEADER_BYTES)
    if selector_id == NAMED_SELECTOR:
        length = reader.take(1, "selector name length")[0]
        try:
            selector = reader.take(length, "selector name").decode("utf-8")
        except UnicodeDecodeError:
            raise DmclipError("selector name is not UTF-8", _BAD_HINT) from None
        if not selector:
            raise DmclipError("empty selector name", _BAD_HINT)
    elif selector_id in names:
        selector = names[selector_id]
    else:
        raise DmclipError(f"unknown selector id {selector_id}", _BAD_HINT)
    if accept is not None:
        accept(Header(selector, dtype, B, N, K, W, has_class, has_indices))
    # the size the header promises must be exactly what arrived (checked before allocating anything big)
    item = _NUMPY_DTYPES[dtype].itemsize
    expected = reader.pos
    expected += (B * W * item + (2 * B if dtype == "int8" else 0)) if has_class else 0
    expected += B * K * W * item + (2 * B * K if dtype == "int8" else 0)
    expected += packed_index_bytes(B * N, bits) if has_indices else 0
    if expected != len(body):
        raise DmclipError(f"payload length {len(body) + CRC_BYTES} does not match its header "
                          f"({expected + CRC_BYTES} bytes)", _BAD_HINT)
    class_tokens = class_scales = scales = indices = None
    if has_class:
        class_tokens = reader.array((B, W), dtype)
        if dtype == "int8":
            class_scales = reader.array((B,), "float16")
    vectors = reader.array((B, K, W), dtype)
    if dtype == "int8":
        scales = reader.array((B, K), "float16")
    if has_indices:
        flat = unpack_indices(body[reader.pos:], B * N, bits)  # the rest of the body, by the length check
        if flat.size and int(flat.max()) >= K:
            raise DmclipError(f"an index points past the {K} vectors sent", _BAD_HINT)
        indices = torch.from_numpy(flat.reshape(B, N))
    return Payload(selector, N, vectors, scales, class_tokens, class_scales, indices)


# ------------------------------------------------------------------------------------------ what a server reads


@dataclass(frozen=True)
class Accepts:
    """What a server's model reads: the payloads it decodes; every other one is refused from its header.

    A payload fits when its tokens per image (N + class token) equal ``tokens`` (what the model's image
    tower emits), its vectors are ``width`` wide, it sends at most N vectors per image, carries at most
    ``max_batch`` images, and its dtype and selector are listed. The restored sequence then has at most
    ``tokens`` tokens, so a request costs the server what an image of its own model costs.
    """

    tokens: int
    width: int
    max_batch: int = 16
    dtypes: tuple[str, ...] = tuple(DTYPES)
    selectors: tuple[str, ...] = tuple(SELECTOR_IDS)

    def check(self, header: Header) -> None:
        got = []
        if header.total_tokens != self.tokens:
            parts = f"N={header.n_tokens}" + (" + class token" if header.has_class else "")
            got.append(f"{header.total_tokens} tokens per image ({parts}), expected {self.tokens}")
        if header.width != self.width:
            got.append(f"vectors {header.width} wide, expected {self.width}")
        if header.k > header.n_tokens:
            got.append(f"K={header.k} vectors per image for N={header.n_tokens} tokens, expected K <= N")
        if header.batch > self.max_batch:
            got.append(f"{header.batch} images in one request, expected at most {self.max_batch}")
        if header.dtype not in self.dtypes:
            got.append(f"dtype {header.dtype}, expected one of {', '.join(self.dtypes)}")
        if header.selector not in self.selectors:
            got.append(f"selector {header.selector!r}, expected one of {', '.join(self.selectors)}")
        if got:
            raise DmclipError("payload does not fit this server's model: " + "; ".join(got),
                              "edge and server must run the same model (the server's `info` names what it "
                              "reads); send at most max_batch images per request")

    def max_payload_bytes(self) -> int:
        """The longest payload that can fit (float32, every token sent, named selector): a frame limit."""
        item = _NUMPY_DTYPES["float32"].itemsize
        per_image = self.tokens * self.width * item + packed_index_bytes(self.tokens, index_bits(self.tokens))
        return HEADER_BYTES + 256 + self.max_batch * (per_image + 8) + CRC_BYTES

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "width": self.width, "max_batch": self.max_batch,
                "dtypes": list(self.dtypes), "selectors": list(self.selectors)}

    @classmethod
    def from_dict(cls, info: dict) -> Accepts:
        try:
            return cls(int(info["tokens"]), int(info["width"]), int(info["max_batch"]),
                       tuple(str(d) for d in info["dtypes"]), tuple(str(s) for s in info["selectors"]))
        except (KeyError, TypeError, ValueError):
            raise DmclipError("the server's info reply is incomplete", "is this a dmclip compress server "
                              "of the same version?") from None


# ------------------------------------------------------------------------------------------ accounting


def payload_stats(payload: Payload) -> dict:
    """Per-image cost of a payload: the paper's communication efficiency and the bytes, with and without indices.

    Bytes are those of a one-image frame body (header + CRC included), averaged over the batch.
    """
    images = payload.split()
    sizes = [len(encode(p)) for p in images]
    has_indices = payload.indices is not None
    index_bytes = packed_index_bytes(payload.n_tokens, index_bits(payload.vectors.shape[1])) if has_indices else 0
    bytes_per_image = sum(sizes) / len(sizes)
    return {
        "vectors_sent": payload.sent_vectors,
        "tokens": payload.total_tokens,
        "communication_efficiency": payload.sent_vectors / max(payload.total_tokens, 1),
        "bytes_per_image": bytes_per_image,
        "index_bytes_per_image": index_bytes,
        "bytes_per_image_without_indices": bytes_per_image - index_bytes,
    }
