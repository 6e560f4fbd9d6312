"""Real formats: export -> load round trips, bad input, spec errors, and the `dmclip data` command."""

from __future__ import annotations

import csv
import gzip
import json
import logging
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.images import png_header_only
from PIL import Image

from dmclip.cli.main import main
from dmclip.data import build_dataset, collate, export, fashion_mnist, parse_spec
from dmclip.data.base import (
    ArrayClassificationDataset,
    ArrayImageTextDataset,
    BadSample,
    ClassificationDataset,
    SkipCounter,
    check_templates,
    clean_caption,
    decode_image,
    float_images,
    to_square,
)
from dmclip.errors import DmclipError

SIZE = 32


@pytest.fixture(scope="module")
def world():
    return build_dataset("world-retrieval-a:size=12", image_size=SIZE)


def _same_samples(loaded, original, *, tolerance: float = 0.0):
    """Same captions; pixels equal, or (JPEG) a mean absolute error per image within ``tolerance``."""
    assert len(loaded) == len(original)
    errors = []
    for i in range(len(original)):
        assert loaded.captions(i) == original.captions(i)
        a, b = loaded[i]["image"].int(), original[i]["image"].int()
        if tolerance == 0:
            assert torch.equal(a, b), f"sample {i} pixels differ"
        errors.append((a - b).abs().float().mean().item())
    assert max(errors) <= tolerance, f"pixels differ beyond tolerance: {errors}"
    return errors


# ------------------------------------------------------------------------------------- round trips


def test_csv_round_trip_keeps_pixels_and_all_captions(world, tmp_path):
    result = export(world, "csv", tmp_path / "out")
    assert result["samples"] == 12
    rows = list(csv.DictReader(open(tmp_path / "out" / "data.csv", encoding="utf-8")))
    assert len(rows) == 60 and set(rows[0]) == {"filepath", "caption"}  # open_clip's layout: a row per pair
    _same_samples(build_dataset(f"csv:{tmp_path / 'out' / 'data.csv'}", image_size=SIZE), world)


def test_tsv_with_open_clip_title_column(world, tmp_path):
    export(world, "csv", tmp_path / "out")
    rows = list(csv.DictReader(open(tmp_path / "out" / "data.csv", encoding="utf-8")))
    with open(tmp_path / "out" / "train.tsv", "w", encoding="utf-8") as fh:
        fh.write("filepath\ttitle\n")
        for row in rows:
            fh.write(f"{row['filepath']}\t{row['caption']}\n")
    _same_samples(build_dataset(f"tsv:{tmp_path / 'out' / 'train.tsv'}", image_size=SIZE), world)


def test_webdataset_round_trip_over_shards_by_brace_pattern_and_directory(world, tmp_path):
    export(world, "webdataset", tmp_path / "wds", shard_size=5)
    shards = sorted(p.name for p in (tmp_path / "wds").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    _same_samples(build_dataset(f"wds:{tmp_path}/wds/shard-{{000000..000002}}.tar", image_size=SIZE), world)
    _same_samples(build_dataset(f"wds:{tmp_path}/wds", image_size=SIZE), world)


def test_webdataset_written_by_the_webdataset_package_reads_back(world, tmp_path):
    """Our shards are what webdataset's own reader expects (img2dataset layout)."""
    import webdataset as wds

    export(world, "webdataset", tmp_path / "wds", shard_size=100)
    samples = list(wds.WebDataset(str(tmp_path / "wds" / "shard-000000.tar"), shardshuffle=False, empty_check=False))
    assert len(samples) == 12
    assert samples[0]["txt"].decode() == world.captions(0)[0]
    assert json.loads(samples[0]["json"])["captions"] == world.captions(0)


def test_jpeg_export_is_close_within_tolerance(world, tmp_path):
    export(world, "webdataset", tmp_path / "wds", image_format="jpg")
    loaded = build_dataset(f"wds:{tmp_path}/wds", image_size=SIZE)
    errors = _same_samples(loaded, world, tolerance=8.0)  # grainy backgrounds are JPEG's worst case
    assert np.mean(errors) <= 4.0 and max(errors) > 0


def test_coco_round_trip_and_karpathy_list(world, tmp_path):
    export(world, "coco", tmp_path / "coco")
    _same_samples(build_dataset(f"coco:{tmp_path}/coco/captions.json", image_size=SIZE), world)
    # BLIP's coco_karpathy_train.json: one entry per caption, images relative to a root given after the JSON
    coco = json.loads((tmp_path / "coco" / "captions.json").read_text())
    files = {img["id"]: img["file_name"] for img in coco["images"]}
    karpathy = [{"image": files[a["image_id"]], "caption": a["caption"], "image_id": str(a["image_id"])}
                for a in coco["annotations"]]
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "coco_karpathy_train.json").write_text(json.dumps(karpathy))
    _same_samples(build_dataset(f"coco:{tmp_path}/ann/coco_karpathy_train.json:{tmp_path}/coco",
                                image_size=SIZE), world)


