"""`dmclip runs clean`: remove failed, interrupted and crashed run directories (or the ones named), listing
them first and asking; a sweep directory goes with its last run."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from dmclip.cli.common import RunsDirOpt, age, console, err_console, seconds_since
from dmclip.errors import DmclipError, did_you_mean

# statuses `runs clean` removes by filter: runs that ended without results, or never started
CLEANABLE = ("failed", "interrupted", "crashed", "created")
DEFAULT_CLEAN = "failed,interrupted,crashed"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# a sweep directory: made by `distill --alpha ...` / `pretrain --seeds ...`, stamped like a run, no run.json
_SWEEP_NAME = re.compile(r"\d{8}-\d{6}-.+")


def parse_duration(text: str) -> float:
    """``"7d"`` -> seconds; units s, m, h, d, w."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise DmclipError(f"--older-than {text!r} is not a duration", "write a number and a unit: 30m, 12h, 7d, 2w")
    return float(match[1]) * _SECONDS[match[2]]


def parse_statuses(text: str) -> list[str]:
    """``"failed,interrupted"`` -> the statuses, each one `runs clean` may remove by filter."""
    statuses = [s.strip() for s in text.split(",") if s.strip()]
    for status in statuses:
        if status in ("completed", "running"):
            raise DmclipError(f"--status {status}: a {status} run is never removed by a filter",
                              "name its directory instead: dmclip runs clean runs/<command>/<run>"
                              if status == "completed" else "stop its process first; then it shows as interrupted")
        if status not in CLEANABLE:
            raise DmclipError(f"--status {status!r} is not a status", did_you_mean(status, list(CLEANABLE)))
    if not statuses:
        raise DmclipError("--status names no status", f"e.g. --status {','.join(CLEANABLE[:2])}")
    return statuses


def select_by_filter(root: Path, command: str | None, statuses: list[str], older_than: float | None) -> list:
    """The runs under ``root`` with one of ``statuses`` that started more than ``older_than`` seconds ago."""
    from dmclip.runs import find_runs

    chosen = []
    for run in find_runs(root, command):
        try:
            status, started = run.display_status(), run.info.get("start_time")
        except DmclipError:  # damaged: its status is unknown, so only naming it removes it
            continue
        elapsed = seconds_since(started)
        if status in statuses and (older_than is None or elapsed is not None and elapsed > older_than):
            chosen.append(run)
    return chosen


def select_named(paths: list[Path]) -> list:
    """The runs named on the command line (a sweep directory names its members); a running one is refused."""
    from dmclip.runs import RunDir

    chosen = {}  # resolved path -> run: a run named twice (or with its sweep) is removed once
    for path in paths:
        members = sorted(p.parent for p in Path(path).glob("*/run.json")) if not (Path(path) / "run.json").is_file() \
            else []
        for run in [RunDir(p) for p in members] or [RunDir.open(path)]:
            if _status(run) == "running":
                info = run.info
                raise DmclipError(f"{run.path} is running (pid {info.get('pid')} on {info.get('host')})",
                                  "stop that process first; a running run's directory is never removed")
            chosen.setdefault(run.path.resolve(), run)
    return list(chosen.values())


def _status(run) -> str:
    try:
        return run.display_status()
    except DmclipError:
        return "damaged"


def emptied_sweeps(runs: list) -> list[Path]:
    """The sweep directories all of whose runs are in ``runs``: they go with them."""
    removed = {run.path.resolve() for run in runs}
    sweeps = []
    for parent in dict.fromkeys(run.path.parent for run in runs):
        members = {p.parent.resolve() for p in parent.glob("*/run.json")}
        if _SWEEP_NAME.fullmatch(parent.name) and not (parent / "run.json").exists() and members <= removed:
            sweeps.append(parent)
    return sweeps


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _confirmed(count: int, yes: bool) -> bool:
    """--yes, or the user's answer at a terminal; elsewhere (a script) refuse rather than guess."""
    import sys

    if yes:
        return True
    if not sys.stdin.isatty():
        raise DmclipError(f"refusing to remove {count} run director{'y' if count == 1 else 'ies'} without "
                          "confirmation", "pass --yes to remove them, or --dry-run to only list them")
    return typer.confirm(f"remove {'it' if count == 1 else f'these {count}'}?", default=False)


