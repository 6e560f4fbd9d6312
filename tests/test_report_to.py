"""`--report-to tensorboard,wandb`: the rows of metrics.jsonl and the results, read back from the dashboards'
own files (TensorBoard's EventAccumulator; W&B's offline run log, record by record).

What a user would notice if this broke: a TensorBoard curve that is not the run's loss, a W&B run with no
history, a traceback when the package is missing, or two writers (one per rank) under torchrun.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import TINY_CLIP
from helpers.torchrun import torchrun_dmclip

from dmclip.cli.main import main
from dmclip.runs import RunDir, find_runs

TINY = ["--data", "world-train:size=48", "--steps", "4", "--batch-size", "16", *TINY_CLIP,
        "--set", "train.warmup_steps=1", "--set", "train.progress=false", "--set", "train.log_every=1",
        "--set", "eval.zeroshot=world-zeroshot:size=40"]
needs_tensorboard = pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                                       reason="pip install -e '.[dashboards]' (tensorboard)")
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="pip install -e '.[dashboards]' (wandb)")


def _pretrain(tmp_path: Path, *extra: str) -> RunDir:
    assert main(["pretrain", *TINY, "--runs-dir", str(tmp_path / "runs"), *extra]) == 0
    [run] = find_runs(tmp_path / "runs", "pretrain")
    return run


def _events(run: RunDir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list((run.path / "tensorboard").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(run.path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return files, accumulator


def _wandb_records(path: Path):
    """The records of a W&B offline run file (run-<id>.wandb): a 7-byte header (":W&B", magic, version), then
    LevelDB's log format (32 KiB blocks of [crc32c, length, type] + data chunks), each record a protobuf."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, or LAST of FIRST/MIDDLE.../LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


@needs_tensorboard
def test_tensorboard_has_every_logged_row_and_the_results(tmp_path):
    run = _pretrain(tmp_path, "--report-to", "tensorboard")
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    files, events = _events(run)
    assert len(files) == 1
    for key in ("loss", "contrastive", "lr", "grad_norm", "samples_per_s", "epoch"):
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [r["step"] for r in rows], key
        # TensorBoard keeps float32: each value is metrics.jsonl's, rounded to float32
        assert [e.value for e in scalars] == [float(np.float32(r[key])) for r in rows], key
    results = run.results()
    [acc1] = events.Scalars("results/zeroshot/acc1")
    assert (acc1.step, acc1.value) == (4, float(np.float32(results["zeroshot"]["acc1"])))
    assert events.Scalars("results/train/loss")[0].value == float(np.float32(results["train"]["loss"]))
    [text] = events.Tensors("results/text_summary")  # the whole results.json as a text summary
    assert json.loads(text.tensor_proto.string_val[0].decode().strip("`\n")) == results
    assert not (run.path / "wandb").exists()


@needs_wandb
def test_wandb_offline_run_has_the_history_the_summary_and_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = _pretrain(tmp_path, "--report-to", "wandb", "--seed", "3")
    [log] = list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))
    history, summary, config = [], {}, {}
    for record in _wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            config.update(_items(record.run.config.update))
        elif kind == "config":
            config.update(_items(record.config.update))
    rows = run.metrics()
    assert [h["_step"] for h in history] == [r["step"] for r in rows]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows], rel=1e-12)
    assert [h["lr"] for h in history] == pytest.approx([r["lr"] for r in rows], rel=1e-12)
    results = run.results()
    assert summary["results/zeroshot/acc1"] == pytest.approx(results["zeroshot"]["acc1"])
    assert summary["results/train/steps"] == 4
    assert config["seed"] == 3 and config["train"]["report_to"] == ["wandb"]  # resolved.yaml


@needs_tensorboard
@needs_wandb
def test_both_dashboards_from_a_recipe_list(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  report_to: [tensorboard, wandb]\n")
    run = _pretrain(tmp_path, str(recipe))
    files, events = _events(run)
    assert len(files) == 1 and len(events.Scalars("loss")) == 4
    assert list((run.path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_an_unknown_dashboard_is_refused_before_a_run_exists(tmp_path, capsys):
    assert main(["pretrain", *TINY, "--runs-dir", str(tmp_path / "runs"), "--report-to", "tensorbord"]) == 2
    err = capsys.readouterr().err
    assert "error: train.report_to: 'tensorbord' is not a dashboard dmclip writes" in err
    assert "hint: use tensorboard and/or wandb, e.g. --report-to tensorboard,wandb (did you mean 'tensorboard'?)" in err
    assert not find_runs(tmp_path / "runs")


@pytest.mark.parametrize("command", ["pretrain", "distill", "capfilt"])
def test_a_missing_package_names_the_pip_extra(tmp_path, capsys, monkeypatch, command):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main([command, "--report-to", "tensorboard,wandb", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "error: --report-to wandb needs the wandb package, which is not installed" in err
    assert "hint: pip install -e '.[dashboards]' (or pip install wandb)" in err
    assert not find_runs(tmp_path / "runs")


def test_a_missing_package_in_a_recipe_fails_the_run_before_training(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert main(["pretrain", *TINY, "--runs-dir", str(tmp_path / "runs"), "--set", "train.report_to=[tensorboard]"]) == 2
    assert "hint: pip install -e '.[dashboards]'" in capsys.readouterr().err
    assert find_runs(tmp_path / "runs", "pretrain") == []  # it failed before training: no run directory left


@needs_tensorboard
@pytest.mark.slow
def test_under_torchrun_only_rank_0_writes_the_dashboard(tmp_path):
    argv = ["pretrain", *TINY, "--set", "eval.each_run=false", "--report-to", "tensorboard", "--runs-dir",
            str(tmp_path / "runs")]
    done = torchrun_dmclip(argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    [run] = find_runs(tmp_path / "runs", "pretrain")
    files, events = _events(run)
    assert len(files) == 1, files  # one writer: rank 0
    assert [e.value for e in events.Scalars("loss")] == [float(np.float32(r["loss"])) for r in run.metrics()]
