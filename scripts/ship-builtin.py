#!/usr/bin/env python3
"""Ship a completed dmclip run as a built-in model: `python scripts/ship-builtin.py RUN_DIR NAME`.

Copies the run's model (model.json + model.safetensors) and its record (run.json, recipe.yaml,
resolved.yaml, overrides.txt, results.json, metrics.jsonl) into dmclip/builtin/NAME/, so that
`--teacher builtin:NAME` loads it with no training and anyone can see (and rerun) how it was made.
tests/test_builtin.py checks that every shipped model still loads and still scores what results.json says.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

RECORD = ("run.json", "recipe.yaml", "resolved.yaml", "overrides.txt", "results.json", "metrics.jsonl")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    run, name = Path(argv[0]), argv[1]
    info = json.loads((run / "run.json").read_text())
    if info.get("status") != "completed":
        print(f"error: {run} is not a completed run (status {info.get('status')})", file=sys.stderr)
        return 2
    out = Path(__file__).resolve().parent.parent / "dmclip" / "builtin" / name
    out.mkdir(parents=True, exist_ok=True)
    for file in ("model.json", "model.safetensors"):
        shutil.copyfile(run / "model" / file, out / file)
    for file in RECORD:
        if (run / file).exists():
            shutil.copyfile(run / file, out / file)
    print(f"shipped {run} as builtin:{name} ({sum(p.stat().st_size for p in out.iterdir()) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
