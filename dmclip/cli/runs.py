"""`dmclip runs`: list, show, compare, report and clean run directories."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dmclip.cli.common import RunsDirOpt, age, console, err_console
from dmclip.cli.runs_clean import register_clean
from dmclip.errors import DmclipError, did_you_mean
from dmclip.report import format_metric, markdown_table, metric_label, metric_unit

runs_app = typer.Typer(help="List, show, compare, report and clean run directories.\n\n"
                            "Example: dmclip runs list --command distill", no_args_is_help=True)

# The metric a person looks at first, per command (first one present wins), and its label in `runs list`.
KEY_METRICS = {"zeroshot_acc1": "acc@1", "acc1": "acc@1", "avg_perf": "Avg Perf", "image_retrieval_recall@1": "T→I R@1",
               "bleu4": "BLEU-4", "precision": "precision", "loss": "loss"}
# The config each command's run directory holds (eval has one per task: none here), for its defaults.
COMMAND_CONFIGS = {"pretrain": ("dmclip.pretrain", "PretrainConfig"), "distill": ("dmclip.distill", "DistillConfig"),
                   "capfilt": ("dmclip.capfilt.config", "CapfiltConfig"),
                   "compress": ("dmclip.compress.pipeline", "CompressConfig")}
ABSENT = "absent"  # the cell of a config key a run does not have (made before the setting existed)
STATUS_STYLES = {"completed": "green", "failed": "red", "crashed": "red", "interrupted": "yellow", "damaged": "red"}
FORMATS = ("table", "md", "csv")

WideOpt = Annotated[bool, typer.Option(
    "--wide", "-w", help="Whole run names and values (and the directories): rows wrap where the terminal is narrow.")]
FormatOpt = Annotated[str, typer.Option(
    "--format", help="table (fits the terminal), md or csv: the whole table, for docs and scripts "
                     "(csv keeps fractions, md shows percent).")]
# a run directory's name: <YYYYmmdd-HHMMSS>-<name>-<6 hex of the config hash>[-<n>: the n-th in one second]
_DIR_NAME = re.compile(r"(?P<stamp>\d{8}-\d{6})-(?P<name>.+?)(?:-(?P<hash>[0-9a-f]{6})(?:-(?P<count>\d+))?)?")
# the parts a short name keeps, shortest first, until the names are told apart
_NAME_PARTS = (("name",), ("name", "hash"), ("stamp", "name"), ("stamp", "name", "hash"))
# where a value splits into items (after the delimiter), for showing the items that differ
_ITEMS = re.compile(r"(?<=[,:/; ])")


def _flatten(prefix: str, obj, out: dict) -> dict:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = obj
    return out


def key_metric(run) -> tuple[str, object] | None:
    """(dotted result key, value) of the metric a person looks at first, or of the last logged loss."""
    results = run.results()
    flat = _flatten("", results or {}, {})
    for name in KEY_METRICS:  # the last match: compress eval's "compressed" row comes after its baseline
        found = [(key, value) for key, value in flat.items()
                 if key.split(".")[-1] == name and isinstance(value, (int, float))]
        if found:
            return found[-1]
    rows = run.metrics()
    if rows and isinstance(rows[-1].get("loss"), (int, float)):
        return "loss", rows[-1]["loss"]
    return None


def short_names(names: list[str]) -> list[str]:
    """Run directory names as short as still tells them apart: the run's name alone, with its config hash
    or its time stamp where runs share a name, the whole directory name where nothing shorter does."""
    matches = [_DIR_NAME.fullmatch(name) for name in names]
    shown: list[str | None] = [None if m else name for name, m in zip(names, matches)]
    for parts in _NAME_PARTS:
        candidates = {i: "-".join(m[p] for p in parts if m[p]) for i, m in enumerate(matches)
                      if m and shown[i] is None}
        taken = [*candidates.values(), *(s for s in shown if s is not None)]
        for i, candidate in candidates.items():
            if taken.count(candidate) == 1:
                shown[i] = candidate
    return [s if s is not None else name for s, name in zip(shown, names)]


def middle_cut(text: str, width: int) -> str:
    """``text`` in ``width`` characters, its middle elided: names differ at their ends (a hash, a seed)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "…" + text[len(text) - (width - 1 - head):]


