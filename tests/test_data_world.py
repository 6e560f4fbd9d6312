"""The embedded world: what a user of world-* splits would notice if it broke."""

from __future__ import annotations

import hashlib
import json
import pickle
import re

import numpy as np
import pytest
import torch

from dmclip.data import build_dataset, image_batch, world
from dmclip.data.world import build as build_module
from dmclip.data.world import images as images_module
from dmclip.data.world.captions import COLOUR_WORDS
from dmclip.errors import DmclipError
from dmclip.registry import datasets

# sha256 of images + captions/labels, computed once; the same on any machine (no per-pixel transcendental
# functions, PCG64 streams). A change here means cached splits and published numbers change: bump
# world.GENERATOR_VERSION on purpose, then update these.
GOLDEN = {
    ("world-train", 40, 32, 0): "15ef47200f297f04ee509be717613f449badd353b4d7e334aa59da195c5ea0c9",
    ("world-shift", 40, 48, 3): "3829ada79d320e860d70ad1b1e2bd046590ed12f631de3b4d167899376ffdb9e",
    ("world-noisy", 40, 32, 0): "46104e376fa9398eb122050ee86f6a11de3893f264cf0160894b35d09afecaea",
}


def _digest(images: np.ndarray, meta: dict) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(json.dumps(meta.get("captions", meta.get("labels"))).encode())
    return h.hexdigest()


@pytest.mark.parametrize("key", list(GOLDEN))
def test_same_seed_gives_the_same_bytes_as_recorded(key):
    split, size, image_size, seed = key
    extra = {"captions": world.SPLITS[split].captions} if world.SPLITS[split].kind == "image-text" else {}
    if split == "world-noisy":
        extra["noise"] = 0.3
    images, meta = world.generate(split, size=size, image_size=image_size, seed=seed, **extra)
    assert _digest(images, meta) == GOLDEN[key]


def test_cached_and_fresh_generation_agree_and_seeds_differ():
    cached = build_dataset("world-train:size=30", image_size=32, seed=5)
    fresh = build_dataset("world-train:size=30,cache=false", image_size=32, seed=5)
    other = build_dataset("world-train:size=30,cache=false", image_size=32, seed=6)
    assert torch.equal(cached.images(), fresh.images())
    assert [cached.captions(i) for i in range(30)] == [fresh.captions(i) for i in range(30)]
    assert not torch.equal(cached.images(), other.images())


@pytest.mark.parametrize("name", datasets.names("world-*"))
def test_every_world_split_builds_with_the_documented_contract(name):
    entry = datasets.entry(name)
    ds = datasets.get(name, **entry.tiny)
    assert len(ds) == entry.tiny["size"] and ds.name == name
    sample = ds[3]
    assert sample["image"].dtype == torch.uint8 and sample["image"].shape == (3, 32, 32)
    assert sample["index"] == 3
    assert ds.kind == entry.factory.kind
    if ds.kind == "image-text":
        assert sample["captions"] == ds.captions(3) and len(sample["captions"]) >= 1
        assert all(isinstance(c, str) and c.strip() for c in sample["captions"])
    else:
        assert len(ds.classnames) == 100 and ds.classnames[0] == "red circle"
        assert all(t.count("{}") == 1 for t in ds.templates)
        assert ds.labels()[3] == sample["label"]
    batch = image_batch([ds[0], ds[1]])
    assert batch.shape == (2, 3, 32, 32) and 0.0 <= batch.min() and batch.max() <= 1.0


def test_default_image_size_is_64_and_image_size_is_respected():
    assert build_dataset("world-zeroshot:size=4")[0]["image"].shape == (3, 64, 64)
    assert build_dataset("world-zeroshot:size=4", image_size=48)[0]["image"].shape == (3, 48, 48)
    assert build_dataset("world-zeroshot:size=4:image_size=40")[0]["image"].shape == (3, 40, 40)


def test_pixels_match_the_scene_that_the_captions_describe():
    """The centre pixel of every object has the colour its caption names (rings: the band instead)."""
    ds = build_dataset("world-train:size=120", image_size=64, seed=1)
    colour_words = {c: {c, *COLOUR_WORDS.get(c, [])} for c in world.COLOURS}
    checked = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        image = ds[i]["image"].permute(1, 2, 0).numpy().astype(int)
        text = " ".join(ds.captions(i))
        for obj in scene["objects"]:
            assert any(re.search(rf"\b{w}\b", text) for w in colour_words[obj["colour"]]), (text, obj)
            offset = 0.8 * obj["radius"] if obj["shape"] == "ring" else 0.0
            y, x = int(obj["cy"] * 64), int((obj["cx"] + offset) * 64)
            rgb = np.asarray(world.COLOURS[obj["colour"]])
            assert np.abs(image[y, x] - rgb).max() <= 14, (i, obj, image[y, x])
            checked += 1
        named = {w for c in world.COLOURS for w in colour_words[c] if re.search(rf"\b{w}\b", text)}
        allowed = set().union(*(colour_words[o["colour"]] for o in scene["objects"]))
        assert named <= allowed, (text, scene)  # no colour is mentioned that is not in the image
    assert checked > 150


