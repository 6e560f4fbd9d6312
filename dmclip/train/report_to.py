"""Dashboards: the rows of metrics.jsonl and the final results, also written to TensorBoard and/or W&B.

``train.report_to: [tensorboard, wandb]`` (``--report-to tensorboard,wandb`` on pretrain, distill and capfilt):

- ``tensorboard``: event files in ``<run dir>/tensorboard/``; every number of a metrics row is a scalar whose
  tag is its metrics.jsonl key (``loss``, ``lr``, ``eval/acc1`` ...) at the row's ``step``; the final results'
  numbers are scalars ``results/<key path>`` at the last step, and the whole results JSON a text summary.
  A resumed run purges the events after the checkpoint's step, as metrics.jsonl drops those rows.
- ``wandb``: a W&B run in ``<run dir>/wandb/``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync``
  uploads it later); rows go to its history, the results to its summary, resolved.yaml to its config.

Only the process that writes the run directory (rank 0) reports. The packages are optional
(``pip install -e '.[dashboards]'`` in the checkout); asking for a missing one is a DmclipError before training starts.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dmclip.errors import DmclipError, did_you_mean

DASHBOARDS = ("tensorboard", "wandb")
EXTRA = "dashboards"


def parse(names: Iterable[str] | str | None) -> list[str]:
    """``"tensorboard,wandb"`` or ``["tensorboard", "wandb"]`` -> the checked, de-duplicated names."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for item in names:
        for name in str(item).split(","):
            name = name.strip().lower()
            if not name:
                continue
            if name not in DASHBOARDS:
                raise DmclipError(f"train.report_to: {name!r} is not a dashboard dmclip writes",
                                  f"use tensorboard and/or wandb, e.g. --report-to tensorboard,wandb "
                                  f"({did_you_mean(name, DASHBOARDS)})")
            if name not in out:
                out.append(name)
    return out


def require(names: Sequence[str]) -> None:
    """A DmclipError naming the pip extra when a dashboard's package is not installed."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise DmclipError(f"--report-to {name} needs the {name} package, which is not installed",
                              f"pip install -e '.[{EXTRA}]' (or pip install {name}), or drop {name} from "
                              "train.report_to")


def numbers(obj: Any, prefix: str = "") -> dict[str, float]:
    """The finite numbers of a nested mapping, keyed by their '/'-joined key path (booleans left out)."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(numbers(value, f"{prefix}/{key}" if prefix else str(key)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj):
        out[prefix] = float(obj)
    return out


class Reporter:
    """The dashboards of one run directory: ``log(row)`` per metrics row, ``results(dict)`` at the end."""

    def __init__(self, names: Sequence[str], run_path: Path, *, start_step: int = 0):
        self.names = list(names)
        self.path = Path(run_path)
        self.last_step = start_step
        self._tensorboard = None
        self._wandb = None
        self._closed = False
        require(self.names)
        if "tensorboard" in self.names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after the step a resumed run restarts from are hidden, as the
            # metrics.jsonl rows past the checkpoint are dropped
            self._tensorboard = SummaryWriter(log_dir=str(self.path / "tensorboard"),
                                              purge_step=start_step if start_step else None)
        if "wandb" in self.names:
            self._wandb = self._start_wandb()
        atexit.register(self.close)

    def _start_wandb(self):
        import wandb

        config = {}
        resolved = self.path / "resolved.yaml"
        if resolved.is_file():
            import yaml

            config = yaml.safe_load(resolved.read_text(encoding="utf-8")) or {}
        settings = wandb.Settings(silent=True, console="off", x_disable_stats=True, x_disable_machine_info=True)
        try:
            return wandb.init(dir=str(self.path), project=os.environ.get("WANDB_PROJECT", "dmclip"),
                              name=self.path.name, id=hashlib.sha256(self.path.name.encode()).hexdigest()[:16],
                              mode=os.environ.get("WANDB_MODE", "offline"), resume="allow", config=config,
                              settings=settings, reinit="create_new")
        except Exception as exc:  # wandb raises its own errors (a bad WANDB_MODE, no login for online mode)
            raise DmclipError(f"W&B could not start a run in {self.path / 'wandb'}: {str(exc).splitlines()[0][:160]}",
                              "unset WANDB_MODE (dmclip runs W&B offline), or drop wandb from train.report_to"
                              ) from None

    def log(self, row: dict) -> None:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            return
        values = {k: v for k, v in numbers(row).items() if k != "step"}
        self.last_step = max(self.last_step, step)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(key, value, step)
        if self._wandb is not None and values:
            self._wandb.log(values, step=step)

    def results(self, results: dict) -> None:
        values = numbers(results)
        if self._tensorboard is not None:
            for key, value in values.items():
                self._tensorboard.add_scalar(f"results/{key}", value, self.last_step)
            text = json.dumps(results, indent=1, default=str)
            self._tensorboard.add_text("results", "```\n" + text + "\n```", self.last_step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.summary.update({f"results/{k}": v for k, v in values.items()})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ValueError):
            atexit.unregister(self.close)
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            import wandb

            self._wandb.finish()
            # finish() can return before W&B's service process has written the run's last records (seen under
            # load: an offline run file without its history); teardown waits for the service, so the run file
            # is complete when the command returns (`wandb sync` right after works)
            wandb.teardown()


def attach(run, names: Iterable[str] | str | None, *, start_step: int = 0) -> Reporter | None:
    """Report ``run``'s metrics rows and results to ``names`` from now on (once per run directory; rank 0
    only: call it where the run directory is written). Returns the reporter, or None when nothing is asked."""
    names = parse(names)
    if not names or getattr(run, "reporter", None) is not None:
        return getattr(run, "reporter", None)
    reporter = Reporter(names, run.path, start_step=start_step)
    run.reporter = reporter
    return reporter