def test_imagefolder_round_trip_with_classnames_and_templates(tmp_path):
    zs = build_dataset("world-zeroshot:size=30", image_size=SIZE)
    export(zs, "imagefolder", tmp_path / "folder")
    loaded = build_dataset(f"imagefolder:{tmp_path}/folder", image_size=SIZE)
    assert loaded.kind == "classification" and loaded.classnames == zs.classnames and loaded.templates == zs.templates
    by_index = {int(Path(src[1]).stem): i for i, src in enumerate(loaded.sources)}
    assert sorted(by_index) == list(range(30))
    for original, i in by_index.items():
        assert loaded.labels()[i] == zs.labels()[original]
        assert torch.equal(loaded[i]["image"], zs[original]["image"])
    # custom class names / templates given as options (CLIP_benchmark's feature)
    names = tmp_path / "names.json"
    folders = sorted(p.name for p in (tmp_path / "folder").iterdir() if p.is_dir())
    names.write_text(json.dumps({f: f"thing {k}" for k, f in enumerate(folders)}))
    templates = tmp_path / "t.txt"
    templates.write_text("a sketch of a {c}.\n\nitap of a {}.\n")
    custom = build_dataset(f"imagefolder:{tmp_path}/folder:classnames={names}:templates={templates}")
    assert custom.classnames[:2] == ["thing 0", "thing 1"]
    assert custom.templates == ["a sketch of a {}.", "itap of a {}."]
    assert custom[0]["image"].shape == (3, 64, 64)  # default size


@pytest.mark.slow  # importing `datasets` and building its cache take seconds
def test_huggingface_local_imagefolder_with_captions(world, tmp_path):
    root = tmp_path / "hf"
    root.mkdir()
    with open(root / "metadata.jsonl", "w") as fh:
        for i in range(len(world)):
            Image.fromarray(world[i]["image"].permute(1, 2, 0).numpy()).save(root / f"{i:03d}.png")
            fh.write(json.dumps({"file_name": f"{i:03d}.png", "text": world.captions(i)}) + "\n")
    _same_samples(build_dataset(f"hf:{root}", image_size=SIZE), world)


@pytest.mark.slow
def test_huggingface_json_file_with_relative_image_paths(world, tmp_path):
    export(world, "coco", tmp_path / "c")
    with open(tmp_path / "c" / "pairs.jsonl", "w") as fh:
        for i in range(len(world)):
            fh.write(json.dumps({"image": f"images/{i:08d}.png", "caption": world.captions(i)}) + "\n")
    _same_samples(build_dataset(f"hf:{tmp_path}/c/pairs.jsonl", image_size=SIZE), world)


