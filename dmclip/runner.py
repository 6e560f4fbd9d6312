"""The one way a command runs: :func:`launch` takes a :class:`Command` (what the command is) and what the user
asked for, and returns either one :class:`Run` or a :class:`Sweep` (one run per point, and a summary).

    outcome = launch(DISTILL, recipe=path, sets=["train.lr=1e-3"], shortcuts={"student.name": "mamba-nano"},
                     sweep={"alpha": "0,0.75", "seeds": "0,1"}, runs_root=Path("runs"))

In order: the recipe is read once (its ``sweep:`` block from the same read); ``--set`` overrides, then the
shortcut options, make the config; each sweep value is set into the field it sweeps and checked there, so it
is refused with that field's key path and range; ``command.prepare(config, runs_root)`` fixes what must not
move between members (distill: the teacher ``latest`` names); then the run directories, made by rank 0 and
shared with the other torchrun ranks. A ``DmclipError`` raised before training began (no checkpoint, no
metrics row) removes the run directory it came from, and a sweep directory left with no member: a typo
leaves nothing behind. A run that had begun stays, for ``--resume``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dmclip.config import build_config, from_dict, set_path, to_dict, to_yaml
from dmclip.errors import DmclipError, did_you_mean
from dmclip.io import atomic_write_text
from dmclip.recipe import parse_yaml, read_recipe
from dmclip.runs import RunDir, default_runs_root
from dmclip.train import distributed

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One run of a sweep: ``point`` maps each swept key (``alpha``, ``seeds``) to this run's value."""

    point: dict[str, Any]
    config: Any
    run_dir: RunDir
    result: dict


@dataclass(frozen=True)
class Command:
    """What :func:`launch` needs to know about a command.

    ``run(config, run_dir) -> result`` does the work. ``sweep_fields`` maps each key a sweep may vary (the
    command-line option and the recipe's ``sweep:`` key, e.g. ``"alpha"``) to the config field it sets
    (``"loss.alpha"``). ``prepare(config, runs_root)`` may change the config before any directory exists.
    ``summarize(sweep_dir, members, base_config) -> summary`` writes a sweep's summary files (rank 0 only).
    ``sweep_name(name, recipe)`` and ``member_name(name, recipe, config, point)`` name a sweep's directories.
    """

    name: str
    config: type
    run: Callable[[Any, RunDir], dict]
    sweep_fields: Mapping[str, str] = field(default_factory=dict)
    prepare: Callable[[Any, Path], None] | None = None
    summarize: Callable[[Path, list[Member], Any], dict] | None = None
    sweep_name: Callable[[str | None, Path | None], str] | None = None
    member_name: Callable[[str | None, Path | None, Any, dict], str] | None = None
    seed_field: str = "seed"


@dataclass
class Run:
    """One run: its directory and its result. ``reports`` is False on the torchrun ranks that are not rank 0."""

    run_dir: RunDir
    result: dict
    reports: bool = True


@dataclass
class Sweep:
    """A sweep: its directory, one :class:`Member` per point, the summary (None on ranks other than 0)."""

    sweep_dir: Path
    members: list[Member]
    summary: dict | None
    reports: bool = True


def launch(command: Command, *, recipe: Path | None = None, sets: Sequence[str] | None = None,
           shortcuts: Mapping[str, Any] | None = None, sweep: Mapping[str, str | None] | None = None,
           name: str | None = None, runs_root: Path | None = None, resume: Path | None = None,
           argv: list[str] | None = None) -> Run | Sweep:
    """Run ``command`` once, or once per sweep point. ``shortcuts``: config fields set by options (None = not
    given); ``sweep``: each option that sweeps (a key of ``command.sweep_fields``) and its comma list, or None;
    ``runs_root``: where run directories go (default ``$DMCLIP_RUNS`` or ./runs); ``resume``: a run directory
    to continue with its own saved config; ``argv``: what run.json records."""
    runs_root = Path(runs_root) if runs_root is not None else default_runs_root()
    request = _Request(command, recipe, list(sets or []), dict(shortcuts or {}), name, runs_root, argv or [])
    distributed.setup()
    try:
        if resume is not None:
            return _resume(request, Path(resume), {k: v for k, v in (sweep or {}).items() if v is not None})
        planned = plan(command, recipe=recipe, sets=request.sets, shortcuts=request.shortcuts, sweep=sweep,
                       runs_root=runs_root)
        request.recipe_text = planned.recipe_text
        return _sweep(request, planned) if planned.swept else _single(request, planned.base)
    finally:
        distributed.teardown()


