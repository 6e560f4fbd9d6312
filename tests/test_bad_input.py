"""The bad-input catalogue: every row of docs/errors.md, through the CLI.

What a user would notice if this broke: their own messy data, a typo in a recipe, a damaged run or a full
disk giving a traceback (exit 1), a hang, a 1 GB allocation, or a half-written file in place of the good one,
instead of one `error:` line naming the problem, one `hint:` line with the fix, exit code 2, and every file
already written left as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import TINY_CLIP
from helpers.images import png_header_only
from PIL import Image

from dmclip.cli.main import main
from dmclip.data import build_dataset
from dmclip.runs import RunDir, find_runs

TINY = [*TINY_CLIP, "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "eval.each_run=false"]


def pretrain(*args: str) -> list[str]:
    return ["pretrain", "--steps", "2", "--batch-size", "8", *TINY, *args]


# ------------------------------------------------------------------------------------------ files


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def picture(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def image_set(tmp: Path, bad_image: bytes | None = None, bad_caption: str | bytes | None = None,
              missing: bool = False, good: int = 7) -> str:
    """A CSV set of ``good`` PNGs plus one bad row; returns its spec with max_skip_fraction=0 (fail at once)."""
    rows = [b"filepath,caption"]
    for i in range(good):
        (tmp / f"good{i}.png").write_bytes(png(picture(i)))
        rows.append(f"good{i}.png,a picture number {i}".encode())
    if bad_image is not None:
        (tmp / "bad.png").write_bytes(bad_image)
        rows.append(b"bad.png,a bad picture")
    if bad_caption is not None:
        (tmp / "captioned.png").write_bytes(png(picture(99)))
        caption = bad_caption if isinstance(bad_caption, bytes) else bad_caption.encode()
        rows.append(b'captioned.png,"' + caption + b'"')
    if missing:
        rows.append(b"not-there.png,a picture that is gone")
    (tmp / "train.csv").write_bytes(b"\n".join(rows) + b"\n")
    return f"csv:{tmp / 'train.csv'}:max_skip_fraction=0"


def truncated_png() -> bytes:
    data = png(picture(5))
    return data[: len(data) // 2]


def recipe(tmp: Path, text: str) -> str:
    (tmp / "r.yaml").write_text(text)
    return str(tmp / "r.yaml")


# ------------------------------------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    """Two completed tiny pretrain runs of different widths (checkpoint every step)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    try:
        for name, width in (("narrow", "32"), ("wide", "48")):
            root = tmp_path_factory.mktemp(name)
            assert main([*pretrain("--data", "world-train:size=16", "--set", f"model.vision_width={width}",
                                   "--set", "train.checkpoint_every=1"), "--runs-dir", str(root)]) == 0
            out[name] = find_runs(root)[0].path
    finally:
        torch.set_num_threads(threads)
    return out


def copy_run(source: Path, tmp: Path, status: str = "interrupted") -> Path:
    target = tmp / "runs" / "pretrain" / source.name
    shutil.copytree(source, target)
    RunDir(target).update_info(status=status)
    return target


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# ------------------------------------------------------------------------------------------ the catalogue