@pytest.mark.slow
def test_huggingface_column_label_and_template_options(world, tmp_path):
    """hf:<file>:image_column=..:text_column=.. picks the named columns over the auto-detected ones;
    label_column=.. makes a classification set (each distinct value a class, sorted), templates=.. its prompts.
    Before the fix, an explicit label_column lost to an auto-detected caption column, and plain int labels
    crashed ('int' object has no attribute 'replace')."""
    export(world, "coco", tmp_path / "c")
    kinds = ["red_circle", "blue_square", "green_star"]
    with open(tmp_path / "c" / "rows.jsonl", "w") as fh:
        for i in range(len(world)):
            fh.write(json.dumps({"picture": f"images/{i:08d}.png", "image": "not/this.png",
                                 "caption": "the wrong column", "description": world.captions(i),
                                 "kind": kinds[i % 3], "number": 10 + i % 2}) + "\n")
    rows = f"hf:{tmp_path}/c/rows.jsonl"
    _same_samples(build_dataset(f"{rows}:image_column=picture:text_column=description", image_size=SIZE), world)

    templates = tmp_path / "t.txt"
    templates.write_text("a drawing of a {}.\n")
    by_kind = build_dataset(f"{rows}:image_column=picture:label_column=kind:templates={templates}", image_size=SIZE)
    assert by_kind.classnames == ["blue square", "green star", "red circle"]  # underscores read as spaces
    assert by_kind.templates == ["a drawing of a {}."]
    assert [by_kind.label(i) for i in range(len(world))] == [
        sorted(kinds).index(kinds[i % 3]) for i in range(len(world))]
    assert torch.equal(by_kind[4]["image"], world[4]["image"])
    by_number = build_dataset(f"{rows}:image_column=picture:label_column=number", image_size=SIZE)
    assert by_number.classnames == ["10", "11"]
    assert [by_number.label(i) for i in range(len(world))] == [i % 2 for i in range(len(world))]
    with pytest.raises(DmclipError, match="no column 'nope'"):
        build_dataset(f"{rows}:image_column=picture:label_column=nope", image_size=SIZE)


# ---------------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not fashion_mnist.fashion_mnist_available(),
                    reason="Fashion-MNIST files absent: apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_the_debian_package():
    ds = build_dataset("fashion-mnist:size=200", image_size=SIZE)
    assert ds.kind == "classification" and len(ds) == 200 and len(ds.classnames) == 10
    assert set(ds.labels()) == set(range(10))
    image = ds[0]["image"]
    assert image.shape == (3, SIZE, SIZE)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey photos
    assert image.float().std() > 20  # a real picture, not a blank
    train = build_dataset("fashion-mnist:split=train:size=5", image_size=SIZE)
    assert train.labels() == fashion_mnist.read_idx(Path(fashion_mnist.FASHION_MNIST_DIR) / "train-labels-idx1-ubyte.gz")[:5].tolist()


def test_idx_reader_plain_and_gzip_and_bad_header(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    blob = struct.pack(">4B3I", 0, 0, 8, 3, 2, 28, 28) + images.tobytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(blob)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">4B1I", 0, 0, 8, 1, 2) + bytes([3, 7]))
    ds = build_dataset(f"fashion-mnist:{tmp_path}", image_size=28)
    assert ds.labels() == [3, 7] and ds.classnames[7] == "sneaker"
    assert torch.equal(ds[1]["image"][0], torch.from_numpy(images[1]))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x09\x03" + blob[4:])
    with pytest.raises(DmclipError, match="not a uint8 IDX"):
        build_dataset(f"fashion-mnist:{tmp_path}")
    with pytest.raises(DmclipError, match="apt-get install dataset-fashion-mnist"):
        build_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


# ------------------------------------------------------------------------------------- bad input


