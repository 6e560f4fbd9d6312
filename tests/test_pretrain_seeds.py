"""`dmclip pretrain --seeds 0,1`: one run per seed in a sweep directory and a summary over the seeds.

What a user would notice if this broke: one run instead of one per seed, the same seed trained twice, a
summary whose mean or interval does not match the member runs' own results, or a traceback for a bad list.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers.cli import TINY_CLIP

from dmclip.cli.main import main
from dmclip.runs import RunDir

TINY = ["--data", "world-train:size=64", "--steps", "2", "--batch-size", "16", *TINY_CLIP,
        "--set", "train.warmup_steps=1", "--set", "train.progress=false",
        "--set", "eval.zeroshot=world-zeroshot:size=200"]


@pytest.mark.slow
def test_seeds_run_one_member_per_seed_and_summarise_them(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["pretrain", *TINY, "--seeds", "3,5,8", "--name", "tiny", "--runs-dir", str(runs)]) == 0
    (sweep,) = (runs / "pretrain").iterdir()
    assert sweep.name.endswith("-seeds-tiny")
    members = sorted((RunDir(p) for p in sweep.iterdir() if (p / "run.json").exists()), key=lambda r: r.info["seed"])
    assert [r.info["seed"] for r in members] == [3, 5, 8]
    assert all(r.info["status"] == "completed" for r in members)
    results = [r.results() for r in members]
    losses = [res["train"]["loss"] for res in results]
    assert len(set(losses)) == 3  # three seeds, three different trainings

    summary = json.loads((sweep / "summary.json").read_text())
    acc1 = np.array([res["zeroshot"]["acc1"] for res in results])
    assert [row["zero-shot acc@1"] for row in summary["rows"]] == pytest.approx(list(acc1))
    s = summary["seeds"]["zero-shot acc@1"]
    # by hand: mean, sample std, t_{0.975, 2 df} = 4.302653
    std = math.sqrt(((acc1 - acc1.mean()) ** 2).sum() / 2)
    assert s["mean"] == pytest.approx(acc1.mean())
    assert s["std"] == pytest.approx(std)
    assert s["high"] - s["mean"] == pytest.approx(4.302653 * std / math.sqrt(3), rel=1e-5)
    assert s["n"] == 3
    text = (sweep / "summary.md").read_text()
    assert f"{100 * acc1.mean():.2f} ± {100 * std:.2f}" in text
    # every other column of the runs' eval suite (the sets named in eval.*, Avg Perf), the first set named once
    assert [row["Avg Perf"] for row in summary["rows"]] == pytest.approx([res["eval"]["Avg Perf"] for res in results])
    assert "zero-shot: world-zeroshot" in text and not [c for c in summary["seeds"] if c.startswith("world-zeroshot")]
    assert "pretrain over seeds" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0,1", "--seed", "2"], "error: seed is given by an option and swept by --seeds"),
    (["--seeds", "0,-1"], "error: --seeds: seed = -1 is out of range"),
    (["--seeds", "1,1"], "error: --seeds '1,1' repeats 1"),
    (["--seeds", "0,x"], "error: --seeds: seed = 'x' has the wrong type: expected int"),
    (["--seeds", "0,1", "--resume", "somewhere"], "error: --resume continues one run, not a sweep"),
])
def test_bad_seed_lists_are_one_line_errors_and_create_nothing(tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    assert main(["pretrain", *args, "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (runs / "pretrain").exists()


def test_one_seed_in_the_list_is_a_plain_run(tmp_path):
    runs = tmp_path / "runs"
    assert main(["pretrain", *TINY[:-2], "--set", "eval.each_run=false", "--seeds", "4", "--runs-dir", str(runs)]) == 0
    (run,) = (runs / "pretrain").iterdir()
    assert "-seeds-" not in run.name and RunDir(run).info["seed"] == 4
