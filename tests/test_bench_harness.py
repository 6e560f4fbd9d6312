"""`make bench`: each bench in its own process, a thread count per bench (restored, written per row), a complete section per run
(a broken bench is a FAILED row), partial runs print only, a complete run replaces the one recorded."""

from __future__ import annotations

import re
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


@pytest.fixture
def two_threads():
    """The run's default count is 2 here (conftest sets 1 per test), so a bench at 1 thread is told apart."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(saved)


def _table(text: str) -> list[list[str]]:
    """The cells of every table row of a section, header included."""
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith("| ")]


def test_core_bench_prints_a_section_and_records_nothing(run_all, tmp_path, capsys):
    out = tmp_path / "benchmarks.md"
    assert run_all.main(["--only", "core", "--quick", "--out", str(out)]) == 0
    assert not out.exists() and not (tmp_path / "benchmarks-history.md").exists()  # a partial run only prints
    text = capsys.readouterr().out
    assert "(--only core and --quick smoke run: printed only, not recorded)" in text
    machine = next(line for line in text.splitlines() if line.startswith("Machine: "))
    assert "torch " in machine and "usable cores" in machine and "threads" not in machine  # counts are per row
    assert " GiB memory, " in machine  # the hardware line of every results table names the memory
    assert re.search(r"Wall time: \d+\.\d min\.", text)  # and how long the run took
    table = _table(text)
    assert table[0] == ["benchmark", "value", "threads", "baseline", "ratio", "goal", "met", "notes"]
    names = [cells[0] for cells in table[1:]]
    assert any(n.startswith("recipe -> validated config") for n in names)
    assert any(n.startswith("registry lookup") for n in names)
    assert "CLI start-up (dmclip --version)" in names
    assert all(cells[2].isdigit() for cells in table[1:])  # every row says its thread count


def _bench(directory: Path, name: str, body: str) -> None:
    (directory / f"bench_{name}.py").write_text(textwrap.dedent(body))


THREAD_BENCHES = {
    "a_one": """
        import torch
        THREADS = 1

        def main():
            return [{"benchmark": "a at its own count", "value": str(torch.get_num_threads())}]
    """,
    "b_default": """
        import torch

        def main():
            return [{"benchmark": "b at the default", "value": str(torch.get_num_threads())}]
    """,
    "c_leaks": """
        import torch

        def main():
            torch.set_num_threads(1)  # and never puts it back
            return [{"benchmark": "c", "value": "1 s"}]
    """,
    "d_inner": """
        import torch
        from benchmarks.common import row, threads

        def main():
            with threads(1):
                inner = row("d inside threads(1)", str(torch.get_num_threads()), threads=1)
            return [inner, row("d outside", str(torch.get_num_threads()))]
    """,
    "e_after": """
        import torch

        def main():
            return [{"benchmark": "e after the leak", "value": str(torch.get_num_threads())}]
    """,
}


def test_threads_are_set_per_bench_restored_after_it_and_written_per_row(run_all, tmp_path, capsys, two_threads):
    import torch

    benches = tmp_path / "benches"
    benches.mkdir()
    for name, body in THREAD_BENCHES.items():
        _bench(benches, name, body)
    out = tmp_path / "benchmarks.md"
    assert run_all.main(["--bench-dir", str(benches), "--out", str(out)]) == 1  # c_leaks fails
    assert torch.get_num_threads() == two_threads
    rows = {cells[0]: cells for cells in _table(out.read_text())[1:]}
    # value = the count the bench saw; column 2 = the count the section says; they agree on every row
    assert rows["a at its own count"][1:3] == ["1", "1"]
    assert rows["b at the default"][1:3] == ["2", "2"]  # a_one's count did not leak into b
    assert rows["d inside threads(1)"][1:3] == ["1", "1"] and rows["d outside"][1:3] == ["2", "2"]
    assert rows["e after the leak"][1:3] == ["2", "2"]  # the harness put back what c_leaks changed
    leak = rows["bench_c_leaks"]
    assert leak[1] == "FAILED" and leak[2] == "2"
    assert "changed torch's thread count from 2 to 1" in leak[-1]
    assert "c" not in rows  # rows of a bench that broke the contract are not recorded as figures


def test_threads_context_restores_on_error(run_all):
    import torch

    from benchmarks.common import threads

    saved = torch.get_num_threads()
    with pytest.raises(RuntimeError), threads(saved + 1):
        assert torch.get_num_threads() == saved + 1
        torch.set_num_threads(saved + 2)
        raise RuntimeError("boom")
    assert torch.get_num_threads() == saved


FAILING_BENCHES = {
    "alpha": """
        from benchmarks.common import format_seconds, interleaved, row, timeit

        def main():
            t = interleaved({"a": lambda: sum(range(100)), "b": lambda: sum(range(1000))}, repeats=3, number=10)
            assert timeit(lambda: None, repeats=2, warmup=0) >= 0
            return [row("sum", format_seconds(t["a"]), baseline="longer sum", ratio=t["b"] / t["a"],
                        goal=">= 1x", met=t["b"] >= t["a"], notes="a | b")]
    """,
    "boom": """
        def main():
            raise RuntimeError("no GPU here")
    """,
    "malformed": """
        def main():
            return [{"benchmark": "x"}]
    """,
    "zulu": """
        def main():
            return [{"benchmark": "last one", "value": "1 s"}]
    """,
}


def test_a_failing_bench_is_a_failed_row_in_a_complete_section(run_all, tmp_path, capsys, two_threads):
    benches = tmp_path / "benches"
    benches.mkdir()
    for name, body in FAILING_BENCHES.items():
        _bench(benches, name, body)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nHow to read the rows.\n\n" + run_all.MARKER + "\n")
    assert run_all.main(["--bench-dir", str(benches), "--out", str(out)]) == 1
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nHow to read the rows.\n") and text.count(run_all.MARKER) == 1
    assert text.count("\n## ") == 1 and "4 benches, 2 FAILED." in text  # one section, every bench in it
    assert "| sum | " in text and "a \\| b" in text  # a pipe in a cell does not break the table
    assert "| last one | 1 s | 2 | - | - | - | - | - |" in text  # the benchmark after the failures ran
    assert "| bench_boom | FAILED | 2 | - | - | - | - | RuntimeError: no GPU here |" in text
    assert "| bench_malformed | FAILED | 2 |" in text and "missing ['value']" in text
    assert "RuntimeError: no GPU here" in capsys.readouterr().err  # the traceback, for the author

    _bench(benches, "boom", "def main():\n    return [{'benchmark': 'fixed', 'value': '2 s'}]\n")
    (benches / "bench_malformed.py").unlink()
    assert run_all.main(["--bench-dir", str(benches), "--out", str(out)]) == 0
    new = out.read_text()
    assert new.count("\n## ") == 1 and "3 benches, none failed." in new and "| fixed | 2 s |" in new
    assert "FAILED" not in new  # the run it replaced is gone from the page (git log keeps it) ...
    assert new.split(run_all.MARKER, 1)[0] == text.split(run_all.MARKER, 1)[0]  # ... the text above is kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["benches", "benchmarks.md"]  # and no other file is written


def test_only_and_quick_never_touch_the_docs_file(run_all, tmp_path, capsys):
    benches = tmp_path / "benches"
    benches.mkdir()
    for name, body in FAILING_BENCHES.items():
        _bench(benches, name, body)
    out = tmp_path / "benchmarks.md"
    out.write_text(run_all.HEADER + "\n## 2026-01-01 00:00\n\nthe recorded run\n")
    before = out.read_bytes()
    assert run_all.main(["--bench-dir", str(benches), "--only", "zulu", "--out", str(out)]) == 0
    assert run_all.main(["--bench-dir", str(benches), "--only", "boom", "--out", str(out)]) == 1
    assert run_all.main(["--bench-dir", str(benches), "--quick", "--out", str(out)]) == 1
    assert out.read_bytes() == before
    printed = capsys.readouterr()
    assert "(--only zulu: printed only, not recorded)" in printed.out and "| last one | 1 s |" in printed.out
    assert "(--only boom: printed only, not recorded)" in printed.out and "| bench_boom | FAILED |" in printed.out
    assert "(--quick smoke run: printed only, not recorded)" in printed.out
    assert "printed only;" in printed.err


def test_a_docs_file_without_the_marker_is_refused_before_anything_runs(run_all, tmp_path, capsys):
    benches = tmp_path / "benches"
    benches.mkdir()
    _bench(benches, "boom", FAILING_BENCHES["boom"])
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nno marker\n")
    assert run_all.main(["--bench-dir", str(benches), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "has no line" in err and "[bench] boom" not in err
    assert out.read_text() == "# Benchmarks\n\nno marker\n"


def test_the_real_docs_can_receive_a_run(run_all):
    text = (REPO / "docs" / "benchmarks.md").read_text()
    assert text.count(run_all.MARKER) == 1
    assert text.split(run_all.MARKER, 1)[1].count("\n## ") == 1  # exactly one recorded run


def test_only_an_unknown_name_is_an_error(run_all, tmp_path, capsys):
    assert run_all.main(["--only", "nothing", "--out", str(tmp_path / "x.md")]) == 2
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


ISOLATED_BENCHES = {
    "a_pollutes": """
        import os

        def main():
            os.environ["DMCLIP_BENCH_LEFTOVER"] = "from a"  # state a bench leaves behind in its process
            return [{"benchmark": "a pid", "value": str(os.getpid())}]
    """,
    "b_looks": """
        import os

        def main():
            return [{"benchmark": "b pid", "value": str(os.getpid())},
                    {"benchmark": "b sees", "value": os.environ.get("DMCLIP_BENCH_LEFTOVER", "nothing")}]
    """,
    "c_dies": """
        import os

        def main():
            os._exit(3)  # a hard crash: no exception, no rows
    """,
}


def test_every_bench_runs_in_its_own_process_and_a_crash_is_a_failed_row(run_all, tmp_path, capsys):
    import os

    benches = tmp_path / "benches"
    benches.mkdir()
    for name, body in ISOLATED_BENCHES.items():
        _bench(benches, name, body)
    assert run_all.main(["--bench-dir", str(benches), "--no-write"]) == 1
    rows = {cells[0]: cells for cells in _table(capsys.readouterr().out)[1:]}
    pids = {rows["a pid"][1], rows["b pid"][1], str(os.getpid())}
    assert len(pids) == 3  # two children and the harness: three processes
    assert rows["b sees"][1] == "nothing"  # what a left in its process did not reach b
    assert rows["bench_c_dies"][1] == "FAILED" and "exited with code 3" in rows["bench_c_dies"][-1]
