"""The shared helpers every command's report goes through: markdown tables, percentages, figures, the device
and the progress bar. What a user would notice if they broke: report.md tables a markdown viewer cannot
render, 0.5 shown as 0.50 instead of 50.00, a half-written PNG, a run on the CPU that asked for a GPU."""

from __future__ import annotations

import math

import pytest
import torch

from dmclip.device import model_device, resolve_device
from dmclip.errors import DmclipError
from dmclip.progress import ProgressBar, progress_bar
from dmclip.report import (
    format_metric,
    markdown_table,
    metric_label,
    metric_unit,
    percent,
    pyplot,
    save_figure,
)


def test_markdown_table_by_hand():
    table = markdown_table(["model", "acc@1 (%)", "n"], [["teacher", "49.95", 2000], ["student", "-", 7]], align="lr")
    assert table == ("| model | acc@1 (%) | n |\n"
                     "|---|---:|---|\n"  # columns past align's end are left-aligned
                     "| teacher | 49.95 | 2000 |\n"
                     "| student | - | 7 |\n")
    assert markdown_table(["a"], []) == "| a |\n|---|\n"


def test_percent_of_fractions_and_of_what_is_not_a_number():
    assert percent(0.4995) == "49.95"
    assert percent(1) == "100.00"
    assert percent(0.12345, digits=1, suffix=" %") == "12.3 %"
    assert percent(None) == percent(math.nan) == percent("0.5") == "-"


@pytest.mark.parametrize("key", ["acc1", "zeroshot.acc5", "acc@1", "mean_per_class_recall", "mean per-class recall",
                                 "image_retrieval_recall@10", "world-retrieval-a T→I R@1", "R@5", "Avg Perf",
                                 "avg_perf", "bleu4", "BLEU-1", "meteor", "ROUGE-L", "precision", "f1",
                                 "noise_removal.recall", "communication_efficiency", "bleu4_ratio"])
def test_fractions_are_shown_in_percent_with_the_unit_in_the_header(key):
    assert metric_unit(key) == "%"
    assert metric_label(key) == f"{key} %" and metric_label(key, "acc") == "acc %"
    assert format_metric(key, 0.4995) == "49.95" and format_metric(key, 1) == "100.00"


@pytest.mark.parametrize("key, value, cell", [
    ("loss", 4.76853, "4.769"), ("train.lr", 0.0005, "0.0005"), ("image_retrieval_median_rank", 3.0, "3"),
    ("alpha", 0.75, "0.75"), ("filter.keep_fraction", 0.5, "0.5"), ("mlp_ratio", 4.0, "4"),
    ("min_lr_ratio", 0.1, "0.1"), ("parameters", 1654529, "1654529"), ("acc@1 %", 49.95, "49.95"),
    ("zero-shot acc@1 %", 12.5, "12.5")])
def test_other_numbers_keep_their_own_unit(key, value, cell):
    """Losses, rates, ranks, config values, and labels that already carry their unit are not scaled."""
    assert metric_unit(key) == "" and metric_label(key) == key
    assert format_metric(key, value) == cell


def test_cider_is_shown_times_100_and_what_is_not_a_number_as_is():
    assert metric_unit("cider") == metric_unit("CIDEr") == "×100" and metric_label("cider", "CIDEr") == "CIDEr ×100"
    assert format_metric("cider", 1.2345) == "123.45"
    assert format_metric("acc1", None) == format_metric("acc1", math.nan) == "-"
    assert format_metric("acc1", "n/a") == "n/a" and format_metric("acc1", True) == "True"


def test_save_figure_writes_a_whole_png_and_closes_the_figure(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png", dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left beside it


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    with pytest.raises(DmclipError, match="no GPU is visible") as error:
        resolve_device("cuda", hint="use device=cpu (or auto)")
    assert error.value.hint == "use device=cpu (or auto)"


def test_resolve_device_gives_this_process_its_gpu(monkeypatch):
    """Under torchrun each rank has made its own GPU current: auto and cuda resolve to that one, by number."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")


def test_model_device():
    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Identity()) == torch.device("cpu")  # no parameters: the CPU


@pytest.mark.parametrize("enabled, unit", [(False, ""), (True, ""), (True, "images")])
def test_progress_bar_keeps_stdout_clean(enabled, unit, capsys):
    with progress_bar(enabled, "encoding", 10, completed=2, unit=unit) as advance:
        for _ in range(4):
            advance(2)
    assert capsys.readouterr().out == ""  # stdout carries results only


def test_training_bar_on_a_terminal_shows_the_rate_and_the_loss_line(monkeypatch, capsys):
    """The training loop's bar: step n/total, the rate text it passes (samples/s, lr) and the loss parts under
    it, kept on the screen at the end; off a terminal nothing at all, so logs and CI output stay clean."""
    monkeypatch.setenv("COLUMNS", "160")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    with ProgressBar(True, "step", 40, unit="samples", detail=True, keep=True) as bar:
        bar.update(12, rate="1,883 samples/s  lr 1.8e-05", detail="loss 0.412  distill 0.3")
    assert not bar.shown and capsys.readouterr() == ("", "")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    with ProgressBar(True, "step", 40, completed=10, unit="samples", detail=True, keep=True) as bar:
        assert bar.shown
        bar.update(12, rate="1,883 samples/s  lr 1.8e-05", detail="loss 0.412  distill 0.3")
    out, err = capsys.readouterr()
    assert out == "" and not bar.shown
    assert "step" in err and "12/40" in err and "1,883 samples/s  lr 1.8e-05" in err
    assert "loss 0.412  distill 0.3" in err

