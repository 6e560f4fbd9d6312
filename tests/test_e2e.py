"""End to end through `dmclip.cli.main([...])` at tiny sizes: pretrain -> distill -> eval, sweeps, errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers.cli import TINY_CLIP, only_run

from dmclip.cli.main import main
from dmclip.models.refs import load_model_ref
from dmclip.runs import RunDir

TINY_DATA = "world-train:size=96"
TINY_PRETRAIN = [*TINY_CLIP, "--set", "train.warmup_steps=1", "--set", "train.progress=false",
                 "--set", "eval.zeroshot=world-zeroshot", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> RunDir:
    root = tmp_path_factory.mktemp("runs")
    code = main(["pretrain", "--data", TINY_DATA, "--steps", "4", "--batch-size", "16", "--runs-dir", str(root),
                 "--name", "tiny-teacher", *TINY_PRETRAIN])
    assert code == 0
    return only_run(root, "pretrain")


def test_pretrain_writes_a_complete_run_directory(teacher_run):
    info = teacher_run.info
    assert info["status"] == "completed" and info["command"] == "pretrain"
    for name in ("resolved.yaml", "overrides.txt", "metrics.jsonl", "log.txt", "results.json",
                 "model/model.json", "model/model.safetensors", "checkpoints/last.pt"):
        assert (teacher_run.path / name).exists(), name
    assert not (teacher_run.path / "recipe.yaml").exists()  # no recipe was given: no empty placeholder
    rows = teacher_run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    results = teacher_run.results()
    assert 0.0 <= results["zeroshot"]["acc1"] <= results["zeroshot"]["acc5"] <= 1.0


def test_pretrained_model_loads_without_training_code_and_encodes(teacher_run):
    model = load_model_ref(f"run:{teacher_run.path}")
    images = torch.rand(3, 3, model.image_size, model.image_size)
    tokens = model.tokenize(["a red circle", "a blue star", "two green squares"])
    assert model.encode_image(images).shape == (3, model.embed_dim)
    assert model.encode_text(tokens).shape == (3, model.embed_dim)


def test_resolved_yaml_repeats_the_run_exactly(teacher_run, tmp_path):
    """`dmclip pretrain runs/.../resolved.yaml` trains the same model (CPU, same seed)."""
    code = main(["pretrain", str(teacher_run.path / "resolved.yaml"), "--runs-dir", str(tmp_path)])
    assert code == 0
    again = only_run(tmp_path, "pretrain")
    a = teacher_run.metrics()[-1]["loss"]
    b = again.metrics()[-1]["loss"]
    assert a == pytest.approx(b, rel=1e-5)


def test_distill_from_the_teacher_and_eval(teacher_run, tmp_path):
    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0.75",
                 "--data", TINY_DATA, "--steps", "3", "--batch-size", "16", "--runs-dir", str(tmp_path),
                 "--set", "train.progress=false", "--set", "train.warmup_steps=1"])
    assert code == 0
    run = only_run(tmp_path, "distill")
    results = run.results()
    assert results["alpha"] == 0.75 and results["teacher"] == f"run:{teacher_run.path}"
    parts = run.metrics()[-1]
    assert {"contrastive", "kd"} <= set(parts)
    student = load_model_ref(f"run:{run.path}")
    teacher = load_model_ref(f"run:{teacher_run.path}")
    assert student.arch["visual"]["family"] == "vision-mamba"
    # frozen-teacher text tower: the student's text embeddings are the teacher's
    tokens = teacher.tokenize(["a red circle"])
    torch.testing.assert_close(student.encode_text(tokens), teacher.encode_text(tokens))


@pytest.mark.slow
def test_alpha_sweep_writes_one_run_per_point_and_a_summary(teacher_run, tmp_path, plot_pixels):
    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0,1",
                 "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir", str(tmp_path),
                 "--set", "train.progress=false", "--set", "eval.each_run=false"])
    assert code == 0
    sweep = next((tmp_path / "distill").glob("*-sweep-*"))
    members = sorted(p for p in sweep.iterdir() if (p / "run.json").exists())
    assert len(members) == 2
    alphas = sorted(json.loads((m / "results.json").read_text())["alpha"] for m in members)
    assert alphas == [0.0, 1.0]
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 4 and "Avg Perf" in summary[0]  # header, the teacher, two students
    assert [line.split(",")[0] for line in summary[1:]] == ["teacher", "student alpha=0", "student alpha=1"]
    markdown = (sweep / "summary.md").read_text()
    assert "RQ1" in markdown and "RQ2" in markdown and "ViT of the student's size" in markdown
    colours = plot_pixels(sweep / "summary.png", size=(780, 456))  # 6.5 x 3.8 in at 120 dpi
    assert sum(colours.values()) > 600, colours  # one line per eval column over alpha, not only the legend


@pytest.mark.slow
def test_seeds_by_alphas_sweep_reports_intervals_and_paired_differences(teacher_run, tmp_path):
    """`--alpha 0,1 --seeds 3,4`: four runs (every alpha at every seed); summary-seeds.csv holds each alpha's
    mean over its seeds of the per-run table, and alpha 1's paired difference against alpha 0."""
    import csv

    code = main(["distill", "--teacher", f"run:{teacher_run.path}", "--student", "mamba-tiny-test", "--alpha", "0,1",
                 "--seeds", "3,4", "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir",
                 str(tmp_path), "--set", "train.progress=false", "--set", "eval.each_run=false"])
    assert code == 0
    sweep = next((tmp_path / "distill").glob("*-sweep-*"))
    members = [json.loads((m / "results.json").read_text()) | json.loads((m / "run.json").read_text())
               for m in sweep.iterdir() if (m / "run.json").exists()]
    assert sorted((m["alpha"], m["seed"]) for m in members) == [(0.0, 3), (0.0, 4), (1.0, 3), (1.0, 4)]
    per_run = {row["model"]: row for row in csv.DictReader((sweep / "summary.csv").read_text().splitlines())}
    assert set(per_run) == {"teacher", "student alpha=0 seed=3", "student alpha=0 seed=4",
                            "student alpha=1 seed=3", "student alpha=1 seed=4"}
    # the seed reaches the model: same alpha, other seed, other student
    a, b = (load_model_ref(f"run:{m}") for m in sorted(sweep.glob("*alpha0-seed*")))
    assert not torch.equal(a.visual.state_dict()["patch_embed.weight"], b.visual.state_dict()["patch_embed.weight"])
    rows = {(r["alpha"], r["column"]): r for r in csv.DictReader((sweep / "summary-seeds.csv").read_text().splitlines())}
    avg = lambda alpha: [float(per_run[f"student alpha={alpha} seed={s}"]["Avg Perf"]) for s in (3, 4)]
    assert float(rows[("alpha=0", "Avg Perf")]["mean"]) == pytest.approx(sum(avg(0)) / 2)
    assert float(rows[("alpha=1", "Avg Perf")]["mean"]) == pytest.approx(sum(avg(1)) / 2)
    assert int(rows[("alpha=1", "Avg Perf")]["seeds"]) == 2
    difference = rows[("alpha=1", "Avg Perf")]
    assert float(difference["diff_vs_baseline"]) == pytest.approx(sum(avg(1)) / 2 - sum(avg(0)) / 2, abs=1e-9)
    assert float(difference["diff_low"]) <= float(difference["diff_vs_baseline"]) <= float(difference["diff_high"])
    assert rows[("alpha=0", "Avg Perf")]["diff_vs_baseline"] == ""  # the baseline is not compared with itself
    markdown = (sweep / "summary.md").read_text()
    assert "Paired difference against alpha=0" in markdown and "mean ± std" in markdown
    resolved = (sweep / "resolved.yaml").read_text()
    assert "seeds: [3, 4]" in resolved