@dataclass
class Plan:
    """What :func:`launch` will run, resolved and checked: the shared config, the swept keys and their values
    (empty for one run), one (point, config) per sweep member, and the recipe's text as given."""

    base: Any
    swept: dict[str, list]
    members: list[tuple[dict, Any]]
    recipe_text: str


def plan(command: Command, *, recipe: Path | None = None, sets: Sequence[str] | None = None,
         shortcuts: Mapping[str, Any] | None = None, sweep: Mapping[str, str | None] | None = None,
         runs_root: Path | None = None) -> Plan:
    """The configs :func:`launch` runs for these arguments (``command.prepare`` applied), nothing created."""
    data, recipe_text = read_recipe(recipe) if recipe is not None else ({}, "")
    # a command that sweeps reads the recipe's `sweep:` block; for another it may be a field (compress's)
    block = data.pop("sweep") if command.sweep_fields and "sweep" in data else _NO_BLOCK
    points = _sweep_points(command, block, dict(sweep or {}), Path(recipe) if recipe else None)
    base = build_config(command.config, data, list(sets or []), shortcuts)
    values = {key: _checked(command, base, key, given, dict(shortcuts or {})) for key, given in points.items()}
    single = {key: listed[0] for key, listed in values.items() if len(listed) == 1}
    swept = {key: listed for key, listed in values.items() if len(listed) > 1}
    base = _member_config(command, base, single, "") if single else base
    if command.prepare is not None:
        command.prepare(base, Path(runs_root) if runs_root is not None else default_runs_root())
    points = [dict(zip(swept, values)) for values in itertools.product(*swept.values())] if swept else []
    return Plan(base, swept, [(point, _member_config(command, base, point, "")) for point in points], recipe_text)


@dataclass
class _Request:
    command: Command
    recipe: Path | None
    sets: list[str]
    shortcuts: dict
    name: str | None
    runs_root: Path
    argv: list[str]
    recipe_text: str = ""

    def create(self, config, name: str, parent: Path | None = None) -> RunDir:
        """A new run directory (rank 0 makes it, the other ranks get its path)."""
        return distributed.shared_run(lambda: RunDir.create(
            self.command.name, name, config, root=self.runs_root, parent=parent, recipe_text=self.recipe_text,
            overrides=self.sets, argv=self.argv, seed=getattr(config, self.command.seed_field, None)))


# ------------------------------------------------------------------------------------------ sweep values


def _sweep_points(command: Command, block, options: dict[str, str | None], recipe: Path | None) -> dict:
    """{sweep key: (where it was given, [(value, where)])}: the recipe's ``sweep:`` block (checked even where an
    option overrides it), each key replaced by its option when given."""
    points = _recipe_block(command, block, f"recipe {recipe.name}") if block is not _NO_BLOCK else {}
    for key, text in options.items():
        if text is None:
            continue
        if key in points:
            log.info("--%s %s overrides the recipe's sweep.%s", key, text, key)
        points[key] = (f"--{key}", _option_values(key, text))
    return points


def _checked(command: Command, base, key: str, given: tuple[str, list], shortcuts: dict) -> list:
    """The values of one sweep key, each checked by the config field it sets (its type, range, choices)."""
    where, values = given
    field_path = command.sweep_fields[key]
    if shortcuts.get(field_path) is not None:
        raise DmclipError(f"{field_path} is given by an option and swept by {where}",
                          f"give one value or a sweep, not both (one run: drop {where}; a sweep: drop the option)")
    checked = []
    for value, item in values:
        config = _member_config(command, base, {key: value}, item)
        for part in field_path.split("."):  # the value as the field holds it (--alpha 1 -> 1.0)
            config = getattr(config, part)
        checked.append(config)
    return checked


