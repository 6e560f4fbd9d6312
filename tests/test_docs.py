"""The docs a reader can trust: README.md and docs/*.md checked against the code they describe.

- every `dmclip ...` line of a ```bash / sh / console / shell block parses against the real CLI (command path,
  option names, required options, argument counts, value types); `dmclip ...` lines of plain ``` blocks and
  inline `code` name real commands and options; the cheap ones (no trained model needed) are run;
- every ```yaml recipe validates against its command's config class (with the project's config loader);
- every `--set key.path=value` names a real config field of its command and holds a value it accepts;
- every relative link (and #anchor) and every repository path (recipes/..., scripts/..., docs/...,
  dmclip/..., tests/..., benchmarks/...) exists;
- docs/config.md's `--set` and error-message tables are what the code does;
- every page under docs/ says which kind it is (guide, reference, results) and docs/README.md lists it under
  that kind; no page holds the history of the project (issue numbers, "previous session", "was fixed").

What a reader would notice if these broke: a documented command that exits with "No such option", a recipe
copied from a page that is refused, a link to nothing. `test_the_checks_find_broken_docs` shows each check
fails on a broken page.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer

from dmclip.cli.main import app, main
from dmclip.config import load_config, set_path
from dmclip.errors import DmclipError

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Failures in pages another change is rewriting: (check, doc, text the problem quotes) -> why it is broken.
# An entry that no longer fails makes the test fail too, so the list only shrinks.
KNOWN_BROKEN: dict[tuple[str, str, str], str] = {}

# ```yaml blocks that are not recipes (with the reason); every other one is validated.
NOT_RECIPES: dict[tuple[str, str], str] = {}

# `--set` arguments that show syntax, not a field; and ones that are documented *as* errors (these must fail).
SET_SYNTAX = {"key.path=value": "the general form", "a.b.c=value": "the general form"}
SET_DELIBERATE_ERRORS: dict[tuple[str, str], str] = {
    ("docs/errors.md", "optim.lr=1e-3"): "the `set-unknown-section` row: pretrain has no optim section",
    ("docs/errors.md", "train.stpes=3"): "the `set-unknown-key` row: a misspelt key",
    ("docs/config.md", "trian.lr=1e-3"): "a row of the error table (test_config_md_error_table_is_what_the_code_says)",
    ("docs/config.md", "train.lr.max=1"): "a row of the error table (test_config_md_error_table_is_what_the_code_says)",
}

# options of other tools that pages quote beside dmclip's (open_clip's trainer, torchrun, run_all)
OTHER_TOOLS_OPTIONS = {"--accum-freq": "open_clip", "--epochs": "open_clip", "--nnodes": "torchrun",
                       "--node_rank": "torchrun", "--master_addr": "torchrun", "--master_port": "torchrun",
                       "--rdzv_backend": "torchrun", "--rdzv_endpoint": "torchrun", "--rdzv_id": "torchrun",
                       "--nproc_per_node": "torchrun", "--quick": "benchmarks.run_all"}

SHELL_LANGS = {"bash", "sh", "shell", "console", "zsh"}
COMMAND_CONFIGS = {  # the config class behind each command's recipe and --set (eval has neither)
    "pretrain": "dmclip.pretrain:PretrainConfig",
    "distill": "dmclip.distill:DistillConfig",
    "capfilt": "dmclip.capfilt.config:CapfiltConfig",
    "compress": "dmclip.compress.config:CompressConfig",
}
PAGE_COMMAND = {"docs/pretrain.md": "pretrain", "docs/distill.md": "distill", "docs/capfilt.md": "capfilt",
                "docs/compress.md": "compress", "docs/eval.md": "eval"}
# documented commands run for real: they need no trained model and take seconds
CHEAP = {("list",), ("runs", "list"), ("data", "show"), ("data", "export")}
HELP_OPTIONS = {"--help", "-h"}

ROOT = typer.main.get_command(app)


def config_class(command: str):
    import importlib

    module, name = COMMAND_CONFIGS[command].split(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the block's first content line
    text: str


@dataclass(frozen=True)
class Problem:
    check: str
    doc: str
    line: int
    text: str
    why: str

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text!r}: {self.why}"


FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)\s*$")


def fenced_blocks(text: str) -> list[Block]:
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang = match.group(1), match.group(2).lower()
        end = i + 1
        while end < len(lines) and not lines[end].startswith(fence):
            end += 1
        blocks.append(Block(lang, i + 2, "\n".join(lines[i + 1:end])))
        i = end + 1
    return blocks


def prose(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept)."""
    out, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if line.startswith(fence):
                fence = None
            out.append("")
        else:
            out.append(line)
    return "\n".join(out)


