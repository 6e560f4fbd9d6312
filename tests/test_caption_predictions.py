"""`dmclip eval caption --predictions FILE`: captions in COCO results format scored like generated ones.

What a user would notice if this broke: other numbers for the same captions than `eval caption` gives when it
writes them itself, or a file with a missing, repeated or foreign image id scored anyway (or a traceback).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from dmclip.cli.main import main
from dmclip.data import build_dataset
from dmclip.runs import find_runs

DATA = "world-retrieval-a:size=12"
LIMIT = 8


def _caption(tmp_path: Path, *argv: str) -> dict:
    runs = tmp_path / "runs"
    before = {r.path for r in find_runs(runs)}
    assert main(["eval", "caption", "--data", DATA, "--limit", str(LIMIT), "--runs-dir", str(runs), *argv]) == 0
    [run] = [r for r in find_runs(runs) if r.path not in before]
    return {"results": run.results(), "captions": json.loads((run.path / "captions.json").read_text()),
            "path": run.path}


def _same(a: dict, b: dict) -> bool:
    """Equal metrics; NaN (METEOR skipped) is null in results.json."""
    def plain(m: dict) -> dict:
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in m.items()}

    return plain(a) == plain(b)


@pytest.mark.requires_java
def test_the_models_own_captions_score_the_same_from_a_file(blip_dir, tmp_path):
    generated = _caption(tmp_path, "--model", f"run:{blip_dir}", "--method", "nucleus", "--seed", "1")
    assert [c["image_id"] for c in generated["captions"]] == list(range(LIMIT))
    shuffled = tmp_path / "predictions.json"  # the order of a results file does not matter
    shuffled.write_text(json.dumps(generated["captions"][::-1]))
    scored = _caption(tmp_path, "--predictions", str(shuffled))
    assert _same(scored["results"]["metrics"], generated["results"]["metrics"])
    for key in ("dataset", "task", "language", "notes"):
        assert scored["results"][key] == generated["results"][key], key
    assert scored["results"]["details"] == {"num_images": LIMIT, "predictions": str(shuffled)}
    assert scored["captions"] == generated["captions"]  # re-written in image order


@pytest.mark.requires_java
def test_the_files_captions_are_what_is_scored(blip_dir, tmp_path):
    """A reference caption per image as the prediction: the scores of those captions (BLEU-1 of 1: each
    prediction is one of its own references), not the model's."""
    from dmclip.metrics.caption import caption_metrics

    dataset = build_dataset(DATA)
    references = {i: list(dataset.captions(i)) for i in range(LIMIT)}
    predictions = tmp_path / "references.json"
    predictions.write_text(json.dumps([{"image_id": i, "caption": refs[0]} for i, refs in references.items()]))
    scored = _caption(tmp_path, "--predictions", str(predictions), "--no-meteor", "--model", "first-reference")
    expected = caption_metrics(references, {i: refs[0] for i, refs in references.items()}, meteor=False)
    assert _same(scored["results"]["metrics"], expected)
    assert scored["results"]["metrics"]["bleu1"] == pytest.approx(1.0)
    assert scored["results"]["model"] == "first-reference"
    assert scored["results"]["notes"] == ["METEOR skipped (--no-meteor)"]


def _entries(n: int = LIMIT) -> list[dict]:
    return [{"image_id": i, "caption": f"a shape number {i}"} for i in range(n)]


@pytest.mark.parametrize("content, message, hint", [
    ('[{"image_id": 0, "caption": "a red circle"},', "is not valid JSON (line 1, column 45: Expecting value)",
     "write a COCO results file"),
    (json.dumps({"0": "a red circle"}), "holds a JSON dict, not a list of results", "write a COCO results file"),
    (json.dumps(_entries()[:5]), "3 of 8 images have no caption (e.g. image_id 5)", "--limit N"),
    (json.dumps(_entries() + [{"image_id": 3, "caption": "again"}]), "image_id 3 appears twice (entries 3 and 8)",
     "one caption per image"),
    (json.dumps(_entries() + [{"image_id": 8, "caption": "x"}]),
     "image_id 8 (entry 8) is out of range: world-retrieval-a:size=12 has 12 images and --limit scores the first 8 "
     "(ids 0..7)", "0-based"),
    (json.dumps(_entries()[:7] + [{"image_id": -1, "caption": "x"}]), "image_id -1 (entry 7) is out of range",
     "0-based"),
    (json.dumps(_entries()[:7] + [{"image_id": "7", "caption": "x"}]), "entry 7 has image_id '7', not a whole number",
     "sample indices"),
    (json.dumps(_entries()[:7] + [{"image_id": 7, "caption": None}]), "entry 7 (image_id 7) has caption None",
     "write a COCO results file"),
    (json.dumps(_entries()[:7] + [{"id": 7, "caption": "x"}]), "entry 7 is not an object with image_id and caption",
     "write a COCO results file"),
])
def test_bad_prediction_files_are_one_line_errors_before_a_run_exists(tmp_path, capsys, content, message, hint):
    path = tmp_path / "predictions.json"
    path.write_text(content)
    runs = tmp_path / "runs"
    assert main(["eval", "caption", "--predictions", str(path), "--data", DATA, "--limit", str(LIMIT),
                 "--runs-dir", str(runs)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("error:", "hint:"))]
    assert len(lines) == 2 and message in lines[0] and hint in lines[1], lines
    assert not find_runs(runs)


def test_missing_file_and_no_captioner_are_one_line_errors(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(["eval", "caption", "--predictions", str(tmp_path / "nope.json"), "--runs-dir", str(runs)]) == 2
    assert f"error: predictions file '{tmp_path / 'nope.json'}' does not exist" in capsys.readouterr().err
    assert main(["eval", "caption", "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err
    assert "error: eval caption needs a captioner or captions to score" in err
    assert "hint: pass --model run:<BLIP run>, or --predictions FILE (COCO results format)" in err
    assert not find_runs(runs)
