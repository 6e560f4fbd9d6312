"""The shared core's overheads: recipe resolution, registry lookup, CLI start-up.

These are the costs every command pays before it does any work; a regression here is felt on every
`dmclip` call and every sweep point.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.common import format_seconds, interleaved, repeats, row
from dmclip.config import field, load_config, to_yaml


@dataclass
class _Data:
    name: str = field("world", "dataset")
    image_size: int = field(64, "pixels", min=8)
    batch_size: int = field(32, "images per step", min=1)
    workers: int = field(0, "loader processes", min=0)
    max_skip_fraction: float = field(0.01, "fraction of bad samples allowed", min=0.0, max=1.0)
    augment: list[str] = field(["crop", "flip"], "augmentations")


@dataclass
class _Optim:
    lr: float = field(5e-4, "peak learning rate", min=0.0)
    weight_decay: float = field(0.1, "AdamW decay", min=0.0)
    betas: tuple[float, float] = field((0.9, 0.98), "AdamW betas")
    warmup_steps: int = field(100, "steps", min=0)
    epochs: int = field(10, "epochs", min=1)


@dataclass
class _Loss:
    alpha: float = field(0.5, "KD weight", min=0.0, max=1.0)
    temperature: float = field(0.07, "softmax temperature", min=0.0)
    kind: str = field("kl", "KD loss", choices=["kl", "mse", "cosine"])


@dataclass
class BenchConfig:
    """About the size of a distill config: three sections, ~20 fields."""

    seed: int = field(0, "random seed")
    student: str = field("mamba-ti", "student name")
    teacher: str = field("open_clip:ViT-B-32", "teacher reference")
    data: _Data = field(_Data(), "data")
    optim: _Optim = field(_Optim(), "optimizer")
    loss: _Loss = field(_Loss(), "loss")


def _config_rows() -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(to_yaml(BenchConfig()))
        text = recipe.read_text()
        times = interleaved({
            "yaml": lambda: yaml.safe_load(text),
            "dmclip": lambda: load_config(BenchConfig, recipe, sets=["optim.lr=1e-3", "loss.alpha=0.75"]),
        }, repeats=repeats(15), warmup=3, number=20)
    ratio = times["yaml"] / times["dmclip"]
    return [row("recipe -> validated config (20 fields, 2 --set)", format_seconds(times["dmclip"]),
                baseline="yaml.safe_load of the same file", ratio=round(ratio, 2), goal=">= 0.33x",
                met=ratio >= 1 / 3, notes="validation costs at most 3x the bare YAML parse")]


def _registry_rows() -> list[dict]:
    from dmclip.registry import Registry

    reg: Registry = Registry("students")
    plain = {}
    for i in range(200):
        reg.add(f"model-{i}", lambda: None)
        plain[f"model-{i}"] = lambda: None
    reg.names()  # plugins loaded once, as in a real process
    times = interleaved({"dict": lambda: plain["model-123"], "registry": lambda: reg.entry("model-123")},
                        repeats=repeats(15), warmup=100, number=2000)
    return [row("registry lookup (200 entries)", format_seconds(times["registry"]), baseline="dict lookup",
                ratio=round(times["dict"] / times["registry"], 2), goal="< 10 µs", met=times["registry"] < 1e-5,
                notes="a name lookup costs nothing next to building the model")]


def _startup_rows() -> list[dict]:
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": repo}

    def launch(code: str):
        return lambda: subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)

    times = interleaved({"python": launch("pass"),
                         "dmclip": launch("import sys; from dmclip.cli.main import main; sys.exit(main(['--version']))")},
                        repeats=repeats(5), warmup=1)
    return [row("CLI start-up (dmclip --version)", format_seconds(times["dmclip"]), baseline="python -c pass",
                ratio=round(times["python"] / times["dmclip"], 2), goal="< 1 s", met=times["dmclip"] < 1.0,
                notes="what a user waits for before any output (torch is not imported for --version)")]


def main() -> list[dict]:
    return _config_rows() + _registry_rows() + _startup_rows()