_NO_BLOCK = object()  # a recipe without `sweep:` (`sweep:` alone is None, and refused)
_SWEEP_EXAMPLE = "sweep: {alpha: [0.0, 0.75], seeds: [0, 1, 2]}"


def _recipe_block(command: Command, block, where: str) -> dict:
    keys = command.sweep_fields
    example = _SWEEP_EXAMPLE if "alpha" in keys else "sweep: {seeds: [0, 1, 2]}"
    if not isinstance(block, dict) or not block:
        raise DmclipError(f"{where}: sweep must map a field to its list of values, got {block!r}", f"write e.g. {example}")
    points = {}
    for key, values in block.items():
        if key not in keys:
            raise DmclipError(f"{where}: unknown sweep key {str(key)!r}", did_you_mean(str(key), keys))
        if not isinstance(values, list):
            raise DmclipError(f"{where}: sweep.{key} = {values!r} is not a list",
                              f"list the values to run, e.g. {example}; one value without a sweep goes in {keys[key]}")
        if not values:
            raise DmclipError(f"{where}: sweep.{key} is an empty list", f"list the values to run, e.g. {example}")
        points[key] = (f"the recipe's sweep.{key}", _distinct(
            [(value, f"{where}: sweep.{key}[{i}]") for i, value in enumerate(values)], f"{where}: sweep.{key}"))
    return points


def _option_values(key: str, text: str) -> list[tuple[Any, str]]:
    """``--alpha 0,0.75`` -> [(0.0, "--alpha"), (0.75, "--alpha")]: each item read as a YAML scalar, as ``--set``
    reads a value; the field it sets checks it."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(items):
        raise DmclipError(f"--{key} {text!r} has an empty value",
                          f"separate values with commas and no empty items, e.g. --{key} 0,1,2")
    return _distinct([(parse_yaml(item, where=f"--{key}"), f"--{key}") for item in items], f"--{key} {text!r}")


def _distinct(values: list[tuple[Any, str]], where: str) -> list[tuple[Any, str]]:
    seen = []
    for value, _ in values:
        if value in seen:
            raise DmclipError(f"{where} repeats {value}", "list each sweep point once")
        seen.append(value)
    return values


def _member_config(command: Command, base, point: dict, where: str):
    """``base`` with each swept field set to the point's value, built (so checked) as the config's own field."""
    data = to_dict(base)
    for key, value in point.items():
        set_path(data, command.sweep_fields[key], value, command.config)
    try:
        return from_dict(command.config, data)
    except DmclipError as exc:
        raise DmclipError(f"{where}: {exc.message}" if where else exc.message, exc.hint) from None


# ------------------------------------------------------------------------------------------ runs


def _resume(request: _Request, path: Path, sweep: dict) -> Run:
    """``--resume``: the run continues with its own saved config, so options that would change it are refused."""
    command = request.command
    if sweep:
        raise DmclipError("--resume continues one run, not a sweep", "resume the member run that was interrupted")
    given = [key for key, value in request.shortcuts.items() if value is not None] + request.sets
    if request.recipe is not None or given:
        raise DmclipError("--resume continues a run with its own saved config; other options would change it",
                          f"drop {', '.join(given) or 'the recipe argument'} or start a new run without --resume")
    # rank 0 checks and shares the directory: another rank checking after rank 0 marked it running would refuse it
    run_dir = distributed.shared_run(lambda: _resumable(command, path))
    with distributed.active(run_dir):
        result = command.run(run_dir.resolved_config(command.config), run_dir)
    return Run(run_dir, result, distributed.is_main())


def _resumable(command: Command, path: Path) -> RunDir:
    """The run directory at ``path``, if it is ``command``'s and neither completed nor running."""
    run_dir = RunDir.open(path)
    if run_dir.command != command.name:
        raise DmclipError(f"{path} is a `{run_dir.command}` run, not a `{command.name}` run",
                          f"resume it with `dmclip {run_dir.command} --resume {path}`")
    status = run_dir.display_status()
    if status == "completed":
        raise DmclipError(f"{path} already completed", "start a new run instead of --resume")
    if status == "running":
        raise DmclipError(f"{path} is still running (pid {run_dir.info.get('pid')} on {run_dir.info.get('host')})",
                          "wait for it to finish, or stop that process first; two processes must not "
                          "write one run directory")
    return run_dir


