"""`dmclip doctor` tells a user which selective scan this install runs and why, and an install without a C++
compiler completes on the pure-PyTorch scan, saying so.

What a user would notice if this broke: a slow fallback nobody mentions (a student 5x slower on CPU, with no
clue why), an install that stops on a machine without g++, or a doctor that names a kernel the install lacks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dmclip.cli.main import main
from dmclip.models import scan, scan_build

REPO = Path(__file__).resolve().parents[1]


def doctor_output(capsys, monkeypatch, *argv) -> str:
    monkeypatch.setattr("dmclip.cli.doctor.console", Console(width=500))  # one line per fact
    capsys.readouterr()
    assert main(["doctor", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.requires_fused_scan
def test_doctor_names_the_kernel_and_its_instruction_set(capsys, monkeypatch):
    out = doctor_output(capsys, monkeypatch)
    isa = scan.kernel_isa()
    assert f"cpu: the fused C++ kernel, {isa} instructions" in out
    assert "torch uses 1 (" in out  # the test's one thread, as torch.get_num_threads() says
    facts = json.loads(doctor_output(capsys, monkeypatch, "--json"))
    assert facts["scan"]["backend"] == "cpu" and facts["scan"]["kernel"]["isa"] == isa
    assert facts["scan"]["kernel"]["cpu_isas"][-1] == "scalar"
    assert facts["threads"]["torch"] == 1
    assert set(facts["extras"]) <= {"export", "dashboards", "cuda"}


def test_doctor_names_the_pytorch_scan_and_why_when_the_kernel_did_not_load(capsys, monkeypatch):
    # a failed build, as load_extension() records it
    monkeypatch.setattr(scan_build, "_state", {"tried": True, "module": None, "fix": "the fix",
                                               "error": "RuntimeError: selective_scan.cpp:1: error: boom"})
    monkeypatch.setattr(scan, "_warned", set())
    out = doctor_output(capsys, monkeypatch)
    assert ("chunked: the pure-PyTorch scan, slower, because the fused CPU kernel is not available "
            "(RuntimeError: selective_scan.cpp:1: error: boom); fix: the fix") in out
    facts = json.loads(doctor_output(capsys, monkeypatch, "--json"))
    assert facts["scan"] == {"backend": "chunked", "kernel": None, "reason": facts["scan"]["reason"],
                             "fix": "the fix"}
    assert "boom" in facts["scan"]["reason"] and facts["threads"]["kernel"] is None


def run_module(module: str, env: dict, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def fresh_machine_env(tmp_path: Path, **extra: str) -> dict:
    """A machine on which nothing was built yet: its own HOME and cache, no DMCLIP_* switches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DMCLIP_")}
    env.update(HOME=str(tmp_path / "home"), DMCLIP_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO), **extra)
    return env


@pytest.mark.slow
def test_an_install_without_a_compiler_completes_on_the_pytorch_scan_and_doctor_says_so(tmp_path):
    no_compiler = tmp_path / "bin"  # PATH has no c++/g++/clang, CXX names nothing
    no_compiler.mkdir()
    env = fresh_machine_env(tmp_path, PATH=str(no_compiler), CXX=str(tmp_path / "nowhere" / "c++"))
    for required in ("", "1"):  # CI's switch asks for the kernel only where a compiler exists
        built = run_module("dmclip.models.scan_build", {**env, "DMCLIP_REQUIRE_FUSED_SCAN": required})
        assert built.returncode == 0, built.stdout + built.stderr
        assert built.stdout.strip() == (
            f"fused CPU selective scan NOT built (no C++ compiler (CXX={env['CXX']} not found)); dmclip uses the "
            "slower pure-PyTorch scan. Fix: install g++ (or clang), then run `python -m dmclip.models.scan_build`")
    doctor = run_module("dmclip.cli", {**env, "COLUMNS": "500"}, "doctor")
    assert doctor.returncode == 0, doctor.stderr
    assert "chunked: the pure-PyTorch scan, slower, because the fused CPU kernel is not available (no C++ " \
           "compiler" in doctor.stdout
    assert "fix: install g++ (or clang)" in doctor.stdout


@pytest.mark.slow
def test_a_failed_build_is_said_at_install_and_an_error_only_where_ci_requires_the_kernel(tmp_path):
    # a compiler that exists and fails (what a broken toolchain or a compile error looks like to the build)
    env = fresh_machine_env(tmp_path, CXX="false")
    built = run_module("dmclip.models.scan_build", env)
    assert built.returncode == 0, built.stdout + built.stderr
    line = built.stdout.strip().splitlines()[-1]
    assert line.startswith("fused CPU selective scan NOT built (") and line.endswith(
        "dmclip uses the slower pure-PyTorch scan. Fix: run `python -m dmclip.models.scan_build --verbose` to see "
        "the compiler's output")
    required = run_module("dmclip.models.scan_build", {**env, "DMCLIP_REQUIRE_FUSED_SCAN": "1"})
    assert required.returncode == 1
    assert required.stdout.strip().splitlines()[-1].startswith("error: fused CPU selective scan NOT built (")
