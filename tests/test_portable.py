"""Nothing of the machine that made it: no page, recipe or shipped model record names a directory of one
machine, and the two writers of such records (the builtin shipper and `dmclip runs report`) write run
directories as paths a reader can use anywhere.

What a user would notice if these broke: a README line or a `builtin:` record pointing at /work/... or
/home/someone/..., a docs table whose footer cannot be rerun outside the author's machine.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from dmclip.cli.main import main
from dmclip.runs import RunDir

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TEXT = (".md", ".yaml", ".yml", ".json", ".jsonl", ".txt", ".cff")


@pytest.fixture(scope="module")
def shipper():
    spec = importlib.util.spec_from_file_location("ship_builtin", REPO / "scripts" / "ship-builtin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _published_files() -> list[Path]:
    roots = [REPO / "docs", REPO / "recipes", REPO / "dmclip" / "builtin"]
    found = [REPO / "README.md", REPO / "CITATION.cff"]
    for root in roots:
        found += [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix in SHIPPED_TEXT]
    return found


@pytest.mark.parametrize("path", ["/work/x", "/home/me/data.csv", "/root/.cache", "/tmp/abl/runs",
                                  "/Users/me/runs", "C:\\Users\\me"])
def test_the_pattern_finds_each_kind_of_machine_path(shipper, path):
    assert shipper.MACHINE_PATH.search(f"--data csv:{path} and `{path}`")


@pytest.mark.parametrize("text", ["runs/pretrain/x", "~/.cache/dmclip", "data/tmp/x", "/data/imagenet/val",
                                  "csv:my-data/train.csv"])
def test_the_pattern_leaves_portable_paths_alone(shipper, text):
    assert not shipper.MACHINE_PATH.search(text)


def test_no_page_recipe_or_builtin_record_names_a_machine_path(shipper):
    files = _published_files()
    assert any(p.parent.name == "world-vit" for p in files) and len(files) > 20
    leaks = [f"{p.relative_to(REPO)}:{n}: {line.strip()[:120]}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if shipper.MACHINE_PATH.search(line)]
    assert not leaks, "\n".join(leaks)


def _completed_run(root: Path, resolved: str = "objective: clip\n") -> Path:
    run = root / "pretrain" / "20260101-000000-teacher-abc123"
    (run / "model").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "model" / "model.json").write_text('{"family": "clip"}\n')
    (run / "model" / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    argv = ["dmclip", "pretrain", "recipes/pretrain-clip-teacher.yaml", "--runs-dir", str(root), "--name", "teacher"]
    (run / "run.json").write_text(json.dumps({"command": "pretrain", "status": "completed", "argv": argv}))
    (run / "results.json").write_text(json.dumps(
        {"train": {"steps": 3, "checkpoint": str(run / "checkpoints" / "last.pt")}, "zeroshot": {"acc1": 0.5}}))
    (run / "resolved.yaml").write_text(resolved)
    return run


def test_the_shipper_writes_the_model_unchanged_and_a_portable_record(shipper, tmp_path):
    run = _completed_run(tmp_path / "runs")
    out = shipper.ship(run, "teacher", root=tmp_path / "builtin")
    for name in ("model.json", "model.safetensors"):
        assert (out / name).read_bytes() == (run / "model" / name).read_bytes()
    info = json.loads((out / "run.json").read_text())
    assert info["argv"] == ["dmclip", "pretrain", "recipes/pretrain-clip-teacher.yaml", "--name", "teacher"]
    assert json.loads((out / "results.json").read_text())["train"]["checkpoint"] == "checkpoints/last.pt"
    for path in out.iterdir():
        if path.suffix in SHIPPED_TEXT:
            text = path.read_text()
            assert str(tmp_path) not in text and not shipper.MACHINE_PATH.search(text), path.name


def test_the_shipper_refuses_a_record_naming_a_machine_path_and_writes_nothing(shipper, tmp_path):
    run = _completed_run(tmp_path / "runs", resolved="data:\n  train: csv:/home/me/private/train.csv\n")
    with pytest.raises(ValueError, match="resolved.yaml: train: csv:/home/me/private/train.csv"):
        shipper.ship(run, "teacher", root=tmp_path / "builtin")
    assert not (tmp_path / "builtin").exists()


def _run_with_result(root: Path, name: str) -> RunDir:
    run = RunDir.create("pretrain", name, None, root=root, argv=["dmclip", "pretrain"], seed=0)
    run.write_results({"zeroshot": {"acc1": 0.5}})
    return run


def test_runs_report_names_each_run_by_its_path_under_the_runs_root(tmp_path, capsys, monkeypatch):
    first, second = _run_with_result(tmp_path / "runs", "a"), _run_with_result(tmp_path / "runs", "b")
    expected = f"pretrain/{first.path.name} pretrain/{second.path.name}"

    assert main(["runs", "report", str(first.path), str(second.path), "--metrics", "zeroshot.acc1"]) == 0
    footer = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Rendered by"))
    assert f"`dmclip runs report {expected}`" in footer and str(tmp_path) not in footer

    argv = ["dmclip", "runs", "report", str(first.path), str(second.path), "--metrics", "zeroshot.acc1"]
    monkeypatch.setattr(sys, "argv", argv)  # as typed in a shell: the command is echoed from argv
    assert main(argv[1:]) == 0
    footer = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Rendered by"))
    assert f"`dmclip runs report {expected} --metrics zeroshot.acc1`" in footer and str(tmp_path) not in footer
