"""compress eval / sweep / serve-send end to end: if these break, the numbers in docs/results-compress.md and
the CLI's run directories would be wrong or missing."""

from __future__ import annotations

import json
import threading

import pytest
from helpers.compress_standin import StandInCaptioner, colour_dataset

from dmclip.compress.config import CompressConfig
from dmclip.compress.measure import score_captions
from dmclip.compress.pipeline import run_eval, run_sweep
from dmclip.compress.summary import seed_claims
from dmclip.config import load_config
from dmclip.runs import RunDir


def _score(refs, cands):  # no Java in the fast tests: the captions are already lower-case words
    return score_captions(refs, cands, tokenize=False)


def _cfg(*sets):
    cfg, _ = load_config(CompressConfig, None, ["limit=6", "batch_size=4", *sets])
    return cfg


def test_eval_compares_with_the_baseline_and_writes_the_run(tmp_path):
    run = RunDir.create("compress", "eval", root=tmp_path)
    result = run_eval(_cfg("selector=kmeans", "k=2"), run, model=StandInCaptioner(), dataset=colour_dataset(),
                      score_fn=_score)
    base, row = result["baseline"], result["compressed"]
    assert base["bleu1"] == pytest.approx(1.0) and base["bleu4_ratio"] == pytest.approx(1.0)
    assert row["vectors_sent"] == 3 and row["tokens"] == 17
    assert row["communication_efficiency"] == pytest.approx(3 / 17)
    assert row["bytes_per_image"] == 21 + 4 + 3 * 6 * 2 + 2  # 16 indices x 1 bit
    assert row["bytes_per_image_without_indices"] == row["bytes_per_image"] - 2
    assert row["bytes_per_image"] < base["bytes_per_image"]
    saved = json.loads((run.path / "results.json").read_text())
    assert saved["compressed"]["bleu1"] == row["bleu1"]
    table = [line.split(" | ") for line in (run.path / "report.md").read_text().splitlines() if line.startswith("|")]
    header, compressed = table[0], table[3]
    # scores and shares in percent, each with its unit in the header; bytes are no percentage
    assert header[1:8] == ["comm. eff. %", "bytes/img", "bytes w/o idx", "BLEU-1 %", "BLEU-4 %", "CIDEr ×100",
                           "BLEU-4 / full %"]
    assert compressed[1:3] == [f"{100 * 3 / 17:.2f}", f"{row['bytes_per_image']:.3f}"]
    assert compressed[4] == f"{100 * row['bleu1']:.2f}" and compressed[6] == f"{100 * row['cider']:.2f}"


