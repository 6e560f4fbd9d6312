"""world-noisy's web captions: a known fraction made wrong (another image's caption, a wrong colour, or generic
alt text), with the ground truth kept per caption."""

from __future__ import annotations

import numpy as np

from dmclip.data.world.captions import compose_caption, scene_objects
from dmclip.data.world.shapes import COLOUR_NAMES, COLOURS

_GENERIC = ["IMG_{n4}.jpg", "DSC{n5}.JPG", "image", "untitled", "photo {n3}", "stock photo {n5}", "click to enlarge",
            "thumbnail", "screenshot {n4}", "download now", "best price online", "picture_{n3}.png"]


def corrupt_captions(s, captions, templates, uniforms, rng, fraction: float):
    """Make exactly round(fraction * all captions) wrong: another image's caption, a wrong colour/shape, or
    generic alt text. Returns (web captions, is_noisy, kinds)."""
    n, per_image = templates.shape
    total = n * per_image
    wrong = np.zeros(total, dtype=bool)
    wrong[rng.permutation(total)[: round(fraction * total)]] = True
    wrong = wrong.reshape(n, per_image)
    kind_u = rng.random((n, per_image))
    other = rng.integers(1, max(2, n), size=(n, per_image))
    swap_colour = rng.integers(1, len(COLOURS), size=(n, per_image))
    generic_pick = rng.integers(0, len(_GENERIC), size=(n, per_image))
    digits = rng.integers(0, 100000, size=(n, per_image))
    web = [list(c) for c in captions]
    kinds = [["clean"] * per_image for _ in range(n)]
    for i, k in zip(*np.nonzero(wrong)):
        kind = "swap" if kind_u[i, k] < 0.4 else "attribute" if kind_u[i, k] < 0.75 else "generic"
        if kind == "swap":
            j = (i + int(other[i, k])) % n
            same = (s["shape"][j, 0] == s["shape"][i, 0]) and (s["colour"][j, 0] == s["colour"][i, 0])
            if j == i or same:
                kind = "attribute"
            else:
                web[i][k] = captions[j][k % len(captions[j])]
        if kind == "attribute":  # recolour the first object (all of them in a count scene)
            objects = scene_objects(s, i)
            present = {(o["colour"], o["shape"]) for o in objects}
            shape = objects[0]["shape"]
            step = int(swap_colour[i, k])
            colour = COLOUR_NAMES[(int(s["colour"][i, 0]) + step) % len(COLOURS)]
            while (colour, shape) in present:
                step += 1
                colour = COLOUR_NAMES[(int(s["colour"][i, 0]) + step) % len(COLOURS)]
            targets = range(len(objects)) if s["count"][i] else [0]
            objects = scene_objects(s, i, {t: (colour, shape) for t in targets})
            web[i][k] = compose_caption("a", int(templates[i, k]), objects, bool(s["count"][i]),
                                        int(s["background"][i]), uniforms[i, k])
        if kind == "generic":
            number = int(digits[i, k])
            web[i][k] = _GENERIC[int(generic_pick[i, k])].format(n3=number % 1000, n4=f"{number % 10000:04d}",
                                                                  n5=f"{number:05d}")
        kinds[i][k] = kind
    return web, wrong, kinds
