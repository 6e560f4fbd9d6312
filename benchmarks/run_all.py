"""Run every ``benchmarks/bench_*.py``, each in a process of its own, and write one complete section to
docs/benchmarks.md.

    python -m benchmarks.run_all                  # what `make bench` runs: every bench, recorded
    python -m benchmarks.run_all --only scan      # just benchmarks/bench_scan.py: printed, not recorded
    python -m benchmarks.run_all --quick          # smoke run of the harness: printed, not recorded

A complete run (every bench, real repeat counts) replaces the section in ``--out`` (docs/benchmarks.md), so
docs/benchmarks.md always holds exactly one run (git log keeps the others). Each bench runs at its own thread
count (its module's ``THREADS``, else the run's default), restored after it; the count is written per row. A bench that raises
is a row saying FAILED with the error line (traceback on stderr), the others still run, the section is
still written, and the exit code is 1. A run with ``--only`` or ``--quick`` is not a run of everything, so
it only prints its section: it never writes a partial section into the docs.

Each bench runs in a fresh Python process (``--child``; its output is passed through and its rows come back as
JSON), so nothing one bench leaves behind reaches the next one's timings: thread pools of other OpenMP or BLAS
runtimes (faiss, scikit-learn, onnxruntime), the allocator's state, imported libraries. In one process the
k-means bench (faiss, scikit-learn) made the fused-scan row after it run about twice as slow in 4 of 5 runs
(``--only kmeans --only scan``, against 4 of 4 at full speed with ``--only scan``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROW_KEYS, check_row, threads  # noqa: E402
from dmclip.report import markdown_table  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "docs" / "benchmarks.md"
# Everything below this line in the output file is the latest complete run; everything above it is kept.
MARKER = "<!-- make bench writes the latest complete run below this line, replacing the one there -->"
HEADER = "# Benchmarks\n\nFigures from `make bench` (`python -m benchmarks.run_all`).\n\n" + MARKER + "\n"


def discover(bench_dir: Path = HERE) -> dict[str, Path]:
    """``{"core": .../bench_core.py, ...}``, sorted by name."""
    return {p.stem[len("bench_"):]: p for p in sorted(Path(bench_dir).glob("bench_*.py"))}


def _load(name: str, path: Path):
    module_name = f"benchmarks.bench_{name}" if path.parent == HERE else f"_dmclip_bench_{name}"
    if path.parent == HERE:
        return importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except (AttributeError, OSError):
        return "?"


def _memory() -> str:
    try:
        return f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB memory"
    except (AttributeError, ValueError, OSError):
        return "memory unknown"


def machine() -> str:
    """One line: CPU model, cores, memory, Python and torch versions, GPU if any (thread counts are per row)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu, f"{usable} usable cores of {os.cpu_count()}", _memory(), f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        parts.append("torch not installed")
    return ", ".join(parts)


def commit() -> str:
    """``abc1234`` (``+ uncommitted changes`` when the tree is dirty), or ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + (" + uncommitted changes" if dirty else "")


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}x"
    return str(value).replace("|", "\\|").replace("\n", " ")


def section(rows: list[dict], *, when: dt.datetime, machine_line: str, load: tuple[str, str], code: str,
            command: str, seconds: float, partial: str = "") -> str:
    """The markdown section of one run: heading, machine, code, command, wall time, then one row per result."""
    failed = sum(1 for r in rows if r.get("value") == "FAILED")
    benches = len({r["bench"] for r in rows})
    title = f"## {when.strftime('%Y-%m-%d %H:%M')}"
    title += f" ({partial}: printed only, not recorded)" if partial else ""
    lines = [title, "",
             f"Machine: {machine_line}; load average {load[0]} at the start, {load[1]} at the end.",
             f"Code: {code}. Command: `{command}`. Wall time: {seconds / 60:.1f} min.",
             f"{benches} bench{'es' if benches != 1 else ''}, "
             + (f"{failed} FAILED." if failed else "none failed."), ""]
    columns = list(ROW_KEYS)
    lines.append(markdown_table(columns, [[_cell(item.get(c)) for c in columns] for item in rows]))
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # never a half-written docs file


def record(out: Path, text: str) -> None:
    """Put ``text`` below MARKER in ``out``, replacing the run that was there (git log keeps it)."""
    out = Path(out)
    old = out.read_text(encoding="utf-8") if out.exists() else HEADER
    if MARKER not in old:
        raise ValueError(f"{out} has no line {MARKER!r}: add it where the latest run should go")
    _write(out, old.split(MARKER, 1)[0] + MARKER + "\n\n" + text)


def _failed_row(name: str, threads_: int, notes: str) -> dict:
    """The one row a bench that failed gets: value FAILED, the reason in the notes."""
    return {**check_row({"benchmark": f"bench_{name}", "value": "FAILED", "threads": threads_, "notes": notes}),
            "bench": name}


def run_bench(name: str, path: Path, default_threads: int) -> list[dict]:
    """Rows of one bench, each with ``bench`` (its name) and ``threads``; a failure is one FAILED row."""
    import torch

    count = default_threads
    start = time.perf_counter()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        module = _load(name, path)
        count = getattr(module, "THREADS", None) or default_threads
        with threads(count):
            result = module.main()
            now = torch.get_num_threads()
        if now != count:
            raise RuntimeError(f"main() changed torch's thread count from {count} to {now} and left it: "
                               f"time at another count inside `with benchmarks.common.threads(n):`")
        if not isinstance(result, list):
            raise ValueError(f"main() returned {type(result).__name__}, not a list of rows")
        rows = [check_row(item) for item in result]
    except Exception as exc:  # one broken benchmark must not hide the others' figures
        traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"[bench] {name} FAILED", file=sys.stderr, flush=True)
        return [_failed_row(name, count, f"{type(exc).__name__}: {message}")]
    print(f"[bench] {name}: {len(rows)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return [{**item, "threads": item["threads"] or count, "bench": name} for item in rows]


def run_isolated(name: str, path: Path, default_threads: int) -> list[dict]:
    """:func:`run_bench` in a child process (``--child``); a child that dies without rows is one FAILED row."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dmclip-bench-") as tmp:
        rows_file = Path(tmp) / "rows.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(HERE.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
        child = subprocess.run([sys.executable, "-m", "benchmarks.run_all", "--child", name, "--bench-dir",
                                str(path.parent), "--threads", str(default_threads), "--rows-out", str(rows_file)],
                               cwd=HERE.parent, env=env, capture_output=True, text=True)
        sys.stdout.write(child.stdout)
        sys.stderr.write(child.stderr)
        if rows_file.exists():
            return json.loads(rows_file.read_text(encoding="utf-8"))
    last = child.stderr.strip().splitlines()[-1] if child.stderr.strip() else ""
    print(f"[bench] {name} FAILED (its process exited with code {child.returncode})", file=sys.stderr, flush=True)
    return [_failed_row(name, default_threads, f"the bench's process exited with code {child.returncode}: {last}")]