# id -> (setup(tmp, runs) -> argv, error line, hint line). "{tmp}" and "{run}" are filled in; an entry ending
# in "..." is compared up to there (the rest quotes a library's own reason, e.g. torch's or PIL's).
Setup = Callable[[Path, dict], list[str]]
CATALOGUE: dict[str, tuple[Setup, str, str]] = {
    # ---- images (csv set with max_skip_fraction=0, so one bad row stops the run)
    "image-corrupt": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_image=b"this is not an image at all")),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 unreadable-image), more than max_skip_fraction=0",
        "fix or remove those files, or allow more with the dataset option max_skip_fraction=<fraction> "
        "(e.g. 'csv:train.csv:max_skip_fraction=0.05', or --set data.max_skip_fraction=0.05)"),
    "image-truncated": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_image=truncated_png())),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 truncated-image), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    "image-zero-byte": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_image=b"")),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 empty-file), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    "image-huge": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_image=png_header_only(20000, 20000))),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 huge-image), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    "image-too-small": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_image=png(picture(3, size=4)))),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 wrong-shape), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    "image-missing": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, missing=True)),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 missing-file), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    # ---- captions
    "caption-empty": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_caption="   ")),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 empty-caption), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    "caption-not-utf8": (
        lambda tmp, runs: pretrain("--data", image_set(tmp, bad_caption="caf\xe9".encode("latin-1"))),
        "csv:{tmp}/train.csv: 1 of 8 samples are bad (1 non-utf8-caption), more than max_skip_fraction=0",
        "fix or remove those files, ..."),
    # ---- missing files and directories
    "data-file-missing": (
        lambda tmp, runs: pretrain("--data", f"csv:{tmp}/nope.csv"),
        "csv: file '{tmp}/nope.csv' does not exist",
        "check the path (relative paths start at ...), e.g. csv:data/train.csv"),
    "data-directory-missing": (
        lambda tmp, runs: pretrain("--data", f"imagefolder:{tmp}/nope"),
        "imagefolder: directory '{tmp}/nope' does not exist",
        "check the path (relative paths start at ...), e.g. imagefolder:data/val"),
    "recipe-missing": (
        lambda tmp, runs: ["pretrain", f"{tmp}/nope.yaml"],
        "recipe '{tmp}/nope.yaml' does not exist", "..."),
    "recipe-is-a-directory": (
        lambda tmp, runs: ["pretrain", str(tmp)],
        "recipe '{tmp}' is a directory", "..."),
    "runs-dir-is-a-file": (
        lambda tmp, runs: (tmp.joinpath("file").write_text("x"), pretrain("--data", "world-train:size=16",
                                                                           "--runs-dir", f"{tmp}/file"))[1],
        "cannot create the run directory {tmp}/file/pretrain/...",
        "choose another --runs-dir (or $DMCLIP_RUNS), one that is a writable directory"),
    "resume-missing-directory": (
        lambda tmp, runs: ["pretrain", "--resume", f"{tmp}/nope"],
        "{tmp}/nope is not a dmclip run directory (no run.json)",
        "pass a directory under runs/<command>/ (`dmclip runs list` shows them)"),
    # ---- recipes
    "yaml-unknown-key": (
        lambda tmp, runs: ["pretrain", recipe(tmp, "train:\n  stpes: 3\n")],
        "unknown config key 'train.stpes'", "did you mean train.steps?"),
    "yaml-wrong-type": (
        lambda tmp, runs: ["pretrain", recipe(tmp, "train:\n  steps: many\n")],
        "train.steps = 'many' has the wrong type: expected int", "set train.steps to a value of type int"),
    "yaml-tabs": (
        lambda tmp, runs: ["pretrain", recipe(tmp, "train:\n\tsteps: 3\n")],
        "recipe r.yaml is not valid YAML at line 2, column 1: ...", "indent with spaces, not tabs"),
    "yaml-duplicated-key": (
        lambda tmp, runs: ["pretrain", recipe(tmp, "seed: 1\nobjective: clip\nseed: 2\n")],
        "recipe r.yaml: duplicated key 'seed' at line 3, column 1 (first at line 1)",
        "keep one of the two entries: YAML would silently use the last one"),
    "yaml-code-tag": (
        lambda tmp, runs: ["pretrain", recipe(tmp, f"objective: !!python/object/apply:os.system ['touch {tmp}/pwned']\n")],
        "recipe r.yaml: refused tag !!python/object/apply:os.system at line 1, column 12",
        "recipes are plain data (yaml.safe_load): ..."),
    "set-unknown-key": (
        lambda tmp, runs: ["pretrain", "--set", "train.stpes=3"],
        "--set train.stpes: unknown config key 'train.stpes'", "did you mean train.steps?"),
    "set-unknown-section": (
        lambda tmp, runs: ["pretrain", "--set", "optim.lr=1e-3"],
        "--set optim.lr: unknown config key 'optim'", "..."),
    # ---- compress load
    "load-not-loopback": (
        lambda tmp, runs: ["compress", "load", "--server", "192.0.2.7:5000"],
        "the load generator only targets this machine; 192.0.2.7 is not a loopback address",
        "run it next to the server: --server 127.0.0.1:PORT"),
    "load-too-many-clients": (
        lambda tmp, runs: ["compress", "load", "--server", "127.0.0.1:5000", "--clients", "1000"],
        "--clients 1000 is out of range", "use 1 to 64 clients"),
    # ---- checkpoints and models
    "resume-other-architecture": (
        lambda tmp, runs: ["pretrain", "--resume", str(other_architecture_checkpoint(tmp, runs))],
        "the checkpoint does not fit this model (20 tensors differ, e.g. visual.cls_token (1, 1, 32) vs (1, 1, 48))",
        "resume with the same model config the run was started with"),
    "resume-truncated-checkpoint": (
        lambda tmp, runs: ["pretrain", "--resume", str(truncated_checkpoint(tmp, runs))],
        "checkpoint {run}/checkpoints/last.pt cannot be read (...",
        "it is truncated or not a dmclip checkpoint: use another one, or the previous checkpoint in the same "
        "directory"),
    "model-weights-other-architecture": (
        lambda tmp, runs: ["eval", "zero-shot", "--model", f"run:{other_architecture_weights(tmp, runs)}"],
        "weights in {run}/model do not fit the architecture in model.json (0 missing, 0 unexpected, ...",
        "the weights come from another architecture; use the matching run"),
    "model-weights-truncated": (
        lambda tmp, runs: ["eval", "zero-shot", "--model", f"run:{truncated_weights(tmp, runs)}"],
        "weights in {run}/model cannot be read (...", "the file is truncated or missing; use another run"),
    "model-reference-to-nothing": (
        lambda tmp, runs: ["eval", "zero-shot", "--model", "vit-nanno"],
        "no model 'vit-nanno'",
        "use run:<run dir>, open_clip:<arch>:<weights>, or a registered name (did you mean 'vit-nano'...?)"),
    "model-open-clip-without-weights": (
        lambda tmp, runs: ["eval", "zero-shot", "--model", "open_clip:ViT-B-32"],
        "open_clip:ViT-B-32 names an architecture but no weights (it would be random)",
        "name the weights: open_clip:<arch>:/path/checkpoint.pt, open_clip:local-dir:/path/to/hub-dir, "
        "open_clip:<arch>:<pretrained tag> (from the Hugging Face cache when offline), or open_clip:<arch>:random "
        "for random weights"),
    "model-run-directory-missing": (
        lambda tmp, runs: ["distill", "--teacher", f"run:{tmp}/nope"],
        "run directory '{tmp}/nope' does not exist",
        "`dmclip runs list` shows the runs; pass one as run:<directory>"),
}


