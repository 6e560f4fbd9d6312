"""Webdataset shards: streamed for training (split over ranks x DataLoader workers, resumable), indexed for
evaluation (``.cls`` sets as classification), and DataLoader workers for every format.

What a user would notice if these broke: a sample read twice (or never) in an epoch when training on 8 GPUs
with 8 workers each, a resumed run that trains on other batches than the uninterrupted one, a 1 TB dataset
read whole before the first step, CLIP_benchmark's webdataset sets refused by `dmclip eval zero-shot`, or
`train.num_workers=4` failing on some format.
"""

from __future__ import annotations

import collections
import csv
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import SIX_STEPS, TINY_CLIP, one_thread_main
from helpers.kill_resume import assert_same_run, kill_twice_then_resume, the_run
from helpers.torchrun import assert_close_runs, torchrun_dmclip
from PIL import Image

from dmclip.cli.main import main
from dmclip.data import build_dataset, collate, export
from dmclip.data.stream import WdsStream
from dmclip.errors import DmclipError
from dmclip.runs import RunDir, find_runs
from dmclip.train import TrainConfig, fit
from dmclip.train.data import DataPosition, StreamOrder

SIZE = 16


def png(value: int) -> bytes:
    """A 16 x 16 image whose pixels encode ``value`` (so a batch can be checked against its keys)."""
    array = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    array[..., 0], array[..., 1], array[..., 2] = value % 256, value // 256 % 256, 7
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(folder: Path, shards: int, per_shard: int, *, bad: set[int] = frozenset(),
                 layout: str = "datacomp") -> Path:
    """``shards`` x ``per_shard`` samples keyed by their number: DataComp's layout (jpg-or-png + txt + json
    {"caption"}); sample numbers in ``bad`` get bytes that are no image."""
    import webdataset as wds

    folder.mkdir(parents=True)
    number = 0
    for s in range(shards):
        with wds.TarWriter(str(folder / f"shard-{s:06d}.tar")) as sink:
            for _ in range(per_shard):
                sample = {"__key__": f"{number:09d}", "png": b"not an image" if number in bad else png(number),
                          "txt": f"caption {number}"}
                if layout == "datacomp":
                    sample["json"] = json.dumps({"uid": f"{number:032x}", "caption": f"caption {number}"})
                sink.write(sample)
                number += 1
    return folder


def numbers(batch: dict) -> list[int]:
    """The sample numbers of a batch, read from its keys, checked against its pixels and captions."""
    out = []
    for key, image, captions in zip(batch["key"], batch["image"], batch["captions"]):
        number = int(key.split("/")[1])
        assert int(image[0, 0, 0]) + 256 * int(image[1, 0, 0]) == number and captions == [f"caption {number}"]
        out.append(number)
    return out


def stream(folder: Path, **options) -> WdsStream:
    spec = ":".join([f"wds:{folder}", *(f"{k}={v}" for k, v in options.items())])
    ds = build_dataset(spec, image_size=SIZE, allow_stream=True)
    assert isinstance(ds, WdsStream)
    return ds