def test_captions_are_varied_five_per_image_from_many_templates():
    ds = build_dataset("world-train:size=300", image_size=32)
    assert all(len(ds.captions(i)) == 5 and len(set(ds.captions(i))) >= 4 for i in range(len(ds)))
    skeletons = set()
    for i in range(len(ds)):
        for c in ds.captions(i):
            skeletons.add(re.sub(r"\b(" + "|".join(world.COLOUR_NAMES) + r"|violet|turquoise)\b", "C", c)[:12])
    assert len(skeletons) >= 20
    counts = [c for i in range(len(ds)) for c in ds.captions(i) if c.startswith(("two ", "three ", "a pair"))]
    relations = [c for i in range(len(ds)) for c in ds.captions(i) if re.search(r"\b(above|below|under)\b", c)]
    assert counts and relations


def test_zeroshot_classes_are_balanced_and_shapes_separable_at_32px():
    """A nearest-class-mean classifier on colour masks tells the 10 shapes apart at 32 px (objects are big)."""
    images, meta = world.generate("world-zeroshot", size=1500, image_size=32, seed=0)
    labels = np.asarray(meta["labels"])
    assert np.bincount(labels, minlength=100).tolist() == [15] * 100
    colours = np.asarray(list(world.COLOURS.values()))[labels // 10]
    masks = (np.abs(images.astype(np.int16) - colours[:, None, None, :]).max(-1) < 40).reshape(len(images), -1)
    shape = labels % 10
    means = np.stack([masks[:1000][shape[:1000] == k].mean(0) for k in range(10)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    accuracy = ((masks[1000:] @ means.T).argmax(1) == shape[1000:]).mean()
    assert accuracy >= 0.85


def test_shift_uses_other_styles_on_the_same_classes():
    zs = build_dataset("world-zeroshot:size=200", image_size=32)
    shift = build_dataset("world-shift:size=200", image_size=32)
    assert shift.classnames == zs.classnames and shift.templates == zs.templates
    scenes = [shift.scene(i) for i in range(200)]
    assert all(s["objects"][0]["outline"] or s["objects"][0]["texture"] or s["objects"][0]["rotation"]
               or s["palette"] != "normal" or s["background"] in ("checker", "bright") for s in scenes)
    assert {s["background"] for s in scenes} >= {"checker", "bright"}


def test_retrieval_sets_use_different_caption_styles():
    a = build_dataset("world-retrieval-a:size=50", image_size=32)
    b = build_dataset("world-retrieval-b:size=50", image_size=32)
    assert len(build_dataset("world-retrieval-a", image_size=16)) == 1000
    assert all(len(a.captions(i)) == 5 and len(b.captions(i)) == 5 for i in range(50))
    assert all(c[0].isupper() and c.endswith(".") for i in range(50) for c in b.captions(i))
    assert not any(c.endswith(".") for i in range(50) for c in a.captions(i))
    assert not torch.equal(a.images(), b.images())


def test_noisy_split_has_the_requested_fraction_wrong_with_ground_truth():
    ds = build_dataset("world-noisy:size=200,noise=0.3,captions=2", image_size=32)
    flags = [f for i in range(200) for f in ds[i]["caption_is_noisy"]]
    assert sum(flags) == round(0.3 * 400)
    kinds = {k for i in range(200) for k in ds.extras(i)["noise_kind"]}
    assert kinds == {"clean", "swap", "attribute", "generic"}
    for i in range(200):
        sample = ds[i]
        for caption, clean, noisy, kind in zip(sample["captions"], sample["clean_captions"],
                                               sample["caption_is_noisy"], sample["noise_kind"]):
            assert (caption != clean) == noisy == (kind != "clean")
            if kind == "attribute":  # only the colour changed
                assert len(caption.split()) == len(clean.split())
                assert sum(x != y for x, y in zip(caption.split(), clean.split())) >= 1
    zero = build_dataset("world-noisy:size=50,noise=0", image_size=32)
    assert not any(f for i in range(50) for f in zero.extras(i)["caption_is_noisy"])


def _files(cache) -> list[str]:
    return sorted(str(p.relative_to(cache / "world")) for p in (cache / "world").rglob("*") if p.is_file())


def test_a_small_split_is_cached_once_enough_of_it_is_read_then_read_from_disk(monkeypatch, tmp_path):
    monkeypatch.setenv("DMCLIP_CACHE", str(tmp_path))
    first = build_dataset("world-train:size=600", image_size=32)
    expected = first.images()  # 600 rendered on demand: more than 2 * CHUNK, so the next read writes the split
    folder = _files(tmp_path)[0].split("/")[0]
    assert folder.startswith("world-train-600-") and _files(tmp_path) == [f"{folder}/captions.json"]
    assert torch.equal(first.images([3, 599]), expected[[3, 599]])
    assert _files(tmp_path) == [f"{folder}/captions.json", f"{folder}/images-32px.npy"]

    monkeypatch.setattr(images_module, "render", lambda *a: pytest.fail("rendered a cached split"))
    monkeypatch.setattr(build_module, "split_text", lambda *a: pytest.fail("wrote cached captions again"))
    again = build_dataset("world-train:size=600", image_size=32)
    assert torch.equal(again.images(), expected) and again.captions(9) == first.captions(9)
    assert torch.equal(again[599]["image"], expected[599]) and torch.equal(again[-1]["image"], expected[599])
    worker = pickle.loads(pickle.dumps(again))  # a DataLoader worker under spawn opens the file itself
    assert torch.equal(worker.images([5, 0]), expected[[5, 0]])
    assert len(pickle.dumps(again)) < expected.numel() / 4


def test_an_interrupted_cache_write_leaves_nothing_and_a_damaged_one_is_made_again(monkeypatch, tmp_path):
    monkeypatch.setenv("DMCLIP_CACHE", str(tmp_path))
    render = images_module.render
    ds = build_dataset("world-zeroshot:size=600", image_size=32)
    expected = ds.images()
    blocks = []

    def killed(*args):
        blocks.append(args)
        if len(blocks) == 2:
            raise KeyboardInterrupt  # as if the process died while writing the second block
        return render(*args)

    monkeypatch.setattr(images_module, "render", killed)
    with pytest.raises(KeyboardInterrupt):
        ds.images([0])
    assert not (tmp_path / "world").exists() or _files(tmp_path) == []  # no half file, no temporary, no lock
    monkeypatch.setattr(images_module, "render", render)
    assert torch.equal(ds.images([0, 1]), expected[[0, 1]])
    (cached,) = (tmp_path / "world").rglob("images-32px.npy")
    cached.write_bytes(cached.read_bytes()[:5000])  # damaged by hand
    again = build_dataset("world-zeroshot:size=600", image_size=32)
    assert torch.equal(again.images(), expected) and not cached.exists()  # removed, rendered on demand
    again.images([1])
    assert cached.stat().st_size > expected.numel()  # and written again


def test_a_split_too_big_to_keep_is_never_written_to_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DMCLIP_CACHE", str(tmp_path))
    monkeypatch.setattr(images_module, "IMAGE_CACHE_BYTES", 600 * 32 * 32 * 3 - 1)
    ds = build_dataset("world-train:size=600", image_size=32)
    assert torch.equal(ds.images(), ds.images())
    assert [name.split("/")[1] for name in _files(tmp_path)] == ["captions.json"]


def test_a_cache_that_cannot_be_written_warns_once_and_the_split_still_reads(monkeypatch, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DMCLIP_CACHE", str(blocker / "cache"))
    fresh_images = build_dataset("world-train:size=600,cache=false", image_size=32).images()
    ds = build_dataset("world-train:size=600", image_size=32)
    for start in range(0, 1800, 300):  # three times the split: past the point where it would be written
        assert torch.equal(ds.images(range(start % 600, start % 600 + 300)), fresh_images[start % 600:][:300])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2 and "captions" in warnings[0] and "rendering on demand" in warnings[1], warnings
    assert ds.captions(5) == build_dataset("world-train:size=600,cache=false", image_size=32).captions(5)


@pytest.mark.parametrize("spec, message", [
    ("world-train:sise=10", "did you mean 'size'"),
    ("world-train:size=0", "out of range"),
    ("world-noisy:noise=1.5", "out of range"),
    ("world-trian", "did you mean 'world-train'"),
    ("world-train:extra", "key=value"),
])
def test_bad_world_specs_are_one_line_errors_with_the_fix(spec, message):
    with pytest.raises(DmclipError) as info:
        build_dataset(spec, image_size=32)
    assert message in str(info.value)