def code_spans(text: str) -> list[tuple[int, str]]:
    """Inline `code` outside fenced blocks -> (line, content); a span may wrap onto the next line."""
    body = prose(text)
    spans = []
    for match in re.finditer(r"(`+)((?:(?!\1)[^\n]|\n(?!\s*\n))+?)\1", body):
        spans.append((body.count("\n", 0, match.start()) + 1, " ".join(match.group(2).split())))
    return spans


def shell_lines(block: Block) -> list[tuple[int, str]]:
    """The command lines of a shell block: continuations joined, console prompts stripped, output skipped."""
    out, pending, start = [], "", 0
    for offset, raw in enumerate(block.text.splitlines()):
        line = raw.rstrip()
        if block.lang == "console" and not pending:
            if not line.lstrip().startswith("$"):
                continue
            line = line.lstrip()[1:]
        if not pending:
            start = block.line + offset
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def synopsis_lines(block: Block) -> list[tuple[int, str]]:
    """`dmclip ...` lines of a plain ``` block (usage synopses): an indented `[--x ...]` line continues one."""
    out = []
    for offset, line in enumerate(block.text.splitlines()):
        stripped = line.strip()
        if stripped.startswith("dmclip "):
            out.append((block.line + offset, stripped))
        elif out and line[:1].isspace() and stripped.startswith(("[", "-")) and \
                out[-1][0] + len(out[-1][1].splitlines()) == block.line + offset:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + stripped)
    return [(n, " ".join(text.split())) for n, text in out]


PLACEHOLDER = re.compile(r"<[^<>\n]*>")


def tokens(command: str) -> list[str]:
    """Shell words of one command line: `<blip run>` stays one word, comments and a trailing `&` go."""
    command = PLACEHOLDER.sub(lambda m: m.group(0).replace(" ", "_"), command)
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        words = command.split()
    for i, word in enumerate(words):
        if word in ("|", "||", "&&", ";", ">", ">>", "2>"):
            words = words[:i]
            break
    while words and words[-1] == "&":
        words.pop()
    return words


def dmclip_args(words: list[str]) -> list[str] | None:
    """The arguments given to dmclip by `dmclip ...`, `python -m dmclip.cli ...` or `torchrun ... -m dmclip.cli ...`."""
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if not words:
        return None
    if words[0] == "dmclip":
        return words[1:]
    if Path(words[0]).name in ("python", "python3", "torchrun") and "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and words[i + 1] == "dmclip.cli":
            return words[i + 2:]
    return None


# ------------------------------------------------------------------------------------ the CLI side