def differing_parts(values: list[str], width: int) -> list[str]:
    """Values too long for ``width`` shown by the items where they differ, what they share elided:
    ``world-train:image_size=32,count=20000`` beside ``...=64,...`` -> ``…image_size=32…``."""
    real = [v for v in values if v not in (ABSENT, "-")]
    if max(map(len, values), default=0) <= width or len(set(real)) < 2:
        return values
    items = [_ITEMS.split(v) for v in real]
    head = _common_length(items)
    tail = _common_length([i[head:][::-1] for i in items])
    out = []
    for value in values:
        parts = _ITEMS.split(value)
        middle = "".join(parts[head:len(parts) - tail]).strip(",:/; ")
        out.append(value if value in (ABSENT, "-") or not middle
                   else ("…" if head else "") + middle + ("…" if tail else ""))
    return out


def _common_length(sequences: list[list[str]]) -> int:
    """How many leading items all ``sequences`` share."""
    count = 0
    for column in zip(*sequences):
        if len(set(column)) > 1:
            break
        count += 1
    return count


def _table(title: str, wide: bool) -> Table:
    """A terminal table that spends few columns on rules: rows stay one line at 80 columns."""
    style = {} if wide else {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False}
    return Table(title=title, title_justify="left", min_width=min(len(title), console.width), **style)


