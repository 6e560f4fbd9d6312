"""On-demand rendering gives every world image the bytes of the chunked renderer that made the world (and the
data builtin:world-vit was trained on), alone or in any batch; readers (DataLoader workers, data show) render
only what they read, and a split is written to the cache only where that pays."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from dmclip.data import build_dataset, collate
from dmclip.data.world import SPLITS, WorldImages
from dmclip.data.world.render import CHUNK, render
from dmclip.data.world.shapes import SHAPES, erode, shape_distance
from dmclip.data.world.splits import noise_seed, split_scenes

# ------------------------------------------------------------------------ the reference: the chunked renderer
# The world's first renderer, kept verbatim: whole chunks of CHUNK images, one noise stream per chunk drawn in
# order, each shape's window sized by the largest radius of its kind in the chunk. It defines the bytes.


def _render(s: dict[str, np.ndarray], size: int, noise_seed: list[int]) -> np.ndarray:
    """Scenes -> (n, S, S, 3) uint8."""
    n = len(s["n_obj"])
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    xs = (np.arange(size, dtype=np.float32) + 0.5)[None, None, :]
    ys = (np.arange(size, dtype=np.float32) + 0.5)[None, :, None]
    for start in range(0, n, CHUNK):
        sl = slice(start, min(n, start + CHUNK))
        c = {key: value[sl] for key, value in s.items()}
        out[sl] = _render_chunk(c, size, xs, ys, np.random.default_rng([*noise_seed, start // CHUNK]))
    return out


def _background(c, size, xs, ys, rng) -> np.ndarray:
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
    noisy = np.nonzero(kind == 2)[0]
    if len(noisy):
        image[noisy] += rng.uniform(-22, 22, size=(len(noisy), size, size, 1)).astype(np.float32)
    return image


def _render_chunk(c, size, xs, ys, rng) -> np.ndarray:
    image = _background(c, size, xs, ys, rng)  # (b, S, S, 3) float32
    b = len(c["n_obj"])
    stroke = max(2, round(size / 22))
    period = max(2.0, size / 10)
    for slot in range(3):
        active = c["n_obj"] > slot
        if not active.any():
            continue
        dist = np.full((b, size, size), np.inf, dtype=np.float32)
        for t, shape in enumerate(SHAPES):
            idx = np.nonzero(active & (c["shape"][:, slot] == t))[0]
            if len(idx) == 0:
                continue
            rot = c["rotation"][idx, slot]
            cx, cy, r = c["cx"][idx, slot] * size, c["cy"][idx, slot] * size, c["radius"][idx, slot] * size
            # only a window around each object is computed (every shape lies within 1.2 radii of its centre);
            # the pixels it holds get the same values as a full-image computation would give them
            window = min(size, int(math.ceil(2 * 1.2 * r.max())) + 2)
            x0 = np.clip(np.floor(cx - window / 2).astype(np.int64), 0, size - window)
            y0 = np.clip(np.floor(cy - window / 2).astype(np.int64), 0, size - window)
            span = np.arange(window)
            wx = xs[:, :, :window] + x0[:, None, None].astype(np.float32)  # (b, 1, W) pixel centres
            wy = ys[:, :window, :] + y0[:, None, None].astype(np.float32)  # (b, W, 1)
            dist[idx[:, None, None], (y0[:, None] + span)[:, :, None], (x0[:, None] + span)[:, None, :]] = (
                shape_distance(shape, cx, cy, r, np.cos(rot), np.sin(rot), wx, wy))
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
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)



# ---------------------------------------------------------------------------------------------------- tests

SIZE = 520  # three chunks, the last one partial
INDEX_SETS = {
    "first": np.arange(8),
    "last": np.arange(SIZE - 8, SIZE),
    "chunk boundaries": np.array([255, 256, 257, 511, 512]),
    "random, repeats, any order": np.random.default_rng(0).integers(0, SIZE, size=48),
}


@pytest.mark.parametrize("image_size", [16, 32, 37, 64])
@pytest.mark.parametrize("split", list(SPLITS))
def test_any_images_rendered_on_demand_have_the_chunked_renderers_bytes(split, image_size):
    scenes, _, _ = split_scenes(split, SIZE, 2)
    seed = noise_seed(split, 2)
    expected = _render(scenes, image_size, seed)
    images = WorldImages(scenes, image_size, seed)
    for name, indices in INDEX_SETS.items():
        assert np.array_equal(images[indices], expected[indices]), name
    for i in (0, 255, 256, SIZE - 1, -1):
        assert np.array_equal(images[i], expected[i]), i
    assert np.array_equal(images[250:262], expected[250:262])
    assert images.rendered == sum(len(v) for v in INDEX_SETS.values()) + 5 + 12  # only what was read


def test_the_bytes_do_not_depend_on_how_many_images_are_rendered_per_step(monkeypatch):
    from dmclip.data.world import render as module

    scenes, _, _ = split_scenes("world-train", SIZE, 1)
    seed = noise_seed("world-train", 1)
    expected = _render(scenes, 32, seed)
    monkeypatch.setattr(module, "BLOCK_PIXELS", 7 * 32 * 32)  # 7 images per step: steps cross chunks and runs
    indices = np.concatenate([np.arange(SIZE), INDEX_SETS["random, repeats, any order"]])
    assert np.array_equal(WorldImages(scenes, 32, seed)[indices], expected[indices])


def test_a_shape_is_cut_by_its_chunks_window_in_any_batch():
    """A small star's tips reach past its own window (the half-plane distance overshoots at sharp corners):
    alone in its chunk (image 5) the chunked renderer cut them off; beside a big star of the same chunk (image
    CHUNK + 1, with CHUNK + 2) it did not. Read alone or together, each keeps its chunk's bytes."""
    scenes, _, _ = split_scenes("world-train", 300, 0)
    scenes["n_obj"][:], scenes["shape"][:, 0], scenes["outline"][:], scenes["texture"][:] = 1, 0, False, 0
    star = SHAPES.index("star")
    for i, radius in ((5, 0.1245), (CHUNK + 1, 0.1245), (CHUNK + 2, 0.25)):
        scenes["shape"][i, 0], scenes["radius"][i, 0], scenes["rotation"][i, 0] = star, radius, 0.0
        scenes["cx"][i, 0], scenes["cy"][i, 0] = 0.4631, 0.464
    scenes["background"][[5, CHUNK + 1]], scenes["bg_a"][CHUNK + 1] = 0, scenes["bg_a"][5]
    expected = _render(scenes, 16, [1, 2, 3])
    assert not np.array_equal(expected[5], expected[CHUNK + 1])  # the same star, cut in one chunk only
    images = WorldImages(scenes, 16, [1, 2, 3])
    for indices in ([5, CHUNK + 1, CHUNK + 2], [5], [CHUNK + 1], [CHUNK + 2, 5]):
        assert np.array_equal(images[indices], expected[indices]), indices