def option_names(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")} | HELP_OPTIONS


def all_option_names(command) -> set[str]:
    names = option_names(command)
    for sub in getattr(command, "commands", {}).values():
        names |= all_option_names(sub)
    return names


def is_option(word: str) -> bool:
    return len(word) > 1 and word.startswith("-") and not re.fullmatch(r"-[\d.]+", word)


@dataclass
class Resolved:
    path: tuple[str, ...]
    command: object
    rest: list[str]


def resolve(args: list[str], synopsis: bool = False) -> Resolved | str | None:
    """Walk the command tree: the command and the words after its path; a str says what is wrong; None
    when the path is a placeholder (`dmclip <command> ...`)."""
    command, path, i = ROOT, [], 0
    while hasattr(command, "commands"):
        while i < len(args) and is_option(args[i]):
            name = args[i].split("=", 1)[0]
            if name not in option_names(command):
                return f"`{' '.join(['dmclip', *path])}` has no option {name}"
            i += 1
        if i == len(args):
            break
        word = args[i].strip("[]") if synopsis else args[i]
        if "<" in word or word in ("...", "COMMAND"):
            return None
        if word not in command.commands:
            return f"`{' '.join(['dmclip', *path])}` has no command {word!r} (it has {', '.join(command.commands)})"
        command, path, i = command.commands[word], [*path, word], i + 1
    return Resolved(tuple(path), command, args[i:])


def unknown_options(command, words: list[str], synopsis: bool = False) -> list[str]:
    known, bad = option_names(command), []
    for word in words:
        parts = word.strip("[]").split("|") if synopsis else [word]
        for part in parts:
            if is_option(part) and part.split("=", 1)[0] not in known:
                bad.append(part.split("=", 1)[0])
    return bad


def parse_error(resolved: Resolved) -> str | None:
    """What click says when it parses these words (options, required ones, argument count, value types)."""
    if HELP_OPTIONS & set(resolved.rest) or hasattr(resolved.command, "commands"):
        return None
    try:
        resolved.command.make_context(" ".join(["dmclip", *resolved.path]), list(resolved.rest))
    except typer.TyperException as exc:
        return exc.format_message() if hasattr(exc, "format_message") else str(exc)
    return None


def set_args(resolved: Resolved) -> list[str]:
    set_param = [p for p in resolved.command.params if "--set" in p.opts]
    flags = set(set_param[0].opts + set_param[0].secondary_opts) if set_param else {"--set"}
    out, words = [], resolved.rest
    for i, word in enumerate(words):
        if word in flags and i + 1 < len(words):
            out.append(words[i + 1])
        elif word.startswith("--set="):
            out.append(word[len("--set="):])
    return out


# ------------------------------------------------------------------------------------------ checks


def doc_name(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def command_problems(doc: str, text: str) -> list[Problem]:
    """Documented dmclip command lines that do not parse, or name commands/options that do not exist."""
    problems = []

    def check(line: int, command: str, full: bool, synopsis: bool = False) -> None:
        args = dmclip_args(tokens(command))
        if args is None:
            return
        resolved = resolve(args, synopsis)
        if resolved is None:
            return
        if isinstance(resolved, str):
            problems.append(Problem("commands", doc, line, command, resolved))
            return
        name = " ".join(["dmclip", *resolved.path])
        bad = unknown_options(resolved.command, resolved.rest, synopsis)
        if bad:
            problems.append(Problem("commands", doc, line, command, f"`{name}` has no option {', '.join(bad)}"))
        elif full and (error := parse_error(resolved)):
            problems.append(Problem("commands", doc, line, command, f"`{name}` refuses it: {error}"))

    for block in fenced_blocks(text):
        if block.lang in SHELL_LANGS:
            for line, command in shell_lines(block):
                check(line, command, full=True)
        elif block.lang in ("", "text"):
            for line, command in synopsis_lines(block):
                check(line, command, full=False, synopsis=True)
    page = PAGE_COMMAND.get(doc)
    page_options = all_option_names(ROOT.commands[page] if page else ROOT)
    for line, span in code_spans(text):
        if dmclip_args(tokens(span)) is not None:
            check(line, span, full=False)
        elif span.startswith("--") and is_option(span.split()[0]) and not span.startswith("--set"):
            name = span.split()[0].split("=", 1)[0]
            if name not in page_options and name not in OTHER_TOOLS_OPTIONS:
                where = f"`dmclip {page}`" if page else "any dmclip command"
                problems.append(Problem("commands", doc, line, span, f"{where} has no option {name}"))
    return problems


def documented_commands(doc: str, text: str) -> list[tuple[int, str, Resolved]]:
    """The parsed dmclip command lines of the shell blocks."""
    out = []
    for block in fenced_blocks(text):
        if block.lang in SHELL_LANGS:
            for line, command in shell_lines(block):
                args = dmclip_args(tokens(command))
                resolved = resolve(args) if args is not None else None
                if isinstance(resolved, Resolved):
                    out.append((line, command, resolved))
    return out


def set_problems(doc: str, text: str) -> list[Problem]:
    """`--set key=value` that names no field of its command (or a value the field refuses)."""
    found: list[tuple[int, str, list[str]]] = []  # (line, argument, candidate commands)
    page = PAGE_COMMAND.get(doc)
    page_commands = [page] if page in COMMAND_CONFIGS else list(COMMAND_CONFIGS)

    def commands_of(resolved: Resolved) -> list[str]:
        return [resolved.path[0]] if resolved.path and resolved.path[0] in COMMAND_CONFIGS else []

    for block in fenced_blocks(text):
        lines = (shell_lines(block) if block.lang in SHELL_LANGS
                 else synopsis_lines(block) if block.lang in ("", "text") else [])
        for line, command in lines:
            args = dmclip_args(tokens(command))
            resolved = resolve(args) if args is not None else None
            if isinstance(resolved, Resolved):
                found += [(line, arg, commands_of(resolved)) for arg in set_args(resolved)]
    for line, span in code_spans(text):
        args = dmclip_args(tokens(span))
        if args is not None:
            resolved = resolve(args)
            if isinstance(resolved, Resolved):
                found += [(line, arg, commands_of(resolved)) for arg in set_args(resolved)]
        elif span.startswith("--set"):
            words = tokens(span)
            found += [(line, words[i + 1], page_commands) for i, w in enumerate(words[:-1])  # not an error message
                      if w == "--set" and ("=" in words[i + 1] or words[i + 1].endswith(".*"))]

    problems = []
    for line, arg, commands in found:
        if arg in SET_SYNTAX:
            continue
        errors = {}
        for command in commands:
            try:
                if "=" in arg:
                    load_config(config_class(command), None, [arg])
                else:  # a key named without a value: `--set model.*`
                    set_path({}, arg.removesuffix(".*"), None, config_class(command))
            except DmclipError as exc:
                errors[command] = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
        deliberate = (doc, arg) in SET_DELIBERATE_ERRORS
        if deliberate and len(errors) < len(commands):
            problems.append(Problem("set", doc, line, f"--set {arg}",
                                    "documented as an error, but it works: remove it from SET_DELIBERATE_ERRORS"))
        elif not deliberate and (not commands or len(errors) == len(commands)):
            why = "; ".join(f"{c}: {m}" for c, m in errors.items()) or "this command takes no --set"
            problems.append(Problem("set", doc, line, f"--set {arg}", why))
    return problems


def yaml_command(doc: str, block: Block) -> str | None:
    comments = " ".join(line for line in block.text.splitlines() if line.lstrip().startswith("#"))
    for pattern in (r"dmclip (pretrain|distill|capfilt|compress)\b", r"recipes/(pretrain|distill|capfilt|compress)-"):
        names = set(re.findall(pattern, comments))
        if len(names) == 1:
            return names.pop()
    return PAGE_COMMAND.get(doc) if PAGE_COMMAND.get(doc) in COMMAND_CONFIGS else None


def yaml_problems(doc: str, text: str, tmp: Path) -> list[Problem]:
    """```yaml recipes that their command's config loader refuses."""
    problems = []
    for block in fenced_blocks(text):
        if block.lang not in ("yaml", "yml"):
            continue
        first = block.text.strip().splitlines()[0] if block.text.strip() else ""
        if (doc, first) in NOT_RECIPES:
            continue
        command = yaml_command(doc, block)
        if command is None:
            problems.append(Problem("yaml", doc, block.line, first, "cannot tell which command this recipe is for: "
                                    "name it in a comment (`# dmclip distill ...`) or list it in NOT_RECIPES"))
            continue
        path = tmp / f"{Path(doc).stem}-{block.line}.yaml"
        path.write_text(block.text + "\n", encoding="utf-8")
        try:
            load_config(config_class(command), path)
            if command in ("distill", "pretrain"):  # the sweep: block, which the runner reads
                import importlib

                from dmclip.runner import plan

                plan(importlib.import_module(f"dmclip.{command}").COMMAND, recipe=path)
        except DmclipError as exc:
            problems.append(Problem("yaml", doc, block.line, first, f"`dmclip {command}` refuses it: {exc.message}"))
    return problems


def github_slug(heading: str) -> str:
    heading = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {github_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", prose(text), re.M)}


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REPO_PATH = re.compile(r"(?<![\w./-])((?:recipes|scripts|docs|dmclip|tests|benchmarks)/[\w./*-]*)")


def path_problems(doc: str, text: str, root: Path = REPO) -> list[Problem]:
    """Relative links (with #anchors) and repository paths that lead nowhere."""
    problems, base = [], (root / doc).parent
    body = prose(text)
    for match in LINK.finditer(body):
        target = match.group(1)
        line = body.count("\n", 0, match.start()) + 1
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or "<" in target:
            continue
        file, _, anchor = target.partition("#")
        path = (base / file) if file else root / doc
        if not path.exists():
            problems.append(Problem("paths", doc, line, target, f"the link leads to nothing ({path.relative_to(root)} "
                                    "does not exist)"))
        elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text(encoding="utf-8")):
            problems.append(Problem("paths", doc, line, target, f"{path.name} has no heading #{anchor}"))
    for match in REPO_PATH.finditer(text):
        name = match.group(1).rstrip(".,:")
        if text[match.end():match.end() + 1] in ("<", "{"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        found = list(root.glob(name.rstrip("/"))) if "*" in name else [root / name] if (root / name).exists() else []
        if not found:
            problems.append(Problem("paths", doc, line, name, "no such file in the repository"))
    return problems


# ------------------------------------------------------------------------------------------ tests


def _report(check: str, problems: list[Problem]) -> None:
    known = {key: why for key, why in KNOWN_BROKEN.items() if key[0] == check}
    left = [p for p in problems if not any(p.doc == d and t in p.text for (_, d, t) in known)]
    stale = [key for key in known if not any(p.doc == key[1] and key[2] in p.text for p in problems)]
    message = "\n".join(map(str, left))
    if stale:
        message += "\nKNOWN_BROKEN entries that no longer fail (remove them): " + ", ".join(map(str, stale))
    assert not left and not stale, message


def _pages() -> list[tuple[str, str]]:
    return [(doc_name(p), p.read_text(encoding="utf-8")) for p in DOCS]


def test_documented_commands_parse_against_the_cli():
    _report("commands", [p for doc, text in _pages() for p in command_problems(doc, text)])


def test_set_overrides_name_real_config_fields():
    _report("set", [p for doc, text in _pages() for p in set_problems(doc, text)])


def test_yaml_recipes_validate_against_their_config(tmp_path):
    _report("yaml", [p for doc, text in _pages() for p in yaml_problems(doc, text, tmp_path)])


def test_links_and_repository_paths_exist():
    _report("paths", [p for doc, text in _pages() for p in path_problems(doc, text)])


def test_cheap_documented_commands_run(tmp_path, monkeypatch, capsys):
    """`dmclip list ...`, `runs list`, `data show`, `data export` as documented, in a scratch directory holding
    the files the guides tell a user to make."""
    from test_guides import write_my_data

    monkeypatch.chdir(tmp_path)
    write_my_data(tmp_path)
    ran = set()
    for doc, text in _pages():
        for line, command, resolved in documented_commands(doc, text):
            args = dmclip_args(tokens(command))
            if resolved.path not in CHEAP or "<" in command or "..." in args or tuple(args) in ran:
                continue
            ran.add(tuple(args))
            assert main(list(args)) == 0, f"{doc}:{line}: `{command}` failed:\n{capsys.readouterr().err}"
            if resolved.path == ("data", "show"):
                out = args[args.index("-o" if "-o" in args else "--output") + 1]
                assert (tmp_path / out).stat().st_size > 0, f"{doc}:{line}: `{command}` wrote no {out}"
            if resolved.path == ("data", "export"):
                out = [w for w in resolved.rest if not is_option(w)][-1]
                assert any((tmp_path / out).iterdir()), f"{doc}:{line}: `{command}` exported nothing"
    assert ran, "no cheap documented command found: the extraction is broken"


def _table(text: str, heading: str) -> list[list[str]]:
    """The rows (cells) of the first table after a heading."""
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


def _code(cell: str) -> str:
    match = re.search(r"(`+)(.*?)\1", cell)
    assert match, f"no `code` in table cell {cell!r}"
    return match.group(2)[1:-1] if len(match.group(1)) > 1 and match.group(2).startswith(" ") else match.group(2)


def _matches(line: str, expected: str) -> bool:
    """Exact, except that each "..." stands for any text."""
    return re.fullmatch(".*".join(re.escape(part) for part in expected.split("...")), line) is not None


def test_config_md_set_table_is_what_the_code_does():
    rows = _table((REPO / "docs" / "config.md").read_text(encoding="utf-8"), "`--set`")
    assert len(rows) >= 5
    for command, given, gets in rows:
        arg = tokens(_code(given))[1]
        cfg, _ = load_config(config_class(_code(command)), None, [arg])
        value = cfg
        for part in arg.split("=", 1)[0].split("."):
            value = getattr(value, part)
        expected = ast.literal_eval(_code(gets))
        assert value == expected and type(value) is type(expected), f"{given}: the field gets {value!r}, not {gets}"


def test_config_md_error_table_is_what_the_code_says(tmp_path):
    """Each row: `dmclip distill` with that recipe text (or --set) gives exactly that error and hint."""
    from dmclip.distill import DistillConfig

    rows = _table((REPO / "docs" / "config.md").read_text(encoding="utf-8"), "Error messages")
    assert len(rows) >= 10
    for mistake, given, error, hint in rows:
        given = _code(given)
        if given.startswith("--set "):
            recipe, sets = None, [tokens(given)[1]]
        else:
            recipe, sets = tmp_path / "r.yaml", []
            recipe.write_text(given.replace("\\n", "\n").replace("\\t", "\t") + "\n", encoding="utf-8")
        with pytest.raises(DmclipError) as caught:
            load_config(DistillConfig, recipe, sets)
        assert _matches(caught.value.message, _code(error)), f"{mistake}: {caught.value.message!r}"
        assert _matches(caught.value.hint, _code(hint)), f"{mistake}: {caught.value.hint!r}"


def test_the_checks_find_broken_docs(tmp_path):
    """A renamed option, a misspelt command, a broken recipe, a wrong --set key, a dead link: each is found."""
    page = ("```bash\n"
            "dmclip eval zero-shot --modle run:runs/pretrain/<run>\n"
            "dmclip eval zero-shoot --model x\n"
            "dmclip distill --alpha 0.75 --set train.stpes=3\n"
            "dmclip eval retrieval --data world-retrieval-b   # no --model\n"
            "```\n\n"
            "```yaml\n# dmclip distill\ntrain:\n  lr: 1.0e-3\noptim:\n  lr: 1.0e-3\n```\n\n"
            "```yaml\n# dmclip pretrain\ntrain:\n  steps: many\n```\n\n"
            "See [runs](runs.md#no-such-heading), [x](nope.md), `recipes/distill.yaml` and `--seeed 3`.\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "runs.md").write_text("# Runs\n## Resuming\n")
    commands = [p.why for p in command_problems("docs/x.md", page)]
    assert any("has no option --modle" in w for w in commands), commands
    assert any("has no command 'zero-shoot'" in w for w in commands), commands
    assert any("Missing option '--model'" in w for w in commands), commands
    assert any("has no option --seeed" in w for w in commands), commands
    sets = [p.why for p in set_problems("docs/x.md", page)]
    assert any("did you mean train.steps" in w for w in sets), sets
    recipes = [p.why for p in yaml_problems("docs/x.md", page, tmp_path)]
    assert any("unknown config key 'optim'" in w for w in recipes), recipes
    assert any("train.steps = 'many'" in w for w in recipes), recipes
    paths = {p.text for p in path_problems("docs/x.md", page, root=tmp_path)}
    assert {"runs.md#no-such-heading", "nope.md", "recipes/distill.yaml"} <= paths, paths
    assert not path_problems("docs/x.md", "[ok](runs.md#resuming)", root=tmp_path)


KIND = re.compile(r"^\*(Guide|Reference|Results)[:.]")
SECTION_KIND = {"Guides": "Guide", "Reference": "Reference", "Results": "Results"}
HISTORY = re.compile(r"\bissues? #?\d+|\b(this|previous|earlier|last|first) session|\bpreviously\b|\bwe learned\b|"
                     r"\bwas ours\b|\bwas fixed\b|benchmarks-history|\bearlier (recipe|run|harness|teacher)", re.I)


def _kind(text: str) -> str | None:
    """The kind a page states in the paragraph under its title."""
    paragraphs = [p.strip() for p in text.split("\n\n")[1:] if p.strip()]
    match = KIND.match(paragraphs[0]) if paragraphs else None
    return match.group(1) if match else None


def _index_kinds(index: str) -> dict[str, str]:
    """docs/README.md: page name -> the kind of the section that lists it."""
    listed, kind = {}, None
    for line in index.splitlines():
        if line.startswith("## "):
            kind = SECTION_KIND.get(line[3:].strip())
        for name in re.findall(r"\]\(([\w.-]+\.md)\)", line):
            listed.setdefault(name, kind)
    return listed


def test_every_page_says_its_kind_and_the_index_lists_it_under_that_kind():
    listed = _index_kinds((REPO / "docs" / "README.md").read_text(encoding="utf-8"))
    wrong = []
    for path in sorted((REPO / "docs").glob("*.md")):
        if path.name == "README.md":
            continue
        kind = _kind(path.read_text(encoding="utf-8"))
        if kind is None:
            wrong.append(f"{path.name}: no '*Guide: ...*', '*Reference: ...*' or '*Results: ...*' under its title")
        elif listed.get(path.name) != kind:
            wrong.append(f"{path.name} is a {kind} page; docs/README.md lists it under {listed.get(path.name)}")
    assert not wrong, "\n".join(wrong)


def test_no_page_holds_the_projects_history():
    found = [f"{doc}:{body.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for doc, text in _pages() for body in [prose(text)] for m in HISTORY.finditer(body)]
    assert not found, "history belongs in git log:\n" + "\n".join(found)


def test_the_page_checks_find_a_page_without_kind_and_a_history_line():
    assert _kind("# Page\n\nSome text.\n") is None and _kind("# Page\n\n*Guide: how to.*\n") == "Guide"
    assert _index_kinds("## Guides\n\n| [a.md](a.md) | x |\n\n## Results\n\n[b](b.md)\n") == {"a.md": "Guide",
                                                                                                 "b.md": "Results"}
    page = "# P\n\nThe fix of issue 17 was fixed in the previous session.\n\n```python\nsession = 1\n```\n"
    assert {m.group(0) for m in HISTORY.finditer(prose(page))} == {"issue 17", "was fixed", "previous session"}