def test_sweep_writes_table_csv_plot_and_checks_the_claims(tmp_path, plot_pixels):
    run = RunDir.create("compress", "sweep", root=tmp_path)
    cfg = _cfg("sweep.k=[1,2,8]", "sweep.fractions=[0.1,0.5]", "sweep.pool_sizes=[2]",
               "sweep.tome_fractions=[0.25]")
    result = run_sweep(cfg, run, model=StandInCaptioner(), dataset=colour_dataset(), score_fn=_score)
    labels = [r["label"] for r in result["rows"]]
    assert labels == ["none", "kmeans k=1", "kmeans k=2", "kmeans k=8", "random 0.1", "random 0.5",
                      "topk-norm 0.1", "topk-norm 0.5", "pool 2x2", "tome 0.25"]
    # two rows of panels (BLEU-4, CIDEr) at 11 x 4.2 in each, 110 dpi; one line per selector: kmeans (C0),
    # random (C1), topk-norm (C2) have several points each, pool (C3) one marker per panel
    colours = plot_pixels(run.path / "compress-sweep.png", size=(1210, 924))
    assert min(colours["C0"], colours["C1"], colours["C2"]) > 300 and colours["C3"] > 50, colours
    csv_lines = (run.path / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(labels) and "bytes_per_image" in csv_lines[0]
    header = csv_lines[0].split(",")  # the CSV is for machines: fractions, as in results.json
    none = dict(zip(header, csv_lines[1].split(",")))
    assert float(none["communication_efficiency"]) == result["rows"][0]["communication_efficiency"] <= 1
    assert "| kmeans k=8 |" in (run.path / "summary.md").read_text()
    assert any("k=8" in c for c in result["claims"]) and any("random" in c for c in result["claims"])


def test_sweep_over_seeds_pairs_kmeans_with_random_at_its_bytes(tmp_path):
    """Seeded selectors (kmeans, random) are scored at every seed, the others once; each k gets a random point
    with the fewest tokens whose frame is at least as large, and a paired interval against it."""
    import numpy as np

    from dmclip.compress.codec import encode
    from dmclip.compress.config import selector_from_config

    run = RunDir.create("compress", "sweep", root=tmp_path)
    cfg = _cfg("limit=9", "sweep.k=[1,2]", "sweep.fractions=[0.5]", "sweep.selectors=[kmeans,random,pool]",
               "sweep.pool_sizes=[2]", "sweep.seeds=[0,1,2]", "sweep.matched_random=true")
    result = run_sweep(cfg, run, model=StandInCaptioner(), dataset=colour_dataset(9), score_fn=_score)
    rows = {r["label"]: r for r in result["rows"]}
    assert {label: r["seeds"] for label, r in rows.items()} == {
        "none": 1, "kmeans k=1": 3, "kmeans k=2": 3, "random 0.5": 3, "pool 2x2": 1,
        "random 1 token (kmeans k=1 bytes)": 3, "random 3 tokens (kmeans k=2 bytes)": 3}
    tokens = StandInCaptioner().encode_image_tokens(colour_dataset(1)[0]["image"][None].float())
    for k, count in ((1, 1), (2, 3)):  # k = 1 sends no indices: one vector, as random's one token
        matched = rows[f"random {count} token{'s' * (count > 1)} (kmeans k={k} bytes)"]
        assert matched["bytes_per_image"] >= rows[f"kmeans k={k}"]["bytes_per_image"]
        if count > 1:  # the fewest that are as large
            fewer = selector_from_config(cfg, "random", fraction=(count - 1) / 16)
            assert len(encode(fewer.compress(tokens))) < rows[f"kmeans k={k}"]["bytes_per_image"]
    pairs = result["intervals"]["pairs"]
    assert set(pairs) == {"kmeans k=1 - random 1 token (kmeans k=1 bytes)",
                          "kmeans k=2 - random 3 tokens (kmeans k=2 bytes)"}
    items = np.load(run.path / "items.npz")
    assert items["kmeans k=2|bleu"].shape == (3, 9, 10) and items["pool 2x2|cider"].shape == (1, 9)
    assert result["intervals"]["seeds"] == 3 and result["intervals"]["images"] == 9
    for r in result["rows"]:  # every interval holds its value
        assert r["cider_ratio_low"] - 1e-12 <= r["cider_ratio"] <= r["cider_ratio_high"] + 1e-12
    summary = (run.path / "summary.md").read_text()
    assert "bootstrap interval over 3 seeds x 9 images" in summary and "| kmeans k=2 - random 3 tokens" in summary
    csv_lines = (run.path / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 + 5 * 3 and csv_lines[0].split(",")[-1] == "seed"
    assert any("random 3 tokens" in c and "points" in c for c in result["claims"])


def test_eval_trains_the_server_at_every_seed_and_an_equal_steps_control(tmp_path, monkeypatch):
    """--finetune-server with finetune.control: per seed, one decoder trained on the selector's tokens and one
    trained the same steps on all tokens, each read as the comparison needs; both start from the model given."""
    import dmclip.compress.pipeline as pipeline

    trained = []
    model = StandInCaptioner()

    def fake_finetune(copy, cfg, run, dataset=None, selector=None):
        trained.append((cfg.seed, selector, copy is not model))
        copy.shift = 0.0 if selector == "none" else 1.0  # what the stand-in "learned"
        return {"steps": cfg.finetune.steps}

    monkeypatch.setattr(pipeline, "finetune_server", fake_finetune)
    run = RunDir.create("compress", "eval", root=tmp_path)
    cfg = _cfg("selector=kmeans", "k=1", "finetune.enabled=true", "finetune.control=true", "finetune.seeds=[3,4]")
    result = run_eval(cfg, run, model=model, dataset=colour_dataset(), score_fn=_score)
    assert trained == [(3, "kmeans", True), (3, "none", True), (4, "kmeans", True), (4, "none", True)]
    assert not hasattr(model, "shift")  # the model given is never trained: each arm trains a copy
    labels = [(r["label"], r["seeds"]) for r in result["rows"]]
    assert labels == [("none", 1), ("kmeans k=1", 1), ("kmeans k=1, server tuned on it", 2),
                      ("kmeans k=1, server tuned on all tokens", 2), ("none, server tuned on all tokens", 2)]
    assert set(result["intervals"]["pairs"]) == {
        "kmeans k=1, server tuned on it - kmeans k=1",
        "kmeans k=1, server tuned on it - kmeans k=1, server tuned on all tokens",
        "kmeans k=1, server tuned on it - none, server tuned on all tokens"}
    assert [(f["arm"], f["seed"]) for f in result["finetune"]] == [
        ("kmeans k=1, server tuned on it", 3), ("kmeans k=1, server tuned on all tokens", 3),
        ("kmeans k=1, server tuned on it", 4), ("kmeans k=1, server tuned on all tokens", 4)]
    assert all((run.path / "finetune").joinpath(p).is_dir() for p in (run.path / "finetune").iterdir())
    assert "Paired differences" in (run.path / "report.md").read_text()


def test_an_equal_steps_control_needs_a_selector_to_compare_with(tmp_path):
    from dmclip.errors import DmclipError

    run = RunDir.create("compress", "eval", root=tmp_path)
    with pytest.raises(DmclipError, match="--selector none already does"):
        run_eval(_cfg("selector=none", "finetune.enabled=true", "finetune.control=true"), run,
                 model=StandInCaptioner(), dataset=colour_dataset(), score_fn=_score)
    result = run_eval(_cfg("selector=none"), run, model=StandInCaptioner(), dataset=colour_dataset(), score_fn=_score)
    assert [r["label"] for r in result["rows"]] == ["none"] and result["compressed"]["bleu4_ratio"] == 1.0


def test_seed_claims_are_computed_not_assumed():
    rows = [{"selector": "kmeans", "setting": 8, "bleu4": 0.5, "bleu4_ratio": 0.5, "bleu1_ratio": 0.9,
             "communication_efficiency": 0.03, "bytes_per_image": 100},
            {"selector": "random", "setting": 0.4, "bleu4": 0.6, "bytes_per_image": 1000}]
    claims = seed_claims(rows)
    assert "does not hold" in claims[0] and "0 of 1" in claims[1]


@pytest.mark.slow
@pytest.mark.requires_java  # compress eval / sweep score their captions through the PTB tokenizer
def test_cli_eval_sweep_serve_send_on_a_tiny_blip(tmp_path):
    """From the command line with a real (untrained, tiny) BLIP saved like a pretrain run."""
    import numpy as np
    from PIL import Image

    from dmclip.cli.main import main
    from dmclip.compress.config import DecodeConfig
    from dmclip.compress.endpoints import caption_handler
    from dmclip.compress.server import CaptionServer
    from dmclip.models.base import load_saved_model, save_model
    from dmclip.models.blip import BlipModel, blip_tokenizer

    model = BlipModel(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, text_width=32,
                      text_depth=1, text_heads=2, embed_dim=16, context_length=12, queue_size=8,
                      tokenizer=blip_tokenizer(["a red circle", "two blue squares", "a green triangle"], 12))
    save_model(model, tmp_path / "blip")
    ref = f"run:{tmp_path / 'blip'}"
    common = ["--runs-dir", str(tmp_path / "runs"), "--limit", "3", "--set", "decode.max_length=4",
              "--set", "decode.min_length=1", "--set", "decode.num_beams=1"]
    assert main(["compress", "eval", "--model", ref, "--selector", "kmeans", "--k", "4", *common]) == 0
    assert main(["compress", "sweep", "--model", ref, *common, "--set", "sweep.selectors=[kmeans,random]",
                 "--set", "sweep.k=[2]", "--set", "sweep.fractions=[0.5]"]) == 0
    runs = sorted((tmp_path / "runs" / "compress").iterdir())
    assert len(runs) == 2 and all((r / "results.json").is_file() and (r / "report.md").is_file() for r in runs)
    assert main(["compress", "eval", "--model", "run:/no/such/run", *common]) == 2

    image = tmp_path / "a.png"
    Image.fromarray(np.full((40, 40, 3), 200, dtype=np.uint8)).save(image)
    server = CaptionServer(caption_handler(load_saved_model(tmp_path / "blip"), DecodeConfig(max_length=4,
                                                                                              num_beams=1)),
                           "127.0.0.1", 0, max_requests=1, idle_timeout=30)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    assert main(["compress", "send", "--server", f"127.0.0.1:{server.port}", "--model", ref, "--selector",
                 "kmeans", "--k", "2", "--runs-dir", str(tmp_path / "runs"), str(image)]) == 0
    thread.join(10)
    sent = json.loads(sorted((tmp_path / "runs" / "compress").glob("*send*"))[0].joinpath("results.json").read_text())
    assert sent["images"][0]["wire_bytes_sent"] == 4 + 21 + 4 + 3 * 32 * 2 + 2  # 16 patches x 1 bit = 2 bytes


@pytest.mark.slow
def test_finetune_server_trains_the_decoder_on_compressed_tokens_only(tmp_path):
    import torch

    from dmclip.compress.finetune import finetune_server
    from dmclip.models.blip import BlipModel, blip_tokenizer

    model = BlipModel(image_size=16, patch_size=4, vision_width=16, vision_depth=1, vision_heads=2, text_width=16,
                      text_depth=1, text_heads=2, embed_dim=8, context_length=8, queue_size=8,
                      tokenizer=blip_tokenizer(["a red square", "a green square", "a blue square"], 8))
    visual_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in model.text_decoder.state_dict().items()}
    run = RunDir.create("compress", "finetune", root=tmp_path)
    cfg = _cfg("selector=kmeans", "k=2", "finetune.steps=3", "finetune.batch_size=4", "finetune.lr=1e-3")
    summary = finetune_server(model, cfg, run, dataset=colour_dataset(8))
    assert summary["steps"] == 3 and (run.path / "model" / "model.json").is_file()
    assert all(torch.equal(v, model.visual.state_dict()[k]) for k, v in visual_before.items())  # edge frozen
    after = model.text_decoder.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in decoder_before.items())  # the decoder is what trains