def _bad_csv(tmp_path, world, good: int) -> Path:
    """A CSV with ``good`` good rows and one row of each kind of bad input."""
    export(world, "csv", tmp_path / "src")
    images = tmp_path / "src" / "images"
    png = (images / "00000000.png").read_bytes()
    (images / "zero.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    Image.new("RGB", (400, 20)).save(images / "sliver.png")
    rows = [(f"images/{i % 12:08d}.png", f"caption {i}".encode()) for i in range(good)]
    rows += [(b"images/missing.png", b"a missing file"), ("images/zero.png", b"a zero-byte file"),
             ("images/00000001.png", b"   "), ("images/00000002.png", b"caf\xe9 latin-1 caption"),
             ("images/truncated.png", b"truncated"), ("images/garbage.png", b"unreadable"),
             ("images/sliver.png", b"wrong shape")]
    lines = [b"filepath,caption"] + [(p if isinstance(p, bytes) else p.encode()) + b"," + c for p, c in rows]
    path = tmp_path / "src" / "bad.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_are_dropped_at_load_and_bad_images_replaced_when_read(world, tmp_path, caplog):
    path = _bad_csv(tmp_path, world, good=20)
    with caplog.at_level(logging.WARNING, logger="dmclip.data"):
        ds = build_dataset(f"csv:{path}:max_skip_fraction=0.5", image_size=SIZE)
    assert ds.skipped == {"missing-file": 1, "empty-file": 1, "empty-caption": 1, "non-utf8-caption": 1}
    # rows sharing a file are one image: 12 distinct good files + truncated, garbage, sliver
    assert len(ds) == 15
    seen = [ds[i] for i in range(len(ds))]  # reading every sample replaces the three bad images
    assert ds.skipped == {"missing-file": 1, "empty-file": 1, "empty-caption": 1, "non-utf8-caption": 1,
                          "truncated-image": 1, "unreadable-image": 1, "wrong-shape": 1}
    bad = {i for i, src in enumerate(ds.sources) if Path(src[1]).stem in ("truncated", "garbage", "sliver")}
    for i, sample in enumerate(seen):
        assert sample["image"].shape == (3, SIZE, SIZE)
        assert (sample["index"] != i) == (i in bad)  # a replacement names the sample it really is
        assert sample["captions"] == ds.captions(sample["index"])
    _ = [ds[i] for i in bad]  # reading the same bad sample again does not count it twice
    assert sum(ds.skipped.values()) == 7
    lines = [r.getMessage() for r in caplog.records if "skipping samples" in r.getMessage()]
    for reason in ds.skipped:  # one log line per reason, whether it was found at load or when read
        assert sum(f"with {reason.replace('-', ' ')} " in line for line in lines) == 1, (reason, lines)
    assert len(lines) == 7


def test_skips_past_max_skip_fraction_fail_with_the_counts(world, tmp_path):
    path = _bad_csv(tmp_path, world, good=100)
    with pytest.raises(DmclipError) as info:
        build_dataset(f"csv:{path}", image_size=SIZE)  # 4 of 107 rows bad > 1 %
    message = str(info.value)
    assert "4 of 107 samples are bad" in message and "1 missing-file" in message and "max_skip_fraction" in message
    ds = build_dataset(f"csv:{path}:max_skip_fraction=0.05", image_size=SIZE)  # 4 dropped: allowed
    with pytest.raises(DmclipError, match="truncated-image|unreadable-image|wrong-shape"):
        ds.validate()  # + 3 undecodable images = 7 of 107 > 5 %


def test_truncated_webdataset_shard_keeps_the_readable_samples(world, tmp_path):
    export(world, "webdataset", tmp_path / "wds", shard_size=100)
    shard = tmp_path / "wds" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    ds = build_dataset(f"wds:{shard}:max_skip_fraction=1", image_size=SIZE)
    assert 3 <= len(ds) < 12
    assert "truncated-shard" in ds.skipped or "truncated-image" in ds.validate()
    for i in range(len(ds)):
        assert ds[i]["captions"] == world.captions(ds[i]["index"])


# ------------------------------------------------------------------------------------------- specs


def test_parse_spec():
    assert parse_spec("world-train") == ("world-train", [], {})
    assert parse_spec("world-noisy:noise=0.3,size=500") == ("world-noisy", [], {"noise": 0.3, "size": 500})
    assert parse_spec("coco:a/b.json:imgs:max_skip_fraction=0.1") == ("coco", ["a/b.json", "imgs"],
                                                                        {"max_skip_fraction": 0.1})
    assert parse_spec("world-train:cache=false")[2] == {"cache": False}


@pytest.mark.parametrize("spec, message, hint", [
    ("csv:/nonexistent/train.csv", "does not exist", "check the path"),
    ("csv", "no file given", "csv:data/train.csv"),
    ("parquet:x.parquet", "unknown dataset 'parquet'", "formats:"),
    ("cocoo:x.json", "unknown dataset", "did you mean 'coco:'"),
    ("wds:/nonexistent/shard-{000..003}.tar", "does not exist", "brace pattern"),
    ("imagefolder:/nonexistent", "does not exist", "imagefolder:"),
    ("hf:/nonexistent/dir", "does not exist", "local"),
])
def test_bad_specs_are_one_line_errors_with_the_fix(spec, message, hint):
    with pytest.raises(DmclipError) as info:
        build_dataset(spec)
    assert message in info.value.message and hint in (info.value.hint or "")


def test_path_without_format_and_unknown_option(world, tmp_path):
    export(world, "csv", tmp_path / "out")
    with pytest.raises(DmclipError) as info:
        build_dataset(str(tmp_path / "out" / "data.csv"))
    assert info.value.hint.startswith("prefix it with the format, e.g. csv:")
    with pytest.raises(DmclipError, match="did you mean 'caption_key'"):
        build_dataset(f"csv:{tmp_path}/out/data.csv:captionkey=x")


def test_collate_stacks_images_and_keeps_caption_lists(world):
    batch = collate([world[0], world[1], world[2]])
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["index"].tolist() == [0, 1, 2] and batch["captions"][1] == world.captions(1)
    loader = torch.utils.data.DataLoader(world, batch_size=4, collate_fn=collate)
    assert sum(len(b["captions"]) for b in loader) == 12


# --------------------------------------------------------------------------------------------- CLI


def test_cli_export_and_show(tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["data", "export", "world-retrieval-b:size=6", "--format", "csv", "--image-size", "32", str(out)]) == 0
    assert "wrote 6 samples of world-retrieval-b as csv" in capsys.readouterr().out
    assert len(list((out / "images").iterdir())) == 6
    assert main(["data", "export", "world-retrieval-b:size=6", "--format", "csv", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err
    grid = tmp_path / "grid.png"
    assert main(["data", "show", f"csv:{out}/data.csv", "--n", "6", "--columns", "3", "-o", str(grid)]) == 0
    with Image.open(grid) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert main(["data", "show", "world-zeroshot:size=4", "--n", "4", "-o", str(tmp_path / "z.png")]) == 0
    assert main(["data", "show", "world-trian", "-o", str(tmp_path / "x.png")]) == 2
    assert "did you mean 'world-train'" in capsys.readouterr().err


def test_export_refuses_captions_as_imagefolder(world, tmp_path):
    with pytest.raises(DmclipError, match="cannot be an ImageFolder"):
        export(world, "imagefolder", tmp_path / "x")
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


# ------------------------------------------------------------------------------ the dataset base classes


def _gray(values, mode: str) -> Image.Image:
    """An 8 x 8 image of mode ``mode`` whose rows repeat ``values`` (8 of them)."""
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.tile(np.asarray(values, dtype=dtype), (8, 1)))
    assert image.mode == mode
    return image


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", [0, 257, 65407, 32896, 65535, 65280, 128, 129], [0, 1, 255, 128, 255, 254, 0, 1]),  # 65407: 254.502
    ("I", [0, 257, 65535, 70000, -5, 32896, 1000, 2000], [0, 1, 255, 255, 0, 128, 4, 8]),
    ("F", [0.0, 1.0, 0.25, 2.0, -0.5, 0.2, 0.5019608, 0.75], [0, 255, 64, 255, 0, 51, 128, 191]),
])
def test_16_bit_32_bit_and_float_images_keep_their_brightness(mode, values, expected):
    """A 16-bit or 32-bit integer image reads 0..65535 as 0..255 and a float image 0..1, each grey level rounded
    and clipped, the same in R, G and B (PIL's own convert would clip them to white or black)."""
    rgb = to_square(_gray(values, mode), 8)
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    assert (rgb == np.asarray(expected, dtype=np.uint8)[None, :, None]).all(), rgb[0, :, 0]


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "1"])
def test_8_bit_modes_convert_as_pil_does(mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).convert(mode)
    assert np.array_equal(to_square(image, 8), np.asarray(image.convert("RGB")))


