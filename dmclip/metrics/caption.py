"""Caption metrics exactly as the COCO caption evaluation (pycocoevalcap) computes them.

    caption_metrics(references={id: ["a red circle", ...]}, candidates={id: "a red circle"})
    -> {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}

Both sides go through the same PTB tokenisation as ``COCOEvalCap.evaluate`` (Stanford PTBTokenizer,
lower-cased, punctuation dropped), then pycocoevalcap's own scorers: BLEU-1..4 (corpus level, closest
reference length), METEOR 1.5, ROUGE-L (β = 1.2) and CIDEr-D (σ = 6, as pycocoevalcap's ``Cider``).
The tokenizer and METEOR run Java jars that ship with pycocoevalcap.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from dmclip.errors import DmclipError

log = logging.getLogger(__name__)
METRIC_KEYS = ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider")


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise DmclipError("caption metrics need Java (pycocoevalcap's tokenizer and METEOR are Java jars)",
                          "install a JRE, e.g. `apt-get install default-jre-headless`, then run again")
    return java


def _tokenizer_module():
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        raise DmclipError("caption metrics need pycocoevalcap", "pip install pycocoevalcap==1.2") from None
    return ptbtokenizer


def ptb_tokenize(captions: Mapping[object, Sequence[str]]) -> dict[object, list[str]]:
    """``{id: [caption, ...]} -> {id: [tokenized caption, ...]}`` as pycocoevalcap's ``PTBTokenizer``.

    The same jar, flags and punctuation list; the sentences go to a temporary file outside the
    installed package (pycocoevalcap writes it next to the jar).
    """
    module = _tokenizer_module()
    jar = Path(module.__file__).resolve().parent / module.STANFORD_CORENLP_3_4_1_JAR
    keys = [k for k, caps in captions.items() for _ in range(len(caps))]
    if not keys:
        return {k: [] for k in captions}
    sentences = "\n".join(c.replace("\n", " ") for caps in captions.values() for c in caps)
    with tempfile.NamedTemporaryFile(delete=False) as fh:
        fh.write(sentences.encode())
        path = fh.name
    try:
        proc = subprocess.run([_java(), "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
                               "-preserveLines", "-lowerCase", path], capture_output=True, check=False)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    if proc.returncode != 0:
        raise DmclipError(f"the PTB tokenizer (java) failed: {proc.stderr.decode(errors='replace').strip()[:200]}",
                          "check `java -version` works (Java 8 or newer)")
    lines = proc.stdout.decode().split("\n")
    out: dict[object, list[str]] = {k: [] for k in captions}
    for key, line in zip(keys, lines):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in module.PUNCTUATIONS))
    return out


def _check_inputs(references: Mapping, candidates: Mapping) -> None:
    if not references:
        raise DmclipError("no references to score captions against", "the dataset has no captions; check --data")
    missing = [k for k in references if k not in candidates]
    extra = [k for k in candidates if k not in references]
    if missing or extra:
        raise DmclipError(f"candidates and references cover different images ({len(missing)} without a candidate, "
                          f"{len(extra)} without references)", "give one candidate caption per referenced image")
    empty = [k for k, refs in references.items() if not [r for r in refs if r and r.strip()]]
    if empty:
        raise DmclipError(f"{len(empty)} images have empty references (e.g. {empty[0]!r})",
                          "every image needs at least one non-empty reference caption; fix or drop those images")


def caption_metrics(references: Mapping[object, Sequence[str]], candidates: Mapping[object, str], *,
                    tokenize: bool = True, meteor: bool = True) -> dict:
    """Corpus-level caption scores (fractions; CIDEr on its own 0..10 scale), keyed by ``METRIC_KEYS``.

    ``tokenize=False`` scores the strings as given (already PTB-tokenized, space-separated).
    ``meteor=False`` skips METEOR (it starts a JVM, ~5 s) and reports it as NaN.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    _check_inputs(references, candidates)
    gts = {k: [r for r in refs if r and r.strip()] for k, refs in references.items()}
    res = {k: [candidates[k] or ""] for k in gts}
    if tokenize:
        gts, res = ptb_tokenize(gts), ptb_tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    out = {f"bleu{n + 1}": float(bleu[n]) for n in range(4)}
    out["meteor"] = meteor_score(gts, res) if meteor else float("nan")
    out["rouge_l"] = float(rouge)
    out["cider"] = float(cider)
    return {k: out[k] for k in METRIC_KEYS}


