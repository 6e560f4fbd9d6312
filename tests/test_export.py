"""`dmclip export` as a user meets it: an ONNX file that onnxruntime runs to PyTorch's numbers, a pt2 program
that torch runs without dmclip (the fused scan's library beside it), a JSON that says how to feed them, and
one-line errors for bad input.

The exported files are loaded here with onnxruntime or torch directly (not through dmclip's helpers; the pt2
program in a process that imports no dmclip) and compared with the model that `load_model_ref` loads, on inputs
other than the ones the export checked itself.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import stderr_lines

from dmclip.cli.main import main
from dmclip.data.tokenizer import Tokenizer
from dmclip.errors import DmclipError
from dmclip.export.to_onnx import onnx_session
from dmclip.models.base import IMAGE_MEAN, IMAGE_STD, save_model
from dmclip.models.refs import load_model_ref

requires_onnx = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None,
                                   reason="pip install -e '.[export]' for the ONNX export tests")

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
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _max_diff(session, name: str, inputs: torch.Tensor, expected: torch.Tensor) -> float:
    got = torch.from_numpy(session.run(None, {name: inputs.numpy()})[0])
    assert got.shape == expected.shape
    return float((got - expected).abs().max())


def _check_image_file(out: Path, ref: str, model) -> dict:
    import onnxruntime

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
@requires_onnx
def test_export_a_mamba_student_both_towers_runs_in_onnxruntime_as_in_pytorch(tmp_path, capsys):
    """~20 s on one quiet core: the selective scan exports as standard ONNX ops, batch 1 and 4 from one file."""
    import onnx

    run = _save_clip(tmp_path / "distill-run", TINY_MAMBA)
    out = tmp_path / "exported"
    assert main(["export", f"run:{run}", "--out", str(out), "--tower", "both"]) == 0
    printed = capsys.readouterr()
    assert "image" in printed.out and "text" in printed.out and "image_encoder.json" in printed.out
    assert "--format pt2 keeps the kernel" in " ".join(printed.err.split())  # the slow scan is said, with the fix
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
@requires_onnx
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
@pytest.mark.parametrize("format, visual, loader", [
    pytest.param("onnx", TINY_VIT, "run_onnx_file", marks=requires_onnx),
    pytest.param("pt2", TINY_MAMBA, "load_program", marks=pytest.mark.requires_fused_scan),
])
def test_an_export_that_differs_from_pytorch_is_refused_and_leaves_nothing(format, visual, loader, tmp_path,
                                                                            monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"dmclip.export.to_{format}")
    real = getattr(module, loader)  # the exported file as the check runs it
    monkeypatch.setattr(module, loader, lambda *args: (lambda inputs: real(*args)(inputs) + 3e-3))  # computes otherwise
    run = _save_clip(tmp_path / "run", visual)
    out = tmp_path / "exported"
    assert main(["export", f"run:{run}", "--out", str(out), "--format", format]) == 2
    err = stderr_lines(capsys)
    assert re.fullmatch(rf"error: the {'ONNX' if format == 'onnx' else 'pt2'} image tower differs from PyTorch by "
                        r"0\.003 \(max abs, batch [14]\), more than 0\.0001; nothing was written", err[0]), err
    assert err[1].startswith("hint: ") and len(err) == 2
    assert not out.exists()  # neither the file nor the kernel's library


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


@requires_onnx
@pytest.mark.parametrize("argv, error, hint", [
    (["nope-model"], "error: no model 'nope-model'", "hint: use run:<run dir>"),
    (["run:/no/such/run"], "error: run directory '/no/such/run' does not exist", "hint: `dmclip runs list`"),
    (["mamba-tiny-test", "--tower", "imag"], "error: unknown tower 'imag'", "did you mean 'image'?"),
    (["mamba-tiny-test", "--tower", "text"], "error: this model has no text tower", "hint: export --tower image"),
    (["mamba-tiny-test", "--opset", "12"], "error: opset 12 is outside what torch", "hint: pass --opset between 18"),
    (["mamba-tiny-test", "--format", "pt3"], "error: unknown export format 'pt3'", "did you mean 'pt2'?"),
    (["mamba-tiny-test", "--format", "pt2", "--opset", "18"], "error: --opset is an ONNX option",
     "hint: leave --opset out with --format pt2"),
])
def test_bad_input_is_one_line_with_a_hint(argv, error, hint, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", *argv, "--out", str(out)]) == 2
    err = stderr_lines(capsys)
    assert len(err) == 2 and err[0].startswith(error) and hint in err[1], err
    assert not out.exists()


@pytest.mark.parametrize("format, earlier", [pytest.param("onnx", "image_encoder.onnx", marks=requires_onnx),
                                             ("pt2", "image_encoder_ops.so"), ("pt2", "image_encoder.json")])
def test_an_existing_export_is_not_overwritten(format, earlier, tmp_path, capsys):
    (tmp_path / earlier).write_bytes(b"earlier export")
    assert main(["export", "mamba-tiny-test", "--out", str(tmp_path), "--format", format]) == 2
    err = stderr_lines(capsys)
    assert err[0] == f"error: {tmp_path / earlier} already exists" and "another --out" in err[1]
    assert (tmp_path / earlier).read_bytes() == b"earlier export" and len(list(tmp_path.iterdir())) == 1


def test_missing_onnx_packages_name_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    assert main(["export", "mamba-tiny-test", "--out", str(tmp_path / "out")]) == 2
    err = stderr_lines(capsys)
    assert err[0] == "error: dmclip export needs onnxruntime, which is not installed", err
    assert "pip install -e '.[export]'" in err[1]


# ------------------------------------------------------------------------------------------ pt2

# what a user runs from the export directory: torch and the files there, nothing of dmclip
NO_DMCLIP_SCRIPT = """\
import sys
import torch
torch.ops.load_library("image_encoder_ops.so")  # the fused scan, as torch.ops.dmclip.bimamba_stack
encoder = torch.export.load("image_encoder.pt2").module()
with torch.inference_mode():
    outputs = [encoder(images) for images in torch.load(sys.argv[1])]