def test_arrays_of_every_channel_layout_become_rgb():
    """(H, W) and (H, W, 1) arrays are grey, (H, W, 3) is RGB as given and (H, W, 4) RGB without its alpha."""
    rgba = np.random.default_rng(0).integers(0, 256, (8, 8, 4), dtype=np.uint8)
    grey = rgba[:, :, 1]
    assert np.array_equal(to_square(rgba[:, :, :3], 8), rgba[:, :, :3])
    assert np.array_equal(to_square(rgba, 8), rgba[:, :, :3])
    for array in (grey, grey[:, :, None]):
        assert np.array_equal(to_square(array, 8), np.repeat(grey[:, :, None], 3, axis=2))


@pytest.mark.parametrize("array, detail", [
    (np.zeros((8, 8, 2), dtype=np.uint8), "array of shape (8, 8, 2)"),
    (np.zeros((8, 8, 5), dtype=np.uint8), "array of shape (8, 8, 5)"),
    (np.zeros((2, 8, 8, 3), dtype=np.uint8), "array of shape (2, 8, 8, 3)"),
    (np.zeros(64, dtype=np.uint8), "array of shape (64,)"),
    (np.zeros((8, 8, 3), dtype=np.float32), "array of dtype float32, expected uint8"),
    (np.zeros((7, 70, 3), dtype=np.uint8), "70x7 pixels"),
    (np.zeros((8, 81, 3), dtype=np.uint8), "81x8 pixels"),
])
def test_arrays_of_another_shape_or_type_are_wrong_shape_samples(array, detail):
    with pytest.raises(BadSample) as info:
        to_square(array, 8)
    assert (info.value.reason, info.value.detail) == ("wrong-shape", detail)