def meteor_score(gts: Mapping[object, list[str]], res: Mapping[object, list[str]]) -> float:
    """pycocoevalcap's METEOR 1.5 over tokenized captions (one JVM per call)."""
    _java()
    from pycocoevalcap.meteor.meteor import Meteor

    # pycocoevalcap's Meteor prints nothing, but guard stdout anyway: library code never prints
    with contextlib.redirect_stdout(io.StringIO()):
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        except ValueError as exc:  # the jar answered something that is not a number
            raise DmclipError(f"METEOR failed ({exc})", "run with --no-meteor to skip it") from None
        finally:
            _stop_meteor(scorer)
    return float(score)


def _stop_meteor(scorer) -> None:
    """Stop the METEOR JVM, each step even if the one before failed (a JVM that died breaks its pipe), and free
    the lock a failed ``compute_score`` leaves held: pycocoevalcap's ``Meteor.__del__`` takes that lock before
    it stops the JVM, so a held one hangs the process when the scorer is freed."""
    process = scorer.meteor_p
    for stop in (process.stdin.close, process.kill, process.wait):
        with contextlib.suppress(OSError):
            stop()
    if scorer.lock.locked():
        scorer.lock.release()


COCO_RESULTS_HINT = 'write a COCO results file: [{"image_id": 0, "caption": "a red circle"}, ...]'


def read_coco_results(path: str | Path, count: int, total: int, dataset: str) -> dict[int, str]:
    """``{image_id: caption}`` from a COCO captioning results file, checked against a dataset.

    Image ids are dataset indices; the file must give exactly one caption for each of the first ``count``
    images (``dataset`` and ``total``, its name and size, for the messages). Anything else is a one-line DmclipError.
    """
    import json

    path = Path(path)
    if not path.is_file():
        raise DmclipError(f"predictions file {str(path)!r} does not exist", COCO_RESULTS_HINT)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DmclipError(f"{path} is not UTF-8 text", COCO_RESULTS_HINT) from None
    except json.JSONDecodeError as exc:
        raise DmclipError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
                          COCO_RESULTS_HINT) from None
    if not isinstance(entries, list):
        raise DmclipError(f"{path} holds a JSON {type(entries).__name__}, not a list of results", COCO_RESULTS_HINT)
    captions: dict[int, str] = {}
    where: dict[int, int] = {}
    for n, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image_id" not in entry or "caption" not in entry:
            raise DmclipError(f"{path}: entry {n} is not an object with image_id and caption ({str(entry)[:60]})",
                              COCO_RESULTS_HINT)
        image_id, text = entry["image_id"], entry["caption"]
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DmclipError(f"{path}: entry {n} has image_id {image_id!r}, not a whole number",
                              "image ids are the dataset's sample indices, 0-based, as `eval caption` writes them")
        if not isinstance(text, str):
            raise DmclipError(f"{path}: entry {n} (image_id {image_id}) has caption {text!r}, not a string",
                              COCO_RESULTS_HINT)
        if not 0 <= image_id < count:
            scope = f"{dataset} has {total} images" + (f" and --limit scores the first {count}" if count < total else "")
            raise DmclipError(f"{path}: image_id {image_id} (entry {n}) is out of range: {scope} "
                              f"(ids 0..{count - 1})", "image ids are the dataset's sample indices, 0-based")
        if image_id in captions:
            raise DmclipError(f"{path}: image_id {image_id} appears twice (entries {where[image_id]} and {n})",
                              "give one caption per image")
        captions[image_id], where[image_id] = text, n
    missing = [i for i in range(count) if i not in captions]
    if missing:
        raise DmclipError(f"{path}: {len(missing)} of {count} images have no caption (e.g. image_id {missing[0]})",
                          "give one caption for every image of the dataset, or score the first N with --limit N")
    return dict(sorted(captions.items()))
