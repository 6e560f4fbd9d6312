"""The layering rule (docs/architecture.md) is enforced: an upward import fails `lint-imports`, naming the line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_an_upward_import_breaks_the_contract(tmp_path):
    """A metrics module importing a command, and config importing runs (a circle in the core), each fail
    `lint-imports` on a copy of the package, the offending line named."""
    shutil.copytree(REPO / "dmclip", tmp_path / "dmclip", ignore=shutil.ignore_patterns("builtin", "csrc", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    zeroshot = tmp_path / "dmclip" / "metrics" / "zeroshot.py"
    zeroshot.write_text(zeroshot.read_text() + "\n\ndef _upward():\n    from dmclip.distill import run  # noqa\n")
    config = tmp_path / "dmclip" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _circle():\n    from dmclip.runs import RunDir  # noqa\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-2000:]
    assert "Contracts: 0 kept, 2 broken." in out, out[-2000:]
    lines = zeroshot.read_text().count("\n")  # the import is the file's last line
    assert f"dmclip.metrics.zeroshot -> dmclip.distill (l.{lines})" in out, out[-2000:]
    assert "dmclip.config -> dmclip.runs" in out, out[-2000:]


def _import_circles(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "import-circles.py"), str(root)],
                          capture_output=True, text=True, timeout=120)


def test_no_import_circle_inside_the_package():
    result = _import_circles(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_lazy_import_circle_fails_the_circle_check_naming_its_lines(tmp_path):
    """A function-level import that closes a circle inside one package (invisible to the layer contracts)
    fails `make lint`'s circle check, with both imports' lines."""
    shutil.copytree(REPO / "dmclip", tmp_path / "dmclip", ignore=shutil.ignore_patterns("builtin", "csrc", "__pycache__"))
    members = tmp_path / "dmclip" / "data" / "wds_members.py"
    members.write_text(members.read_text() + "\n\ndef _circle():\n    from dmclip.data.wds import load  # noqa\n")
    result = _import_circles(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "import circle: dmclip.data.wds -> dmclip.data.wds_members -> dmclip.data.wds\n" in result.stdout
    assert f"dmclip.data.wds_members -> dmclip.data.wds (l.{members.read_text().count(chr(10))})" in result.stdout
    assert "import circle(s) in dmclip: move what both sides need" in result.stderr