def _single(request: _Request, config) -> Run:
    name = request.name or (request.recipe.stem if request.recipe else request.command.name)
    run_dir = request.create(config, name)
    return Run(run_dir, _run_in(request.command, config, run_dir), distributed.is_main())


def _sweep(request: _Request, planned: Plan) -> Sweep:
    command = request.command
    sweep_dir = _create_sweep_dir(request)
    if distributed.is_main():
        atomic_write_text(sweep_dir / "resolved.yaml", sweep_yaml(command, planned))
    members = []
    try:
        for number, (point, config) in enumerate(planned.members, 1):
            run_dir = request.create(config, command.member_name(request.name, request.recipe, config, point),
                                     parent=sweep_dir)
            members.append(Member(point, config, run_dir, _run_in(command, config, run_dir)))
            log.info("%s %d of %d done (%s): %s", command.name, number, len(planned.members),
                     ", ".join(f"{key} {value}" for key, value in point.items()), run_dir.path)
    except DmclipError:
        if distributed.is_main() and not any(p.is_dir() for p in sweep_dir.iterdir()):
            _remove(sweep_dir)
        raise
    summary = None
    if distributed.is_main() and command.summarize is not None:
        summary = command.summarize(sweep_dir, members, planned.base)
    return Sweep(sweep_dir, members, summary, distributed.is_main())


def sweep_yaml(command: Command, planned: Plan) -> str:
    """A sweep directory's resolved.yaml: the members' shared config and the ``sweep:`` block, so that
    `dmclip <command> <sweep dir>/resolved.yaml` runs the same sweep again."""
    block = yaml.safe_dump({"sweep": planned.swept}, sort_keys=False, default_flow_style=None)
    return f"command: {command.name}\n" + to_yaml(planned.base) + block


def _create_sweep_dir(request: _Request) -> Path:
    """``<runs root>/<command>/<stamp>-<sweep name>``, made by rank 0 and shared; never an existing one."""

    class Made:  # what distributed.shared_run shares: an object with the path
        def __init__(self, path: Path):
            self.path = path

    def make() -> Made:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = request.runs_root / request.command.name / f"{stamp}-{request.command.sweep_name(request.name, request.recipe)}"
        try:
            path.mkdir(parents=True, exist_ok=False)
        except OSError as exc:
            raise DmclipError(f"cannot create the sweep directory {path}: {exc.strerror or exc}",
                              "choose another --runs-dir (or $DMCLIP_RUNS), or wait a second if it exists") from None
        return Made(path)

    return distributed.shared_run(make).path


def _run_in(command: Command, config, run_dir: RunDir) -> dict:
    """``command.run`` inside the run directory; a DmclipError before training began removes the directory."""
    try:
        with distributed.active(run_dir):
            return command.run(config, run_dir)
    except DmclipError:
        if distributed.is_main():
            if run_dir.begun():
                log.warning("run directory kept: continue it with --resume %s", run_dir.path)
            else:
                _remove(run_dir.path)
        raise


def _remove(path: Path) -> None:
    """Remove a directory that holds nothing worth keeping, and its parent when that is left empty."""
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def score_and_write(run_dir: RunDir, results: dict, eval_cfg, train_set: str) -> dict:
    """A training command's last step on rank 0: score the saved model (``run_dir/model``) on the sets
    ``eval_cfg`` (an ``EvalAfterConfig``) names when ``eval.each_run`` is on, add the scores to ``results``,
    write results.json. ``train_set``: the data spec trained on (a world set it names is noted in the log)."""
    if eval_cfg.each_run:
        from dmclip.evaluation.benchmark import score_saved_model

        eval_cfg.note_world_sets(train_set)
        results.update(score_saved_model(run_dir.path / "model", *eval_cfg.run_sets(), batch_size=eval_cfg.batch_size))
    run_dir.write_results(results)
    return results