@pytest.mark.parametrize("width, height, size, resized, box", [
    (37, 20, 8, (15, 8), (3, 0, 11, 8)),  # short side 20 -> 8: 37 * 0.4 = 14.8 rounds to 15, centre 8 of 15
    (20, 37, 8, (8, 15), (0, 3, 8, 11)),
    (8, 12, 16, (16, 24), (0, 4, 16, 20)),  # upscaled, centre 16 rows of 24
    (100, 100, None, (64, 64), (0, 0, 64, 64)),  # no size: the default 64
])
def test_images_are_resized_on_the_short_side_and_centre_cropped(width, height, size, resized, box):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    expected = np.asarray(image.resize(resized, Image.Resampling.BICUBIC).crop(box))
    assert np.array_equal(to_square(image, size), expected)


def test_the_side_and_aspect_bounds_are_inclusive():
    assert to_square(np.zeros((8, 80, 3), dtype=np.uint8), 8).shape == (8, 8, 3)  # 8 pixels, aspect 10


def test_float_images_scale_uint8_to_0_1_and_pass_floats_as_float32():
    scaled = float_images(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert scaled.dtype == torch.float32 and torch.allclose(scaled, torch.tensor([0.0, 0.2, 1.0]), atol=1e-7)
    passed = float_images(torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert passed.dtype == torch.float32 and passed.tolist() == [0.5, 2.0]


def test_array_datasets_keep_extras_and_name_their_errors():
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    ds = ArrayImageTextDataset("toy", images, [["a"], ["b"], ["c"]], {"caption_is_noisy": [[0], [1], [0]]})
    assert ds[1]["caption_is_noisy"] == [1] and ds[1]["captions"] == ["b"]
    with pytest.raises(ValueError, match="3 images but 2 caption lists"):
        ArrayImageTextDataset("toy", images, [["a"], ["b"]])
    with pytest.raises(DmclipError, match="^toy: template 'a {} {}' must contain"):
        ArrayClassificationDataset("toy", images, [0, 1, 0], ["x", "y"], ["a {} {}"])
    # the option reaches the skip counter of the world's sets, which are array datasets
    for name in ("world-zeroshot", "world-retrieval-a"):
        with pytest.raises(DmclipError, match="max_skip_fraction = 2.0 is out of range"):
            build_dataset(f"{name}:size=4,max_skip_fraction=2")


def _csv_with_bad_images(world, tmp_path) -> Path:
    """Seven rows: good, unreadable, good, unreadable, truncated, good, good."""
    export(world, "csv", tmp_path / "src")
    images = tmp_path / "src" / "images"
    png = (images / "00000000.png").read_bytes()
    (images / "garbage-1.png").write_bytes(b"not an image" * 10)
    (images / "garbage-2.png").write_bytes(b"not one either" * 10)
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    files = ["00000000.png", "garbage-1.png", "00000001.png", "garbage-2.png", "truncated.png", "00000002.png",
             "00000003.png"]
    path = tmp_path / "src" / "bad.csv"
    path.write_text("filepath,caption\n" + "".join(f"images/{f},caption {k}\n" for k, f in enumerate(files)))
    return path


def test_validate_counts_each_bad_image_once_whatever_was_read_before(world, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="dmclip.data"):
        ds = build_dataset(f"csv:{_csv_with_bad_images(world, tmp_path)}:max_skip_fraction=0.5", image_size=SIZE)
    assert ds[1]["index"] == 2 and ds.skipped == {"unreadable-image": 1}  # read, replaced by the next, counted
    assert ds.validate() == {"unreadable-image": 2, "truncated-image": 1}  # goes on past the known one
    assert [ds[i]["index"] for i in range(7)] == [0, 2, 2, 5, 5, 5, 6]
    assert ds.validate() == ds.skipped == {"unreadable-image": 2, "truncated-image": 1}
    unreadable, truncated = [r.getMessage() for r in caplog.records if "skipping samples" in r.getMessage()]
    assert "with unreadable image (first: " in unreadable and "garbage-1.png: cannot identify" in unreadable
    assert "with truncated image (first: " in truncated and "truncated.png: image file is truncated" in truncated
    with pytest.raises(DmclipError, match=r"sample 3 is bad \(unreadable-image: .*garbage-2.png") as info:
        ds.image(3)
    assert "use ds[i]" in info.value.hint
    assert torch.equal(ds.image(2), ds[2]["image"]) and torch.equal(ds.image(-1), ds[6]["image"])


def test_a_memory_mapped_array_set_pickles_as_its_file_name(tmp_path):
    """DataLoader workers under spawn get the file name and map it themselves, not a copy of every image; an
    in-memory set pickles whole."""
    import pickle

    pixels = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", pixels)
    mapped = ArrayImageTextDataset("toy", np.load(tmp_path / "images.npy", mmap_mode="r"), [["c"]] * 20)
    blob = pickle.dumps(mapped)
    assert len(blob) < pixels.nbytes / 4
    worker = pickle.loads(blob)
    assert isinstance(worker._images, np.memmap) and worker.captions(19) == ["c"]
    assert torch.equal(worker.images([3, 0]), torch.from_numpy(pixels[[3, 0]]).permute(0, 3, 1, 2))
    in_memory = pickle.loads(pickle.dumps(ArrayImageTextDataset("toy", pixels, [["c"]] * 20)))
    assert torch.equal(in_memory.images(), torch.from_numpy(pixels).permute(0, 3, 1, 2))
    assert in_memory.images().is_contiguous() and repr(in_memory) == "<ArrayImageTextDataset 'toy': 20 samples, 16 px>"


def test_prompts_fill_every_template_and_labels_come_without_decoding():
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    ds = ArrayClassificationDataset("toy", images, [2, 0, 1], ["cat", "dog", "red bird"], ["a {}.", "art of the {c}."])
    assert ds.prompts(2) == ["a red bird.", "art of the red bird."]
    assert repr(ds) == "<ArrayClassificationDataset 'toy': 3 samples, 8 px>"
    assert ds.labels() == [2, 0, 1] and [ds[i]["label"] for i in range(3)] == [2, 0, 1]

    class OnlyLabel(ArrayClassificationDataset):  # a dataset that defines label() alone gets labels() from it
        labels = ClassificationDataset.labels

        def load_image(self, i):
            raise AssertionError("labels() decoded an image")

    assert OnlyLabel("toy", images, [2, 0, 1], ["a", "b", "c"], ["{}"]).labels() == [2, 0, 1]


def test_skips_fail_only_past_the_fraction_and_list_each_reason():
    skips = SkipCounter("toy", 0.25)
    skips.total = 8
    skips.add("missing-file", "a.png")
    skips.add("missing-file", "b.png")
    skips.check()  # 2 of 8: exactly the allowed fraction
    skips.add("empty-caption", "")
    with pytest.raises(DmclipError, match=r"^toy: 3 of 8 samples are bad \(1 empty-caption, 2 missing-file\)"):
        skips.check()
    strict = SkipCounter("strict", 0)  # a fraction of 0 is allowed: no bad sample at all
    strict.total = 1000
    strict.check()
    strict.add("missing-file", "a.png")
    with pytest.raises(DmclipError, match=r"^strict: 1 of 1000 samples are bad"):
        strict.check()


def test_captions_are_utf8_text_with_whitespace_collapsed():
    assert clean_caption(b"  a red\tcircle \n on grey ") == "a red circle on grey"
    assert clean_caption("café ünd 雪".encode()) == "café ünd 雪"
    for value, reason, detail in [(b"caf\xe9" * 20, "non-utf8-caption", repr(b"caf\xe9" * 10)),
                                  ("x" * 50 + "\udce9", "non-utf8-caption", repr("x" * 40)),
                                  (b"caf\x80".decode("utf-8", "surrogateescape"), "non-utf8-caption", repr("caf\udc80")),
                                  (b"caf\xff".decode("utf-8", "surrogateescape"), "non-utf8-caption", repr("caf\udcff")),
                                  (3, "empty-caption", "caption is int"), (" \n ", "empty-caption", "")]:
        with pytest.raises(BadSample) as info:
            clean_caption(value)
        assert (info.value.reason, info.value.detail) == (reason, detail)
        assert str(info.value) == f"{reason}: {detail}"


@pytest.mark.parametrize("template", ["a {} {}", "a {} {", "a {} }", "a photo", "{x} of {}"])
def test_a_template_without_exactly_one_placeholder_is_refused(template):
    with pytest.raises(DmclipError, match="must contain exactly one"):
        check_templates(["a photo of a {}.", template], "toy")


def test_collate_a_batch_of_one_and_classification_labels():
    images = np.zeros((3, 8, 8, 3), dtype=np.uint8)
    ds = ArrayClassificationDataset("toy", images, [2, 0, 1], ["a", "b", "c"], ["{}"])
    one = collate([ds[2]])
    assert one["image"].shape == (1, 3, 8, 8) and one["label"].tolist() == [1] and one["index"].tolist() == [2]
    batch = collate([ds[0], ds[1]])
    assert torch.equal(batch["label"], torch.tensor([2, 0]))


def test_an_index_past_either_end_is_an_index_error_and_an_empty_image_a_bad_sample():
    ds = ArrayImageTextDataset("toy", np.zeros((3, 8, 8, 3), dtype=np.uint8), [["a"], ["b"], ["c"]])
    assert ds[-3]["index"] == 0 and ds[2]["index"] == 2
    for index in (-4, 3):
        with pytest.raises(IndexError, match=f"^toy: index {index} out of range for 3 samples$"):
            ds[index]
    assert [sample["captions"] for sample in ds] == [["a"], ["b"], ["c"]]  # iteration ends at the IndexError
    with pytest.raises(BadSample) as info:
        decode_image(b"", 8, "images/x.png")
    assert (info.value.reason, info.value.detail) == ("empty-file", "images/x.png")


def test_an_image_over_40_million_pixels_is_refused_from_its_header():
    """Up to 40 M pixels an image is decoded (this one then turns out truncated); past it, or past PIL's own
    bomb limit, it is a huge image, named with its size, and never decoded."""
    for (width, height), reason, detail in [((8000, 5000), "truncated-image", "x.png: "),
                                            ((8000, 5001), "huge-image", "x.png: 8000x5001 pixels, more than 40 M"),
                                            ((20000, 20000), "huge-image", "x.png: Image size (400000000 pixels)")]:
        with pytest.raises(BadSample) as info:
            decode_image(png_header_only(width, height), 32, "x.png")
        assert info.value.reason == reason and info.value.detail.startswith(detail), info.value.detail
