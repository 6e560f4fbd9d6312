"""`dmclip export` as a user meets it: an ONNX file that onnxruntime runs to PyTorch's numbers, a JSON that
says how to feed it, and one-line errors for bad input.

The exported files are loaded here with onnxruntime directly (not through dmclip's helpers) and compared
with the model that `load_model_ref` loads, on inputs other than the ones the export checked itself.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import stderr_lines

from dmclip.cli.main import main
from dmclip.data.tokenizer import Tokenizer
from dmclip.errors import DmclipError
from dmclip.export import onnx_session
from dmclip.models.base import IMAGE_MEAN, IMAGE_STD, save_model
from dmclip.models.refs import load_model_ref

onnxruntime = pytest.importorskip("onnxruntime", reason="pip install 'dmclip[export]' for the export tests")

CAPTIONS = ["a small red circle on the left", "two blue squares", "a large green triangle at the top",
            "a yellow star", "three purple circles"]
TINY_TEXT = {"family": "text", "tokenizer": Tokenizer.fit(CAPTIONS, context_length=16).to_dict(), "width": 32,
             "depth": 1, "heads": 2, "embed_dim": 32}
TINY_MAMBA = {"family": "vision-mamba", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "d_state": 8,
              "embed_dim": 32}  # mamba-tiny-test's size
TINY_VIT = {"family": "vit", "image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "embed_dim": 32}
TOLERANCE = 1e-4


def _save_clip(directory: Path, visual: dict, seed: int = 0) -> Path:
    """A CLIP of ``visual`` + a tiny text tower, saved as a distill/pretrain run saves its model."""
    from dmclip.models.clip import CLIP

    torch.manual_seed(seed)
    model = CLIP(visual=visual, text=TINY_TEXT)
    with torch.no_grad():  # weights away from their init: a tower that ignored one would show
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    save_model(model, directory / "model")
    return directory


def _session(path: Path):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _max_diff(session, name: str, inputs: torch.Tensor, expected: torch.Tensor) -> float:
    got = torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


def _check_image_file(out: Path, ref: str, model) -> dict:
    info = json.loads((out / "image_encoder.json").read_text())
    assert info["source"] == ref and info["tower"] == "image" and info["batch"] == "dynamic"
    assert info["input"]["shape"] == ["batch", 3, 32, 32] and info["input"]["dtype"] == "float32"
    assert info["normalisation"]["mean"] == pytest.approx(IMAGE_MEAN) and info["normalisation"]["std"] == pytest.approx(IMAGE_STD)
    assert info["embed_dim"] == 32 and info["output"]["shape"] == ["batch", 32]
    assert 0 <= info["check"]["max_abs_diff"] <= TOLERANCE and set(info["check"]["per_batch"]) == {"1", "4"}
    assert info["versions"]["torch"] == torch.__version__ and info["versions"]["onnxruntime"] == onnxruntime.__version__
    session = _session(out / info["onnx"])
    generator = torch.Generator().manual_seed(123)  # not the export's own check input
    for batch in (1, 4):
        images = torch.rand(batch, 3, 32, 32, generator=generator)
        with torch.no_grad():
            expected = model.encode_image(images)
        assert _max_diff(session, "images", images, expected) <= TOLERANCE, batch
    return info


@pytest.mark.slow
def test_export_a_mamba_student_both_towers_runs_in_onnxruntime_as_in_pytorch(tmp_path, capsys):
    """~20 s on one quiet core: the selective scan exports as standard ONNX ops, batch 1 and 4 from one file."""
    import onnx

    run = _save_clip(tmp_path / "distill-run", TINY_MAMBA)
    out = tmp_path / "exported"
    assert main(["export", f"run:{run}", "--out", str(out), "--tower", "both"]) == 0
    printed = capsys.readouterr().out
    assert "image" in printed and "text" in printed and "image_encoder.json" in printed
    model = load_model_ref(f"run:{run}")
    info = _check_image_file(out, f"run:{run}", model)
    assert info["scan_backend_traced"] == "reference"
    graph = onnx.load(str(out / "image_encoder.onnx")).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}, "a custom op would need dmclip to run"
    assert {node.op_type for node in graph.node} >= {"Exp", "Softplus"}, "the scan's ops are in the graph"

    text = json.loads((out / "text_encoder.json").read_text())
    assert text["input"]["shape"] == ["batch", 16] and text["input"]["dtype"] == "int64"
    assert text["input"]["tokenizer"]["vocab"] == TINY_TEXT["tokenizer"]["vocab"]
    assert 0 <= text["check"]["max_abs_diff"] <= TOLERANCE
    session = _session(out / "text_encoder.onnx")
    for batch in (1, 4):
        tokens = model.tokenize(CAPTIONS[-batch:])
        with torch.no_grad():
            expected = model.encode_text(tokens)
        assert _max_diff(session, "tokens", tokens, expected) <= TOLERANCE, batch
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.json", "image_encoder.onnx",
                                                    "text_encoder.json", "text_encoder.onnx"]


@pytest.mark.slow
def test_export_a_vit_dynamic_and_fixed_batch(tmp_path):
    run = _save_clip(tmp_path / "pretrain-run", TINY_VIT, seed=1)
    model = load_model_ref(str(run))
    assert main(["export", str(run), "--out", str(tmp_path / "dynamic")]) == 0  # a bare run directory works too
    _check_image_file(tmp_path / "dynamic", str(run), model)
    assert not (tmp_path / "dynamic" / "text_encoder.onnx").exists()  # --tower image is the default

    assert main(["export", f"run:{run}", "--out", str(tmp_path / "fixed"), "--batch", "3", "--opset", "18"]) == 0
    info = json.loads((tmp_path / "fixed" / "image_encoder.json").read_text())
    assert info["batch"] == 3 and info["input"]["shape"] == [3, 3, 32, 32] and info["opset"] == 18
    session = _session(tmp_path / "fixed" / "image_encoder.onnx")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _max_diff(session, "images", images, model.encode_image(images)) <= TOLERANCE
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # the batch axis is fixed: 1 is not 3
        session.run(None, {"images": images[:1].numpy()})
    # the bench's session: same outputs, idle threads told not to busy-wait (onnxruntime's default spins)
    quiet = onnx_session(tmp_path / "fixed" / "image_encoder.onnx", threads=2, spinning=False)
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with torch.no_grad():
        assert _max_diff(quiet, "images", images, model.encode_image(images)) <= TOLERANCE


@pytest.mark.slow
def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    import dmclip.export

    run = _save_clip(tmp_path / "run", TINY_VIT)
    monkeypatch.setattr(dmclip.export, "_difference", lambda *args: 3e-3)  # as if the graph computed otherwise
    out = tmp_path / "exported"
    assert main(["export", f"run:{run}", "--out", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0] == ("error: the ONNX image tower differs from PyTorch by 0.003 (max abs, batch 1), more than "
                      "0.0001; nothing was written"), err
    assert err[1].startswith("hint: ") and len(err) == 2
    assert not out.exists()


def test_scan_backend_switches_every_mamba_tower_and_puts_it_back():
    from dmclip.models.base import build_model
    from dmclip.models.mamba import scan_backend

    model = build_model({"family": "clip", "visual": {**TINY_MAMBA, "scan_backend": "chunked"}, "text": TINY_TEXT})
    backends = lambda: {block.mixer.backend for block in model.visual.blocks}
    with scan_backend(model, "reference") as towers:
        assert len(towers) == 1 and backends() == {"reference"} and model.arch["visual"]["scan_backend"] == "reference"
    assert backends() == {"chunked"} and model.arch["visual"]["scan_backend"] == "chunked"
    with pytest.raises(DmclipError, match="unknown selective-scan backend"):
        with scan_backend(model, "refrence"):
            pass
    assert backends() == {"chunked"}


@pytest.mark.parametrize("argv, error, hint", [
    (["nope-model"], "error: no model 'nope-model'", "hint: use run:<run dir>"),
    (["run:/no/such/run"], "error: run directory '/no/such/run' does not exist", "hint: `dmclip runs list`"),
    (["mamba-tiny-test", "--tower", "imag"], "error: unknown tower 'imag'", "did you mean 'image'?"),
    (["mamba-tiny-test", "--tower", "text"], "error: this model has no text tower", "hint: export --tower image"),
    (["mamba-tiny-test", "--opset", "12"], "error: opset 12 is outside what torch", "hint: pass --opset between 18"),
])
def test_bad_input_is_one_line_with_a_hint(argv, error, hint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", *argv, "--out", str(out)]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 2 and err[0].startswith(error) and hint in err[1], err
    assert not out.exists()


def test_an_existing_export_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "image_encoder.onnx").write_bytes(b"earlier export")
    assert main(["export", "mamba-tiny-test", "--out", str(tmp_path)]) == 2
    err = stderr_lines(capsys)
    assert err[0] == f"error: {tmp_path / 'image_encoder.onnx'} already exists" and "another --out" in err[1]
    assert (tmp_path / "image_encoder.onnx").read_bytes() == b"earlier export"


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert main(["export", "mamba-tiny-test", "--out", str(tmp_path / "out")]) == 2
    err = stderr_lines(capsys)
    assert err[0] == "error: dmclip export needs onnxruntime, which is not installed", err
    assert "pip install 'dmclip[export]'" in err[1]