def remove_all(paths: list[Path]) -> None:
    """Remove each directory; one that cannot be removed stops nothing else and is named at the end."""
    import shutil

    failed = []
    for path in paths:
        try:
            shutil.rmtree(path)
        except OSError as exc:
            failed.append(f"{path}: {exc.strerror or exc}")
    if failed:
        raise DmclipError(f"{len(failed)} director{'y' if len(failed) == 1 else 'ies'} could not be removed "
                          f"({failed[0]})", "check the permissions of the runs directory, then run clean again")


def register_clean(group: typer.Typer) -> None:
    @group.command("clean")
    def clean(
        run_dirs: Annotated[list[Path] | None, typer.Argument(
            help="Remove these runs instead (any status but running; a sweep directory: all its runs).",
            show_default=False)] = None,
        status: Annotated[str | None, typer.Option(
            "--status", help=f"Remove runs with these statuses, a comma list of {', '.join(CLEANABLE)} (default: "
                             f"{DEFAULT_CLEAN}); completed and running runs are never chosen this way.",
            show_default=False)] = None,
        older_than: Annotated[str | None, typer.Option(
            "--older-than", help="Only runs started more than this long ago: 30m, 12h, 7d, 2w.",
            show_default=False)] = None,
        command: Annotated[str | None, typer.Option("--command", "-c", help="Only runs of this command.")] = None,
        runs_dir: RunsDirOpt = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; remove nothing.")] = False,
        yes: Annotated[bool, typer.Option("--yes", "-y", help="Remove without asking.")] = False,
    ) -> None:
        """Remove failed, interrupted and crashed run directories, or the ones named; a sweep directory goes with
        its last run. Lists them first, then asks (or needs --yes).

        Example: dmclip runs clean --status failed,interrupted --older-than 7d --dry-run
        """
        from dmclip.runs import default_runs_root

        if run_dirs and (status or older_than or command or runs_dir):
            raise DmclipError("run directories named and a filter given: which runs to remove is ambiguous",
                              "name the run directories, or choose them with --status/--older-than/--command")
        if run_dirs:
            chosen = select_named(run_dirs)
        else:
            limit = parse_duration(older_than) if older_than is not None else None
            chosen = select_by_filter(runs_dir or default_runs_root(), command,
                                      parse_statuses(status or DEFAULT_CLEAN), limit)
        if not chosen:
            err_console.print("nothing to remove", highlight=False)
            return
        sweeps = emptied_sweeps(chosen)
        _print_plan(chosen, sweeps, dry_run)
        if dry_run or not _confirmed(len(chosen), yes):
            err_console.print("nothing removed", highlight=False)
            return
        remove_all([*[run.path for run in chosen], *sweeps])
        console.print(f"removed {_counted(chosen, sweeps)}")


def _counted(runs: list, sweeps: list) -> str:
    return f"{len(runs)} run(s)" + (f" and {len(sweeps)} sweep director{'y' if len(sweeps) == 1 else 'ies'}"
                                    if sweeps else "")


def _print_plan(runs: list, sweeps: list[Path], dry_run: bool) -> None:
    """What `runs clean` removes, one line each: status, age, size and the whole directory (last, to copy)."""
    console.print(f"{'would remove' if dry_run else 'to remove'}: {_counted(runs, sweeps)}", highlight=False)
    lines = [(_status(run), age(_started(run)), run.path) for run in runs] + [("sweep", "-", p) for p in sweeps]
    for status, ago, path in lines:
        console.print(Text(f"  {status:<11} {ago:>4} {_megabytes(_size(path)):>9}  {path}"), soft_wrap=True)


def _started(run) -> str | None:
    try:
        return run.info.get("start_time")
    except DmclipError:
        return None


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
