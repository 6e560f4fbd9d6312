"""`dmclip capfilt`: the filter's arithmetic against hand cases, the written dataset, resume, bad input.

The model is a tiny randomly initialised BLIP saved into tmp_path (no training): its captions are word
salad and its ITM scores hover near 0.5, which is all these tests need — they check what capfilt does with
captions and scores, not how good they are (docs/results-blip-capfilt.md has the experiment).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dmclip.capfilt import pipeline
from dmclip.capfilt.config import CapfiltConfig
from dmclip.capfilt.scoring import calibrated_threshold, score_batch, score_clean_pairs, select_kept
from dmclip.cli.main import main
from dmclip.config import load_config
from dmclip.data import build_dataset
from dmclip.errors import DmclipError
from dmclip.metrics.filtering import noise_removal_metrics, precision_recall_curve
from dmclip.runs import RunDir

DATA = "world-noisy:size=24"


# ------------------------------------------------------------------------------- pure functions


def test_threshold_keeps_scores_at_or_above_it():
    kept, threshold = select_kept([0.2, 0.5, 0.7, 0.49999], threshold=0.5)
    assert kept.tolist() == [False, True, True, False] and threshold == 0.5


def test_keep_fraction_keeps_exactly_that_many_of_the_best_scores_whatever_the_threshold():
    scores = [0.5, 0.9, 0.5, 0.1, 0.5]
    kept, threshold = select_kept(scores, threshold=0.95, keep_fraction=0.4)
    assert kept.tolist() == [True, True, False, False, False]  # 2 of 5; the tie at 0.5 goes to the earlier pair
    assert threshold == 0.5
    assert select_kept(scores, keep_fraction=1.0)[0].all()
    assert select_kept(scores, keep_fraction=0.01)[0].sum() == 0  # round(0.05) = 0


# ----------------------------------------------------------------------------------- the command


def _config(blip_dir: Path, out: Path, **sets) -> CapfiltConfig:
    base = {"model": f"run:{blip_dir}", "data": DATA, "progress": False, "batch_size": 5,
            "output.out": str(out), "output.shard_size": 8, "captioner.num_captions": 2,
            "captioner.min_length": 2, "captioner.max_length": 6}
    config, _ = load_config(CapfiltConfig, None, [], {**base, **sets})
    return config


def _run(config, tmp_path: Path) -> dict:
    run = RunDir.create("capfilt", "test", config, root=tmp_path / "runs")
    with run.active():
        return pipeline.run(config, run)


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_output_dataset_loads_back_with_exactly_the_kept_captions(blip_dir, tmp_path):
    out = tmp_path / "boot"
    result = _run(_config(blip_dir, out, **{"filter.keep_fraction": 0.5}), tmp_path)
    manifest = _manifest(out)
    assert [s["index"] for s in manifest] == list(range(24))
    sources = [c["source"] for s in manifest for c in s["captions"]]
    assert sources.count("web") == 24 and 24 <= sources.count("synthetic") <= 48  # 2 per image, deduplicated
    kept = {s["image"]: [c["text"] for c in s["captions"] if c["kept"]] for s in manifest}
    assert sum(map(len, kept.values())) == round(0.5 * len(sources))
    assert result["dataset"] == f"csv:{out / 'captions.csv'}"
    ds = build_dataset(result["dataset"], image_size=32)
    assert len(ds) == sum(1 for texts in kept.values() if texts)
    for i in range(len(ds)):
        name = str(Path(ds.sources[i][1]).relative_to(out)) if hasattr(ds, "sources") else None
        texts = ds.captions(i)
        assert any(sorted(texts) == sorted(v) for v in kept.values()) if name is None else sorted(texts) == sorted(
            kept[name])
    # pixels survive exactly, and the stored ITM score is the filter's score for that pair
    source = build_dataset(DATA, image_size=32)
    from dmclip.models.refs import load_model_ref

    model = load_model_ref(f"run:{blip_dir}")
    sample = manifest[3]
    image = source[3]["image"]
    assert torch.equal(torch.from_numpy(np.array(__import__("PIL.Image").Image.open(out / sample["image"])))
                       .permute(2, 0, 1), image)
    texts = [c["text"] for c in sample["captions"]]
    with torch.inference_mode():
        expected = model.itm_score(image[None].float().div(255).expand(len(texts), -1, -1, -1), model.tokenize(texts))
    assert [c["itm"] for c in sample["captions"]] == pytest.approx(expected.tolist(), abs=1e-5)
    # world-noisy knows the truth: the report scores the filter with it
    web = [c for s in manifest for c in s["captions"] if c["source"] == "web"]
    truth = noise_removal_metrics([c["noisy"] for c in web], [not c["kept"] for c in web])
    assert result["noise_removal"]["precision"] == truth["precision"]
    assert result["counts"]["web"]["total"] == 24
    assert sum(result["counts"][s]["kept"] for s in ("web", "synthetic")) == sum(map(len, kept.values()))


def test_an_interrupted_run_resumes_without_duplicates_and_matches_an_uninterrupted_one(blip_dir, tmp_path,
                                                                                          monkeypatch):
    whole = tmp_path / "whole"
    _run(_config(blip_dir, whole), tmp_path)

    out = tmp_path / "interrupted"
    real, calls = pipeline.process_shard, []

    def interrupt_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:  # the first shard is committed, the second is half done (images written)
            (args[6] / "images").mkdir(exist_ok=True)
            (args[6] / "images" / "00000008.png").write_bytes(b"half")
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "process_shard", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        _run(_config(blip_dir, out), tmp_path)
    assert sorted(p.name for p in (out / "shards").glob("*.json")) == ["shard-000000.json"]
    monkeypatch.setattr(pipeline, "process_shard", real)

    result = _run(_config(blip_dir, out), tmp_path)
    assert result["shards"] == {"total": 3, "resumed": 1, "processed": 2}
    manifest = _manifest(out)
    assert [s["index"] for s in manifest] == list(range(24))  # every sample once
    assert manifest == _manifest(whole)  # same captions (seeded per shard), same scores
    assert (out / "captions.csv").read_text() == (whole / "captions.csv").read_text()
    rows = (out / "captions.csv").read_text().splitlines()[1:]
    assert len(rows) == len(set(rows))

    # a third run changes nothing and only re-filters the stored scores
    again = _run(_config(blip_dir, out, **{"filter.threshold": 0.0}), tmp_path)
    assert again["shards"] == {"total": 3, "resumed": 3, "processed": 0}
    assert all(c["kept"] for s in _manifest(out) for c in s["captions"])
    # a filter that keeps nothing says so (an under-trained ITM head scores everything near its prior)
    nothing = _run(_config(blip_dir, out, **{"filter.threshold": 1.0}), tmp_path)
    assert nothing["images"]["with_kept_captions"] == 0 and "kept no pair" in nothing["warnings"][0]
    assert (out / "captions.csv").read_text().strip() == "filepath,caption"


def test_a_rerun_with_other_caption_settings_is_refused_a_larger_limit_continues(blip_dir, tmp_path):
    out = tmp_path / "boot"
    _run(_config(blip_dir, out, limit=8), tmp_path)
    with pytest.raises(DmclipError, match="captioner"):
        _run(_config(blip_dir, out, limit=8, **{"captioner.num_captions": 1}), tmp_path)
    # a larger --limit is the same dataset, continued: the committed shard is kept, the rest added
    grown = _run(_config(blip_dir, out, limit=20), tmp_path)
    assert grown["shards"] == {"total": 3, "resumed": 1, "processed": 2}
    assert [s["index"] for s in _manifest(out)] == list(range(20))


def test_webdataset_output_loads_back(blip_dir, tmp_path):
    out = tmp_path / "boot"
    result = _run(_config(blip_dir, out, limit=10, **{"output.format": "wds", "filter.threshold": 0.0}), tmp_path)
    ds = build_dataset(result["dataset"], image_size=32)
    manifest = _manifest(out)
    assert len(ds) == 10
    assert [sorted(ds.captions(i)) for i in range(10)] == [sorted(c["text"] for c in s["captions"]) for s in manifest]


def test_webdataset_shards_hold_the_kept_pairs_and_read_back_as_the_csv_dataset(blip_dir, tmp_path):
    import tarfile

    out = tmp_path / "boot"
    config = _config(blip_dir, out, limit=10, **{"output.format": "wds", "output.shard_size": 4,
                                                 "filter.keep_fraction": 0.5})
    result = _run(config, tmp_path)
    kept = [s for s in _manifest(out) if any(c["kept"] for c in s["captions"])]
    # per kept image: its exact PNG file and a json of its kept captions; images without one are left out
    expected = {}
    for sample in kept:
        key = f"{sample['index']:08d}"
        expected[f"{key}.png"] = (out / sample["image"]).read_bytes()
        expected[f"{key}.json"] = json.dumps({"captions": [c["text"] for c in sample["captions"] if c["kept"]],
                                              "index": sample["index"]}).encode()
    shards = sorted((out / "wds").glob("shard-*.tar"))
    assert len(shards) == -(-len(kept) // 4) and [p.name for p in shards][0] == "shard-000000.tar"
    members = {}
    for path in shards:
        with tarfile.open(path) as tar:
            assert len(tar.getmembers()) <= 2 * 4  # shard_size images per shard
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    assert members == expected
    # the wds: reader gives the same images and captions as the csv: dataset written beside it
    shards_ds = build_dataset(result["dataset"], image_size=32)
    csv_ds = build_dataset(f"csv:{out / 'captions.csv'}", image_size=32)
    assert len(shards_ds) == len(csv_ds) == len(kept)
    for i in range(len(kept)):
        assert torch.equal(shards_ds[i]["image"], csv_ds[i]["image"])
        assert sorted(shards_ds.captions(i)) == sorted(csv_ds.captions(i))
    # a rerun (it only re-filters) writes the same bytes
    before = [p.read_bytes() for p in shards]
    _run(config, tmp_path)
    assert [p.read_bytes() for p in sorted((out / "wds").glob("shard-*.tar"))] == before


def test_cli_writes_report_results_and_curve(blip_dir, tmp_path, capsys, plot_pixels):
    out = tmp_path / "data" / "bootstrapped"  # a fresh clone has no data/: capfilt makes it
    code = main(["capfilt", "--model", f"run:{blip_dir}", "--data", "world-noisy:size=16", "--out", str(out),
                 "--num-captions", "1", "--max-length", "6", "--min-length", "2", "--runs-dir", str(tmp_path / "runs"),
                 "--set", "progress=false", "--shard-size", "8"])
    assert code == 0
    run = RunDir(next((tmp_path / "runs" / "capfilt").iterdir()))
    assert run.info["status"] == "completed"
    results = run.results()
    assert set(results["counts"]) == {"web", "synthetic"} and results["counts"]["web"]["total"] == 16
    assert {"precision", "recall"} <= set(results["noise_removal"]) and results["pr_curve"]["thresholds"]
    colours = plot_pixels(run.path / "pr_curve.png", size=(576, 480))  # 4.8 x 4.0 in at 120 dpi
    assert colours["C0"] > 300  # the precision-recall curve is drawn, not only its legend entry
    report = (run.path / "report.md").read_text()
    assert "precision" in report and "| web | 16 |" in report
    noise, ap = results["noise_removal"], results["pr_curve"]["average_precision"]  # fractions in the file ...
    assert f"noisy web captions {100 * noise['noisy_fraction_before']:.1f} % before" in report  # ... percent here
    assert f"Average precision over thresholds: {100 * ap:.1f} %" in report
    assert "dataset: csv:" in capsys.readouterr().out.replace("\n", "")


def _tiny_clip(tmp_path: Path) -> Path:
    from dmclip.data.tokenizer import Tokenizer
    from dmclip.models.base import build_model, save_model
    from dmclip.models.clip import clip_arch

    tokenizer = Tokenizer.fit(["a red circle"], 16).to_dict()
    model = build_model(clip_arch(32, 8, 32, 1, 2, 32, 1, 2, 32, tokenizer))
    return save_model(model, tmp_path / "clip")


def test_cli_refuses_a_clip_model_in_one_line_with_exit_code_2(tmp_path, capsys):
    clip = _tiny_clip(tmp_path)
    code = main(["capfilt", "--model", f"run:{clip}", "--data", DATA, "--out", str(tmp_path / "boot"),
                 "--runs-dir", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "ITM head" in error_lines[0] and "caption decoder" in error_lines[0] and "clip" in error_lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "boot").exists()


def test_calibrated_threshold_keeps_at_least_that_fraction_of_clean_scores():
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert calibrated_threshold(scores, 0.8) == 0.3  # 8 of 10 are >= 0.3
    assert calibrated_threshold(scores, 1.0) == 0.1
    rng = np.random.default_rng(0)
    many = rng.random(997)
    for keep in (0.5, 0.9, 0.95, 0.99):
        threshold = calibrated_threshold(many, keep)
        assert (many >= threshold).mean() >= keep > (many > threshold).mean()  # the tightest such threshold
    with pytest.raises(DmclipError, match="no image-caption pairs"):
        calibrated_threshold([], 0.9)


def test_calibration_scores_the_clean_sets_own_pairs_and_sets_the_threshold(blip_dir, tmp_path):
    from dmclip.models.refs import load_model_ref

    clean = "world-train-clean:size=12"
    model = load_model_ref(f"run:{blip_dir}").eval()
    expected = []
    dataset = build_dataset(clean, image_size=32)
    with torch.inference_mode():  # oracle: one image at a time, each of its captions
        for i in range(len(dataset)):
            image = dataset[i]["image"][None].float() / 255
            for text in dataset[i]["captions"]:
                expected.append(float(model.itm_score(image, model.tokenize([text]))[0]))
    got = score_clean_pairs(model, clean, 0, 5, torch.device("cpu"))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    result = _run(_config(blip_dir, tmp_path / "boot", **{"limit": 8, "filter.calibrate_on": clean,
                                                           "filter.clean_keep": 0.75}), tmp_path)
    calibration = result["filter"]["calibration"]
    assert calibration["pairs"] == len(expected)
    assert result["filter"]["threshold"] == pytest.approx(calibrated_threshold(expected, 0.75), abs=1e-5)
    kept = [c["kept"] for s in _manifest(tmp_path / "boot") for c in s["captions"]]
    scores = [c["itm"] for s in _manifest(tmp_path / "boot") for c in s["captions"]]
    assert kept == [score >= result["filter"]["threshold"] for score in scores]


def test_every_caption_carries_itm_itc_and_their_sum_and_the_filter_uses_the_chosen_one(blip_dir, tmp_path):
    from dmclip.models.refs import load_model_ref

    model = load_model_ref(f"run:{blip_dir}").eval()
    out = tmp_path / "boot"
    result = _run(_config(blip_dir, out, **{"limit": 6, "filter.score": "itc", "filter.threshold": 0.0}), tmp_path)
    dataset = build_dataset(DATA, image_size=32)
    samples = _manifest(out)
    with torch.inference_mode():  # oracle: the model's own encoders, one pair at a time
        for sample in samples:
            image = dataset[sample["index"]]["image"][None].float() / 255
            for caption in sample["captions"]:
                tokens = model.tokenize([caption["text"]])
                itm = float(model.itm_score(image, tokens)[0])
                itc = float(torch.nn.functional.cosine_similarity(model.encode_image(image), model.encode_text(tokens)))
                assert caption["itm"] == pytest.approx(itm, abs=1e-5)
                assert caption["itc"] == pytest.approx(itc, abs=1e-5)
                logit = np.log(itm / (1 - itm))
                assert caption["itm+itc"] == pytest.approx(logit + itc / float(model.temp), abs=1e-3)
                assert caption["kept"] == (caption["itc"] >= 0.0)
    assert result["filter"]["score"] == "itc"
    web = [c for s in samples for c in s["captions"] if c["source"] == "web"]
    expected = precision_recall_curve([c["itc"] for c in web], [c["noisy"] for c in web])
    assert result["pr_curve"]["average_precision"] == pytest.approx(expected["average_precision"])
    again = _run(_config(blip_dir, out, **{"limit": 6, "filter.score": "itm+itc", "filter.keep_fraction": 0.5}),
                 tmp_path)  # another score on the same shards: a re-filter, nothing recomputed
    assert again["shards"]["processed"] == 0 and again["filter"]["score"] == "itm+itc"
    kept = [c for s in _manifest(out) for c in s["captions"] if c["kept"]]
    assert min(c["itm+itc"] for c in kept) == pytest.approx(again["filter"]["threshold"])


@pytest.mark.parametrize("args, message", [
    (["--out", "{tmp}/a-file/boot"], "which is a file"),
    (["--out", "{tmp}/a-file"], "is a file"),
    (["--out", "{tmp}/boot", "--score", "clip"], "score"),
    (["--calibrate-on", "world-train-clean:size=4", "--threshold", "0.3", "--out", "{tmp}/boot"], "--calibrate-on"),
    (["--clean-keep", "0.9", "--out", "{tmp}/boot"], "--calibrate-on"),
    (["--threshold", "0.3", "--keep-fraction", "0.5", "--out", "{tmp}/boot"], "both"),
    (["--steps", "5", "--out", "{tmp}/boot"], "--finetune-on"),
    (["--out", "{tmp}/boot", "--method", "greedy"], "method"),
])
def test_cli_bad_options_are_one_line_errors(blip_dir, tmp_path, capsys, args, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "a-file").write_text("not a folder")
    code = main(["capfilt", "--model", f"run:{blip_dir}", "--data", DATA, "--runs-dir", str(tmp_path / "runs"), *args])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_non_empty_foreign_out_directory_is_refused(blip_dir, tmp_path):
    out = tmp_path / "boot"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(DmclipError, match="holds no capfilt output"):
        _run(_config(blip_dir, out), tmp_path)
    assert (out / "precious.txt").read_text() == "mine"


@pytest.mark.slow
def test_finetune_on_a_clean_set_then_reuse_the_finetuned_model(blip_dir, tmp_path):
    out = tmp_path / "boot"
    sets = {"limit": 8, "finetune.data": "world-train-clean:size=32", "finetune.train.steps": 2,
            "finetune.train.batch_size": 8, "finetune.train.warmup_steps": 1, "finetune.train.progress": False}
    first = _run(_config(blip_dir, out, **sets), tmp_path)
    assert first["finetune"]["steps"] == 2
    assert (out / "finetuned-model" / "model.json").is_file()
    from dmclip.models.refs import load_model_ref

    tuned, original = load_model_ref(f"run:{out / 'finetuned-model'}"), load_model_ref(f"run:{blip_dir}")
    assert not torch.equal(tuned.itm_head.weight, original.itm_head.weight)
    second = _run(_config(blip_dir, out, **sets), tmp_path)
    assert second["finetune"] is None and second["shards"]["resumed"] == 1


def test_beam_search_captions_and_filter_only_mode(blip_dir):
    from dmclip.models.refs import load_model_ref

    model = load_model_ref(f"run:{blip_dir}")
    images = build_dataset(DATA, image_size=32).images(list(range(3))).float().div(255)
    web = [["a red circle"], ["a blue star", "two green squares"], []]
    beam = _config(blip_dir, Path("unused"), **{"captioner.method": "beam", "captioner.num_captions": 2,
                                                 "captioner.num_beams": 1})
    scored = score_batch(model, images, web, beam, None)
    for captions, texts in zip(scored, web):
        assert [c["text"] for c in captions if c["source"] == "web"] == texts  # web captions first, in order
        synthetic = [c["text"] for c in captions if c["source"] == "synthetic"]
        assert 1 <= len(synthetic) <= 2 and len(set(synthetic)) == len(synthetic)
        assert all(0.0 <= c["itm"] <= 1.0 for c in captions)
    only_web = score_batch(model, images, web, _config(blip_dir, Path("unused"), **{"captioner.num_captions": 0}),
                               None)
    assert [[c["text"] for c in captions] for captions in only_web] == web


def test_cli_resume_continues_an_interrupted_run(blip_dir, tmp_path, monkeypatch):
    """`dmclip capfilt --resume <run>` after Ctrl-C: same run directory, the committed shard kept, the rest
    processed, and the same captions as an uninterrupted run of the same command."""
    argv = ["capfilt", "--model", f"run:{blip_dir}", "--data", DATA, "--num-captions", "1", "--max-length", "6",
            "--min-length", "2", "--set", "progress=false", "--shard-size", "8"]
    assert main([*argv, "--out", str(tmp_path / "whole"), "--runs-dir", str(tmp_path / "whole-runs")]) == 0

    real, calls = pipeline.process_shard, []

    def interrupt_second(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "process_shard", interrupt_second)
    out = tmp_path / "boot"
    assert main([*argv, "--out", str(out), "--runs-dir", str(tmp_path / "runs")]) == 130
    run = RunDir(next((tmp_path / "runs" / "capfilt").iterdir()))
    assert run.info["status"] == "interrupted"
    monkeypatch.setattr(pipeline, "process_shard", real)

    assert main(["capfilt", "--resume", str(run.path)]) == 0
    assert [p.name for p in (tmp_path / "runs" / "capfilt").iterdir()] == [run.path.name]  # no second run
    assert RunDir(run.path).info["status"] == "completed"
    assert RunDir(run.path).results()["shards"] == {"total": 3, "resumed": 1, "processed": 2}
    assert [s["index"] for s in _manifest(out)] == list(range(24))
    assert _manifest(out) == _manifest(tmp_path / "whole")
    assert (out / "captions.csv").read_text() == (tmp_path / "whole" / "captions.csv").read_text()


@pytest.mark.requires_java
def test_eval_caption_from_the_cli_writes_the_captions_and_their_scores(blip_dir, tmp_path, capsys):
    """`dmclip eval caption`: captions.json (COCO results format) holds one caption per image, results.json
    the COCO scores of exactly those captions against the dataset's references; the table is printed."""
    from dmclip.data import float_images
    from dmclip.metrics.caption import caption_metrics
    from dmclip.models.refs import load_model_ref

    data = "world-retrieval-a:size=8"
    assert main(["eval", "caption", "--model", f"run:{blip_dir}", "--data", data, "--limit", "5", "--max-length",
                 "6", "--min-length", "2", "--num-beams", "2", "--no-meteor", "--batch-size", "3",
                 "--runs-dir", str(tmp_path)]) == 0
    run = RunDir(next((tmp_path / "eval").iterdir()))
    results = run.results()
    captions = {row["image_id"]: row["caption"] for row in json.loads((run.path / "captions.json").read_text())}
    assert sorted(captions) == [0, 1, 2, 3, 4] and all(isinstance(c, str) and c for c in captions.values())
    # the captions are the model's beam search of those images
    model = load_model_ref(f"run:{blip_dir}").eval()
    ds = build_dataset(data, image_size=32)
    images = float_images(torch.stack([ds[i]["image"] for i in range(5)]))
    with torch.inference_mode():
        expected = model.generate(images, method="beam", num_beams=2, max_length=6, min_length=2)
    assert [captions[i] for i in range(5)] == list(expected)
    scores = caption_metrics({i: list(ds.captions(i)) for i in range(5)}, captions, meteor=False)
    for key in ("bleu1", "bleu4", "rouge_l", "cider"):
        assert results["metrics"][key] == pytest.approx(scores[key], abs=1e-12), key
    assert results["details"]["num_images"] == 5
    out = capsys.readouterr().out
    assert "CIDEr" in out and "image 0:" in out
