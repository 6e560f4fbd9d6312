"""open_clip teachers as a user has them: a checkpoint file from open_clip's training, a directory in the
Hugging Face hub layout (what open_clip's push_to_hf_hub writes), the hub's local cache; all offline.

The architecture is a real open_clip CLIP (ViT + text transformer) registered at a size a CPU builds in a
blink; the files are written by open_clip's own code; every number is compared with open_clip computing it
itself (its create_model, preprocess transform and tokenizer).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.push_to_hf_hub import save_for_hf
from PIL import Image

from dmclip.cli.main import main
from dmclip.errors import DmclipError
from dmclip.evaluation import zero_shot
from dmclip.evaluation.embeddings import encode_images, encode_texts
from dmclip.evaluation.loading import fill_template
from dmclip.models.base import load_saved_model, save_model
from dmclip.models.refs import load_model_ref
from dmclip.runs import find_runs

ARCH = "dmclip-tiny-openclip"
TINY_CFG = {"embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
OTHER_ARCH = "dmclip-tiny-openclip-wide"
OTHER_CFG = {**TINY_CFG, "vision_cfg": {**TINY_CFG["vision_cfg"], "width": 48}}
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)  # not OpenAI's: shows whose preprocessing is used
ZS_DATA = "world-zeroshot:size=60"
TINY_DATA = "world-train:size=96"


class _NoTokenizerFiles:
    """save_for_hf also writes the tokenizer's HF files (push_to_hf_hub fetches openai's CLIP tokenizer from the
    hub for that); CLIP's BPE tokenizer is chosen from open_clip_config.json alone, so none are needed here."""

    def save_pretrained(self, directory) -> None:
        pass


@pytest.fixture(scope="module")
def tiny_arch():
    """Register the tiny architecture in open_clip's config table for this module (as add_model_config would)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(open_clip.factory._MODEL_CONFIGS, ARCH, json.loads(json.dumps(TINY_CFG)))
        mp.setitem(open_clip.factory._MODEL_CONFIGS, OTHER_ARCH, json.loads(json.dumps(OTHER_CFG)))
        yield ARCH


def _train_a_little(model, steps: int = 30) -> None:
    """A few open_clip ClipLoss steps on the toy world: weights whose zero-shot predictions differ per image
    (random ones predict one class for everything)."""
    from open_clip.loss import ClipLoss

    from dmclip.data import build_dataset

    dataset = build_dataset(TINY_DATA, image_size=32)
    images = dataset.images(list(range(len(dataset)))).float() / 255
    images = (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    tokens = open_clip.get_tokenizer(ARCH)([dataset.captions(i)[0] for i in range(len(dataset))])
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=3e-3), ClipLoss()
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = torch.randperm(len(dataset), generator=generator)[:32]
        loss = loss_fn(model.encode_image(images[batch], normalize=True), model.encode_text(tokens[batch], normalize=True),
                       model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module")
def saved(tiny_arch, tmp_path_factory) -> dict:
    """One open_clip model (non-default mean/std), saved every way a user gets one."""
    root = tmp_path_factory.mktemp("open_clip")
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), "mean": MEAN, "std": STD})
    _train_a_little(model)
    model.eval()
    state = model.state_dict()
    # open_clip's training (src/open_clip_train) saves {"epoch", "name", "state_dict", "optimizer"}; under DDP
    # the keys carry "module."
    training = root / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": {"state": {}, "param_groups": []}}, training)
    bare = root / "state_dict.bin"
    torch.save(state, bare)
    hub_bin, hub_safetensors = root / "hub-bin", root / "hub-safetensors"
    save_for_hf(model, _NoTokenizerFiles(), TINY_CFG, hub_bin, safe_serialization=False)
    save_for_hf(model, _NoTokenizerFiles(), TINY_CFG, hub_safetensors, safe_serialization=True)
    return {"model": model, "training": training, "bare": bare, "hub-bin": hub_bin,
            "hub-safetensors": hub_safetensors, "root": root}


def _inputs():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    texts = ["a red circle", "two blue stars on the left", "a green heart.", "a white arrow"]
    return images, texts


def _reference(model: torch.nn.Module, images: torch.Tensor, texts: list[str], name: str, mean, std):
    """open_clip's own encoding: its tokenizer, its normalisation."""
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.encode_image(normalised), model.encode_text(open_clip.get_tokenizer(name)(texts))


@pytest.mark.parametrize("which", ["training", "bare"])
def test_checkpoint_file_loads_the_saved_weights(saved, which):
    """open_clip:<arch>:<file>: open_clip's training checkpoint (DDP prefixes) or a bare state_dict."""
    loaded = load_model_ref(f"open_clip:{ARCH}:{saved[which]}")
    reference = saved["model"].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    assert (loaded.image_size, loaded.context_length, loaded.embed_dim) == (32, 16, 32)
    images, texts = _inputs()
    # a bare checkpoint carries no preprocessing: the architecture's (OpenAI's mean/std), as open_clip does
    image_ref, text_ref = _reference(saved["model"], images, texts, ARCH, open_clip.OPENAI_DATASET_MEAN,
                                     open_clip.OPENAI_DATASET_STD)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), image_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(loaded.tokenize(texts)), text_ref, rtol=0, atol=1e-5)
    assert loaded.arch["weights"] == str(Path(saved[which]).resolve())


