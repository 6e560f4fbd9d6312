"""Work shards, the unit of resume, and the dataset written from them.

A shard is committed by writing ``<out>/shards/shard-NNNNNN.json`` (its samples, captions and scores) after its
images; a rerun with the same ``--out`` skips committed shards and redoes the rest. The dataset files (captions.csv,
the webdataset shards, the manifest) are then rewritten from all shards in one cheap pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dmclip.capfilt.config import CapfiltConfig
from dmclip.capfilt.scoring import score_batch
from dmclip.data.base import float_images
from dmclip.data.export import encode_image, write_webdataset
from dmclip.errors import DmclipError

STATE_FILE = "capfilt-state.json"
STATE_VERSION = 1


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.json"


def _shard_seed(seed: int, shard: int) -> int:
    digest = hashlib.blake2b(f"capfilt:{seed}:{shard}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def read_shard(path: Path, start: int, stop: int) -> dict | None:
    """A committed shard, or None when it is missing or damaged (it is then redone)."""
    try:
        shard = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(shard, dict) or shard.get("start") != start or shard.get("stop") != stop:
        return None
    return shard


def process_shard(model, dataset, k: int, start: int, stop: int, cfg: CapfiltConfig, out: Path,
                  device: torch.device, advance: Callable[[int], None]) -> dict:
    """Caption, score and write the images of samples [start, stop); commit the shard file last."""
    from dmclip.io import atomic_write_json

    began = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(_shard_seed(cfg.seed, k))
    samples, skipped = [], 0
    (out / "images").mkdir(exist_ok=True)
    for begin in range(start, stop, cfg.batch_size):
        items = []
        for i in range(begin, min(begin + cfg.batch_size, stop)):
            item = dataset[i]
            if int(item["index"]) != i:  # a bad sample, replaced by the dataset with another one: skip it
                skipped += 1
                continue
            items.append(item)
        if items:
            images = torch.stack([s["image"] for s in items])
            floats = float_images(images)
            scored = score_batch(model, floats.to(device), [list(s["captions"]) for s in items], cfg, generator)
            for item, image, captions in zip(items, images, scored):
                index = int(item["index"])
                name = f"images/{index:08d}.png"
                pixels = image.cpu().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()  # (S, S, 3)
                (out / name).write_bytes(encode_image(pixels))
                noisy, kinds = item.get("caption_is_noisy"), item.get("noise_kind")
                web_rank = 0
                for caption in captions:
                    if caption["source"] == "web":
                        if noisy is not None:
                            caption["noisy"] = bool(noisy[web_rank])
                        if kinds is not None:
                            caption["noise_kind"] = kinds[web_rank]
                        web_rank += 1
                samples.append({"index": index, "image": name, "captions": captions})
        advance(min(begin + cfg.batch_size, stop) - begin)
    shard = {"shard": k, "start": start, "stop": stop, "samples": samples, "skipped": skipped,
             "seconds": time.perf_counter() - began}
    atomic_write_json(out / "shards" / shard_name(k), shard)
    return shard


def out_path(out_text: str) -> Path:
    """``--out`` as a path, or a one-line error when it cannot be a new dataset directory."""
    if not out_text:
        raise DmclipError("capfilt needs an output directory", "pass --out <new dataset dir>")
    out = Path(out_text).expanduser()
    if out.exists() and not out.is_dir():
        raise DmclipError(f"--out {out} is a file", "choose a directory path for the new dataset")
    existing = next((p for p in out.parents if p.exists()), None)  # the folders below it are made
    if existing is not None and not existing.is_dir():
        raise DmclipError(f"--out {out} is inside {existing}, which is a file",
                          "choose an --out whose folders are folders (missing ones are created)")
    return out


def prepare_out(out_text: str, state: dict) -> Path:
    """Check ``--out`` and its state file: a new directory, or one this same configuration started."""
    from dmclip.io import atomic_write_json

    out = out_path(out_text)
    state_path = out / STATE_FILE
    if out.is_dir() and any(out.iterdir()):
        if not state_path.is_file():
            raise DmclipError(f"--out {out} is not empty and holds no capfilt output",
                              "choose a new directory (an existing one is only continued when capfilt started it)")
        try:
            previous = json.loads(state_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raise DmclipError(f"{state_path} cannot be read", "remove the damaged directory or choose a new --out") \
                from None
        changed = [key for key in state if previous.get(key) != state[key]]
        if changed:
            raise DmclipError(f"--out {out} was started with other settings ({', '.join(changed)} differ); "
                              "continuing would mix two datasets",
                              "use a new --out, or repeat the first run's settings (only the filter's threshold "
                              "and keep fraction may change)")
    try:
        (out / "shards").mkdir(parents=True, exist_ok=True)  # and --out's missing parents, as dmclip reinforce does
    except OSError as exc:
        raise DmclipError(f"cannot create --out {out}: {exc.strerror or exc}",
                          "choose an --out in a directory you can write to") from None
    if not state_path.is_file():
        atomic_write_json(state_path, state)
    return out


def write_dataset(out: Path, samples: list[dict], fmt: str, shard_size: int) -> tuple[str, int]:
    """captions.csv (or wds shards) from the kept captions, and the manifest; returns (spec, images written)."""
    import csv
    import io

    from dmclip.io import atomic_write_text

    manifest = "".join(json.dumps(s) + "\n" for s in samples)
    atomic_write_text(out / "manifest.jsonl", manifest)
    with_captions = [s for s in samples if any(c["kept"] for c in s["captions"])]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["filepath", "caption"])
    for sample in with_captions:
        for caption in sample["captions"]:
            if caption["kept"]:
                writer.writerow([sample["image"], caption["text"]])
    atomic_write_text(out / "captions.csv", buffer.getvalue())
    if fmt == "csv":
        return f"csv:{out / 'captions.csv'}", len(with_captions)
    folder = out / "wds"
    folder.mkdir(exist_ok=True)
    for stale in folder.glob("shard-*.tar"):
        stale.unlink()
    if with_captions:  # members stamped mtime 0: a rerun writes the same bytes
        write_webdataset(({"__key__": f"{sample['index']:08d}", "png": (out / sample["image"]).read_bytes(),
                           "json": json.dumps({"captions": [c["text"] for c in sample["captions"] if c["kept"]],
                                               "index": sample["index"]}).encode()}
                          for sample in with_captions), folder, shard_size, mtime=0)
    return f"wds:{folder}", len(with_captions)
