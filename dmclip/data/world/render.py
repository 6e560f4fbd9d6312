"""Pixels: any of a split's images rendered from their scenes, alone or in any batch, with the same bytes.

An image's bytes are those of rendering its split in consecutive chunks of ``CHUNK`` images (the way every
world image, and so the data that trained ``builtin:world-vit``, was first made). Two things couple the
images of a chunk, and :func:`chunk_layout` reads both from the scenes up front, so that ``render`` can draw
any indices (any order, repeats allowed) and give each image the bytes its chunk gives it:

- the noise of the chunk's noisy backgrounds is one PCG64 stream per chunk, drawn image after image (one
  64-bit draw per pixel): an image's block starts ``rank * S * S`` draws in, ``rank`` being its place among
  its chunk's noisy images, and the stream is advanced there instead of drawn;
- each shape's signed distance is computed in a square window sized by the largest radius among its chunk's
  objects of the same shape in the same slot, and pixels outside the window stay empty: a batch computes a
  window big enough for all its objects and empties what lies outside each object's own.

Pixels use only IEEE-exact operations (add, multiply, sqrt, min/max; no per-pixel trigonometry), so the same
scenes give the same bytes on any machine.
"""

from __future__ import annotations

import numpy as np

from dmclip.data.world.shapes import SHAPES, erode, shape_distance

CHUNK = 256  # images per chunk of the defining renderer (fixed: the noise streams and the windows follow it)
SLOTS = 3  # objects per scene, at most
# images rendered per vectorised step: about a million pixels, so the float temporaries stay small (a batch of
# 128 at 224 px renders ~20 % faster 16 at a time than all at once; at 32 px, all at once is fastest)
BLOCK_PIXELS = 2**20
NOISE = 22.0  # a noisy background adds uniform(-NOISE, NOISE) to each pixel (the same to its three channels)