@pytest.mark.parametrize("which", ["hub-bin", "hub-safetensors"])
def test_hub_layout_directory_loads_with_its_own_preprocessing(saved, which):
    """open_clip:local-dir:<dir>: architecture, mean/std and weights all from the directory."""
    assert (saved[which] / "open_clip_config.json").is_file()
    loaded = load_model_ref(f"open_clip:local-dir:{saved[which]}")
    assert loaded.mean.flatten().tolist() == pytest.approx(MEAN)
    assert loaded.std.flatten().tolist() == pytest.approx(STD)
    images, texts = _inputs()
    image_ref, text_ref = _reference(saved["model"], images, texts, f"local-dir:{saved[which]}", MEAN, STD)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), image_ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(loaded.tokenize(texts)), text_ref, rtol=0, atol=1e-5)


def test_zero_shot_equals_open_clips_own_computation(saved):
    """dmclip.evaluation.zero_shot on the loaded teacher = open_clip's model, preprocess transform and tokenizer
    with class embeddings averaged over the templates (CLIP's recipe)."""
    from dmclip.data import build_dataset

    directory = saved["hub-safetensors"]
    teacher = load_model_ref(f"open_clip:local-dir:{directory}")
    result = zero_shot(teacher, ZS_DATA)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{directory}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{directory}")
    model.eval()
    dataset = build_dataset(ZS_DATA, image_size=32)
    pixels = dataset.images(list(range(len(dataset))))
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in pixels])
        image_features = F.normalize(model.encode_image(batch), dim=-1)
        classes = []
        for name in dataset.classnames:
            prompts = tokenizer([t.format(name) for t in dataset.templates])
            classes.append(F.normalize(F.normalize(model.encode_text(prompts), dim=-1).mean(0), dim=-1))
        classifier = torch.stack(classes)
    logits = 100 * image_features @ classifier.T
    labels = torch.tensor(dataset.labels())
    top1 = logits.argmax(1) == labels
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(1)
    recalls = [top1[labels == c].float().mean() for c in labels.unique()]

    ours, _ = encode_images(teacher, dataset)
    torch.testing.assert_close(ours, image_features, rtol=0, atol=1e-5)
    prompts = [fill_template(t, c) for c in dataset.classnames for t in dataset.templates]
    ours_text = encode_texts(teacher, prompts).view(len(dataset.classnames), len(dataset.templates), -1)
    torch.testing.assert_close(F.normalize(ours_text.mean(1), dim=-1), classifier, rtol=0, atol=1e-5)
    assert result["metrics"]["acc1"] == pytest.approx(top1.float().mean().item(), abs=1e-9)
    assert result["metrics"]["acc5"] == pytest.approx(top5.float().mean().item(), abs=1e-9)
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(torch.stack(recalls).mean().item(), abs=1e-6)
    assert len(set(logits.argmax(1).tolist())) > 1  # the comparison is not between two constant predictions
    # open_clip's full BPE vocabulary reads any word: no unknown-word warning, whatever the class names
    odd = zero_shot(teacher, ZS_DATA, classnames=[f"crimson disc {i}" for i in range(len(dataset.classnames))])
    assert "unknown_words" not in odd["details"] and not any("vocabulary" in n for n in odd["notes"])


