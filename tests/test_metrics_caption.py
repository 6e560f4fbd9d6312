"""Caption metrics: hand-computed cases, an independent BLEU, and equality with pycocoevalcap's pipeline.

What a user would notice if these broke: BLEU/CIDEr/METEOR/ROUGE-L numbers that differ from the COCO
caption evaluation every captioning paper reports.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from collections import Counter

import pytest

from dmclip.errors import DmclipError
from dmclip.metrics.caption import caption_metrics, ptb_tokenize

REFERENCES = {
    1: ["A red circle on the left.", "a small red circle, left side", "Red round shape at left!"],
    2: ["Two blue squares.", "a pair of blue squares on a grey background"],
    3: ["A green triangle in the middle", "green triangle, centred", "the triangle is green"],
    4: ["a yellow star at the top right", "yellow star (top-right)"],
}
CANDIDATES = {1: "A red circle at the left.", 2: "two blue squares on grey", 3: "a green square in the middle",
              4: "a yellow star"}


def test_bleu_and_rouge_by_hand():
    refs = {0: ["a b c e"]}
    out = caption_metrics(refs, {0: "a b c d"}, tokenize=False, meteor=False)
    # unigrams 3/4, bigrams 2/3, trigrams 1/2, 4-grams 0/1; same length, so no brevity penalty
    assert out["bleu1"] == pytest.approx(3 / 4)
    assert out["bleu2"] == pytest.approx(math.sqrt(3 / 4 * 2 / 3))
    assert out["bleu3"] == pytest.approx((3 / 4 * 2 / 3 * 1 / 2) ** (1 / 3))
    assert out["bleu4"] < 1e-3  # zero matches: pycocoevalcap's 1e-15 smoothing leaves (0.25e-15) ** (1/4)
    # longest common subsequence 3 of 4 words both ways: P = R = 3/4, so F_beta = 3/4
    assert out["rouge_l"] == pytest.approx(3 / 4)
    assert math.isnan(out["meteor"])


def test_perfect_distinct_captions_score_cider_10_and_bleu_1():
    refs = {0: ["a red circle left"], 1: ["two blue squares up"], 2: ["one green triangle down"]}
    out = caption_metrics(refs, {k: v[0] for k, v in refs.items()}, tokenize=False, meteor=False)
    # CIDEr-D = 10 · mean over n = 1..4 of the tf-idf cosine, each 1 for a perfect caption
    assert out["cider"] == pytest.approx(10.0)
    assert out["bleu1"] == pytest.approx(1.0) and out["bleu4"] == pytest.approx(1.0)
    # three-word captions have no 4-grams: that n contributes 0, so 10 · 3/4
    short = {0: ["a red circle"], 1: ["two blue squares"], 2: ["one green triangle"]}
    assert caption_metrics(short, {k: v[0] for k, v in short.items()}, tokenize=False,
                           meteor=False)["cider"] == pytest.approx(7.5)


def test_cider_d_of_imperfect_captions_by_hand():
    """CIDEr-D (pycocoevalcap's Cider) of two imperfect captions, computed by hand from its definition.

    Two images, so idf = log(2) - log(max(1, df)) with df counted once per image over its references:
    'a', 'cat', 'a cat' are in both images' references (idf 0); every other reference n-gram has df 1 and
    n-grams found in no reference ('the', 'ran ran', ...) count as df 1 as well, so all of those weigh
    tf * L with L = log 2. Per n = 1..4: clipped tf-idf cosine sum_g min(h_g, r_g) * r_g / (|h| |r|),
    times the Gaussian length penalty exp(-delta^2 / (2 * 6^2)); averaged over n, over the references, x 10.
    """
    refs = {0: ["a cat sat", "a dog sat"], 1: ["a cat ran"]}
    cands = {0: "a cat sat", 1: "the cat ran ran"}
    # image 0 against "a cat sat": identical, cosine 1 for n = 1, 2, 3 and 0 for n = 4 (no 4-grams)
    # image 0 against "a dog sat": n = 1 shares only 'sat' (L^2 / (L * L sqrt 2)); n = 2, 3 share nothing
    image0 = 10 * ((1 + 1 + 1 + 0) + (1 / math.sqrt(2) + 0 + 0 + 0)) / 4 / 2
    # image 1: candidate unigrams the:L, cat:0, ran:2L (|h| = L sqrt 5), bigrams the-cat, cat-ran, ran-ran
    # (|h| = L sqrt 3); the reference's ran:L and cat-ran:L (|r| = L each). 'ran' clips to min(2L, L) = L.
    # lengths differ by one word: penalty exp(-1 / 72)
    image1 = 10 * math.exp(-1 / 72) * (1 / math.sqrt(5) + 1 / math.sqrt(3) + 0 + 0) / 4 / 1
    out = caption_metrics(refs, cands, tokenize=False, meteor=False)
    assert out["cider"] == pytest.approx((image0 + image1) / 2, abs=1e-6)
    # the case is sensitive to each part: unclipped 'ran' (2L^2) or no length penalty give other values
    unclipped = 10 * math.exp(-1 / 72) * (2 / math.sqrt(5) + 1 / math.sqrt(3)) / 4
    no_penalty = 10 * (1 / math.sqrt(5) + 1 / math.sqrt(3)) / 4
    for wrong in (unclipped, no_penalty):
        assert abs(out["cider"] - (image0 + wrong) / 2) > 1e-3


def _independent_corpus_bleu(refs: dict, cands: dict, n_max: int = 4) -> list[float]:
    """Papineni et al. 2002 at corpus level, brevity penalty on the closest reference length (COCO's choice)."""
    matches, totals = [0] * n_max, [0] * n_max
    cand_len = ref_len = 0
    for key, cand in cands.items():
        words = cand.split()
        ref_words = [r.split() for r in refs[key]]
        cand_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]
        for n in range(1, n_max + 1):
            grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
            best = Counter()
            for r in ref_words:
                for gram, count in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                    best[gram] = max(best[gram], count)
            matches[n - 1] += sum(min(c, best[g]) for g, c in grams.items())
            totals[n - 1] += max(len(words) - n + 1, 0)
    bp = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    scores, log_sum = [], 0.0
    for n in range(n_max):
        log_sum += math.log(matches[n] / totals[n])
        scores.append(bp * math.exp(log_sum / (n + 1)))
    return scores


def test_bleu_matches_an_independent_implementation():
    refs = {k: [r.lower().replace(",", "").replace(".", "").replace("!", "") for r in v] for k, v in REFERENCES.items()}
    cands = {1: "a red circle at the left side", 2: "two blue squares on a grey background", 3: "a green triangle",
             4: "a yellow star at the top"}
    ours = caption_metrics(refs, cands, tokenize=False, meteor=False)
    expected = _independent_corpus_bleu(refs, cands)
    for n in range(4):
        assert ours[f"bleu{n + 1}"] == pytest.approx(expected[n], rel=1e-6)


@pytest.mark.requires_java
def test_ptb_tokenize_equals_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    data = {k: [{"caption": c} for c in v] for k, v in REFERENCES.items()}
    assert ptb_tokenize(REFERENCES) == PTBTokenizer().tokenize(data)
    assert ptb_tokenize({1: ["Two blue squares."]}) == {1: ["two blue squares"]}


def _pycocoevalcap_pipeline(meteor: bool):
    """What COCOEvalCap.evaluate does, called directly (SPICE aside: it needs a download)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": CANDIDATES[k]}] for k in REFERENCES})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out = {f"bleu{n + 1}": bleu[n] for n in range(4)}
    out["rouge_l"], _ = Rouge().compute_score(gts, res)
    out["cider"], _ = Cider().compute_score(gts, res)
    if meteor:
        out["meteor"], _ = Meteor().compute_score(gts, res)
    return out


@pytest.mark.requires_java
def test_equals_the_coco_caption_evaluation_without_meteor():
    ours = caption_metrics(REFERENCES, CANDIDATES, meteor=False)
    theirs = _pycocoevalcap_pipeline(meteor=False)
    for key, value in theirs.items():
        assert ours[key] == pytest.approx(value, abs=1e-12), key
    assert 0 < ours["cider"] < 10 and 0 < ours["bleu4"] < 1


@pytest.mark.slow
@pytest.mark.requires_java
def test_meteor_equals_the_coco_caption_evaluation():
    ours = caption_metrics(REFERENCES, CANDIDATES, meteor=True)
    theirs = _pycocoevalcap_pipeline(meteor=True)
    assert ours["meteor"] == pytest.approx(theirs["meteor"], abs=1e-12)
    assert 0.1 < ours["meteor"] < 1


def test_empty_references_are_a_clear_error():
    with pytest.raises(DmclipError, match="empty references"):
        caption_metrics({1: ["a cat"], 2: ["", "  "]}, {1: "a cat", 2: "a dog"}, meteor=False)
    with pytest.raises(DmclipError, match="no references"):
        caption_metrics({}, {}, meteor=False)
    with pytest.raises(DmclipError, match="different images"):
        caption_metrics({1: ["a cat"]}, {2: "a cat"}, meteor=False)


def test_missing_java_is_a_clear_error(monkeypatch):
    import dmclip.metrics.caption as caption

    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    with pytest.raises(DmclipError, match="Java") as info:
        caption_metrics({1: ["a cat"]}, {1: "a cat"}, meteor=False)
    assert "apt-get install" in info.value.hint


@pytest.mark.requires_java
def test_empty_references_are_dropped_before_scoring():
    """An image's blank references are ignored (as if never given), not tokenized nor counted."""
    with_blanks = {1: ["A red circle.", "", "  "], 2: ["Two blue squares.", "a pair of blue squares"]}
    without = {1: ["A red circle."], 2: ["Two blue squares.", "a pair of blue squares"]}
    candidates = {1: "a red circle", 2: "two squares"}
    assert caption_metrics(with_blanks, candidates, meteor=False) == pytest.approx(
        caption_metrics(without, candidates, meteor=False), nan_ok=True)


def test_a_missing_candidate_caption_scores_as_an_empty_one():
    refs = {0: ["a b c"], 1: ["d e f"]}
    empty = caption_metrics(refs, {0: "a b c", 1: ""}, tokenize=False, meteor=False)
    assert caption_metrics(refs, {0: "a b c", 1: None}, tokenize=False, meteor=False) == pytest.approx(empty, nan_ok=True)
    assert empty["rouge_l"] == pytest.approx(0.5)  # one perfect caption, one that matches nothing
    # no words: 3 candidate words against 6 reference words, all matching, so BLEU-1 is the brevity penalty
    assert empty["bleu1"] == pytest.approx(math.exp(1 - 6 / 3))


@pytest.mark.requires_java
def test_ptb_tokenize_keeps_one_line_per_caption():
    """A newline inside a caption must not shift every later caption onto another image; no captions, no java."""
    assert ptb_tokenize({1: ["A red\ncircle.", "Two"], 2: [], 3: ["x"]}) == {1: ["a red circle", "two"], 2: [], 3: ["x"]}
    assert ptb_tokenize({1: [], 2: []}) == {1: [], 2: []}


def test_a_failing_tokenizer_is_a_clear_error(monkeypatch):
    import dmclip.metrics.caption as caption

    monkeypatch.setattr(caption, "_java", lambda: shutil.which("false"))
    with pytest.raises(DmclipError, match=r"the PTB tokenizer \(java\) failed") as info:
        ptb_tokenize({1: ["a cat"]})
    assert "java -version" in info.value.hint


@pytest.mark.parametrize("references, candidates, counts", [
    ({1: ["a cat"]}, {1: "a cat", 2: "a dog"}, "(0 without a candidate, 1 without references)"),
    ({1: ["a cat"], 2: ["a dog"]}, {1: "a cat"}, "(1 without a candidate, 0 without references)"),
])
def test_candidates_for_other_images_are_refused(references, candidates, counts):
    with pytest.raises(DmclipError, match="cover different images") as info:
        caption_metrics(references, candidates, tokenize=False, meteor=False)
    assert counts in info.value.message
    assert info.value.hint == "give one candidate caption per referenced image"


def test_empty_references_hint_and_scoring_prints_nothing(capsys):
    with pytest.raises(DmclipError, match=r"1 images have empty references \(e.g. 2\)") as info:
        caption_metrics({1: ["a cat"], 2: [""]}, {1: "a cat", 2: "a dog"}, meteor=False)
    assert info.value.hint.startswith("every image needs at least one non-empty reference caption")
    caption_metrics({0: ["a b c"]}, {0: "a b c"}, tokenize=False, meteor=False)
    assert capsys.readouterr().out == ""  # library code never prints (pycocoevalcap's BLEU does when verbose)


@pytest.mark.requires_java
def test_ptb_tokenize_leaves_no_temporary_file(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert ptb_tokenize({1: ["A cat."]}) == {1: ["a cat"]}
    assert list(tmp_path.iterdir()) == []


def _fake_java(tmp_path, monkeypatch, script: str):
    """A shell script in place of java for the tokenizer: ``$last`` is the file of sentences it is given."""
    import dmclip.metrics.caption as caption

    java = tmp_path / "java"
    java.write_text("#!/bin/sh\nfor last; do :; done\n" + script + "\n")
    java.chmod(0o755)
    monkeypatch.setattr(caption, "_java", lambda: str(java))


def test_ptb_tokenize_reads_lines_ended_by_crlf(tmp_path, monkeypatch):
    """Java on Windows ends its output lines with CR LF: the CR is not part of the last word."""
    _fake_java(tmp_path, monkeypatch, "sed 's/$/\\r/' \"$last\"")
    assert ptb_tokenize({1: ["a cat , sat", "two"], 2: ["x"]}) == {1: ["a cat sat", "two"], 2: ["x"]}


def test_ptb_tokenize_does_not_mind_its_temporary_file_already_gone(tmp_path, monkeypatch):
    """A temporary-file cleaner (or the tokenizer) removing the file of sentences is no error."""
    _fake_java(tmp_path, monkeypatch, "cat \"$last\"; rm \"$last\"")
    assert ptb_tokenize({1: ["a cat"]}) == {1: ["a cat"]}


class _FakeJvm:
    """The METEOR jar's process: answers ``lines`` on stdout, records how it is stopped."""

    def __init__(self, lines, broken_pipe=False):
        self.calls = []
        self.stdin = self
        self.stdout = io.BytesIO("".join(f"{line}\n" for line in lines).encode())
        self.broken_pipe = broken_pipe

    def write(self, data):
        pass

    def flush(self):
        pass

    def close(self):
        self.calls.append("close")
        if self.broken_pipe:
            raise BrokenPipeError(32, "Broken pipe")

    def kill(self):
        self.calls.append("kill")

    def wait(self):
        self.calls.append("wait")


def _fake_meteor(monkeypatch, lines, broken_pipe=False):
    """pycocoevalcap's own Meteor (its compute_score, lock and __del__) talking to a fake JVM that answers
    ``lines``; prints at start (the real one may)."""
    import threading

    import pycocoevalcap.meteor.meteor as meteor_module

    started = []

    class FakeMeteor(meteor_module.Meteor):
        def __init__(self):
            print("starting METEOR")
            self.meteor_p = _FakeJvm(lines, broken_pipe)
            self.lock = threading.Lock()
            self.inputs = []
            started.append(self)

        def compute_score(self, gts, res):
            self.inputs.append((gts, res))
            return super().compute_score(gts, res)

    monkeypatch.setattr(meteor_module, "Meteor", FakeMeteor)
    return started


# the jar's answers for one image: its statistics line, then the image's score, then the corpus score
ONE_IMAGE = ["1 1 1 1", "0.5", "0.25"]


def test_meteor_score_is_the_jars_number_printed_nowhere_and_the_jvm_stopped(monkeypatch, capsys):
    from types import MappingProxyType

    from dmclip.metrics.caption import meteor_score

    started = _fake_meteor(monkeypatch, ONE_IMAGE)
    score = meteor_score(MappingProxyType({1: ["a cat"]}), MappingProxyType({1: ["a cat"]}))
    assert score == 0.25 and type(score) is float
    assert capsys.readouterr().out == ""
    assert started[0].meteor_p.calls == ["close", "kill", "wait"]
    assert not started[0].lock.locked()


def test_meteor_garbage_from_the_jar_is_a_clear_error_the_jvm_stopped_and_the_scorer_freeable(monkeypatch):
    """pycocoevalcap's Meteor keeps its lock when the jar's answer is not a number, and its __del__ takes that
    lock: left held, the process hung forever once the scorer was freed."""
    from dmclip.metrics.caption import meteor_score

    started = _fake_meteor(monkeypatch, ["1 1 1 1", "Exception"])
    with pytest.raises(DmclipError, match=r"METEOR failed \(could not convert") as info:
        meteor_score({1: ["a cat"]}, {1: ["a cat"]})
    assert info.value.hint == "run with --no-meteor to skip it"
    assert started[0].meteor_p.calls == ["close", "kill", "wait"]
    assert not started[0].lock.locked()


def test_a_jvm_that_died_after_answering_still_gives_the_score_and_is_waited_for(monkeypatch):
    from dmclip.metrics.caption import meteor_score

    started = _fake_meteor(monkeypatch, ONE_IMAGE, broken_pipe=True)
    assert meteor_score({1: ["a cat"]}, {1: ["a cat"]}) == 0.25
    assert started[0].meteor_p.calls == ["close", "kill", "wait"]
    started[0].meteor_p.broken_pipe = False  # so that the scorer's own __del__ closes it quietly


def test_caption_metrics_reports_meteor_by_default_over_the_scored_captions(monkeypatch):
    started = _fake_meteor(monkeypatch, ["1 1 1 1", "1 1 1 1", "0.5", "0.5", "0.75"])
    out = caption_metrics({0: ["a b c", ""], 1: ["d e f"]}, {0: "a b c", 1: None}, tokenize=False)
    assert out["meteor"] == 0.75
    assert started[0].inputs == [({0: ["a b c"], 1: ["d e f"]}, {0: ["a b c"], 1: [""]})]


def test_meteor_without_java_is_a_clear_error_before_starting_it(monkeypatch):
    import dmclip.metrics.caption as caption

    started = _fake_meteor(monkeypatch, ONE_IMAGE)
    monkeypatch.setattr(caption.shutil, "which", lambda name: None)
    with pytest.raises(DmclipError, match="need Java"):
        caption.meteor_score({1: ["a cat"]}, {1: ["a cat"]})
    assert started == []


def _results(tmp_path, content, count=3, total=3):
    from dmclip.metrics.caption import read_coco_results

    path = tmp_path / "results.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return read_coco_results(path, count, total, "shapes")


def test_coco_results_are_read_in_image_order(tmp_path):
    entries = [{"image_id": 2, "caption": "c"}, {"image_id": 0, "caption": "a"}, {"image_id": 1, "caption": "b"}]
    captions = _results(tmp_path, entries)
    assert list(captions.items()) == [(0, "a"), (1, "b"), (2, "c")]


HINT = 'write a COCO results file: [{"image_id": 0, "caption": "a red circle"}, ...]'
IDS = "image ids are the dataset's sample indices, 0-based"


@pytest.mark.parametrize("content, count, total, message, hint", [
    (b"\xff\xfe[]", 3, 3, "is not UTF-8 text", HINT),
    (b"[{", 3, 3, "is not valid JSON (line 1, column 3: Expecting property name enclosed in double quotes)",
     HINT),
    ({"0": "a"}, 3, 3, "holds a JSON dict, not a list of results", HINT),
    (["a red circle"], 3, 3, "entry 0 is not an object with image_id and caption (a red circle)", HINT),
    ([{"caption": "a"}], 3, 3, "entry 0 is not an object with image_id and caption", HINT),
    ([{"image_id": 0}], 3, 3, "entry 0 is not an object with image_id and caption", HINT),
    ([{"image_id": True, "caption": "a"}], 3, 3, "entry 0 has image_id True, not a whole number",
     IDS + ", as `eval caption` writes them"),
    ([{"image_id": 0, "caption": 5}], 3, 3, "entry 0 (image_id 0) has caption 5, not a string", HINT),
    ([{"image_id": 3, "caption": "a"}], 3, 3,
     "image_id 3 (entry 0) is out of range: shapes has 3 images (ids 0..2)", IDS),
    ([{"image_id": 2, "caption": "a"}], 2, 3,
     "image_id 2 (entry 0) is out of range: shapes has 3 images and --limit scores the first 2 (ids 0..1)", IDS),
    ([{"image_id": -1, "caption": "a"}], 3, 3, "image_id -1 (entry 0) is out of range", IDS),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], 3, 3,
     "image_id 1 appears twice (entries 0 and 1)", "give one caption per image"),
    ([{"image_id": 1, "caption": "a"}], 3, 3, "2 of 3 images have no caption (e.g. image_id 0)",
     "give one caption for every image of the dataset, or score the first N with --limit N"),
])
def test_bad_coco_results_files_are_clear_errors(tmp_path, content, count, total, message, hint):
    with pytest.raises(DmclipError) as info:
        _results(tmp_path, content, count, total)
    assert message in info.value.message and info.value.hint == hint


def test_coco_results_are_read_as_utf8_whatever_the_locale(tmp_path):
    """A process whose locale is not UTF-8 (as Windows' cp1252) still reads the file's captions as UTF-8."""
    import os
    import subprocess
    import sys

    path = tmp_path / "results.json"
    path.write_text(json.dumps([{"image_id": 0, "caption": "café"}], ensure_ascii=False), encoding="utf-8")
    code = ("import sys; from dmclip.metrics.caption import read_coco_results; "
            "print(ascii(read_coco_results(sys.argv[1], 1, 1, 'shapes')))")
    env = dict(os.environ, LC_ALL="C", PYTHONCOERCECLOCALE="0")
    out = subprocess.run([sys.executable, "-X", "utf8=0", "-c", code, str(path)], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == ascii({0: "café"})


def test_a_missing_coco_results_file_is_a_clear_error(tmp_path):
    from dmclip.metrics.caption import read_coco_results

    with pytest.raises(DmclipError, match="does not exist") as info:
        read_coco_results(tmp_path / "nope.json", 1, 1, "shapes")
    assert info.value.hint == HINT
