"""`dmclip doctor`: what this install has (the facts come from dmclip.doctor)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from dmclip.cli.common import console


def _scan(facts: dict) -> str:
    kernel = facts["kernel"]
    if kernel is None:
        return (f"{facts['backend']}: the pure-PyTorch scan, slower, because the fused CPU kernel is not "
                f"available ({facts['reason']}); fix: {facts['fix']}")
    text = (f"{facts['backend']}: the fused C++ kernel, {kernel['isa']} instructions (this CPU runs "
            f"{', '.join(kernel['cpu_isas'])}; this build has {', '.join(kernel['build_isas'])})")
    if "cuda_backend" in facts:
        text += f"; CUDA tensors: {facts['cuda_backend']}"
    return text


def _threads(facts: dict) -> str:
    omp = facts["OMP_NUM_THREADS"]
    text = (f"torch uses {facts['torch']} (OMP_NUM_THREADS={omp if omp is not None else 'unset'}, ATen "
            f"parallel backend {facts['aten_parallel_backend']})")
    return text + (f"; the fused kernel: {facts['kernel']}" if facts["kernel"] else "")


def _java(facts: dict) -> str:
    if facts["path"] is None:
        return f"not found: caption metrics (eval caption, compress eval/sweep) cannot run; fix: {facts['fix']}"
    return f"{facts['path']} ({facts['version']})"


def _extras(extras: dict) -> str:
    if not extras:
        return "unknown: dmclip is not installed with pip (pip install -e .)"
    parts = []
    for extra, packages in extras.items():
        present = [f"{name} {version}" for name, version in packages.items() if version]
        if len(present) == len(packages):
            parts.append(f"{extra}: {', '.join(present)}")
        else:
            parts.append(f"{extra}: not installed (pip install -e '.\\[{extra}]')")
    return "; ".join(parts)


def _gpu(facts: dict) -> str:
    if facts["cuda"]:
        return f"CUDA {facts['cuda_version']}: {', '.join(facts['devices'])}"
    return "Apple MPS" if facts["mps"] else "none (torch.cuda.is_available() is False): everything runs on the CPU"


def _rows(facts: dict) -> list[tuple[str, str]]:
    versions, data, directories = facts["versions"], facts["fashion_mnist"], facts["directories"]
    return [
        ("dmclip", f"{versions['dmclip']} (torch {versions['torch']}, Python {versions['python']}, "
                   f"{versions['platform']}, {versions['executable']})"),
        ("selective scan", escape(_scan(facts["scan"]))),
        ("threads", escape(_threads(facts["threads"]))),
        ("Java", escape(_java(facts["java"]))),
        ("extras", _extras(facts["extras"])),
        ("GPU", escape(_gpu(facts["gpu"]))),
        ("Fashion-MNIST", escape(data["path"] if data["present"] else f"not found; fix: {data['fix']}")),
        ("cache", escape(directories["cache"])),
        ("runs", escape(directories["runs"])),
    ]


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        as_json: Annotated[bool, typer.Option("--json", help="Print the facts as one JSON object.")] = False,
    ) -> None:
        """Show what this install has: the scan kernel, threads, Java, extras, GPU, data.

        Example: dmclip doctor --json
        """
        from dmclip.doctor import gather

        facts = gather()
        if as_json:
            typer.echo(json.dumps(facts, indent=2))
            return
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for name, value in _rows(facts):
            table.add_row(name, value)
        console.print(table)
