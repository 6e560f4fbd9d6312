"""Nothing dmclip loads can run code: checkpoints (weights_only), model weights (safetensors), recipes
(safe YAML), plugins (installed entry points only).

What a user would notice if this broke: downloading someone's run directory or recipe and having it execute
a command on their machine, or a `dmclip.py`/`plugins` file in the current directory hijacking the CLI.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dmclip.cli.main import main
from dmclip.errors import DmclipError
from dmclip.io import torch_load
from dmclip.runs import RunDir

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this calls os.system: a checkpoint that runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> None:
    # a real torch checkpoint (zip) whose pickle holds the payload next to ordinary tensors
    torch.save({"format": 1, "step": 1, "model": {"w": torch.zeros(2)}, "evil": Payload(marker)}, path)


def test_a_checkpoint_with_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil_checkpoint(tmp_path / "last.pt", marker)
    with pytest.raises(DmclipError) as info:
        torch_load(tmp_path / "last.pt")
    assert "cannot be read" in info.value.message and "not a dmclip checkpoint" in info.value.hint
    assert not marker.exists()


def test_a_plain_pickle_checkpoint_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "last.pt").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DmclipError):
        torch_load(tmp_path / "last.pt")
    assert not marker.exists()


def test_resume_from_a_checkpoint_with_code_is_one_error_line(tmp_path, capsys):
    """`dmclip pretrain --resume` of a run whose last.pt was swapped for a malicious one."""
    from dmclip.pretrain import PretrainConfig

    marker = tmp_path / "pwned"
    run = RunDir.create("pretrain", "evil", PretrainConfig(), root=tmp_path / "runs")
    run.update_info(status="interrupted")
    (run.path / "tokenizer.json").write_text('{"context_length": 8, "vocab": null}')
    run.checkpoint_path().parent.mkdir()  # made by the first checkpoint a run saves
    evil_checkpoint(run.checkpoint_path(), marker)
    before = run.checkpoint_path().read_bytes()
    # the default config would build world-train at full size: make the data small, as the run would be
    (run.path / "resolved.yaml").write_text(
        "command: pretrain\ndata:\n  train: world-train:size=16\ntrain:\n  batch_size: 8\n  steps: 2\n"
        "  progress: false\neval:\n  zeroshot: ''\nmodel:\n  vision_width: 16\n  vision_depth: 1\n"
        "  text_width: 16\n  text_depth: 1\n  embed_dim: 8\n  patch_size: 8\n")
    assert main(["pretrain", "--resume", str(run.path)]) == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {run.checkpoint_path()} cannot be read" in err and "hint:" in err
    assert not marker.exists()
    assert run.checkpoint_path().read_bytes() == before and run.status == "failed"


def test_training_checkpoints_are_weights_only_and_models_are_safetensors(tmp_path):
    """What dmclip writes loads with weights_only=True, and model weights need no pickle at all."""
    from safetensors.torch import load_file

    from dmclip.models.base import load_saved_model, save_model
    from dmclip.registry import students

    model = students.get("vit-nano")
    save_model(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["model.json", "model.safetensors"]
    assert set(load_file(str(tmp_path / "model" / "model.safetensors"))) == set(model.state_dict())
    loaded = load_saved_model(tmp_path / "model")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    run = RunDir.create("pretrain", "x", None, root=tmp_path)
    run.save_checkpoint({"format": 1, "step": 3, "model": model.state_dict(), "rng": {"python": [1, 2]}})
    assert torch.load(run.checkpoint_path(), weights_only=True)["step"] == 3


def test_a_recipe_code_tag_never_runs_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "pwned"
    for tag in ("!!python/object/apply:os.system", "!!python/object/new:os.system", "!!python/name:os.system"):
        (tmp_path / "r.yaml").write_text(f"objective: {tag} ['touch {marker}']\n")
        assert main(["pretrain", str(tmp_path / "r.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 2
        assert "refused tag" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_plugins_come_only_from_installed_entry_points(tmp_path):
    """A module named like a plugin in the current directory, or named in a recipe, is never imported."""
    marker = tmp_path / "imported"
    for name in ("dmclip_plugins.py", "plugins.py", "dmclip_plugin.py", "conftest_plugin.py"):
        (tmp_path / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    (tmp_path / "r.yaml").write_text("plugins: [plugins]\nobjective: clip\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONSAFEPATH", None)
    script = ("import sys; from dmclip.cli.main import main; from dmclip import registry;"
              "[r.names() for r in (registry.students, registry.teachers, registry.losses, registry.datasets)];"
              "code = main(['list', 'students']); code2 = main(['pretrain', 'r.yaml', '--runs-dir', 'runs']);"
              "sys.exit(0 if (code, code2) == (0, 2) else 1)")
    # `python -c` puts the current directory first on sys.path: the worst case for a stray module
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "unknown config key 'plugins'" in result.stderr
    assert not marker.exists()


def test_the_plugin_loader_imports_only_dmclip_packages_and_the_entry_point_group(monkeypatch):
    """Every import load_plugins makes is a built-in dmclip package or an entry point of `dmclip.plugins`."""
    import importlib
    import importlib.metadata

    from dmclip import registry

    imported, groups = [], []
    real_import, real_entry_points = importlib.import_module, importlib.metadata.entry_points
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: (imported.append(name), real_import(name, *a))[1])
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda **kw: (groups.append(kw.get("group")), real_entry_points(**kw))[1])
    registry.load_plugins(force=True)
    assert imported and all(name == "dmclip" or name.startswith("dmclip.") for name in imported), imported
    assert groups == ["dmclip.plugins"]