def take(order: StreamOrder, micro_batches: int) -> list[int]:
    iterator = order.batches(collate)
    return [n for _ in range(micro_batches) for n in numbers(next(iterator))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_shards(tmp_path_factory.mktemp("wds") / "shards", shards=8, per_shard=6)


# ------------------------------------------------------------------------------ exactly once per epoch


def test_plain_iteration_reads_every_sample_once_per_epoch_over_2_ranks_x_2_workers(shards):
    """DataLoader(stream, num_workers=2) on each of 2 ranks: the 48 samples, each once; another epoch
    reads them all again in another order."""
    orders = []
    for epoch in (0, 1):
        seen = []
        for rank in range(2):
            ds = stream(shards, shuffle_buffer=10).split(rank, 2)
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
            seen += [n for batch in loader for n in numbers(batch)]
        assert sorted(seen) == list(range(48))
        orders.append(seen)
    assert orders[0] != orders[1]


def test_training_readers_cover_each_epoch_once_over_2_ranks_x_2_workers(shards):
    """fit's readers (StreamOrder): 2 ranks x 2 workers, 3 samples per micro-batch. Each reader holds 2 shards
    (12 samples = 4 micro-batches) per epoch, so 8 micro-batches per rank are one epoch and 16 are two."""
    per_rank = [take(StreamOrder(stream(shards), 12, seed=5, grad_accum=2, world_size=2, rank=rank, num_workers=2),
                     16) for rank in range(2)]
    first = per_rank[0][:24] + per_rank[1][:24]
    second = per_rank[0][24:] + per_rank[1][24:]
    assert sorted(first) == list(range(48)) and sorted(second) == list(range(48))
    assert first != second  # epoch 1 shuffles shards and samples anew
    again = take(StreamOrder(stream(shards), 12, seed=5, grad_accum=2, world_size=2, rank=0, num_workers=2), 16)
    assert again == per_rank[0]  # the run seed fixes the order
    other = take(StreamOrder(stream(shards), 12, seed=6, grad_accum=2, world_size=2, rank=0, num_workers=2), 16)
    assert other != per_rank[0]


def test_resampled_draws_shards_with_replacement_even_with_fewer_shards_than_readers(tmp_path):
    folder = write_shards(tmp_path / "few", shards=3, per_shard=4)
    with pytest.raises(DmclipError, match="3 shard\\(s\\) cannot feed 4 readers") as info:
        StreamOrder(stream(folder), 8, seed=0, world_size=2, rank=0, num_workers=2)
    assert "resampled=true" in info.value.hint
    seen = collections.Counter()
    for rank in range(2):
        seen.update(take(StreamOrder(stream(folder, resampled="true"), 8, seed=0, world_size=2, rank=rank,
                                     num_workers=2), 6))
    assert sum(seen.values()) == 48 and set(seen) <= set(range(12))
    assert max(seen.values()) > 1  # 48 draws of 12 samples: with replacement, repeats


# ----------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("workers,accum", [(0, 1), (2, 1), (2, 2)])
def test_a_resumed_stream_continues_with_the_same_batches(tmp_path, workers, accum):
    """Position after any step (mid-epoch, at an epoch's end, epochs later; with any worker's turn next) ->
    the uninterrupted run's next batches; a bad image inside is replaced the same way both times."""
    folder = write_shards(tmp_path / "shards", shards=4, per_shard=7, bad={9})
    whole = take(StreamOrder(stream(folder), 8, seed=1, grad_accum=accum, num_workers=workers), 20 * accum)
    for step in (1, 3, 7, 12):
        resumed = StreamOrder(stream(folder), 8, seed=1, grad_accum=accum, num_workers=workers)
        resumed.position = DataPosition(0, step * 8)
        assert take(resumed, (20 - step) * accum) == whole[step * 8:], f"resumed at step {step}"
    assert len(whole) == 160 and set(whole) == set(range(28)) - {9}  # 9 is unreadable: others take its place


def test_resuming_a_stream_read_by_other_readers_names_both_reader_counts(shards):
    """The batches depend on how many readers split the shards: a resume with other train.num_workers is refused."""
    from types import SimpleNamespace

    from dmclip.train.state import TrainState

    task = SimpleNamespace(model=torch.nn.Linear(2, 2))

    def state(cfg: TrainConfig) -> TrainState:
        return TrainState.create(task, task.model, stream(shards), cfg, seed=0, world=1, rank=0)

    one_reader, two_readers = (TrainConfig(steps=4, batch_size=4, num_workers=n, device="cpu") for n in (0, 2))
    with pytest.raises(DmclipError) as error:
        state(two_readers).restore(state(one_reader).checkpoint(one_reader), two_readers, main=True)
    assert error.value.message == (
        "the checkpoint was trained with batch_size 4 on 8 shards read by 1 rank(s) x 1 reader(s), "
        "this run has batch_size 4 on 8 shards read by 1 rank(s) x 2 reader(s)")
    assert error.value.hint == ("resume with the same data and batch size (the data order depends on both, and "
                                "for a stream on the ranks and train.num_workers)")


def test_the_first_batch_reads_only_the_first_shard(shards, monkeypatch):
    """Nothing is read up front: building the stream peeks at one shard, the first batch opens one more."""
    import sys

    import webdataset  # noqa: F401  (its package attribute `gopen` is the function; the module is below)

    gopen_module = sys.modules["webdataset.gopen"]  # the tar reader opens each shard through it
    opened = []
    real = gopen_module.gopen

    def counting(url, *args, **kwargs):
        opened.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(gopen_module, "gopen", counting)
    ds = stream(shards, shuffle_buffer=2)
    assert len(opened) == 1
    batch = next(StreamOrder(ds, 4, seed=0).batches(collate))
    assert len(numbers(batch)) == 4 and len(opened) == 2 and len(ds.shards) == 8


def test_stream_spec_errors_are_one_line_with_the_fix(shards, tmp_path):
    with pytest.raises(DmclipError, match="reads the set by index") as info:
        build_dataset(f"wds:{shards}:stream=true")  # e.g. dmclip data show
    assert "drop stream=true" in info.value.hint
    with pytest.raises(DmclipError, match="did you mean 'shuffle_buffer'"):
        build_dataset(f"wds:{shards}:shuffle_bufer=10", allow_stream=True)
    indexed = build_dataset(f"wds:{shards}:stream=false", image_size=SIZE, allow_stream=True)
    assert len(indexed) == 48 and indexed.captions(5) == ["caption 5"]


# -------------------------------------------------------------------------------- .cls classification


@pytest.mark.slow  # two evaluations through main()
def test_cls_shards_are_a_zero_shot_set_scored_as_the_original(tmp_path):
    """`dmclip data export` of a classification set -> `.cls` shards + classnames.txt: `eval zero-shot` on them
    scores exactly what it scores on the set itself (PNG keeps the pixels)."""
    assert main(["data", "export", "world-zeroshot:size=40", str(tmp_path / "zs"), "--shard-size", "16",
                 "--image-size", "32"]) == 0
    loaded = build_dataset(f"wds:{tmp_path / 'zs'}", image_size=32, allow_stream=True)  # .cls: indexed
    original = build_dataset("world-zeroshot:size=40", image_size=32)
    assert loaded.kind == "classification" and loaded.classnames == original.classnames
    assert loaded.templates == original.templates and loaded.labels() == original.labels()
    scores = []
    for data in (f"wds:{tmp_path / 'zs'}", "world-zeroshot:size=40"):
        assert main(["eval", "zero-shot", "--model", "builtin:world-vit", "--data", data,
                     "--runs-dir", str(tmp_path / "runs" / str(len(scores)))]) == 0
        (run,) = (tmp_path / "runs" / str(len(scores)) / "eval").iterdir()
        scores.append(json.loads((run / "results.json").read_text())["metrics"])
    assert scores[0] == scores[1] and scores[0]["acc1"] > 0.1


def test_clip_benchmark_layout_loads_with_its_class_names_and_templates(tmp_path):
    """ROOT/test/{0..N}.tar (image + .cls), ROOT/classnames.txt, ROOT/zeroshot_classification_templates.txt."""
    import webdataset as wds

    (tmp_path / "root" / "test").mkdir(parents=True)
    labels = [k % 3 for k in range(11)]
    for shard in range(11 // 4 + 1):
        with wds.TarWriter(str(tmp_path / "root" / "test" / f"{shard}.tar")) as sink:
            for k in range(shard * 4, min(11, shard * 4 + 4)):
                sink.write({"__key__": f"s{k:04d}", "webp": png(k), "cls": str(labels[k])})
    (tmp_path / "root" / "test" / "nshards.txt").write_text("3\n")
    (tmp_path / "root" / "classnames.txt").write_text("cat\ndog\nbird\n")
    (tmp_path / "root" / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\nart of the {c}.\n")
    ds = build_dataset(f"wds:{tmp_path / 'root'}", image_size=SIZE)
    assert ds.kind == "classification" and ds.classnames == ["cat", "dog", "bird"]
    assert ds.templates == ["a photo of a {}.", "art of the {}."] and ds.labels() == labels
    assert [int(ds[k]["image"][0, 0, 0]) for k in range(11)] == list(range(11))
    (tmp_path / "root" / "classnames.txt").write_text("cat\ndog\n")
    with pytest.raises(DmclipError, match="label 2 found but only 2 class names"):
        build_dataset(f"wds:{tmp_path / 'root'}")


# ---------------------------------------------------------------------------- DataLoader workers, every format


class RecordingTask:
    """Records what each micro-batch held (sample indices and an image checksum); trains a 1-weight model."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        self.seen = []

    def collate(self, samples):
        batch = collate(samples)
        return {"image": batch["image"], "index": [int(i) for i in batch["index"]]}

    def loss(self, model, batch, step):
        self.seen.append((step, batch["index"], int(batch["image"].long().sum())))
        return {"loss": model(batch["image"].float().mean().reshape(1, 1)).sum()}


@pytest.fixture(scope="module")
def every_format(tmp_path_factory, shards) -> dict[str, str]:
    root = tmp_path_factory.mktemp("formats")
    world = build_dataset("world-retrieval-a:size=24", image_size=SIZE)
    export(world, "csv", root / "csv")
    export(world, "coco", root / "coco")
    export(build_dataset("world-zeroshot:size=24", image_size=SIZE), "imagefolder", root / "folder")
    with open(root / "csv" / "data.csv", encoding="utf-8") as fh:
        rows = [{"image": f"csv/{row['filepath']}", "caption": row["caption"]} for row in csv.DictReader(fh)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"world": "world-train:size=24", "csv": f"csv:{root}/csv/data.csv", "coco": f"coco:{root}/coco/captions.json",
            "imagefolder": f"imagefolder:{root}/folder", "hf-json": f"hf:{root}/data.jsonl",
            "wds-index": f"wds:{shards}:stream=false", "wds-stream": f"wds:{shards}"}


@pytest.mark.parametrize("name", ["world", "csv", "coco", "imagefolder", "wds-index", "wds-stream",
                                  pytest.param("hf-json", marks=pytest.mark.slow)])  # importing datasets: seconds
def test_train_num_workers_works_for_every_format(every_format, name, tmp_path):
    """fit with 2 DataLoader workers: a map-style set gives the batches of loading in the training process; the
    stream (whose readers are its workers) gives 16 distinct samples in 4 steps of 4, as with no worker."""
    dataset = build_dataset(every_format[name], image_size=SIZE, allow_stream=True)
    seen = []
    for workers in (0, 2):
        cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, num_workers=workers, progress=False,
                          checkpoint_every=0, device="cpu")
        run = RunDir.create("toy", f"{name}-{workers}", cfg, root=tmp_path, seed=0)
        task = RecordingTask()
        with run.active():
            fit(task, dataset, cfg, run, seed=0)
        seen.append(task.seen)
        assert [step for step, _, _ in task.seen] == [0, 1, 2, 3]
    if name == "wds-stream":
        for records in seen:
            assert len({i for _, indices, _ in records for i in indices}) == 16
    else:
        assert seen[0] == seen[1] and len({i for _, indices, _ in seen[0] for i in indices}) > 4


# ---------------------------------------------------------------------------- kill and resume through main()


@pytest.mark.slow
def test_pretrain_on_a_stream_killed_twice_resumes_to_the_uninterrupted_weights(tmp_path, capsys, monkeypatch):
    """As tests/test_kill_resume.py, on 8 shards streamed by 2 DataLoader workers: 6 steps of 16 cross an epoch
    of each worker (32 samples), and the final resume starts mid-epoch (step 2)."""
    assert main(["data", "export", "world-train:size=64", str(tmp_path / "shards"), "--shard-size", "8",
                 "--image-size", "32"]) == 0
    argv = ["pretrain", "--data", f"wds:{tmp_path / 'shards'}", *SIX_STEPS, "--set", "train.num_workers=2", *TINY_CLIP]
    assert one_thread_main([*argv, "--runs-dir", str(tmp_path / "reference")]) == 0
    reference = the_run(tmp_path / "reference")
    assert [row["epoch"] for row in RunDir(reference).metrics()][-1] == 1.5  # sizes.json: 96 of 64 samples
    resumed = kill_twice_then_resume(argv, tmp_path / "runs", tmp_path, capsys, monkeypatch)
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_two_ranks_with_two_workers_each_resume_a_killed_streamed_run(tmp_path):
    """torchrun, 2 ranks x 2 DataLoader workers = 4 readers of 8 shards: rank 1 is SIGKILLed in step 4; the
    resumed run ends with the weights and losses of an uninterrupted 2-rank run."""
    assert main(["data", "export", "world-train:size=64", str(tmp_path / "shards"), "--shard-size", "8",
                 "--image-size", "32"]) == 0
    argv = ["pretrain", "--data", f"wds:{tmp_path / 'shards'}", *SIX_STEPS, "--set", "train.num_workers=2", *TINY_CLIP]
    whole = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "whole")], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (reference,) = find_runs(tmp_path / "whole")
    assert reference.load_checkpoint()["dataset_size"] == "8 shards read by 2 rank(s) x 2 reader(s)"
    killed = torchrun_dmclip([*argv, "--runs-dir", str(tmp_path / "killed")], tmp_path, die_at=3)
    assert killed.returncode != 0
    (run,) = find_runs(tmp_path / "killed")
    assert run.load_checkpoint()["step"] == 3  # mid-epoch: each reader is 1.5 batches into its 2-batch epoch
    resumed = torchrun_dmclip(["pretrain", "--resume", str(run.path)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close_runs(run.path, reference.path)


# ---------------------------------------------------------------------------- in the training process


def test_iterating_without_workers_reads_each_sample_once_over_2_ranks(shards):
    """``for sample in stream`` in the process itself (no DataLoader worker): each rank its half, every sample
    once; without split (no torch.distributed) one reader reads all 48; 16 ranks cannot share 8 shards."""
    seen = []
    for rank in range(2):
        ds = stream(shards, shuffle_buffer=10).split(rank, 2)
        ds.set_epoch(1)
        seen += [int(sample["key"].split("/")[1]) for sample in ds]
    assert sorted(seen) == list(range(48))
    whole = stream(shards, shuffle_buffer=0)
    order = [int(sample["key"].split("/")[1]) for sample in whole]
    assert sorted(order) == list(range(48)) and whole.skips.total == 48 and whole.skipped == {}
    assert all(order[i:i + 6] == list(range(order[i], order[i] + 6)) for i in range(0, 48, 6))  # no shuffle buffer
    with pytest.raises(DmclipError, match=r"8 shard\(s\) cannot feed 16 readers \(ranks x DataLoader workers\)"):
        next(iter(stream(shards).split(3, 16)))


def _shards_read(ds: WdsStream) -> list[str]:
    """The shard files an iteration of ``ds`` read, in order (no shuffle buffer: one shard after the other)."""
    return list(dict.fromkeys(sample["key"].split("/")[0] for sample in ds))


def test_a_dataloader_worker_of_a_rank_reads_its_own_reader_slot(shards, monkeypatch):
    """Worker 1 of 2 on rank 1 of 2 is reader 3 of 4: it reads that reader's 2 shards of the epoch; without
    split, the rank and world size are torch.distributed's (rank 1 of 4 here)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: SimpleNamespace(id=1, num_workers=2))
    ds = stream(shards, shuffle_buffer=0).split(1, 2)
    ds.set_epoch(2)
    assert _shards_read(ds) == [Path(s).name for s in ds.epoch_shards(2, 3, 4, ds.seed)]
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: None)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    ds = stream(shards, shuffle_buffer=0)
    assert _shards_read(ds) == [Path(s).name for s in ds.epoch_shards(0, 1, 4, ds.seed)]


def test_resampled_readers_draw_their_own_shards_each_epoch_reproducibly(shards):
    ds = stream(shards, resampled="true")
    draws = {(epoch, slot): ds.epoch_shards(epoch, slot, 3, seed=0) for epoch in (0, 1) for slot in range(3)}
    assert all(len(drawn) == 3 for drawn in draws.values())  # a third of the 8 shards, rounded up
    assert set().union(*draws.values()) <= set(ds.shards)
    assert len({tuple(drawn) for drawn in draws.values()}) == 6  # each reader and epoch draws its own
    assert ds.epoch_shards(1, 2, 3, seed=0) == draws[1, 2] and ds.epoch_shards(1, 2, 3, seed=1) != draws[1, 2]


def test_the_shuffle_buffer_orders_samples_by_run_seed_and_epoch(tmp_path):
    """One shard of 12: a buffer of 10 (or even 2) reads them out of order, in another order for another
    epoch or run seed, the same for the same ones."""
    shard = write_shards(tmp_path / "one", shards=1, per_shard=12) / "shard-000000.tar"

    def order(buffer: int, seed: int, epoch: int) -> list[int]:
        ds = WdsStream("one", [shard], image_size=SIZE, shuffle_buffer=buffer, seed=seed)
        ds.set_epoch(epoch)
        return _numbers_of(list(ds))

    orders = [order(10, 0, 0), order(10, 0, 1), order(10, 1, 0), order(2, 0, 0)]
    assert all(sorted(o) == list(range(12)) and o != list(range(12)) for o in orders)
    assert len({tuple(o) for o in orders[:3]}) == 3 and order(10, 0, 1) == orders[1]


def test_every_epoch_orders_the_shards_its_own_way(shards):
    """70 epochs of 8 shards (40,320 orders): a seed per epoch from the whole 63-bit range gives about 70
    different orders (a seed confined to 64 values could give at most 64)."""
    ds = stream(shards)
    orders = {tuple(ds.epoch_shards(epoch, 0, 1, seed=0)) for epoch in range(70)}
    assert len(orders) > 64
    by_seed = {tuple(ds.epoch_shards(0, 0, 1, seed=seed)) for seed in range(70)}  # and so does each run seed
    assert len(by_seed) > 64


def test_a_stream_built_in_python_has_the_specs_defaults(shards):
    built = WdsStream("x", sorted(shards.glob("*.tar")))
    spec = build_dataset(f"wds:{shards}", allow_stream=True)
    defaults = [(ds.seed, ds.shuffle_buffer, ds.resampled, ds.skips.max_fraction, ds.image_size) for ds in (built, spec)]
    assert defaults[0] == defaults[1] == (0, 1000, False, 0.01, 64)


def test_iterating_skips_bad_samples_and_shards_and_counts_them(tmp_path):
    folder = write_shards(tmp_path / "shards", shards=3, per_shard=4, bad={5})
    ds = stream(folder, max_skip_fraction=0.5)
    (folder / "shard-000002.tar").unlink()  # gone after the stream was built
    assert sorted(int(s["key"].split("/")[1]) for s in ds) == [0, 1, 2, 3, 4, 6, 7]
    assert ds.skipped == {"unreadable-image": 1, "missing-shard": 1} and ds.skips.total == 9  # 8 read, 1 shard
    strict = stream(write_shards(tmp_path / "strict", shards=2, per_shard=4, bad={5}), max_skip_fraction=0.1)
    with pytest.raises(DmclipError, match="1 of 8 samples are bad"):
        list(strict)  # counted at the end of the epoch: 1 of 8 > 10 %


def test_max_skip_fraction_one_allows_any_number_of_lost_shards(tmp_path):
    """Lost shards count in the total as well as in the skips: with two of three shards gone and one sample
    read, max_skip_fraction=1 reads what is left (it said "2 of 1 samples are bad"), and 0.5 refuses 2 of 3."""
    folder = write_shards(tmp_path / "shards", shards=3, per_shard=1)
    ds, strict = stream(folder, max_skip_fraction=1), stream(folder, max_skip_fraction=0.5)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        (folder / name).unlink()
    assert len(list(ds)) == 1 and ds.skipped == {"missing-shard": 2} and ds.skips.total == 3
    with pytest.raises(DmclipError, match="2 of 3 samples are bad") as refused:
        list(strict)
    assert refused.value.message.startswith(f"wds:{folder}")  # names the set, as the user wrote it


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file of exactly these members, in this order (duplicates too)."""
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_every_epoch_adds_its_samples_to_the_skip_check_and_the_log_names_the_first_bad_one(tmp_path, caplog):
    """1 bad sample of 8 per epoch is 12.5 %, under a 20 % bound in every epoch (judged on all samples read)."""
    folder = write_shards(tmp_path / "shards", shards=2, per_shard=4, bad={5})
    ds = stream(folder, max_skip_fraction=0.2)
    with caplog.at_level(logging.WARNING):
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            assert len(list(ds)) == 7
    assert ds.skips.total == 16 and ds.skipped == {"unreadable-image": 2}
    assert "unreadable image (first: shard-000001.tar key 000000005: " in caplog.text


def test_shard_errors_are_counted_by_kind_and_logged_with_their_cause(tmp_path, caplog):
    """A missing shard, and one webdataset refuses (a member name twice in one sample): each counted under its
    reason, the log line giving the cause cut at 300 characters."""
    folder = tmp_path / ("x" * 200)
    folder.mkdir()
    twice = _tar(folder / "shard-000000.tar", [("a.png", png(1)), ("a.txt", b"a"), ("a.png", png(2))])
    missing = folder / ("m" * 200 + ".tar")
    good = _tar(folder / "shard-000001.tar", [(f"{k}.{suffix}", data) for k in "bcd"
                                              for suffix, data in (("png", png(2)), ("txt", b"b"))])
    ds = WdsStream("s", [twice, missing, good], shuffle_buffer=0, max_skip_fraction=1)
    with caplog.at_level(logging.WARNING):
        assert len(list(ds)) == 4  # a (its first image) and b, c, d
    assert ds.skipped == {"bad-shard": 1, "missing-shard": 1}
    causes = {record.args[1]: record.args[2] for record in caplog.records if "skipping samples" in record.msg}
    assert "duplicate file name" in causes["bad shard"]
    assert len(causes["missing shard"]) == 300 and "No such file or directory" in causes["missing shard"]


def test_first_captions_prefer_the_json_caption_and_pass_a_sample_without_one(tmp_path):
    (tmp_path / "s").mkdir()
    shard = _tar(tmp_path / "s" / "shard-000000.tar", [("a.txt", b"from txt"), ("a.json", b'{"caption": "from json"}'),
                                                      ("b.txt", b"  "), ("c.txt", b"third")])
    assert WdsStream("s", [shard]).first_captions(5) == [["from json"], ["third"]]


def test_a_shard_rewritten_in_place_is_counted_again(tmp_path):
    """The header count is cached per file version (modification time and size): a resumed run whose shard was
    rewritten counts the new one."""
    from dmclip.data.stream import count_samples

    shard = tmp_path / "shard.tar"

    def rewrite(samples: int, mtime_ns: int) -> int:
        _tar(shard, [(f"{i}.txt", b"x") for i in range(samples)])
        os.utime(shard, ns=(mtime_ns, mtime_ns))
        return shard.stat().st_size

    size = rewrite(2, 10**18)
    assert count_samples(shard) == 2
    assert rewrite(3, 2 * 10**18) == size and count_samples(shard) == 3  # the same size, newer
    assert rewrite(40, 2 * 10**18) > size and count_samples(shard) == 40  # the same time, larger


def test_first_captions_are_read_in_shard_order_without_images(shards, tmp_path):
    assert stream(shards).first_captions(7) == [[f"caption {n}"] for n in range(7)]
    folder = write_shards(tmp_path / "few", shards=2, per_shard=2, layout="txt")
    truncated = folder / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:700])
    ds = stream(folder)
    assert ds.first_captions(10) == [["caption 0"], ["caption 1"]] and "truncated-shard" in ds.skipped
    assert repr(ds) == f"<WdsStream 'wds:{folder}': 2 shards, size unknown, 16 px>"


def _numbers_of(samples: list[dict]) -> list[int]:
    return [int(sample["key"].split("/")[1]) for sample in samples]


def test_a_reader_fills_each_batch_with_good_samples_and_checks_skips_from_1000_on(tmp_path, caplog):
    """A batch keeps its size whatever was bad in it; the skip fraction is checked once a reader has read 1000
    samples (fewer are too few to judge): 2 batches of 500 from a set where 1 in 12 is bad."""
    folder = write_shards(tmp_path / "shards", shards=1, per_shard=12, bad=set(range(12)) - {0, 2})
    batches = stream(folder, shuffle_buffer=0, max_skip_fraction=0.9).slot_batches(0, 1, 6, _numbers_of, seed=0)
    with caplog.at_level(logging.WARNING):
        assert next(batches) == [0, 2, 0, 2, 0, 2]  # the good ones of the batch, in turn
    assert "unreadable image (first: shard-000000.tar key 000000001: " in caplog.text
    assert next(batches) == [2] * 6  # none good: the last good one before it
    assert next(batches) == [0, 2, 0, 2, 0, 2]  # the next epoch
    many = stream(write_shards(tmp_path / "many", shards=2, per_shard=6, bad={5}), max_skip_fraction=0.01)
    batches = many.slot_batches(0, 1, 500, len, seed=0)
    assert next(batches) == 500 and many.skips.total == 500  # 42 bad of 500 > 1 %, not checked yet
    with pytest.raises(DmclipError, match="samples are bad"):
        next(batches)


def test_a_reader_resumed_after_any_sample_count_continues_where_it_was(tmp_path):
    """Reader 1 of 2 over shards of 1, 2 and 4 samples reads one shard per epoch, so its epochs differ in size:
    started after n samples, it yields what the uninterrupted reader yields from its n-th sample on."""
    (tmp_path / "s").mkdir()
    number, shards = 0, []
    for s, size in enumerate((1, 2, 4)):
        members = []
        for _ in range(size):
            members += [(f"{number:09d}.png", png(number)), (f"{number:09d}.txt", f"caption {number}".encode())]
            number += 1
        shards.append(_tar(tmp_path / "s" / f"shard-{s:06d}.tar", members))

    def reader(start: int, before_batch=None):
        ds = WdsStream("s", shards, image_size=SIZE, shuffle_buffer=0)
        return ds.slot_batches(1, 2, 1, _numbers_of, seed=3, start=start, before_batch=before_batch)

    whole = reader(0)
    expected = [next(whole) for _ in range(14)]
    shard_of = [0, 1, 1, 2, 2, 2, 2]
    assert len({shard_of[n] for [n] in expected}) > 1  # epochs of more than one size
    for start in (1, 2, 3, 5, 8, 11):
        numbered = []
        resumed = reader(start, numbered.append)
        assert [next(resumed) for _ in range(14 - start)] == expected[start:], start
        assert numbered == list(range(start, 14)), start  # before_batch(n) gets the reader's batch number


def test_a_reader_of_shards_without_samples_says_so(tmp_path):
    import tarfile

    (tmp_path / "empty").mkdir()
    tarfile.open(tmp_path / "empty" / "shard-000000.tar", "w").close()
    ds = WdsStream("empty", [tmp_path / "empty" / "shard-000000.tar"], shuffle_buffer=0)
    with pytest.raises(DmclipError, match="reader 0 of 1 read no sample in epoch 0"):
        next(ds.slot_batches(0, 1, 2, len, seed=0))
    with pytest.raises(DmclipError, match="reader 0 found no samples in its shards of epoch 0"):
        next(ds.slot_batches(0, 1, 2, len, seed=0, start=4))
    with pytest.raises(DmclipError, match="reader 1 of 2 read no sample in epoch 0"):
        next(ds.slot_batches(1, 2, 2, len, seed=0))  # one shard for two readers: none left for the second
    bad = WdsStream("bad", [write_shards(tmp_path / "bad", 1, 3, bad={0, 1, 2}) / "shard-000000.tar"])
    with pytest.raises(DmclipError, match="reader 0 found no readable sample in its first batch"):
        next(bad.slot_batches(0, 1, 3, len, seed=0))
    with pytest.raises(DmclipError, match="shuffle_buffer=-1 is negative"):
        WdsStream("x", [], shuffle_buffer=-1)


def test_samples_are_counted_from_tar_headers_up_to_any_damage(tmp_path):
    """count_samples (what a resumed reader skips by): member groups sharing a key; folders and webdataset's
    __meta__ members are no samples; a shard cut short counts the samples before the cut."""
    import tarfile

    from dmclip.data.stream import count_samples

    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        folder = tarfile.TarInfo("images")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name in ["__meta__/info.json", "a.png", "a.txt", "images/b.png", "images/b.json", "c.seg.png", "c.txt", "d"]:
            data = name.encode() * 100
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert count_samples(shard) == 3  # a, images/b, c ("d" has no extension: no key)
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"images/b.json")])  # cut inside b's second header
    assert count_samples(cut) == 2


def test_a_sample_id_is_its_shard_file_name_and_key_hashed_to_63_bits():
    import hashlib

    from dmclip.data.stream import sample_index

    for key in (f"{n:09d}" for n in range(16, 24)):  # odd and even ids: every one of the 63 bits kept
        digest = hashlib.blake2b(f"shard-000003.tar/{key}".encode(), digest_size=8).digest()
        expected = int.from_bytes(digest, "little") % 2**63
        assert sample_index("/data/a/shard-000003.tar", key) == expected
        assert sample_index("s3://bucket/shard-000003.tar", key) == expected  # the folder is not part of it


def test_a_sample_without_image_or_with_an_empty_one_is_skipped_by_reason(tmp_path, caplog):
    import webdataset as wds

    (tmp_path / "odd").mkdir()
    with wds.TarWriter(str(tmp_path / "odd" / "shard-000000.tar")) as sink:
        sink.write({"__key__": "good", "png": png(3), "txt": "caption 3", "json": '{"caption": "from json"}'})
        sink.write({"__key__": "no-image", "txt": "caption 4"})
        sink.write({"__key__": "empty", "png": b"", "txt": "caption 5"})
    ds = stream(tmp_path / "odd", max_skip_fraction=1)
    with caplog.at_level(logging.WARNING):
        [sample] = list(ds)
    assert (sample["key"], sample["captions"], sample["image"].shape) == ("shard-000000.tar/good", ["from json"],
                                                                        (3, SIZE, SIZE))
    assert ds.skipped == {"missing-file": 1, "empty-file": 1}
    assert "missing file (first: shard-000000.tar key no-image: no image member)" in caplog.text
    assert "empty file (first: shard-000000.tar key empty)" in caplog.text
    sized = WdsStream("sized", [tmp_path / "odd" / "shard-000000.tar"], size=3)
    assert repr(sized) == "<WdsStream 'sized': 1 shards, 3 samples, 64 px>"
    assert next(iter(sized))["image"].shape == (3, 64, 64)
