"""The `dmclip` command. ``main(argv) -> exit code`` is what tests call.

Exit codes: 0 ok, 1 unexpected error (traceback), 2 a problem the user can fix (one line + hint),
130 interrupted.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from typing import Annotated

import typer

from dmclip import __version__
from dmclip.errors import DmclipError

app = typer.Typer(
    name="dmclip",
    help="Vision-language distillation experiments: pretrain, distill, capfilt, compress, eval, export.\n\n"
         "Example: dmclip distill --alpha 0.75",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmclip {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log warnings only.")] = False,
) -> None:
    _setup_logging(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _setup_logging(level: int) -> None:
    from rich.logging import RichHandler

    logger = logging.getLogger("dmclip")
    for handler in list(logger.handlers):
        if getattr(handler, "_dmclip_console", False):
            logger.removeHandler(handler)
    handler = RichHandler(console=__import__("dmclip.cli.common", fromlist=["err_console"]).err_console,
                          show_path=False, show_time=False, markup=False)
    handler._dmclip_console = True
    handler.setLevel(level)
    logger.addHandler(handler)
    logger.setLevel(min(level, logging.INFO))
    # open_clip logs through the root logger (logging.info), which gives the root a stderr handler of its own:
    # a dmclip record passed on to it would be printed a second time. log.txt hangs on this logger.
    logger.propagate = False


def _register_commands() -> None:
    from dmclip.cli import (
        capfilt,
        compress,
        data,
        distill,
        doctor,
        evaluate,
        export,
        listing,
        pretrain,
        reinforce,
        runs,
    )

    for module in (pretrain, distill, reinforce, capfilt, compress, evaluate, export, data, runs, listing, doctor):
        module.register(app)


_register_commands()


# commands that moved: the words that started them -> (the new command, how it is written now)
MOVED = {("distill", "cache"): ("reinforce", "dmclip reinforce --teacher REF --data SPEC --out DIR "
                                            "[--augmentations K] [--seed N]")}


def _check_moved(argv: list[str]) -> None:
    """A moved command is refused with its new spelling (not with the old one's options reported unknown)."""
    first = next((i for i, word in enumerate(argv) if not word.startswith("-")), len(argv))
    words = tuple(argv[first:first + 2])
    if words in MOVED:
        new, usage = MOVED[words]
        raise DmclipError(f"`dmclip {' '.join(words)}` is now `dmclip {new}`", usage)


def _print_error(message: str, hint: str) -> None:
    from rich.markup import escape

    from dmclip.cli.common import err_console

    # escape(): a message may quote user text such as `--set a=[1,2]`, which Rich would read as markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", highlight=False, soft_wrap=True)
    err_console.print(f"[yellow]hint:[/yellow] {escape(hint)}", highlight=False, soft_wrap=True)


# the commands whose run continues with --resume (one run; a sweep's or a seed set's member runs alike)
RESUMABLE = ("pretrain", "distill", "capfilt")
GROUPS = ("eval", "compress", "data", "runs")  # commands whose second word names the subcommand


def interrupted_message(argv: list[str]) -> str:
    """What Ctrl-C leaves and how to go on, for the command ``argv`` runs: only commands that take --resume
    mention it."""
    words = [a for a in argv if not a.startswith("-")]
    command = " ".join(words[:2] if words[:1] and words[0] in GROUPS else words[:1]) or "dmclip"
    if command in RESUMABLE:
        return (f"continue the run with `dmclip {command} --resume <run directory>` (printed above as 'run "
                "directory'; in a sweep, the member run that was interrupted)")
    if command == "reinforce":
        return "run the same `dmclip reinforce` command again: the store continues where it stopped"
    if command.split()[0] in ("eval", "compress"):  # they make a run directory, which stays as "interrupted"
        return (f"`dmclip {command}` has no --resume: run it again; `dmclip runs clean` removes the interrupted "
                "run directory")
    return f"run `dmclip {command}` again"


def _print_interrupted(argv: list[str]) -> None:
    from rich.markup import escape

    from dmclip.cli.common import err_console

    err_console.print(f"[bold red]interrupted[/bold red]; {escape(interrupted_message(argv))}", highlight=False,
                      soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI with ``argv`` (without the program name); return the exit code."""
    from dmclip.cli import common

    argv = list(sys.argv[1:] if argv is None else argv)
    common.CURRENT_ARGV = ["dmclip", *argv]  # what run.json records, also when tests call main([...])
    logger = logging.getLogger("dmclip")
    propagate = logger.propagate
    try:
        return _run(argv)
    finally:  # dmclip used as a library after main() returns logs through the root logger again
        logger.propagate = propagate


def _run(argv: list[str]) -> int:
    """The command's exit code; every error becomes one message (a traceback for a bug)."""
    debug = bool(os.environ.get("DMCLIP_DEBUG"))
    try:
        _check_moved(argv)
        result = app(args=argv, prog_name="dmclip", standalone_mode=False)
        code = result if isinstance(result, int) and not isinstance(result, bool) else 0
        if code == 130:  # Typer returns Ctrl-C as exit code 130
            _print_interrupted(argv)
        return code
    except DmclipError as exc:
        if debug:
            traceback.print_exc()
        _print_error(exc.message, exc.hint or "run with DMCLIP_DEBUG=1 to see where it came from")
        return 2
    except typer.TyperException as exc:  # usage errors: wrong option, missing argument, bad value
        if type(exc).__name__ == "NoArgsIsHelpError":  # `dmclip` or `dmclip runs` alone: help was printed
            return 0
        ctx = getattr(exc, "ctx", None)
        sub = ctx.command_path if ctx is not None else "dmclip"
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        possibilities = getattr(exc, "possibilities", None)
        hint = f"did you mean {' or '.join(possibilities)}?" if possibilities else f"see `{sub} --help`"
        if debug:
            traceback.print_exc()
        _print_error(message.strip() or type(exc).__name__, hint)
        code = getattr(exc, "exit_code", 2)
        return code if isinstance(code, int) and code not in (0, 1) else 2
    except typer.Exit as exc:
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        _print_interrupted(argv)
        return 130
    except Exception as exc:  # a bug: the traceback is what a report needs
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        _print_error(f"unexpected {type(exc).__name__}: {first}",
                     "this is a bug in dmclip: please report it with the traceback above")
        return 1


def run() -> None:  # console-script entry point
    sys.exit(main())