def test_a_dataloader_reads_each_batch_in_one_render_with_the_same_bytes(monkeypatch):
    from dmclip.data.world import images as module

    ds = build_dataset("world-noisy:size=300,cache=false", image_size=32)
    scenes, _, _ = split_scenes("world-noisy", 300, 0)
    expected = torch.from_numpy(_render(scenes, 32, noise_seed("world-noisy", 0))).permute(0, 3, 1, 2)
    calls = []
    monkeypatch.setattr(module, "render", lambda *args: calls.append(len(args[2])) or render(*args))
    order = torch.randperm(300, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(ds, batch_size=64, sampler=order.tolist(), collate_fn=collate)
    batches = list(loader)
    assert calls == [64, 64, 64, 64, 44]  # one vectorised render per batch, not one per image
    assert torch.equal(torch.cat([b["image"] for b in batches]), expected[order])
    assert torch.cat([b["index"] for b in batches]).tolist() == order.tolist()
    assert [c for b in batches for c in b["captions"]] == [ds.captions(i) for i in order.tolist()]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_dataloader_workers_render_on_their_side_with_the_same_bytes(workers):
    ds = build_dataset("world-shift:size=200,cache=false", image_size=16, seed=4)
    scenes, _, _ = split_scenes("world-shift", 200, 4)
    expected = torch.from_numpy(_render(scenes, 16, noise_seed("world-shift", 4))).permute(0, 3, 1, 2)
    loader = torch.utils.data.DataLoader(ds, batch_size=30, num_workers=workers, collate_fn=collate,
                                         multiprocessing_context="fork")
    batches = list(loader)
    assert torch.equal(torch.cat([b["image"] for b in batches]), expected)
    assert torch.cat([b["label"] for b in batches]).tolist() == ds.labels()


def test_a_world_split_pickles_as_its_scenes_not_its_pixels():
    ds = build_dataset("world-train:size=400,cache=false", image_size=64)
    blob = pickle.dumps(ds)
    assert len(blob) < 400 * 64 * 64 * 3 / 8  # the scenes and captions, not the 4.9 MB of pixels
    again = pickle.loads(blob)
    assert torch.equal(again.images([7, 399, 0]), ds.images([7, 399, 0])) and again.captions(7) == ds.captions(7)


@pytest.mark.slow  # builds the 20 000 captions of world-train and draws a figure
def test_data_show_renders_only_the_images_it_draws(monkeypatch, tmp_path):
    from dmclip.cli.main import main
    from dmclip.data.world import images as module

    monkeypatch.setenv("DMCLIP_CACHE", str(tmp_path / "cache"))
    rendered = []
    monkeypatch.setattr(module, "render", lambda *args: rendered.extend(args[2].tolist()) or render(*args))
    grid = tmp_path / "grid.png"
    assert main(["data", "show", "world-train", "--n", "16", "--sample-seed", "3", "-o", str(grid)]) == 0
    drawn = sorted(np.random.default_rng(3).choice(20000, size=16, replace=False).tolist())
    assert sorted(rendered) == drawn and grid.stat().st_size > 10_000  # 16 of the 20 000 images, nothing more
    assert not list((tmp_path / "cache").rglob("*.npy"))


@pytest.mark.slow  # runs a distillation (two steps)
def test_distilling_a_224_px_open_clip_teacher_renders_only_the_batches_it_trains_on(monkeypatch, tmp_path):
    """A teacher trained at 224 px makes distill read its data at 224 px (world-train: 2.9 GB if rendered
    whole; 2000 images here, 300 MB). It reads the 2 x 8 images it trains on and writes only the captions
    under $DMCLIP_CACHE."""
    import open_clip

    from dmclip.cli.main import main
    from dmclip.data.world import images as module

    arch = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16,
                                            "patch_size": 32},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "dmclip-test-224px", arch)
    torch.manual_seed(0)
    state = open_clip.create_model("dmclip-test-224px").state_dict()
    checkpoint = tmp_path / "epoch_1.pt"  # the way open_clip's trainer saves one (under DDP: "module." keys)
    torch.save({"epoch": 1, "name": "test", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, checkpoint)
    monkeypatch.setenv("DMCLIP_CACHE", str(tmp_path / "cache"))
    rendered = []
    monkeypatch.setattr(module, "render", lambda *args: rendered.append((len(args[2]), args[3])) or render(*args))
    assert main(["distill", "--teacher", f"open_clip:dmclip-test-224px:{checkpoint}", "--student", "mamba-tiny-test",
                 "--data", "world-train:size=2000", "--steps", "2", "--batch-size", "8", "--runs-dir", str(tmp_path / "runs"), "--set",
                 "student.image_size=32", "--set", "student.scan_backend=chunked", "--set", "eval.each_run=false",
                 "--set", "train.progress=false"]) == 0
    assert rendered == [(8, 224)] * 2  # one render per batch, at the teacher's size: the loop reads batches whole
    written = [p for p in (tmp_path / "cache" / "world").rglob("*") if p.is_file()]
    assert [p.name for p in written] == ["captions.json"] and sum(p.stat().st_size for p in written) < 1e6
