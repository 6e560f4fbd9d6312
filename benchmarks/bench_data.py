"""World generation speed: images/s for world-train (20k images at 64 px), generated without the cache."""

from __future__ import annotations

import time

from benchmarks.common import quick

GOAL_SECONDS = 60.0  # issue 4: 20k images at 64 px in under a minute on 2 cores


def measure(size: int = 20000, image_size: int = 64, seed: int = 0) -> dict:
    from dmclip.data import world

    wall, cpu = time.perf_counter(), time.process_time()
    images, meta = world.generate("world-train", size=size, image_size=image_size, seed=seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"images": size, "image_size": image_size, "seconds": wall, "cpu_seconds": cpu,
            "captions": sum(len(c) for c in meta["captions"]), "bytes": int(images.nbytes)}


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
    return rows


if __name__ == "__main__":
    main()