def test_ctrl_c_stops_compress_serve_as_its_normal_end(tmp_path, capsys, monkeypatch):
    """Ctrl-C is how a server is stopped: the run completes with its statistics, exit code 0, and nobody is
    told to --resume a command that has no such option."""
    from dmclip.cli.main import main
    from dmclip.compress.server import CaptionServer
    from dmclip.models.base import save_model
    from dmclip.models.blip import BlipModel, blip_tokenizer

    model = BlipModel(image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, text_width=32,
                      text_depth=1, text_heads=2, embed_dim=16, context_length=12, queue_size=8,
                      tokenizer=blip_tokenizer(["a red circle"], 12))
    save_model(model, tmp_path / "blip")
    real_serve = CaptionServer.serve

    def serve_then_ctrl_c(self):
        self.stats.requests = 3  # what it served before the key was pressed
        self.stop()
        real_serve(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(CaptionServer, "serve", serve_then_ctrl_c)
    assert main(["compress", "serve", "--model", f"run:{tmp_path / 'blip'}", "--port", "0",
                 "--runs-dir", str(tmp_path / "runs")]) == 0
    err = capsys.readouterr().err
    assert "server stopped" in err and "--resume" not in err and "interrupted" not in err
    (run,) = [RunDir(p) for p in (tmp_path / "runs" / "compress").iterdir()]
    assert run.status == "completed" and run.results()["requests"] == 3
    assert "requests: 3" in (run.path / "report.md").read_text()
