"""Run every ``benchmarks/bench_*.py`` and append one section to docs/benchmarks.md.

    python -m benchmarks.run_all                  # what `make bench` runs
    python -m benchmarks.run_all --only scan      # just benchmarks/bench_scan.py
    python -m benchmarks.run_all --quick --docs /tmp/b.md   # smoke run of the harness

A benchmark that raises is reported (traceback on stderr, a line in the section) and the others still
run; the exit code is 1 if any failed or returned malformed rows, else 0.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import platform
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run_all.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROW_KEYS, check_row  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_DOCS = HERE.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Figures from `make bench` (`python -m benchmarks.run_all`); each run appends one section below, newest
last, with the machine it ran on. Ratios compare contenders timed in alternation in the same run
(`benchmarks/common.py: interleaved`), so they hold on a busy machine where absolute times drift.
How to add a benchmark: write `benchmarks/bench_<name>.py` with `main() -> list[dict]` (the row contract
is in `benchmarks/common.py`); `python -m benchmarks.run_all --only <name>` runs just that one.
"""


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


def machine() -> str:
    """One line: CPU model, cores, torch version and threads, GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [cpu, f"{usable} usable cores of {os.cpu_count()}", f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
        if torch.cuda.is_available():
            parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    except ImportError:
        parts.append("torch not installed")
    return ", ".join(parts)


def _cell(value) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.3g}x"
    return str(value).replace("|", "\\|").replace("\n", " ")


def section(rows: list[dict], failures: list[str], *, when: dt.datetime, machine_line: str, quick: bool) -> str:
    lines = [f"\n## {when.strftime('%Y-%m-%d %H:%M')}" + (" (quick smoke run: not real figures)" if quick else ""),
             "", f"Machine: {machine_line}", ""]
    if rows:
        columns = list(ROW_KEYS)
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "|".join("---" for _ in columns) + "|")
        for item in rows:
            lines.append("| " + " | ".join(_cell(item.get(c)) for c in columns) + " |")
    for failure in failures:
        lines.append(f"\nFAILED: {failure}")
    return "\n".join(lines) + "\n"


def append(docs: Path, text: str) -> None:
    docs = Path(docs)
    old = docs.read_text(encoding="utf-8") if docs.exists() else HEADER
    docs.parent.mkdir(parents=True, exist_ok=True)
    tmp = docs.with_name(f".{docs.name}.tmp")
    tmp.write_text(old.rstrip("\n") + "\n" + text, encoding="utf-8")
    os.replace(tmp, docs)  # never a half-written docs file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only benchmarks/bench_NAME.py (repeatable)")
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS, help="markdown file to append to")
    parser.add_argument("--no-write", action="store_true", help="print the section, do not append it")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny repeat counts (DMCLIP_BENCH_QUICK=1)")
    parser.add_argument("--bench-dir", type=Path, default=HERE, help=argparse.SUPPRESS)  # tests
    args = parser.parse_args(argv)
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
        names = args.only
    if not names:
        print(f"error: no bench_*.py under {args.bench_dir}", file=sys.stderr)
        return 2

    rows: list[dict] = []
    failures: list[str] = []
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            result = _load(name, found[name]).main()
            if not isinstance(result, list):
                raise ValueError(f"main() returned {type(result).__name__}, not a list of rows")
            checked = [check_row(item) for item in result]
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            traceback.print_exc()
            failures.append(f"bench_{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(f"[bench] {name} FAILED", file=sys.stderr, flush=True)
            continue
        rows.extend(checked)
        print(f"[bench] {name}: {len(checked)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)

    text = section(rows, failures, when=dt.datetime.now(), machine_line=machine(), quick=args.quick)
    print(text)
    if not args.no_write:
        append(args.docs, text)
        print(f"[bench] appended to {args.docs}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