@pytest.mark.parametrize("argv, words", [
    (["distill", "--teacher", "run:/nonexistent/run"], "does not exist"),
    (["distill", "--alpha", "1.5"], "loss.alpha = 1.5 is out of range"),
    (["distill", "--alpha", "x"], "loss.alpha = 'x' has the wrong type: expected float"),
    (["pretrain", "--set", "model.vision_widht=3"], "vision_width"),
    (["pretrain", "--objective", "simclr"], "not allowed"),
    (["pretrain", "--data", "csv:/nonexistent.csv", "--steps", "1"], "nonexistent"),
])
def test_bad_input_is_one_line_with_a_hint(argv, words, tmp_path, capsys):
    code = main([*argv, "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert words in err and "hint:" in err


@pytest.fixture(scope="module")
def second_teacher(tmp_path_factory) -> RunDir:
    """Another tiny CLIP teacher: same data and sizes as `teacher_run`, another seed, so other weights."""
    root = tmp_path_factory.mktemp("runs2")
    code = main(["pretrain", "--data", TINY_DATA, "--steps", "2", "--batch-size", "16", "--runs-dir", str(root),
                 "--name", "tiny-teacher-2", "--seed", "1", *TINY_PRETRAIN, "--set", "eval.each_run=false"])
    assert code == 0
    return only_run(root, "pretrain")


def _kd_oracle(student_out: dict, members: list, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """KD written out: targets are the members' softmax(scale * image @ text.T) (both ways) averaged; the
    student's text features are the first member's (frozen teacher text tower)."""
    import torch.nn.functional as F

    probs_i2t, probs_t2i = [], []
    for member in members:
        image = F.normalize(member.encode_image(images), dim=-1)
        text = F.normalize(member.encode_text(member.tokenize(captions)), dim=-1)
        scale = member.logit_scale.exp().clamp(max=100.0)
        probs_i2t.append((scale * image @ text.T).softmax(dim=1))
        probs_t2i.append((scale * text @ image.T).softmax(dim=1))
    text = F.normalize(members[0].encode_text(members[0].tokenize(captions)), dim=-1)
    s_i2t = student_out["logit_scale"] * student_out["image_features"] @ text.T
    s_t2i = s_i2t.T
    p_i2t, p_t2i = sum(probs_i2t) / len(members), sum(probs_t2i) / len(members)
    return (-(p_i2t * s_i2t.log_softmax(dim=1)).sum(dim=1).mean()
            - (p_t2i * s_t2i.log_softmax(dim=1)).sum(dim=1).mean()) / 2


def test_distill_from_an_ensemble_of_teachers(teacher_run, second_teacher, tmp_path):
    from dmclip.data import build_dataset
    from dmclip.distill import DistillConfig, DistillTask, build_student, load_teacher
    from dmclip.train.tasks import pick_caption

    a, b = f"run:{teacher_run.path}", f"run:{second_teacher.path}"
    ref = f"ensemble:{a}+{b}"
    code = main(["distill", "--teacher", ref, "--student", "vit-nano", "--data", TINY_DATA, "--steps", "2",
                 "--batch-size", "16", "--runs-dir", str(tmp_path), "--set", "train.progress=false",
                 "--set", "eval.each_run=false"])
    assert code == 0
    run = only_run(tmp_path, "distill")
    assert run.results()["teacher"] == ref
    assert load_model_ref(f"run:{run.path}").encode_image(torch.rand(1, 3, 32, 32)).shape[-1] == 32

    # the KD loss on a fixed batch is the formula with both members' probabilities averaged after the softmax
    cfg = DistillConfig(teacher=ref)
    cfg.student.name, cfg.loss.alpha = "vit-nano", 1.0
    ensemble = load_teacher(ref)
    torch.manual_seed(0)
    student = build_student(cfg, ensemble).eval()
    task = DistillTask(student, ensemble, cfg)
    data = build_dataset(TINY_DATA, image_size=ensemble.image_size)
    batch = task.collate([data[i] for i in range(12)])
    captions = [pick_caption(c, cfg.seed, 5, i) for c, i in zip(batch["captions"], batch["index"])]
    with torch.no_grad():
        got = task.loss(student, batch, step=5)["kd"]
        out = student(batch["images"])
        first, second = load_model_ref(a).eval(), load_model_ref(b).eval()
        expected = _kd_oracle(out, [first, second], batch["images"], captions)
        first_twice = _kd_oracle(out, [first, first], batch["images"], captions)
        second_twice = _kd_oracle(out, [second, second], batch["images"], captions)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # the members differ enough that either one alone gives another loss: the check above can tell them apart
    assert abs(float(expected - first_twice)) > 1e-3 and abs(float(expected - second_twice)) > 1e-3


def test_an_ensemble_of_one_is_refused(tmp_path, capsys):
    code = main(["distill", "--teacher", "ensemble:run:x", "--runs-dir", str(tmp_path)])
    assert code == 2 and "two or more" in capsys.readouterr().err


def test_reinforce_then_distill_from_the_store_through_the_cli(teacher_run, tmp_path, capsys):
    """`dmclip reinforce` writes the store; `dmclip distill --teacher store:<store>` trains from it."""
    from dmclip.data import build_dataset
    from dmclip.data.reinforced import ReinforcedStore, apply_boxes

    store_dir = tmp_path / "store"
    teacher_ref = f"run:{teacher_run.path}"
    assert main(["reinforce", "--teacher", teacher_ref, "--data", TINY_DATA, "--out", str(store_dir),
                 "--augmentations", "3"]) == 0
    assert f"dmclip distill --teacher store:{store_dir}" in capsys.readouterr().out.replace("\n", "")
    store = ReinforcedStore(store_dir)
    assert store.meta["teacher"] == teacher_ref and store.meta["data"] == TINY_DATA
    assert store.image_embeddings.shape[:2] == (96, 3)
    teacher = load_model_ref(teacher_ref).eval()
    image = build_dataset(TINY_DATA, image_size=teacher.image_size)[5]["image"].float().unsqueeze(0) / 255
    with torch.no_grad():
        expected = teacher.encode_image(apply_boxes(image, store.boxes[5, 2].unsqueeze(0)))[0]
    torch.testing.assert_close(store.image_embeddings[5, 2].float(), expected, atol=1e-3, rtol=1e-3)

    ref = f"store:{store_dir}"
    assert main(["distill", "--teacher", ref, "--student", "mamba-tiny-test", "--alpha", "1", "--steps", "2",
                 "--batch-size", "16", "--runs-dir", str(tmp_path / "runs"), "--set", "train.progress=false",
                 "--set", "train.log_every=1",
                 "--set", "eval.each_run=false"]) == 0
    run = only_run(tmp_path / "runs", "distill")
    assert run.info["status"] == "completed" and run.results()["teacher"] == ref
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2] and all(r["kd"] > 0 for r in rows)
    student = load_model_ref(f"run:{run.path}")
    tokens = teacher.tokenize(["a red circle"])  # the store's teacher gave the student its text tower
    torch.testing.assert_close(student.encode_text(tokens), teacher.encode_text(tokens))


def test_pretrain_blip_in_one_process(tmp_path):
    """`dmclip pretrain --objective blip`: a completed run whose saved BLIP captions an image."""
    code = main(["pretrain", "--objective", "blip", "--data", TINY_DATA, "--steps", "2", "--batch-size", "8",
                 "--runs-dir", str(tmp_path), *TINY_PRETRAIN, "--set", "eval.each_run=false"])
    assert code == 0
    run = only_run(tmp_path, "pretrain")
    assert run.info["status"] == "completed" and run.results()["objective"] == "blip"
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    model = load_model_ref(f"run:{run.path}").eval()
    assert model.arch["family"] == "blip"
    with torch.inference_mode():
        captions = model.generate(torch.rand(2, 3, model.image_size, model.image_size), method="beam",
                                  num_beams=2, max_length=5, min_length=1)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


@pytest.mark.slow  # two 3-step distillations
def test_alpha_0_trains_without_running_the_teachers_image_tower_to_the_same_student(tmp_path, monkeypatch):
    """Contrastive-only distillation reads the teacher's text features (its frozen text tower) and never its
    image features: the teacher's ViT is not run, and the student comes out as when it was."""
    from safetensors.torch import load_file

    from dmclip.losses.clip import DistillMix
    from dmclip.models.vit import VisionTransformer

    images_seen = []
    forward = VisionTransformer.forward
    monkeypatch.setattr(VisionTransformer, "forward", lambda self, x: images_seen.append(len(x)) or forward(self, x))
    argv = ["distill", "--alpha", "0", "--student", "mamba-tiny-test", "--data", "world-train:size=64", "--steps",
            "3", "--batch-size", "8", "--set", "train.progress=false", "--set", "eval.each_run=false"]
    assert main([*argv, "--runs-dir", str(tmp_path / "skipped")]) == 0
    assert images_seen == []
    monkeypatch.setattr(DistillMix, "uses_teacher_images", property(lambda self: True))  # as before: run it
    assert main([*argv, "--runs-dir", str(tmp_path / "run")]) == 0
    assert images_seen == [8, 8, 8]
    weights = [load_file(next((tmp_path / root).rglob("model.safetensors"))) for root in ("skipped", "run")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
