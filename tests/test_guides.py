"""The guides run: every `dmclip ...` line of the bash blocks of docs/getting-started.md, your-data.md,
teachers.md and export.md is executed in page order, on small files this test writes where the page says
"your files", with tiny sizes appended (`--steps 2 --batch-size 8`, small world splits); export.md's Python
block is run on what its commands wrote.

What a user would notice if this broke: a guide whose commands fail when copied, on the files it tells them to
make. Each failing command is reported with its page, line and error; commands after a failure still run.
"""

from __future__ import annotations

import csv
import json
import random
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_docs import REPO, dmclip_args, fenced_blocks, resolve, shell_lines, tokens

from dmclip.cli.main import main

# commands of a run page that a test cannot run, with the reason
NOT_RUN = {
    ("docs/export.md", "dmclip compress serve"): "a server process that runs until stopped, for a BLIP run",
    ("docs/export.md", "dmclip compress send"): "needs the server above",
    ("docs/export.md", "dmclip compress load"): "needs the server above",
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe")
TINY_OPEN_CLIP = {"embed_dim": 32,
                  "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def _picture(colour: str, shape: str, size: int = 40) -> Image.Image:
    image = Image.new("RGB", (size, size), (245, 245, 245))
    pixels = image.load()
    for y in range(size // 5, size - size // 5):
        for x in range(size // 5, size - size // 5):
            if shape == "square" or (x // 4) % 2 == 0:
                pixels[x, y] = COLOURS[colour]
    return image


def write_my_data(root: Path) -> None:
    """your-data.md's layout: my-data/{train,val}.csv over 200 images (2 captions each), a 4-class ImageFolder
    my-classes/, and a Hugging Face imagefolder my-hf/ (images + metadata.jsonl)."""
    rng = random.Random(0)
    (root / "my-data" / "images").mkdir(parents=True)
    rows = []
    for i in range(200):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        _picture(colour, shape).save(root / "my-data" / "images" / f"{i:04d}.png")
        rows += [(f"images/{i:04d}.png", f"a {colour} {shape}"), (f"images/{i:04d}.png", f"a {shape} that is {colour}")]
    for name, part in (("train.csv", rows[:320]), ("val.csv", rows[320:])):
        with open(root / "my-data" / name, "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["filepath", "caption"])
            writer.writerows(part)
    for colour in COLOURS:
        (root / "my-classes" / colour).mkdir(parents=True)
        for j in range(10):
            _picture(colour, SHAPES[j % 2], size=36 + j).save(root / "my-classes" / colour / f"{j}.png")
    (root / "my-hf").mkdir()
    with open(root / "my-hf" / "metadata.jsonl", "w", encoding="utf-8") as file:
        for i in range(16):
            colour, shape = list(COLOURS)[i % 4], SHAPES[i % 2]
            _picture(colour, shape).save(root / "my-hf" / f"{i:02d}.png")
            file.write(json.dumps({"file_name": f"{i:02d}.png", "text": f"a {colour} {shape}"}) + "\n")


def write_open_clip_files(root: Path, monkeypatch) -> None:
    """teachers.md's files: an open_clip training checkpoint as its trainer writes it under DDP, and a
    hub-layout directory, of a tiny architecture registered under the name the page uses, ViT-B-32."""
    import open_clip
    from open_clip.push_to_hf_hub import save_for_hf

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "ViT-B-32", json.loads(json.dumps(TINY_OPEN_CLIP)))
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.logit_scale.sum().backward()
    optimizer.step()
    checkpoints = root / "logs" / "my-run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"epoch": 32, "name": "my-run", "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, checkpoints / "epoch_32.pt")

    class NoTokenizerFiles:  # the BPE tokenizer is chosen from open_clip_config.json alone
        def save_pretrained(self, directory) -> None:
            pass

    save_for_hf(model, NoTokenizerFiles(), TINY_OPEN_CLIP, root / "my-hub-model", safe_serialization=True)


def write_photo(root: Path) -> None:
    _picture("blue", "square", size=64).save(root / "photo.png")


def _given(args: list[str], *names: str) -> str | None:
    """The value the command line gives an option (the last one), or None."""
    value = None
    for i, word in enumerate(args):
        for name in names:
            if word == name and i + 1 < len(args):
                value = args[i + 1]
            elif word.startswith(name + "="):
                value = word.split("=", 1)[1]
    return value


def tiny(path: tuple[str, ...], args: list[str]) -> list[str]:
    """The options appended so a guide's command runs in seconds (later options win over the page's)."""
    extra: list[str] = []
    data = _given(args, "--data", "-d")
    if path in (("pretrain",), ("distill",)):
        extra += ["--steps", "2", "--batch-size", "8"]
        if data is None or data.startswith("world-"):
            extra += ["--data", "world-train:size=64"]
        if not any(a.startswith("eval.zeroshot=") for a in args):
            extra += ["--set", "eval.zeroshot=world-zeroshot:size=100"]
    elif path == ("reinforce",) and (data is None or data.startswith("world-")):
        extra += ["--data", "world-train:size=64"]
    elif path == ("eval", "zero-shot") and data is None:
        extra += ["--data", "world-zeroshot:size=200"]
    elif path == ("eval", "retrieval") and data is None:
        extra += ["--data", "world-retrieval-a:size=100"]
    elif path == ("eval", "suite"):
        extra += [] if _given(args, "--zero-shot") else ["--zero-shot", "world-zeroshot:size=200"]
        extra += [] if _given(args, "--retrieval") else ["--retrieval", "world-retrieval-a:size=100"]
    return extra


PLACEHOLDER_RUN = re.compile(r"runs/([\w-]+)/<[^<>]*>")


def with_runs(word: str, runs: Path) -> str:
    """`runs/<command>/<...>` -> the newest entry of runs/<command>/ (the run or sweep the page just made)."""
    def newest(match: re.Match) -> str:
        entries = sorted(p.name for p in (runs / match.group(1)).iterdir()) if (runs / match.group(1)).is_dir() else []
        return f"runs/{match.group(1)}/{entries[-1] if entries else 'nothing-made-yet'}"

    return PLACEHOLDER_RUN.sub(newest, word)


def run_page(doc: str, capsys) -> list[str]:
    """Run the page's commands in the current directory; the failures, one line each."""
    text = (REPO / doc).read_text(encoding="utf-8")
    failures, ran = [], 0
    for block in fenced_blocks(text):
        if block.lang != "bash":
            continue
        for line, command in shell_lines(block):
            args = dmclip_args(tokens(command))
            if args is None or any(doc == d and command.strip().startswith(p) for d, p in NOT_RUN):
                continue
            args = [with_runs(a, Path("runs")) for a in args]
            resolved = resolve(args)
            path = resolved.path if resolved is not None and not isinstance(resolved, str) else ()
            code = main(args + tiny(path, args))
            ran += 1
            err = capsys.readouterr().err.strip().splitlines()
            if code != 0:
                failures.append(f"{doc}:{line}: `{command.strip()}` exited {code}: {' | '.join(err[-2:])}")
    for block in fenced_blocks(text):
        if block.lang == "python":
            try:
                exec(compile(block.text, f"{doc}:{block.line}", "exec"), {})
            except Exception as exc:  # noqa: BLE001 - every failure is reported with its block
                failures.append(f"{doc}:{block.line}: the Python block raised {type(exc).__name__}: {exc}")
    assert ran, f"{doc}: no dmclip command found in its bash blocks"
    return failures


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMCLIP_RUNS", str(tmp_path / "runs"))
    return tmp_path


@pytest.mark.slow
def test_getting_started_runs(scratch, capsys):
    failures = run_page("docs/getting-started.md", capsys)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_your_data_runs_on_a_csv_an_imagefolder_and_a_hugging_face_folder(scratch, capsys):
    write_my_data(scratch)
    failures = run_page("docs/your-data.md", capsys)
    assert not failures, "\n".join(failures)
    sweeps = [p for p in (scratch / "runs" / "distill").iterdir() if "sweep" in p.name]
    summary = (sweeps[0] / "summary.md").read_text() if sweeps else ""
    assert "imagefolder:my-classes" in summary and "csv:my-data/val.csv" in summary  # the user's sets were scored
    assert "world-zeroshot" not in summary  # and only they


@pytest.mark.slow
def test_teachers_runs_with_open_clip_files_written_as_open_clip_writes_them(scratch, capsys, monkeypatch):
    write_my_data(scratch)
    write_open_clip_files(scratch, monkeypatch)
    failures = run_page("docs/teachers.md", capsys)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_export_runs_and_its_python_reads_the_file_without_dmclip(scratch, capsys):
    write_photo(scratch)
    failures = run_page("docs/export.md", capsys)
    assert not failures, "\n".join(failures)
    info = json.loads((scratch / "exported" / "teacher-b8" / "image_encoder.json").read_text())
    assert info["batch"] == 8 and info["opset"] == 18


def test_the_runner_reports_a_failing_command_and_goes_on(tmp_path, monkeypatch, capsys):
    """A page with a wrong option, a placeholder run and a good command: one failure, both others ran."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DMCLIP_RUNS", str(tmp_path / "runs"))
    (tmp_path / "runs" / "eval" / "20260101-000000-x-000000").mkdir(parents=True)
    assert with_runs("run:runs/eval/<my run>", Path("runs")) == "run:runs/eval/20260101-000000-x-000000"
    page = tmp_path / "page.md"
    page.write_text("```bash\ndmclip list students --patern 'mamba*'\ndmclip list students --pattern 'vit*'\n```\n")
    monkeypatch.setattr("test_guides.REPO", tmp_path)
    failures = run_page("page.md", capsys)
    assert len(failures) == 1 and "page.md:2: `dmclip list students --patern 'mamba*'` exited 2" in failures[0]
    assert tiny(("distill",), ["--data", "csv:my.csv"]) == ["--steps", "2", "--batch-size", "8", "--set",
                                                           "eval.zeroshot=world-zeroshot:size=100"]