def _csv_text(header: list[str], rows: list[list]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _print_text_table(header: list[str], rows: list[list], format_: str, align: str = "") -> None:
    """``rows`` as markdown or CSV on stdout, whole, for docs and scripts."""
    text = _csv_text(header, rows) if format_ == "csv" else markdown_table(header, rows, align=align)
    console.print(text, markup=False, highlight=False, soft_wrap=True, end="")


def _check_format(format_: str) -> None:
    if format_ not in FORMATS:
        raise DmclipError(f"--format {format_!r} is not one of {', '.join(FORMATS)}",
                          "use --format table (the default), md or csv")


def _run_row(run) -> dict:
    """What `runs list` knows of one run; a damaged run.json gives a row that says so."""
    try:
        info = run.info
    except DmclipError:  # a damaged run.json must not hide every other run
        return {"command": "?", "run": run.path.name, "status": "damaged", "metric": None, "value": None,
                "step": None, "started": None, "directory": str(run.path)}
    metric = key_metric(run)
    return {"command": str(info.get("command", "?")), "run": run.path.name, "status": run.display_status(),
            "metric": metric[0] if metric else None, "value": metric[1] if metric else None,
            "step": run.last_step(), "started": info.get("start_time"), "directory": str(run.path)}


def _metric_text(row: dict) -> str:
    if row["metric"] is None:
        return "-"
    unit = metric_unit(row["metric"])
    label = KEY_METRICS.get(row["metric"].split(".")[-1], row["metric"])
    return f"{label} {format_metric(row['metric'], row['value'])}" + (f" {unit}" if unit else "")


def _list_table(rows: list[dict], title: str, wide: bool) -> Table:
    """The runs as a terminal table: one line per run at 80 columns (short names, cut to what is left of the
    line), or with ``wide`` every cell whole and the directory in place of the name."""
    table = _table(title, wide)
    columns = (["command"] if wide or len({row["command"] for row in rows}) > 1 else []) + [
        "directory" if wide else "run", "status", "key metric", "step", "age"]
    names = short_names([row["run"] for row in rows])
    cells = [{"command": row["command"], "run": name, "directory": row["directory"], "status": row["status"],
              "key metric": _metric_text(row), "step": "-" if row["step"] is None else str(row["step"]),
              "age": age(row["started"])} for row, name in zip(rows, names)]
    room = max(12, console.width - sum(max(len(c), *(len(cell[c]) for cell in cells)) + 3
                                       for c in columns if c != "run"))
    for cell in cells:
        cell["run"] = middle_cut(cell["run"], room)
    for column in columns:
        table.add_column(column, no_wrap=not wide, overflow="fold" if wide else "ellipsis",
                         justify="right" if column in ("step", "age") else "left")
    for cell in cells:  # Text: names and paths are user text, never Rich markup
        table.add_row(*[Text(cell[c], style=STATUS_STYLES.get(cell[c], "") if c == "status" else "")
                        for c in columns])
    return table


def _print_list(rows: list[dict], format_: str) -> None:
    """The runs as markdown (fractions in percent) or CSV (fractions as stored), every column whole."""
    header = ["command", "run", "status", "metric", "value", "step", "started", "directory"]
    if format_ == "csv":
        lines = [[row[k] if row[k] is not None else "" for k in header] for row in rows]
    else:
        lines = [[row["command"], row["run"], row["status"], metric_label(row["metric"]) if row["metric"] else "-",
                  format_metric(row["metric"] or "", row["value"]), "-" if row["step"] is None else row["step"],
                  row["started"] or "-", row["directory"]] for row in rows]
    _print_text_table(header, lines, format_, align="lllllrll")


def register(app: typer.Typer) -> None:
    @runs_app.command("list")
    def list_runs(
        runs_dir: RunsDirOpt = None,
        command: Annotated[str | None, typer.Option("--command", "-c", help="Only runs of this command.")] = None,
        limit: Annotated[int, typer.Option("--limit", help="Show at most this many (newest first).")] = 30,
        wide: WideOpt = False,
        format_: FormatOpt = "table",
    ) -> None:
        """List runs, newest first. Example: dmclip runs list --command pretrain"""
        from dmclip.runs import default_runs_root, find_runs

        _check_format(format_)
        root = runs_dir or default_runs_root()
        found = find_runs(root, command)
        if not found:
            err_console.print(f"no runs under {escape(str(root))} yet — start one with `dmclip pretrain` or "
                              "`make demo`", highlight=False, soft_wrap=True)
            return
        rows = [_run_row(run) for run in found[:limit]]
        if format_ != "table":
            _print_list(rows, format_)
            return
        console.print(_list_table(rows, f"runs under {root}", wide))

    @runs_app.command("show")
    def show(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
        """Show one run: provenance, status, results. Example: dmclip runs show runs/distill/<run>"""
        from dmclip.runs import RunDir

        run = RunDir.open(run_dir)
        info = run.info
        table = Table(show_header=False, title=str(run.path), title_justify="left")
        table.add_column("key")
        table.add_column("value")
        for key in ("command", "name", "status", "start_time", "end_time", "seed", "git_sha", "torch", "error"):
            value = run.display_status() if key == "status" else info.get(key)
            table.add_row(key, Text("-" if value is None else str(value)))
        step = run.last_step()
        table.add_row("last step", "-" if step is None else str(step))
        console.print(table)
        results = run.results()
        if results:
            res = Table(title="results.json (fractions shown in percent)", title_justify="left")
            res.add_column("metric")
            res.add_column("value", justify="right")
            for key, value in _flatten("", results, {}).items():
                res.add_row(metric_label(key), format_metric(key, value) if isinstance(value, (int, float))
                            and not isinstance(value, bool) else json.dumps(value))
            console.print(res)

    @runs_app.command("compare")
    def compare(run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
                wide: WideOpt = False, format_: FormatOpt = "table") -> None:
        """Metrics side by side and the config keys that differ. Example: dmclip runs compare runs/distill/a runs/distill/b"""
        from dmclip.runs import RunDir

        _check_format(format_)
        if len(run_dirs) < 2:
            raise DmclipError("compare needs at least two run directories", "pass two or more paths")
        runs = [RunDir.open(p) for p in run_dirs]
        results = [_flatten("", r.results() or {}, {}) for r in runs]
        keys = list(dict.fromkeys(k for res in results for k, v in res.items() if isinstance(v, (int, float))))
        metrics = [[key, *[res.get(key) for res in results]] for key in keys]
        configs = _flat_configs(runs)
        differ = [[key, *[c[key] if key in c else ABSENT for c in configs]]
                  for key in _differing_keys(configs, _defaults(runs))]
        if format_ != "table":
            _print_comparison([r.path.name for r in runs], metrics, differ, format_)
            return
        names = [r.path.name for r in runs] if wide else short_names([r.path.name for r in runs])
        console.print(_comparison_table("metrics", names, [
            [metric_label(key), *[format_metric(key, value) for value in values]] for key, *values in metrics],
            wide, numbers=True))
        console.print(_comparison_table("config keys that differ", names, [
            [key, *[str(value) for value in values]] for key, *values in differ], wide) if differ
            else "config: identical")

    @runs_app.command("report")
    def report(
        run_dirs: Annotated[list[Path], typer.Argument(help="Run directories (or sweep directories).")],
        metrics: Annotated[str, typer.Option(
            "--metrics", help="Comma list of result keys (dotted) to show.")] = "zeroshot.acc1,zeroshot.acc5",
        format_: Annotated[str, typer.Option("--format", help="md or csv.")] = "md",
        percent: Annotated[bool | None, typer.Option(
            "--percent/--fractions", help="Fractions in [0, 1] as percent (default: md in percent, csv in fractions).",
            show_default=False)] = None,
        group_by: Annotated[str | None, typer.Option(
            "--group-by", help="Comma list of config keys: one row per group of runs (e.g. seeds of one "
                               "setting), each metric as mean ± std [95 % t-interval] over the group's runs.",
            show_default=False)] = None,
    ) -> None:
        """A table for docs, rendered from run directories: one row per run, the config keys that differ
        between the runs, the chosen result keys, and a footer naming this command, the date, machine and
        seeds. A sweep directory prints its summary.md (itself rendered from its runs).

        Example: dmclip runs report runs/pretrain/a runs/pretrain/b --metrics zeroshot.acc1,train.samples_per_s

        Over seeds: dmclip runs report runs/capfilt/* --metrics noise_removal.precision --group-by filter.score
        """
        console.print(render_report(run_dirs, metrics.split(","), format_, format_ == "md" if percent is None else percent,
                                    group_by=[k for k in (group_by or "").split(",") if k]),
                      markup=False, highlight=False, soft_wrap=True)

    register_clean(runs_app)
    app.add_typer(runs_app, name="runs")


def _comparison_table(title: str, names: list[str], rows: list[list[str]], wide: bool, numbers: bool = False) -> Table:
    """One row per key, one column per run; unless ``wide``, long names and keys keep their ends and a long
    value shows the part where the runs differ, so that a row is one line at 80 columns."""
    table = _table(title, wide)
    key_width = min(max((len(row[0]) for row in rows), default=0), 32)
    value_width = max(12, (console.width - key_width) // len(names) - 3)
    fit = (lambda text, width: text) if wide else middle_cut
    table.add_column("metric" if numbers else "key", no_wrap=not wide, overflow="fold" if wide else "ellipsis")
    for name in names:
        table.add_column(Text(fit(name, value_width)), justify="right" if numbers else "left", no_wrap=not wide,
                         overflow="fold" if wide else "ellipsis")
    for key, *values in rows:
        table.add_row(Text(fit(key, key_width)), *[Text(v) for v in (values if wide else
                                                                    differing_parts(values, value_width))])
    return table


def _print_comparison(names: list[str], metrics: list[list], differ: list[list], format_: str) -> None:
    """`runs compare --format md|csv`: the metrics and the config keys that differ, whole; CSV in fractions."""
    if format_ == "csv":
        rows = [["metric", key, *["" if v is None else v for v in values]] for key, *values in metrics]
        rows += [["config", key, *[json.dumps(v) if isinstance(v, (list, dict)) else v for v in values]]
                 for key, *values in differ]
        _print_text_table(["table", "key", *names], rows, format_)
        return
    _print_text_table(["metric", *names], [[metric_label(key), *[format_metric(key, v) for v in values]]
                                           for key, *values in metrics], format_, align="l" + "r" * len(names))
    if differ:
        console.print()
        _print_text_table(["config key that differs", *names], differ, format_)


def _flat_configs(runs) -> list[dict]:
    """Each run's resolved.yaml as a flat {dotted key: value} dict ({} where it has none)."""
    from dmclip.recipe import parse_yaml

    configs = []
    for r in runs:
        path = r.path / "resolved.yaml"
        data = parse_yaml(path.read_text(encoding="utf-8"), where=str(path)) if path.exists() else {}
        configs.append(_flatten("", data if isinstance(data, dict) else {}, {}))
    return configs


def _defaults(runs) -> list[dict]:
    """Each run's command's config defaults, flat ({} where the command has no one config)."""
    import importlib

    from dmclip.config import to_dict

    flat = {}
    for command in {r.command for r in runs} & set(COMMAND_CONFIGS):
        module, name = COMMAND_CONFIGS[command]
        flat[command] = _flatten("", to_dict(getattr(importlib.import_module(module), name)()), {})
    return [flat.get(r.command, {}) for r in runs]


def _unset(value, default) -> bool:
    """Whether a config value says no more than leaving the key out would: empty, or the key's default."""
    return value is None or (isinstance(value, (str, list, dict)) and not value) or value == default


def _differing_keys(configs: list[dict], defaults: list[dict], ignored: tuple[str, ...] = ()) -> list[str]:
    """The keys whose value is not the same in every config, in first-seen order.

    A key some configs lack (runs made before it existed) differs only where a config that has it sets it:
    ``report_to: []`` or a default beside a run without the key is the same run.
    """
    missing = object()
    differ = []
    for key in dict.fromkeys(k for c in configs for k in c):
        values = {json.dumps(c[key], default=str) for c in configs if key in c}
        lacking = any(key not in c for c in configs)
        if key not in ignored and (len(values) > 1 or lacking and not all(
                _unset(c[key], d.get(key, missing)) for c, d in zip(configs, defaults) if key in c)):
            differ.append(key)
    return differ


def render_report(run_dirs: list[Path], metrics: list[str], format_: str = "md", percent: bool = True,
                  group_by: list[str] | None = None) -> str:
    """The `dmclip runs report` text (see its help)."""
    import platform
    import shlex
    import sys

    from dmclip.runs import RunDir

    if format_ not in ("md", "csv"):
        raise DmclipError(f"--format {format_!r} is not md or csv", "use --format md or --format csv")
    if not run_dirs:
        raise DmclipError("no run directories given", "pass one or more run directories")
    sweeps = [p for p in run_dirs if (Path(p) / "summary.md").is_file() and not (Path(p) / "run.json").is_file()]
    if sweeps:
        if len(run_dirs) > 1:
            raise DmclipError("a sweep directory is reported on its own", "pass the sweep directory alone")
        return (Path(sweeps[0]) / "summary.md").read_text()
    runs = [RunDir.open(p) for p in run_dirs]
    configs = _flat_configs(runs)
    differ = _differing_keys(configs, _defaults(runs),
                             ignored=("train.log_every", "train.checkpoint_every", "train.progress"))
    results = [_flatten("", r.results() or {}, {}) for r in runs]
    missing = [m for m in metrics if all(m not in res for res in results)]
    if missing:
        keys = sorted({k for res in results for k, v in res.items() if isinstance(v, (int, float))})
        raise DmclipError(f"no run has the result key {missing[0]!r}", did_you_mean(missing[0], keys))

    def cell(value, key: str | None = None) -> str:  # key: a result key, shown in its unit when ``percent``
        if isinstance(value, float):
            return format_metric(key, value) if key and percent else repr(value) if format_ == "csv" else f"{value:.4g}"
        return "-" if value is None else str(value)

    header = ["run", *differ, *[metric_label(m) if percent else m for m in metrics]]
    rows = [[r.path.name, *[cell(c[k]) if k in c else ABSENT for k in differ], *[cell(res.get(m), m) for m in metrics]]
            for r, c, res in zip(runs, configs, results)]
    if group_by:
        header, rows = _grouped(group_by, configs, results, metrics, cell, percent)
    seeds = sorted({str(c.get("seed")) for c in configs})
    command = "dmclip " + " ".join(shlex.quote(_under_runs_root(a, runs)) for a in sys.argv[1:]) \
        if sys.argv[1:2] == ["runs"] else "dmclip runs report " + " ".join(_under_runs_root(p, runs) for p in run_dirs)
    hosts = sorted({str(r.info.get("host")) for r in runs})
    footer = (f"Rendered by `{command}` on {dt.date.today().isoformat()} from {len(runs)} run(s); seeds: "
              f"{', '.join(seeds)}; runs made on {', '.join(hosts)} ({platform.machine()}), torch "
              f"{', '.join(sorted({str(r.info.get('torch')) for r in runs}))}.")
    if format_ == "csv":
        return _csv_text(header, rows)
    table = markdown_table(header, rows, align="l" * (len(header) - len(metrics)) + "r" * len(metrics))
    return table + "\n" + footer + "\n"


def _grouped(keys: list[str], configs: list[dict], results: list[dict], metrics: list[str], cell,
             percent: bool) -> tuple[list[str], list[list[str]]]:
    """``--group-by``: one row per distinct value of ``keys``, in first-seen order: the runs and seeds in it,
    then each metric's mean ± std [95 % t-interval] over its runs (a group of one run shows the value alone)."""
    from dmclip.metrics.stats import seed_interval
    from dmclip.report import metric_unit

    unknown = [k for k in keys if all(k not in c for c in configs)]
    if unknown:
        raise DmclipError(f"no run's config has the key {unknown[0]!r}",
                          did_you_mean(unknown[0], sorted({k for c in configs for k in c})))
    groups: dict[tuple, list[int]] = {}
    for i, config in enumerate(configs):
        groups.setdefault(tuple(json.dumps(config.get(k), default=str) for k in keys), []).append(i)

    def summary(metric: str, members: list[int]) -> str:
        values = [results[i][metric] for i in members if isinstance(results[i].get(metric), (int, float))]
        if not values:
            return "-"
        s = seed_interval(values)
        lacking = f" ({len(members) - len(values)} of {len(members)} runs without it)" if len(values) < len(members) else ""
        if s["n"] == 1:
            return f"{cell(s['mean'], metric)} (1 run){lacking}"
        scale = 100 if percent and metric_unit(metric) else 1
        return (f"{s['mean'] * scale:.2f} ± {s['std'] * scale:.2f} [{s['low'] * scale:.2f}, {s['high'] * scale:.2f}]"
                + lacking)

    header = [*keys, "runs", "seeds", *[metric_label(m) if percent else m for m in metrics]]
    rows = [[*[cell(configs[members[0]].get(k)) for k in keys], str(len(members)),
             ", ".join(str(configs[i].get("seed")) for i in members), *[summary(m, members) for m in metrics]]
            for members in groups.values()]
    return header, rows


def _under_runs_root(argument, runs) -> str:
    """A run directory named on the command line as its path under the runs root (``pretrain/<run>``), so
    that a table pasted into docs names no directory of the machine that rendered it; other words as given."""
    for run in runs:
        if Path(argument).resolve() == run.path.resolve():
            parts = run.path.resolve().parts
            top = max((i for i, part in enumerate(parts[:-1]) if part == run.command), default=len(parts) - 1)
            return "/".join(parts[top:])
    return str(argument)