def test_hub_repository_loads_from_the_local_hugging_face_cache(saved, tmp_path, monkeypatch):
    """open_clip:hf-hub:<org>/<repo> offline: the hub's cache layout (refs/main -> snapshots/<commit>)."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--dmclip--tiny-openclip"
    shutil.copytree(saved["hub-bin"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    loaded = load_model_ref("open_clip:hf-hub:dmclip/tiny-openclip")
    reference = saved["model"].state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    assert loaded.mean.flatten().tolist() == pytest.approx(MEAN)


def test_pretrained_tag_without_local_weights_is_an_error_not_random_weights(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", "zero-shot", "--model", "open_clip:ViT-B-32:laion2b_s34b_b79k",
                 "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert ("error: the pretrained tag 'laion2b_s34b_b79k' of ViT-B-32 is not on this machine (not in the Hugging "
            "Face cache, and HF_HUB_OFFLINE is set)") in err
    assert "hint: pass a local checkpoint, e.g. open_clip:ViT-B-32:/path/open_clip_pytorch_model.bin" in err
    assert "Traceback" not in err
    assert not find_runs(tmp_path / "runs")  # failed before a run directory was made


def test_architecture_alone_is_an_error_and_random_weights_must_be_asked_for(saved):
    with pytest.raises(DmclipError) as caught:
        load_model_ref(f"open_clip:{ARCH}")
    assert "names an architecture but no weights" in caught.value.message
    assert "open_clip:<arch>:random" in caught.value.hint
    random = load_model_ref(f"open_clip:{ARCH}:random")
    assert random.arch["weights"] == "random"
    trained = saved["model"].state_dict()
    assert not torch.equal(random.model.visual.conv1.weight, trained["visual.conv1.weight"])


@pytest.mark.parametrize("ref, message, hint", [
    ("open_clip:{root}/hub-bin", "names a directory, not an open_clip architecture",
     "loads as open_clip:local-dir:{root}/hub-bin"),
    (f"open_clip:{ARCH}:{{root}}/hub-bin", "is a directory, not a checkpoint file", "open_clip:local-dir:"),
    (f"open_clip:{ARCH}:{{root}}/missing.pt", "checkpoint file '{root}/missing.pt' does not exist", "check the path"),
    ("open_clip:ViT-B-32:laion2b", "'laion2b' is neither a file nor a pretrained tag of ViT-B-32",
     "did you mean 'laion2b_e16'"),
    ("open_clip:ViT-B-23:random", "open_clip has no architecture 'ViT-B-23'", "did you mean 'ViT-B-32'"),
    ("open_clip:local-dir:{root}", "has no open_clip_config.json", "save_for_hf"),
    ("open_clip:local-dir:{root}/nope", "no such directory", "hub layout"),
    (f"open_clip:{OTHER_ARCH}:{{root}}/state_dict.bin", f"could not load the checkpoint {{root}}/state_dict.bin into "
     f"{OTHER_ARCH}: Error(s) in loading state_dict for CLIP: size mismatch", "another architecture's weights"),
])
def test_bad_open_clip_references_are_one_line_errors(saved, ref, message, hint):
    root = saved["root"]
    with pytest.raises(DmclipError) as caught:
        load_model_ref(ref.format(root=root))
    assert message.format(root=root) in caught.value.message
    assert hint.format(root=root) in caught.value.hint
    assert "\n" not in str(caught.value)


def test_a_saved_open_clip_tower_rebuilds_without_its_source(saved, tmp_path):
    """model.json records open_clip's config: the model comes back after the source directory is gone."""
    source = tmp_path / "hub"
    shutil.copytree(saved["hub-safetensors"], source)
    teacher = load_model_ref(f"open_clip:local-dir:{source}")
    save_model(teacher, tmp_path / "saved")
    shutil.rmtree(source)
    again = load_saved_model(tmp_path / "saved")
    images, texts = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), teacher.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(again.encode_text(again.tokenize(texts)), teacher.encode_text(teacher.tokenize(texts)),
                                   rtol=0, atol=0)
    assert again.mean.flatten().tolist() == pytest.approx(MEAN)


def test_distil_a_mamba_student_from_an_open_clip_teacher_and_evaluate_it(saved, tmp_path, capsys):
    teacher_dir = tmp_path / "teacher"
    shutil.copytree(saved["hub-safetensors"], teacher_dir)
    ref = f"open_clip:local-dir:{teacher_dir}"
    runs = tmp_path / "runs"
    assert main(["distill", "--teacher", ref, "--student", "mamba-tiny-test", "--alpha", "0.5", "--data", TINY_DATA,
                 "--steps", "2", "--batch-size", "16", "--runs-dir", str(runs), "--set", "train.progress=false",
                 "--set", "train.warmup_steps=1", "--set", "train.log_every=1", "--set", "eval.each_run=false"]) == 0
    [run] = find_runs(runs, "distill")
    assert run.results()["teacher"] == ref
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["kd"]) for r in rows)
    teacher = load_model_ref(ref)
    tokens = teacher.tokenize(["a red circle"])
    shutil.rmtree(teacher_dir)  # the student keeps the teacher's text tower; it needs nothing else
    capsys.readouterr()
    assert main(["eval", "zero-shot", "--model", f"run:{run.path}", "--data", ZS_DATA, "--runs-dir", str(runs)]) == 0
    [evaluation] = find_runs(runs, "eval")
    metrics = evaluation.results()["metrics"]
    assert 0.0 <= metrics["acc1"] <= metrics["acc5"] <= 1.0
    assert "acc@1" in capsys.readouterr().out
    student = load_model_ref(f"run:{run.path}")
    assert student.arch["visual"]["family"] == "vision-mamba"
    with torch.no_grad():  # frozen-teacher text tower: the student's text embeddings are the teacher's
        torch.testing.assert_close(student.encode_text(tokens), teacher.encode_text(tokens), rtol=0, atol=0)
    # the teacher's image tower is not carried along in the student's files (a ViT-S-32's would be 90 MB of them)
    from safetensors import safe_open

    with safe_open(run.path / "model" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    teacher_text = {k for k in teacher.state_dict() if not k.startswith("model.visual.")}
    assert {k for k in keys if k.startswith("text.")} == {f"text.{k}" for k in teacher_text}
    assert student.arch["text"]["towers"] == "text"
    checkpoint = torch.load(run.path / "checkpoints" / "last.pt", weights_only=True)  # frozen: rebuilt on resume
    assert not [k for k in checkpoint["model"] if k.startswith("text.")] and "visual.head.weight" in checkpoint["model"]
    with pytest.raises(DmclipError, match="text tower only"):
        student.text.encode_image(torch.rand(1, 3, 8, 8))
