"""A recipe's `sweep:` block: the same sweep as `dmclip distill --alpha 0,0.5,1`.

What a user would notice if this broke: a sweep recipe silently training one student (or the wrong alphas),
a typo in `sweep:` ignored or answered with a traceback, `--alpha` not overriding the recipe, or a sweep's
resolved.yaml that no longer runs the same sweep when passed back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from helpers.cli import TINY_CLIP

from dmclip.cli.main import main
from dmclip.config import load_config, to_yaml
from dmclip.distill import COMMAND, DistillConfig
from dmclip.errors import DmclipError
from dmclip.runner import plan, sweep_yaml
from dmclip.runs import RunDir, find_runs

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TEACHER = {"teacher": "run:/teachers/tiny"}  # an explicit teacher: resolution needs no pretrain run
PLAIN = "student:\n  name: mamba-nano\ntrain:\n  steps: 7\n"


def _recipe(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _plan(recipe: Path | None, alpha: str | None = None, shortcuts: dict = TEACHER, seeds: str | None = None,
          sets: list[str] | None = None):
    return plan(COMMAND, recipe=recipe, sets=sets, shortcuts=shortcuts, sweep={"alpha": alpha, "seeds": seeds})


def _members(recipe: Path | None, alpha: str | None, shortcuts: dict = TEACHER,
             seeds: str | None = None) -> list[DistillConfig]:
    """What `dmclip distill <recipe> [--alpha ...] [--seeds ...]` would train, resolved as the command does."""
    planned = _plan(recipe, alpha, shortcuts, seeds)
    return [config for _, config in planned.members] or [planned.base]


def _swept_alphas(recipe: Path | None, alpha: str | None = None) -> list[float] | None:
    """The alphas of a sweep (None: one run)."""
    return _plan(recipe, alpha).swept.get("alpha")


# ------------------------------------------------------------------------------------------ resolution


def test_recipe_sweep_resolves_to_the_members_of_the_alpha_option(tmp_path):
    swept = _recipe(tmp_path, PLAIN + "sweep:\n  alpha: [0.0, 0.5, 1.0]\n", "swept.yaml")
    plain = _recipe(tmp_path, PLAIN, "plain.yaml")
    assert _swept_alphas(swept) == _swept_alphas(plain, "0,0.5,1") == [0.0, 0.5, 1.0]
    from_recipe, from_option = _members(swept, None), _members(plain, "0,0.5,1")
    assert [cfg.loss.alpha for cfg in from_recipe] == [0.0, 0.5, 1.0]
    assert from_recipe == from_option
    assert {cfg.train.steps for cfg in from_recipe} == {7}  # the rest of the recipe still applies


def test_the_example_sweep_recipe_is_the_demo_recipe_with_alpha_and_seeds_options():
    """docs/distill.md: recipes/distill-alpha-sweep.yaml = recipes/distill-demo.yaml --alpha 0,0.75 --seeds 0,1,2."""
    from_recipe = _members(RECIPES / "distill-alpha-sweep.yaml", None, shortcuts={})
    from_option = _members(RECIPES / "distill-demo.yaml", "0,0.75", shortcuts={}, seeds="0,1,2")
    assert len(from_recipe) == 6 and from_recipe == from_option
    assert [(c.loss.alpha, c.seed) for c in from_recipe] == [(a, s) for a in (0.0, 0.75) for s in (0, 1, 2)]


def test_seeds_in_a_recipe_and_their_errors(tmp_path):
    swept = _recipe(tmp_path, PLAIN + "sweep:\n  alpha: [0.0, 1.0]\n  seeds: [4, 5]\n")
    assert [(c.loss.alpha, c.seed) for c in _members(swept, None)] == [(0.0, 4), (0.0, 5), (1.0, 4), (1.0, 5)]
    assert [(c.loss.alpha, c.seed) for c in _members(swept, "0.5", seeds="7")] == [(0.5, 7)]
    for bad, message in (("[1, -1]", "sweep.seeds[1]: seed = -1 is out of range"),
                         ("[0.5]", "sweep.seeds[0]: seed = 0.5 has the wrong type: expected int"),
                         ("[1, 1]", "sweep.seeds repeats 1")):
        broken = _recipe(tmp_path, PLAIN + f"sweep:\n  seeds: {bad}\n", "bad.yaml")
        with pytest.raises(DmclipError, match=re.escape(message)):
            _members(broken, None)


def test_alpha_option_overrides_the_recipe_sweep(tmp_path, caplog):
    caplog.set_level("INFO", logger="dmclip")
    swept = _recipe(tmp_path, PLAIN + "loss:\n  alpha: 0.3\nsweep:\n  alpha: [0.0, 0.5, 1.0]\n")
    one = _plan(swept, "0.25")
    assert one.swept == {} and one.base.loss.alpha == 0.25  # one value: one ordinary run
    assert _swept_alphas(swept, "0,1") == [0.0, 1.0]
    assert "overrides the recipe's sweep.alpha" in caplog.text
    assert _swept_alphas(swept) == [0.0, 0.5, 1.0]  # the sweep wins over the recipe's loss.alpha
    plain = _plan(_recipe(tmp_path, PLAIN))
    assert plain.swept == {} and plain.base.loss.alpha == DistillConfig().loss.alpha  # no sweep anywhere: one run


def test_one_item_recipe_sweep_is_one_run_like_one_alpha(tmp_path):
    one = _recipe(tmp_path, PLAIN + "sweep:\n  alpha: [0.5]\n")
    assert _members(one, None) == _members(_recipe(tmp_path, PLAIN, "plain.yaml"), "0.5")
    assert _plan(one).swept == {} and _plan(one).base.loss.alpha == 0.5
    # the single-run path loads the recipe itself: the sweep: block must not reach the config as a key
    cfg, _ = load_config(DistillConfig, one, [], {"loss.alpha": 0.5})
    assert cfg.loss.alpha == 0.5


def test_sweep_resolved_yaml_runs_the_same_sweep_and_a_member_one_run(tmp_path):
    recipe = _recipe(tmp_path, PLAIN + "seed: 3\nsweep:\n  alpha: [0.0, 1.0]\n")
    planned = _plan(recipe, sets=["train.lr=0.002"], shortcuts={**TEACHER, "student.name": "vit-nano"})
    members = [config for _, config in planned.members]
    resolved = _recipe(tmp_path, sweep_yaml(COMMAND, planned), "resolved.yaml")
    again = plan(COMMAND, recipe=resolved)  # no --set, no shortcuts: all of it is in the file
    assert again.swept == {"alpha": [0.0, 1.0]} and [config for _, config in again.members] == members
    member = _recipe(tmp_path, "command: distill\n" + to_yaml(members[1]), "member.yaml")
    assert _plan(member, shortcuts={}).swept == {}
    assert load_config(DistillConfig, member)[0] == members[1]


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("text, error, hint", [
    ("sweep:\n  alfa: [0.0, 1.0]\n", "recipe r.yaml: unknown sweep key 'alfa'", "did you mean 'alpha'?"),
    ("sweep:\n  loss.alpha: [0.0, 1.0]\n", "recipe r.yaml: unknown sweep key 'loss.alpha'", "did you mean 'alpha'?"),
    ("sweep:\n  alpha: []\n", "recipe r.yaml: sweep.alpha is an empty list",
     "list the values to run, e.g. sweep: {alpha: [0.0, 0.75], seeds: [0, 1, 2]}"),
    ("sweep:\n  alpha: 0.5\n", "recipe r.yaml: sweep.alpha = 0.5 is not a list",
     "list the values to run, e.g. sweep: {alpha: [0.0, 0.75], seeds: [0, 1, 2]}; one value without a sweep goes in loss.alpha"),
    ("sweep:\n  alpha: 0,1\n", "recipe r.yaml: sweep.alpha = '0,1' is not a list", "list the values to run, ..."),
    ("sweep: [0.0, 1.0]\n", "recipe r.yaml: sweep must map a field to its list of values, got [0.0, 1.0]",
     "write e.g. sweep: {alpha: [0.0, 0.75], seeds: [0, 1, 2]}"),
    ("sweep:\n", "recipe r.yaml: sweep must map a field to its list of values, got None", "write e.g. ..."),
    ("sweep:\n  alpha: [0.0, 1.5]\n", "recipe r.yaml: sweep.alpha[1]: loss.alpha = 1.5 is out of range",
     "loss.alpha must be between 0.0 and 1.0"),
    ("sweep:\n  alpha: [0.0, high]\n", "recipe r.yaml: sweep.alpha[1]: loss.alpha = 'high' has the wrong type: expected "
     "float", "set loss.alpha to a value of type float"),
    ("sweep:\n  alpha: [true]\n", "recipe r.yaml: sweep.alpha[0]: loss.alpha = True has the wrong type: expected float",
     "set loss.alpha to a value of type float"),
    ("sweep:\n  alpha: [0.5, 0.5]\n", "recipe r.yaml: sweep.alpha repeats 0.5", "list each sweep point once"),
])
def test_bad_sweep_block_is_one_error_line_with_a_hint(text, error, hint, tmp_path, capsys):
    runs = tmp_path / "runs"
    code = main(["distill", str(_recipe(tmp_path, PLAIN + text)), "--runs-dir", str(runs)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "hint:"))]
    assert code == 2
    assert lines[0] == f"error: {error}"
    assert lines[1] == f"hint: {hint}" or (hint.endswith("...") and lines[1].startswith(f"hint: {hint[:-3]}"))
    assert len(lines) == 2 and not runs.exists()  # refused before any run directory


def test_a_bad_recipe_sweep_is_refused_even_when_alpha_overrides_it(tmp_path, capsys):
    recipe = _recipe(tmp_path, PLAIN + "sweep:\n  alfa: [0.0, 1.0]\n")
    assert main(["distill", str(recipe), "--alpha", "0.5", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "unknown sweep key 'alfa'" in capsys.readouterr().err


def test_alpha_option_repeating_a_value_is_refused(tmp_path, capsys):
    assert main(["distill", "--alpha", "0,0.5,0", "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "error: --alpha '0,0.5,0' repeats 0" in err and "hint: list each sweep point once" in err


def test_set_cannot_reach_the_sweep_block(tmp_path, capsys):
    """sweep: is recipe-level, not a config field; on the command line the sweep is --alpha."""
    assert main(["distill", "--set", "sweep.alpha=[0,1]", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "unknown config key 'sweep'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ end to end

TINY_DATA = "world-train:size=96"
TINY_PRETRAIN = [*TINY_CLIP, "--set", "train.warmup_steps=1", "--set", "train.progress=false",
                 "--set", "eval.each_run=false"]


@pytest.mark.slow
def test_recipe_sweep_end_to_end_writes_the_alpha_sweep_layout(tmp_path):
    teachers = tmp_path / "teachers"
    assert main(["pretrain", "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir", str(teachers),
                 "--name", "tiny-teacher", *TINY_PRETRAIN]) == 0
    (teacher,) = find_runs(teachers, "pretrain")
    recipe = _recipe(tmp_path, f"teacher: run:{teacher.path}\nstudent:\n  name: mamba-tiny-test\n"
                               f"data:\n  train: {TINY_DATA}\ntrain:\n  steps: 2\n  batch_size: 16\n  progress: false\n"
                               "eval:\n  each_run: false\n  latency: false\nsweep:\n  alpha: [0.0, 1.0]\n")
    runs = tmp_path / "runs"
    assert main(["distill", str(recipe), "--runs-dir", str(runs)]) == 0

    (sweep,) = (runs / "distill").iterdir()
    assert "-sweep-alpha" in sweep.name  # the directory `--alpha 0,1` makes
    members = sorted(p for p in sweep.iterdir() if (p / "run.json").exists())
    assert sorted("-".join(m.name.split("-")[2:4]) for m in members) == ["distill-alpha0", "distill-alpha1"]
    assert sorted(json.loads((m / "results.json").read_text())["alpha"] for m in members) == [0.0, 1.0]
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["teacher", "student alpha=0", "student alpha=1"]

    trained = sorted((RunDir(m).resolved_config(DistillConfig) for m in members), key=lambda c: c.loss.alpha)
    assert _members(recipe, "0,1", {}) == trained  # what `--alpha 0,1` resolves to is what was trained
    again = plan(COMMAND, recipe=sweep / "resolved.yaml")  # resolved.yaml repeats the sweep
    assert again.swept == {"alpha": [0.0, 1.0]} and [config for _, config in again.members] == trained
    assert "RQ2" not in (sweep / "summary.md").read_text()  # eval.latency: false