def other_architecture_checkpoint(tmp: Path, runs: dict) -> Path:
    run = copy_run(runs["wide"], tmp)
    shutil.copy(runs["narrow"] / "checkpoints" / "last.pt", run / "checkpoints" / "last.pt")
    return run


def truncated_checkpoint(tmp: Path, runs: dict) -> Path:
    run = copy_run(runs["narrow"], tmp)
    truncate(run / "checkpoints" / "last.pt")
    return run


def other_architecture_weights(tmp: Path, runs: dict) -> Path:
    run = copy_run(runs["narrow"], tmp, status="completed")
    shutil.copy(runs["wide"] / "model" / "model.safetensors", run / "model" / "model.safetensors")
    return run


def truncated_weights(tmp: Path, runs: dict) -> Path:
    run = copy_run(runs["narrow"], tmp, status="completed")
    truncate(run / "model" / "model.safetensors")
    return run


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` except the two a failed attempt may append to (run.json status, log.txt)."""
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name not in ("run.json", "log.txt")}


def matches(line: str, expected: str) -> bool:
    """Exact, except that each "..." stands for any text (a path, a library's own reason, a list of names)."""
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("...")), line) is not None


NEEDS_RUNS = {"resume-other-architecture", "resume-truncated-checkpoint", "model-weights-other-architecture",
              "model-weights-truncated"}


@pytest.mark.parametrize("case", list(CATALOGUE))
def test_catalogue_row_is_one_error_line_one_hint_exit_2(case, tmp_path, capsys, request):
    setup, error, hint = CATALOGUE[case]
    runs = request.getfixturevalue("two_runs") if case in NEEDS_RUNS else {}
    runs_dir = tmp_path / "runs"
    argv = setup(tmp_path, runs)
    if "--runs-dir" not in argv and "--resume" not in argv:
        argv = [*argv, "--runs-dir", str(runs_dir)]
    run_dirs = find_runs(runs_dir)  # the copied run a --resume row works on
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(lines) == 2, err
    run_path = str(run_dirs[0].path) if run_dirs else ""
    assert matches(lines[0], "error: " + error.format(tmp=tmp_path, run=run_path)), lines[0]
    assert matches(lines[1], "hint: " + hint.format(tmp=tmp_path, run=run_path)), lines[1]
    assert "Traceback" not in err
    assert {p: b for p, b in before.items() if p.exists()} == before  # nothing already written changed
    assert not (tmp_path / "pwned").exists()  # a code tag never ran
    if "--resume" in argv and run_dirs:  # a resumed run that failed says why
        assert RunDir(argv[argv.index("--resume") + 1]).status == "failed"


def test_catalogue_is_documented_row_by_row():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "errors.md").read_text()
    missing = [case for case in CATALOGUE if f"`{case}`" not in doc]
    assert not missing, f"docs/errors.md has no row for {missing}"


# --------------------------------------------------------------------------- accepted (no error at all)


def _modes() -> dict[str, tuple[Image.Image, str]]:
    rgb = picture(7)
    ramp16 = Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16))
    return {
        "grayscale": (rgb.convert("L"), "PNG"),
        "palette": (rgb.convert("P"), "PNG"),
        "rgba": (rgb.convert("RGBA"), "PNG"),
        "cmyk": (rgb.convert("CMYK"), "JPEG"),
        "one-bit": (rgb.convert("1"), "PNG"),
        "16-bit": (ramp16, "PNG"),
        "float": (Image.fromarray((np.arange(32 * 32).reshape(32, 32) / 1024).astype(np.float32)), "TIFF"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_images_in_other_modes_load_as_rgb(mode, tmp_path):
    """Grayscale, palette, RGBA, CMYK, 1-bit, 16-bit and float images load as RGB with their brightness kept
    (a 16-bit or float image is not clipped to white or black)."""
    image, fmt = _modes()[mode]
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    (tmp_path / "x.img").write_bytes(buffer.getvalue())
    (tmp_path / "d.csv").write_text("filepath,caption\nx.img,a thing\n")
    ds = build_dataset(f"csv:{tmp_path / 'd.csv'}", image_size=32)
    sample = ds[0]
    assert ds.skipped == {} and sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
    expected = np.asarray(image.convert("L") if mode not in ("16-bit", "float") else
                          Image.fromarray((np.asarray(image, dtype=np.float64) * (255 / 65535 if mode == "16-bit" else 255))
                                          .round().clip(0, 255).astype(np.uint8)), dtype=np.float64)
    gray = sample["image"].double().mean(0).numpy()
    assert abs(gray.mean() - expected.mean()) < 8, (gray.mean(), expected.mean())


def test_a_bad_image_is_skipped_and_counted_under_the_allowed_fraction(tmp_path):
    """The same bad rows as the catalogue, under max_skip_fraction: skipped, counted, the next sample instead."""
    spec = image_set(tmp_path, bad_image=png_header_only(20000, 20000), bad_caption=b"\xff\xfe", missing=True,
                     good=7).replace("max_skip_fraction=0", "max_skip_fraction=0.5")
    ds = build_dataset(spec, image_size=32)
    assert len(ds) == 8 and ds.skipped == {"missing-file": 1, "non-utf8-caption": 1}
    bad = next(i for i in range(len(ds)) if ds.sources[i][1].endswith("bad.png"))
    sample = ds[bad]
    assert sample["index"] != bad and ds.skipped["huge-image"] == 1


def test_a_decompression_bomb_is_refused_before_it_is_decoded(tmp_path, monkeypatch):
    """The size check reads the header only: a 20000 x 20000 image never reaches Image.load."""
    from PIL import ImageFile

    from dmclip.data.base import BadSample, decode_image

    def refuse(self):
        raise AssertionError("decoded a huge image")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    for width, height in ((20000, 20000), (9000, 9000)):  # over PIL's bomb limit; under it but over ours
        with pytest.raises(BadSample) as info:
            decode_image(png_header_only(width, height), 32, "bomb.png")
        assert info.value.reason == "huge-image"


def test_a_ten_thousand_character_caption_is_kept_and_cut_to_the_context(tmp_path):
    long_caption = ("word " * 2000)[:9_999] + "s"  # 10,000 characters
    spec = image_set(tmp_path, bad_caption=long_caption)
    ds = build_dataset(spec, image_size=32)
    assert ds.skipped == {} and max(len(c) for i in range(len(ds)) for c in ds.captions(i)) == 10_000
    code = main([*pretrain("--data", spec), "--runs-dir", str(tmp_path / "runs")])
    assert code == 0
    tokenizer = json.loads((find_runs(tmp_path / "runs")[0].path / "tokenizer.json").read_text())
    from dmclip.data.tokenizer import Tokenizer

    assert Tokenizer.from_dict(tokenizer)([long_caption]).shape == (1, 16)


# ------------------------------------------------------------------------------------------ a full disk


def test_a_disk_that_fills_mid_write_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """ENOSPC while the step-2 checkpoint is written (and on every write after it: the disk stays full): one
    error line naming the file, the step-1 checkpoint intact, no temporary file left."""
    real_fsync, full = os.fsync, {"now": False, "writes": 0}

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".last.pt." in name:
            full["writes"] += 1
            full["now"] = full["now"] or full["writes"] == 2
        if full["now"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    runs_dir = tmp_path / "runs"
    code = main([*pretrain("--data", "world-train:size=16", "--set", "train.checkpoint_every=1",
                           "--set", "train.log_every=1"),
                 "--runs-dir", str(runs_dir)])
    err = capsys.readouterr().err
    assert code == 2, err
    (run,) = find_runs(runs_dir)
    lines = [line for line in err.splitlines() if line.startswith(("error:", "hint:"))]
    assert lines == [f"error: could not write {run.path}/checkpoints/last.pt: No space left on device",
                     "hint: free disk space or choose another --runs-dir; the previous file is unchanged"]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert run.load_checkpoint()["step"] == 1
    assert list((run.path / "checkpoints").iterdir()) == [run.path / "checkpoints" / "last.pt"]
    assert [r["step"] for r in run.metrics()] == [1, 2]


def test_a_full_disk_while_appending_metrics_is_a_user_error(tmp_path, monkeypatch):
    from dmclip.errors import DmclipError

    run = RunDir.create("pretrain", "x", None, root=tmp_path)
    run.log_metrics({"step": 1, "loss": 1.0})

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, mode="r", **kw: Full() if "a" in mode else real_open(path, mode, **kw))
    with pytest.raises(DmclipError, match="could not write .*metrics.jsonl: No space left on device"):
        run.log_metrics({"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert run.metrics() == [{"step": 1, "loss": 1.0}]


# ------------------------------------------------------------------------------------------ fuzz
# tests/test_config.py fuzzes parse_yaml + from_dict with short random text on a sample config. Added here:
# the real command configs, nested mappings that reach every section, YAML-ish text built from the
# characters that matter to YAML, random bytes as a recipe file, and random --set strings. Nothing but a
# DmclipError may escape, and what loads must validate and save again.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dmclip.config import describe, from_dict, load_config, to_yaml  # noqa: E402
from dmclip.distill import DistillConfig  # noqa: E402
from dmclip.errors import DmclipError  # noqa: E402
from dmclip.pretrain import PretrainConfig  # noqa: E402
from dmclip.recipe import parse_yaml  # noqa: E402

CONFIGS = (PretrainConfig, DistillConfig)
_KEYS = sorted({part for cls in CONFIGS for key, *_ in describe(cls) for part in key.split(".")} | {"zzz", ""})
_scalars = (st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=True)
            | st.text(max_size=12) | st.sampled_from(["clip", "blip", "1e-3", "nan", "inf", "-1", "kl", "auto"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), inner, max_size=4),
                       max_leaves=12)
_mappings = st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6)
_yamlish = st.lists(st.sampled_from(list("abcdefgimnorstl_.0123456789:-[]{},'\"!&*?|>%@#\t\n ")
                                   + ["steps", "train", "model", "!!python/object", "&a", "*a", "<<", "\n  "]),
                    max_size=40).map("".join)


def _only_dmclip_errors(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DmclipError as exc:
        assert exc.message and "\n" not in exc.message, exc.message
        return None


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(CONFIGS), _mappings)
def test_fuzz_nested_mappings_against_the_command_configs(cls, data):
    cfg = _only_dmclip_errors(from_dict, cls, data)
    if cfg is not None:  # what loads is a valid config that saves and loads back the same
        assert from_dict(cls, parse_yaml(to_yaml(cfg))) == cfg


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(CONFIGS), _yamlish)
def test_fuzz_yamlish_text_against_the_command_configs(cls, text):
    data = _only_dmclip_errors(parse_yaml, text)
    if isinstance(data, dict):
        _only_dmclip_errors(from_dict, cls, data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=60))
def test_fuzz_recipe_files_of_random_bytes(tmp_path, data):
    (tmp_path / "r.yaml").write_bytes(data)
    _only_dmclip_errors(load_config, PretrainConfig, tmp_path / "r.yaml")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from(list("=.[]{}:,'\" \t-_09") + _KEYS), max_size=12).map("".join),
                max_size=3))
def test_fuzz_set_overrides(sets):
    _only_dmclip_errors(load_config, DistillConfig, None, sets)