torch.save(outputs, sys.argv[2])
print(sorted(name for name in sys.modules if name.split(".")[0] == "dmclip"))
"""


def _python(script: str, cwd: Path, *args: str) -> str:
    """stdout of ``script`` run by this interpreter in ``cwd``, failing the test with its stderr if it fails."""
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
@pytest.mark.requires_fused_scan
def test_a_pt2_mamba_student_runs_without_dmclip_as_in_pytorch(tmp_path, capsys):
    """~15 s: the image tower's block stack is one operator of the fused kernel (even for a student saved on
    another scan backend), whose library is written beside the program; a script that imports no dmclip runs
    it to PyTorch's numbers at batch 1 and 4."""
    run = _save_clip(tmp_path / "distill-run", {**TINY_MAMBA, "scan_backend": "chunked"})
    out = tmp_path / "exported"
    assert main(["export", f"run:{run}", "--out", str(out), "--tower", "both", "--format", "pt2"]) == 0
    assert "image_encoder_ops.so" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["image_encoder.json", "image_encoder.pt2", "image_encoder_ops.so",
                                                    "text_encoder.json", "text_encoder.pt2"]
    info = json.loads((out / "image_encoder.json").read_text())
    assert info["format"] == "dmclip-pt2" and info["files"] == ["image_encoder.pt2", "image_encoder_ops.so"]
    assert info["operators"] == ["dmclip::bimamba_stack"] and info["requires"]["torch"] == torch.__version__
    assert info["input"]["shape"] == ["batch", 3, 32, 32] and 0 <= info["check"]["max_abs_diff"] <= TOLERANCE
    assert "torch.ops.load_library('image_encoder_ops.so')" in info["python"][1]

    model = load_model_ref(f"run:{run}")
    generator = torch.Generator().manual_seed(123)  # not the export's own check input
    batches = [torch.rand(batch, 3, 32, 32, generator=generator) for batch in (1, 4)]
    torch.save(batches, tmp_path / "inputs.pt")
    imported = _python(NO_DMCLIP_SCRIPT, out, str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt"))
    assert imported.strip() == "[]", imported
    for images, got in zip(batches, torch.load(tmp_path / "outputs.pt"), strict=True):
        with torch.no_grad():
            assert float((got - model.encode_image(images)).abs().max()) <= TOLERANCE, len(images)

    program = torch.export.load(out / "image_encoder.pt2")  # the image tower's weights only, not the text tower's
    assert program.state_dict and all(name.startswith("model.visual.") for name in program.state_dict)
    text = json.loads((out / "text_encoder.json").read_text())
    assert text["library"] is None and text["files"] == ["text_encoder.pt2"] and text["operators"] == []
    tokens = model.tokenize(CAPTIONS)
    with torch.no_grad():
        got = torch.export.load(out / "text_encoder.pt2").module()(tokens)
        assert float((got - model.encode_text(tokens)).abs().max()) <= TOLERANCE


@pytest.mark.requires_fused_scan
def test_the_block_stack_operator_matches_the_reference_and_traces():
    """The operator an exported program calls: the reference scan's numbers, and what torch.export needs of it
    (schema, fake-tensor kernel), checked by torch.library.opcheck."""
    from dmclip.models.mamba import VisionMamba, scan_backend

    torch.manual_seed(0)
    model = VisionMamba(**{k: v for k, v in TINY_MAMBA.items() if k != "family"}).eval()
    params = [t.detach() for block in model.blocks for t in _flat(block.fused_params())]
    x = torch.randn(3, 17, 32)  # (batch, L, width): 17 tokens, not a multiple of any vector width
    with torch.no_grad(), scan_backend(model, "reference"):
        expected = x
        for block in model.blocks:
            expected = block(expected)
    got = torch.ops.dmclip.bimamba_stack(x, params, model.blocks[0].norm.eps)
    assert got.shape == x.shape and float((got - expected).abs().max()) <= TOLERANCE
    assert set(torch.library.opcheck(torch.ops.dmclip.bimamba_stack.default, (x, params, 1e-5)).values()) == {"SUCCESS"}


def _flat(fused_params: tuple) -> list:
    norm_weight, in_proj_weight, mixer_params, out_proj_weight = fused_params
    return [norm_weight, in_proj_weight, *mixer_params, out_proj_weight]


# a process that has dmclip's kernel and also loads an export's copy of it, in either order
LOAD_BOTH = {
    "dmclip first": "cpu_extension()\ntorch.ops.load_library(sys.argv[1])",
    "library first": "torch.ops.load_library(sys.argv[1])\ncpu_extension()",
}


@pytest.mark.slow
@pytest.mark.requires_fused_scan
@pytest.mark.parametrize("order", LOAD_BOTH)
def test_an_exported_library_loads_beside_dmclip_s_own_kernel(order, tmp_path):
    """~5 s: the operator is registered once, by whichever copy loads first, and runs; a second registration
    would abort the process as the library loads."""
    from dmclip.models.scan_ext import cpu_extension

    shutil.copyfile(cpu_extension().__file__, tmp_path / "image_encoder_ops.so")
    script = "\n".join(["import sys", "import torch", "from dmclip.models.scan_ext import cpu_extension",
                         LOAD_BOTH[order], "x = torch.ones(1, 3, 4)",
                         "params = [torch.ones(4), torch.ones(8, 4), torch.ones(2, 4, 4), torch.ones(2, 4),",
                         "          torch.ones(2, 5, 4), torch.ones(2, 4, 1), torch.ones(2, 4), torch.zeros(2, 4, 2),",
                         "          torch.ones(2, 4), torch.ones(4, 4)]",
                         "print(torch.ops.dmclip.bimamba_stack(x, params, 1e-5).isfinite().all().item())"])
    assert _python(script, tmp_path, str(tmp_path / "image_encoder_ops.so")).strip() == "True"


def test_pt2_without_the_fused_scan_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    from dmclip.models import scan_build, scan_ext

    monkeypatch.setattr(scan_ext, "cpu_extension", lambda: None)
    monkeypatch.setattr(scan_build, "extension_error", lambda: "no C++ compiler")
    assert main(["export", "mamba-tiny-test", "--out", str(tmp_path / "out"), "--format", "pt2"]) == 2
    err = stderr_lines(capsys)
    assert err[0] == ("error: --format pt2 runs Vision-Mamba blocks on the fused CPU scan, which is not built here "
                      "(no C++ compiler)"), err
    assert "python -m dmclip.models.scan_build" in err[1] and "--format onnx" in err[1]
    assert not (tmp_path / "out").exists()
