"""World generation speed: images/s for world-train (20k images at 64 px), generated without the cache; what a
random training batch of world images costs (rendered one at a time, as one batch, or read from the cache); and
the memory a webdataset stream needs as its set grows (peak RSS, 10k vs 100k samples)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from benchmarks.common import format_seconds, interleaved, quick, repeats, row

GOAL_SECONDS = 60.0  # issue 4: 20k images at 64 px in under a minute on 2 cores


def measure(size: int = 20000, image_size: int = 64, seed: int = 0) -> dict:
    from dmclip.data import world

    wall, cpu = time.perf_counter(), time.process_time()
    images, meta = world.generate("world-train", size=size, image_size=image_size, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": size, "image_size": image_size, "seconds": wall, "cpu_seconds": cpu,
            "captions": sum(len(c) for c in meta["captions"]), "bytes": int(images.nbytes)}


READ_BATCH = 128
CACHED_IMAGES = 2048  # the memory-mapped contender's file (random bytes: reading does not look at them)


def read_cost_rows() -> list[dict]:
    """A random batch of world-train images at 32, 64 and 224 px: rendered one image at a time (``ds[i]`` in a
    loop), as one batch (a DataLoader's ``__getitems__``), or read from a memory-mapped cache file."""
    import numpy as np

    from dmclip.data.world import WorldImages
    from dmclip.data.world.splits import noise_seed, split_scenes

    size = 2000 if quick() else 20000
    scenes, _, _ = split_scenes("world-train", size, 0)
    pick = np.random.default_rng(0)
    rows = []
    for image_size in (32, 64, 224):
        images = WorldImages(scenes, image_size, noise_seed("world-train", 0))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "images.npy"
            shape = (CACHED_IMAGES, image_size, image_size, 3)
            np.save(path, pick.integers(0, 256, size=shape, dtype=np.uint8))
            times = _batch_read_times(images, np.load(path, mmap_mode="r"), pick,
                                      repeats(3 if image_size == 224 else 5))
        what = f"world-train, a random batch of {READ_BATCH} at {image_size} px"
        rows.append(row(f"{what}: rendered as one batch", format_seconds(times["one batch"]),
                        baseline=f"one image at a time ({format_seconds(times['one at a time'])})",
                        ratio=round(times["one at a time"] / times["one batch"], 2),
                        notes="DataLoader batches call __getitems__: one render per batch"))
        rows.append(row(f"{what}: read from the memory-mapped cache", format_seconds(times["cache"]),
                        baseline=f"rendered as one batch ({format_seconds(times['one batch'])})",
                        ratio=round(times["one batch"] / times["cache"], 1),
                        notes=f"a {CACHED_IMAGES}-image .npy in the page cache; the world keeps splits of at most "
                              "256 MiB on disk (world-train: up to 64 px)"))
        for item in rows[-2:]:
            print(f"{item['benchmark']}: {item['value']} (baseline {item['baseline']}, ratio {item['ratio']})")
    return rows


def _batch_read_times(images, cached, pick, rounds: int) -> dict[str, float]:
    import numpy as np

    def batch(n: int):
        return pick.integers(0, n, READ_BATCH)

    return interleaved({"one at a time": lambda: np.stack([images[int(i)] for i in batch(len(images))]),
                        "one batch": lambda: images[batch(len(images))],
                        "cache": lambda: cached[batch(len(cached))]}, repeats=rounds)


PER_SHARD = 1000
# Runs in a fresh process: the growth of the resident set (MB, sampled every 100 samples, its peak) over the RSS
# after imports, while every sample of the set is read.
_READ_ALL = """
import gc, os, sys
from dmclip.data import build_dataset, collate
from dmclip.train.data import StreamOrder
import webdataset

def rss():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

spec, samples = sys.argv[1], int(sys.argv[2])
gc.collect()
before = peak = rss()
ds = build_dataset(spec, image_size=16, allow_stream=True)
seen = 0
if hasattr(ds, "shards"):  # the stream, read as fit reads it (training readers, batches of 100)
    batches = StreamOrder(ds, 100, seed=0).batches(collate)
    for _ in range(samples // 100):
        seen += len(next(batches)["index"])
        peak = max(peak, rss())
else:  # the index (stream=false): every sample by index
    for i in range(len(ds)):
        seen += bool(ds[i]["captions"])
        if i % 100 == 0:
            peak = max(peak, rss())
assert seen == samples, (seen, samples)
print(max(peak, rss()) - before)
"""


def write_shards(folder: Path, samples: int) -> None:
    """``samples`` 16 x 16 PNG + caption pairs (the same image bytes; a caption of its own each), fast."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 90)).save(buffer, format="PNG")
    image = buffer.getvalue()
    sizes = {}
    for start in range(0, samples, PER_SHARD):
        name = f"shard-{start // PER_SHARD:06d}.tar"
        with tarfile.open(folder / name, "w") as tar:
            for n in range(start, min(samples, start + PER_SHARD)):
                caption = f"a red square, picture number {n} of the set".encode()
                for suffix, data in (("png", image), ("txt", caption)):
                    info = tarfile.TarInfo(f"{n:09d}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        sizes[name] = min(PER_SHARD, samples - start)
    (folder / "sizes.json").write_text(json.dumps(sizes))


def peak_rss_growth(spec: str, samples: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _READ_ALL, spec, str(samples)], env=env, check=True,
                         capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def stream_memory_rows() -> list[dict]:
    small, large = (1000, 10000) if quick() else (10000, 100000)
    growth = {}
    with tempfile.TemporaryDirectory() as tmp:
        for samples in (small, large):
            folder = Path(tmp) / str(samples)
            folder.mkdir()
            write_shards(folder, samples)
            for reader, option in (("stream", ""), ("index", ":stream=false")):
                growth[reader, samples] = peak_rss_growth(f"wds:{folder}{option}", samples)
    rows = []
    for reader, goal in (("stream", True), ("index", False)):
        ratio = growth[reader, small] / max(growth[reader, large], 1e-9)
        rows.append(row(
            f"wds {reader}: peak RSS growth reading all of {large // 1000}k vs {small // 1000}k samples "
            f"(16 px PNG + caption, {PER_SHARD} per shard)",
            f"+{growth[reader, large]:.1f} MB at {large // 1000}k", baseline=f"+{growth[reader, small]:.1f} MB at "
            f"{small // 1000}k", ratio=round(ratio, 2), goal=">= 0.67x (10x the samples, <= 1.5x the memory)" if goal
            else "", met=(ratio >= 1 / 1.5) if goal else None,
            notes="RSS over the process after imports; ratio = baseline / value, 1.0 = flat" + (
                "; the stream reads shard after shard" if goal else "; the index holds every caption and offset")))
        print(f"{rows[-1]['benchmark']}: {rows[-1]['value']} ({rows[-1]['baseline']}), ratio {rows[-1]['ratio']}")
    return rows


def main() -> list[dict]:
    size = 2000 if quick() else 20000
    rows = []
    for image_size in (64, 32):
        m = measure(size, image_size)
        seconds_20k = m["seconds"] * 20000 / size
        rows.append({
            "benchmark": f"world-train generation ({size} images, {image_size} px, 5 captions each, no cache)",
            "value": f"{size / m['seconds']:.0f} images/s",
            "baseline": "",
            "ratio": None,
            "goal": f"20k in < {GOAL_SECONDS:.0f} s" if image_size == 64 else "",
            "met": (seconds_20k < GOAL_SECONDS) if image_size == 64 else None,
            "notes": f"{m['seconds']:.1f} s wall, {m['cpu_seconds']:.1f} s CPU (wall/CPU > 1 means a busy machine)",
        })
        print(f"{rows[-1]['benchmark']}: {rows[-1]['value']} — {rows[-1]['notes']}")
    return rows + read_cost_rows() + stream_memory_rows()


if __name__ == "__main__":
    main()
