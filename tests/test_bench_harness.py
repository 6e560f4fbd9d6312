"""`make bench`: the harness runs benchmarks, survives a broken one, and appends a section per run."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_all(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))  # `benchmarks` is a top-level package beside `dmclip`
    monkeypatch.delenv("DMCLIP_BENCH_QUICK", raising=False)
    from benchmarks import run_all

    return run_all


def test_core_bench_appends_a_section(run_all, tmp_path, capsys):
    docs = tmp_path / "benchmarks.md"
    assert run_all.main(["--only", "core", "--quick", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n")
    assert "Machine: " in text and "torch " in text and "usable cores" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0] == "| benchmark | value | baseline | ratio | goal | met | notes |"
    assert any(line.startswith("| recipe -> validated config") for line in table)
    assert any(line.startswith("| registry lookup") for line in table)
    assert any(line.startswith("| CLI start-up (dmclip --version)") for line in table)


def _bench(directory: Path, name: str, body: str) -> None:
    (directory / f"bench_{name}.py").write_text(textwrap.dedent(body))


def test_a_failing_bench_is_reported_and_the_rest_still_run(run_all, tmp_path, capsys):
    benches = tmp_path / "benches"
    benches.mkdir()
    _bench(benches, "alpha", """
        from benchmarks.common import format_seconds, interleaved, row, timeit

        def main():
            t = interleaved({"a": lambda: sum(range(100)), "b": lambda: sum(range(1000))}, repeats=3, number=10)
            assert timeit(lambda: None, repeats=2, warmup=0) >= 0
            return [row("sum", format_seconds(t["a"]), baseline="longer sum", ratio=t["b"] / t["a"],
                        goal=">= 1x", met=t["b"] >= t["a"], notes="a | b")]
    """)
    _bench(benches, "boom", """
        def main():
            raise RuntimeError("no GPU here")
    """)
    _bench(benches, "malformed", """
        def main():
            return [{"benchmark": "x"}]
    """)
    _bench(benches, "zulu", """
        def main():
            return [{"benchmark": "last one", "value": "1 s"}]
    """)
    docs = tmp_path / "out.md"
    assert run_all.main(["--bench-dir", str(benches), "--docs", str(docs)]) == 1
    text = docs.read_text()
    assert "| sum |" in text and "a \\| b" in text  # a pipe in a cell does not break the table
    assert "| last one | 1 s | - | - | - | - | - |" in text  # the benchmark after the failures ran
    assert "FAILED: bench_boom: RuntimeError: no GPU here" in text
    assert "FAILED: bench_malformed: ValueError" in text and "missing ['value']" in text
    assert "RuntimeError: no GPU here" in capsys.readouterr().err  # the traceback, for the author

    assert run_all.main(["--bench-dir", str(benches), "--only", "zulu", "--docs", str(docs)]) == 0
    text = docs.read_text()
    assert text.count("# Benchmarks") == 1 and text.count("\n## ") == 2  # one section per run, appended


def test_only_an_unknown_name_is_an_error(run_all, tmp_path, capsys):
    assert run_all.main(["--only", "nothing", "--docs", str(tmp_path / "x.md")]) == 2
    assert "no benchmark named nothing; have: " in capsys.readouterr().err
    assert not (tmp_path / "x.md").exists()


def test_interleaved_times_every_contender(run_all):
    from benchmarks.common import format_seconds, interleaved

    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert set(times) == {"a", "b"} and all(t >= 0 for t in times.values())
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # rotated: neither always goes first
    assert format_seconds(0.0041) == "4.1 ms" and format_seconds(2.5) == "2.5 s" and format_seconds(3e-7) == "300 ns"


def test_module_entry_point_runs(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--only", "nothing"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no benchmark named nothing" in out.stderr