def chunk_layout(scenes: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What each image needs from the rest of its chunk: ``noise_rank`` (n,), its place among the chunk's
    noisy backgrounds (-1: not noisy), and ``window_radius`` (n, SLOTS), the largest radius among the chunk's
    objects of its shape in its slot (fractions of the image side; 0 for an empty slot)."""
    n = len(scenes["n_obj"])
    chunk = np.arange(n) // CHUNK
    noisy = scenes["background"] == 2
    before = np.cumsum(noisy) - noisy  # noisy images before each image, in the whole split
    noise_rank = np.where(noisy, before - before[chunk * CHUNK], -1)
    active = scenes["n_obj"][:, None] > np.arange(SLOTS)
    group = (chunk[:, None] * SLOTS + np.arange(SLOTS)) * len(SHAPES) + scenes["shape"]  # (chunk, slot, shape)
    largest = np.zeros((int(chunk[-1]) + 1 if n else 0) * SLOTS * len(SHAPES))
    np.maximum.at(largest, group[active], scenes["radius"][active])
    return {"noise_rank": noise_rank, "window_radius": np.where(active, largest[group], 0.0)}


def render(scenes: dict[str, np.ndarray], layout: dict[str, np.ndarray], indices, size: int,
           noise_seed: list[int]) -> np.ndarray:
    """Images ``indices`` of a split (scenes and :func:`chunk_layout`) -> (len(indices), S, S, 3) uint8."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    out = np.empty((len(indices), size, size, 3), dtype=np.uint8)
    xs = (np.arange(size, dtype=np.float32) + 0.5)[None, None, :]
    ys = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    step = max(1, min(CHUNK, BLOCK_PIXELS // (size * size)))
    for start in range(0, len(indices), step):
        part = indices[start:start + step]
        c = {key: value[part] for key, value in (*scenes.items(), *layout.items())}
        image = _background(c, size, xs, ys)
        _add_noise(image, c["noise_rank"], part // CHUNK, size, noise_seed)
        _draw_objects(image, c, size, xs, ys)
        out[start:start + step] = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return out


def _background(c, size, xs, ys) -> np.ndarray:
    """(b, S, S, 3) float32: plain, or a mix of the two background colours (gradient, stripes, checker)."""
    b = len(c["n_obj"])
    kind = c["background"]
    a = c["bg_a"].astype(np.float32)[:, None, None, :]
    other = c["bg_b"].astype(np.float32)[:, None, None, :]
    image = np.empty((b, size, size, 3), dtype=np.float32)
    image[:] = a
    for k in (1, 3, 4):  # gradient, stripes, checker: a mix of the two background colours
        idx = np.nonzero(kind == k)[0]
        if len(idx) == 0:
            continue
        period = (c["bg_period"][idx] * size).astype(np.float32)[:, None, None]
        if k == 4:
            mix = (np.floor(xs / period) + np.floor(ys / period)) % 2
        else:
            direction = c["bg_dir"][idx][:, None, None]
            # a coordinate along one of four directions, in pixels
            t = np.where(direction == 0, xs, np.where(direction == 1, ys, np.where(
                direction == 2, (xs + ys) / 2, (xs + size - ys) / 2)))
            mix = t / size if k == 1 else np.floor(t / period) % 2
        image[idx] = a[idx] + (other[idx] - a[idx]) * mix.astype(np.float32)[..., None]
    return image


def _add_noise(image: np.ndarray, noise_rank: np.ndarray, chunks: np.ndarray, size: int,
               noise_seed: list[int]) -> None:
    """Add each noisy background's block of its chunk's stream (runs of neighbouring ranks in one draw)."""
    pixels = size * size
    for chunk in np.unique(chunks[noise_rank >= 0]):
        where = np.nonzero((chunks == chunk) & (noise_rank >= 0))[0]
        ranks = np.unique(noise_rank[where])
        rng = np.random.default_rng([*noise_seed, int(chunk)])
        blocks, drawn = [], 0  # drawn: the blocks of the stream consumed so far
        for run in np.split(ranks, np.nonzero(np.diff(ranks) > 1)[0] + 1):
            rng.bit_generator.advance((int(run[0]) - drawn) * pixels)  # uniform takes one 64-bit draw per double
            blocks.append(rng.uniform(-NOISE, NOISE, size=(len(run), size, size, 1)).astype(np.float32))
            drawn = int(run[-1]) + 1
        image[where] += np.concatenate(blocks)[np.searchsorted(ranks, noise_rank[where])]


def _draw_objects(image: np.ndarray, c, size: int, xs, ys) -> None:
    """Blend each slot's objects into ``image`` (b, S, S, 3) float32, in place."""
    b = len(c["n_obj"])
    stroke = max(2, round(size / 22))
    period = max(2.0, size / 10)
    for slot in range(SLOTS):
        active = c["n_obj"] > slot
        if not active.any():
            continue
        dist = np.full((b, size, size), np.inf, dtype=np.float32)
        for t, shape in enumerate(SHAPES):
            idx = np.nonzero(active & (c["shape"][:, slot] == t))[0]
            if len(idx):
                _shape_window(dist, shape, idx, slot, c, size, xs, ys)
        alpha = np.clip(0.5 - dist, 0.0, 1.0)
        outlined = np.nonzero(c["outline"][:, slot])[0]
        if len(outlined):
            alpha[outlined] = alpha[outlined] - erode(alpha[outlined], stroke)
        colour = c["rgb"][:, slot, :].copy()
        colour = np.where((c["palette"] == 1)[:, None], colour + 0.38 * (255 - colour), colour)
        colour = np.where((c["palette"] == 2)[:, None], colour * 0.62, colour)
        colour = colour.astype(np.float32)[:, None, None, :]
        texture = c["texture"][:, slot]
        if texture.any():
            stripes = np.floor((xs + ys) / period) % 2
            checker = (np.floor(xs / period) + np.floor(ys / period)) % 2
            pattern = np.where((texture == 1)[:, None, None], stripes,
                               np.where((texture == 2)[:, None, None], checker, 0.0)).astype(np.float32)
            colour = colour * (1.0 - 0.45 * pattern[..., None])
        if active.all():
            image += (colour - image) * alpha[..., None]
        else:
            idx = np.nonzero(active)[0]
            part = image[idx]
            part += (colour[idx] - part) * alpha[idx][..., None]
            image[idx] = part


def _shape_window(dist: np.ndarray, shape: str, idx: np.ndarray, slot: int, c, size: int, xs, ys) -> None:
    """Write the signed distance of objects ``idx`` (one shape, one slot) into ``dist`` inside their windows.

    An object's window is the one its chunk gives it: ``ceil(2.4 r) + 2`` pixels for the chunk's largest radius
    ``r`` of this shape and slot (every shape lies within 1.2 radii of its centre), clipped to the image."""
    rot = c["rotation"][idx, slot]
    cx, cy, r = c["cx"][idx, slot] * size, c["cy"][idx, slot] * size, c["radius"][idx, slot] * size
    window = np.minimum(size, np.ceil(2 * 1.2 * (c["window_radius"][idx, slot] * size)).astype(np.int64) + 2)
    x0 = np.clip(np.floor(cx - window / 2).astype(np.int64), 0, size - window)
    y0 = np.clip(np.floor(cy - window / 2).astype(np.int64), 0, size - window)
    span = int(window.max())  # one window for the batch, placed to hold each object's own
    left, top = np.minimum(x0, size - span), np.minimum(y0, size - span)
    offsets = np.arange(span)
    wx = xs[:, :, :span] + left[:, None, None].astype(np.float32)  # (b, 1, W) pixel centres
    wy = ys[:, :span, :] + top[:, None, None].astype(np.float32)  # (b, W, 1)
    values = shape_distance(shape, cx, cy, r, np.cos(rot), np.sin(rot), wx, wy)
    if (window < span).any():  # empty what lies outside an object's own window, as its chunk leaves it
        columns, rows = left[:, None] + offsets, top[:, None] + offsets  # (b, W) pixel indices
        inside_x = (columns >= x0[:, None]) & (columns < (x0 + window)[:, None])
        inside_y = (rows >= y0[:, None]) & (rows < (y0 + window)[:, None])
        values = np.where(inside_y[:, :, None] & inside_x[:, None, :], values, np.float32(np.inf))
    dist[idx[:, None, None], (top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]] = values
