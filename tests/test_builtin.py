"""The models shipped in the package (builtin:<name>). What a user would notice if this broke: `--teacher
builtin:world-vit` failing to load after a code change, or loading but no longer scoring what its run record
says (a silently changed architecture, tokenizer or preprocessing)."""

from __future__ import annotations

import json

import pytest

from dmclip.errors import DmclipError
from dmclip.models.refs import builtin_dir, builtin_names, load_model_ref


def test_world_vit_is_shipped_with_its_run_record():
    assert "world-vit" in builtin_names()
    path = builtin_dir("world-vit")
    for name in ("model.json", "model.safetensors", "run.json", "resolved.yaml", "results.json", "metrics.jsonl"):
        assert (path / name).is_file(), name
    assert json.loads((path / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin_names())
def test_builtin_model_still_scores_its_recorded_zero_shot_accuracy(name):
    """Re-score the shipped model on the set its run was scored on: within 0.25 points of results.json
    (summation order across thread counts may flip a handful of near-ties among 2000 images)."""
    from dmclip.evaluation import zero_shot_accuracy

    recorded = json.loads((builtin_dir(name) / "results.json").read_text())["zeroshot"]
    model = load_model_ref(f"builtin:{name}")
    now = zero_shot_accuracy(model, "world-zeroshot", batch_size=256)
    assert now["acc1"] == pytest.approx(recorded["acc1"], abs=0.0025)
    assert now["acc5"] == pytest.approx(recorded["acc5"], abs=0.0025)


def test_unknown_builtin_is_a_clear_error():
    with pytest.raises(DmclipError, match="no built-in model 'world-vt'") as error:
        load_model_ref("builtin:world-vt")
    assert "world-vit" in error.value.hint
