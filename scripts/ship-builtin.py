#!/usr/bin/env python3
"""Ship a completed dmclip run as a built-in model: `python scripts/ship-builtin.py RUN_DIR NAME`.

Copies the run's model (model.json + model.safetensors) and its record (run.json, recipe.yaml,
resolved.yaml, overrides.txt, results.json, metrics.jsonl) into dmclip/builtin/NAME/, so that
`--teacher builtin:NAME` loads it with no training and anyone can see (and rerun) how it was made.
tests/test_builtin.py checks that every shipped model still loads and still scores what results.json says.

The record is made portable on the way: `--runs-dir DIR` leaves the argv (where runs went does not change
what was trained) and a path inside the run becomes relative to it (results.json's checkpoint). A record
that still names a path of this machine (a dataset given by an absolute path, say) is refused, and nothing
is written: a package must not carry one machine's paths.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

MODEL = ("model.json", "model.safetensors")
RECORD = ("run.json", "recipe.yaml", "resolved.yaml", "overrides.txt", "results.json", "metrics.jsonl")
BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "dmclip" / "builtin"
# absolute paths of the machines dmclip is used on: what no shipped file, page or recipe may hold
MACHINE_PATH = re.compile(r"(?<![\w.~-])(?:/(?:work|home|root|tmp|Users)/|[A-Za-z]:\\)")


def portable_argv(argv: list[str]) -> list[str]:
    """The argv without `--runs-dir DIR` / `--runs-dir=DIR`."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--runs-dir":
            skip = True
        elif not word.startswith("--runs-dir="):
            out.append(word)
    return out


def relative_to_run(value, run: Path):
    """``value`` with every string that is a path inside ``run`` made relative to it (dicts, lists walked)."""
    if isinstance(value, dict):
        return {key: relative_to_run(item, run) for key, item in value.items()}
    if isinstance(value, list):
        return [relative_to_run(item, run) for item in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).resolve().is_relative_to(run):
        return Path(value).resolve().relative_to(run).as_posix()
    return value


def record_texts(run: Path) -> dict[str, str]:
    """The record files as they will be shipped: run.json's argv and results.json's paths made portable."""
    texts = {name: (run / name).read_text(encoding="utf-8") for name in RECORD if (run / name).exists()}
    info = json.loads(texts["run.json"])
    info["argv"] = portable_argv(info.get("argv") or [])
    texts["run.json"] = json.dumps(info, indent=2) + "\n"
    if "results.json" in texts:
        texts["results.json"] = json.dumps(relative_to_run(json.loads(texts["results.json"]), run), indent=2) + "\n"
    return texts


def machine_paths(texts: dict[str, str], run: Path) -> list[str]:
    """`file: line` for every line that still names a path of this machine (or the run's own location)."""
    found = []
    for name, text in texts.items():
        for line in text.splitlines():
            if MACHINE_PATH.search(line) or str(run) in line:
                found.append(f"{name}: {line.strip()[:160]}")
    return found


def ship(run: Path, name: str, root: Path = BUILTIN_ROOT) -> Path:
    """Write ``run``'s model and portable record into ``root/name``; raises ValueError before writing anything."""
    run = run.resolve()
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    if info.get("status") != "completed":
        raise ValueError(f"{run} is not a completed run (status {info.get('status')})")
    texts = record_texts(run)
    leaks = machine_paths(texts, run)
    if leaks:
        raise ValueError("the run's record names paths of this machine; rerun it with relative paths (e.g. "
                         "--data csv:data/train.csv) or fix these lines:\n  " + "\n  ".join(leaks))
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    for file in MODEL:
        shutil.copyfile(run / "model" / file, out / file)
    for file, text in texts.items():
        (out / file).write_text(text, encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    run, name = Path(argv[0]), argv[1]
    try:
        out = ship(run, name)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"shipped {run} as builtin:{name} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