def _child(name: str, bench_dir: Path, threads_: int, rows_out: Path) -> int:
    """The child side of :func:`run_isolated`: one bench, its rows written as JSON to ``rows_out``."""
    import json

    import torch

    torch.set_num_threads(threads_)
    found = discover(bench_dir)
    rows = run_bench(name, found[name], threads_)
    rows_out.write_text(json.dumps(rows), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only benchmarks/bench_NAME.py (repeatable); prints, records nothing")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="file whose latest-run section a complete run replaces (default docs/benchmarks.md)")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not record it")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny repeat counts (DMCLIP_BENCH_QUICK=1); prints, records nothing")
    parser.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests
    parser.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)  # run_isolated's child process
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # with --child
    parser.add_argument("--rows-out", type=Path, help=argparse.SUPPRESS)  # with --child
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.bench_dir, args.threads, args.rows_out)
    if args.quick:
        os.environ["DMCLIP_BENCH_QUICK"] = "1"

    found = discover(args.bench_dir)
    names = list(found)
    if args.only:
        unknown = [n for n in args.only if n not in found]
        if unknown:
            print(f"error: no benchmark named {', '.join(unknown)}; have: {', '.join(found) or 'none'}",
                  file=sys.stderr)
            return 2
        names = list(dict.fromkeys(args.only))
    if not names:
        print(f"error: no bench_*.py under {args.bench_dir}", file=sys.stderr)
        return 2

    records = not (args.only or args.quick or args.no_write)
    if records and Path(args.out).exists() and MARKER not in Path(args.out).read_text(encoding="utf-8"):
        print(f"error: {args.out} has no line {MARKER!r}: add it where the latest run should go", file=sys.stderr)
        return 2

    import torch

    default_threads = torch.get_num_threads()  # OMP_NUM_THREADS when set (make bench sets 2)
    load_start = _load_average()
    when, started = dt.datetime.now(), time.perf_counter()
    rows: list[dict] = []
    for name in names:
        rows.extend(run_isolated(name, found[name], default_threads))

    partial = " and ".join(p for p in ("--only " + " ".join(names) if args.only else "",
                                       "--quick smoke run" if args.quick else "") if p)
    omp = os.environ.get("OMP_NUM_THREADS")
    command = (f"OMP_NUM_THREADS={omp} " if omp else "") + "python -m benchmarks.run_all" \
        + (" --only " + " --only ".join(names) if args.only else "") + (" --quick" if args.quick else "")
    text = section(rows, when=when, machine_line=machine(), load=(load_start, _load_average()), code=commit(),
                   command=command, seconds=time.perf_counter() - started, partial=partial)
    print(text)
    if partial:
        print(f"[bench] {partial}: printed only; {args.out} is written by a complete run", file=sys.stderr)
    elif not args.no_write:
        record(args.out, text)
        print(f"[bench] wrote {args.out}, replacing the run recorded there", file=sys.stderr)
    return 1 if any(r["value"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
