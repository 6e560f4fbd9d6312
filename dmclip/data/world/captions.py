"""Captions: word choices and the caption templates of the two styles, written per scene.

Style "a" is short alt-text-like phrases (training, world-retrieval-a, world-noisy), style "b" full sentences in
another voice (world-retrieval-b). Every word choice is read from uniforms drawn up front, so a caption is a pure
function of its scene, template and uniforms.
"""

from __future__ import annotations

import numpy as np

from dmclip.data.world.shapes import COLOUR_NAMES, SHAPES

_SHAPE_WORDS = {
    "circle": [("circle", "circles"), ("disc", "discs")], "square": [("square", "squares")],
    "triangle": [("triangle", "triangles")], "star": [("star", "stars")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")], "heart": [("heart", "hearts")],
    "ring": [("ring", "rings"), ("donut", "donuts")], "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses")],
    "hexagon": [("hexagon", "hexagons")], "arrow": [("arrow", "arrows")],
}
COLOUR_WORDS = {"purple": ["purple", "violet"], "cyan": ["cyan", "turquoise"]}
_SIZE_WORDS = (["small", "little", "tiny"], ["large", "big"])
_BG_WORDS = {
    0: ["a plain background", "a dark background", "a solid background"],
    1: ["a gradient background", "a fading background", "a shaded background"],
    2: ["a noisy background", "a grainy background", "a speckled background"],
    3: ["a striped background", "a background with stripes", "a stripy background"],
    4: ["a checkered background"], 5: ["a bright background"],
}
_COUNT_WORDS = {2: ["two", "a pair of"], 3: ["three"]}
_VERT = {0: ["top", "upper"], 2: ["bottom", "lower"]}
_HORZ = {0: "left", 2: "right"}
_REL = {"above": ["above", "over"], "below": ["below", "under", "beneath"],
        "left": ["to the left of", "left of"], "right": ["to the right of", "right of"]}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class _Words:
    """Word choices for one caption, drawn from pre-generated uniforms (no RNG state in the loop)."""

    def __init__(self, uniforms: np.ndarray, objects: list[dict], background: int):
        self.u = uniforms
        self.k = 0
        self.objects = objects
        self.background = background

    def pick(self, options):
        value = options[min(int(self.u[self.k % len(self.u)] * len(options)), len(options) - 1)]
        self.k += 1
        return value

    def colour(self, o) -> str:
        return self.pick(COLOUR_WORDS.get(o["colour"], [o["colour"]]))

    def shape(self, o, plural: bool = False) -> str:
        return self.pick(_SHAPE_WORDS[o["shape"]])[int(plural)]

    def size(self, o) -> str:
        return self.pick(_SIZE_WORDS[o["big"]])

    def np(self, o, size: bool | None = None, article: bool = True) -> str:
        """'a large red circle' (size: True always, False never, None by chance)."""
        words = [self.colour(o), self.shape(o)]
        if size or (size is None and self.pick([False, True])):
            words.insert(0, self.size(o))
        text = " ".join(words)
        return f"{_article(text)} {text}" if article else text

    def pos(self, o) -> str:
        r, c = o["row"], o["col"]
        if r == 1 and c == 1:
            return self.pick(["in the centre", "in the middle", "in the center"])
        if r == 1:
            side = _HORZ[c]
            return self.pick([f"on the {side}", f"at the {side} side", f"on the {side}-hand side"])
        if c == 1:
            v = _VERT[r][0]
            return self.pick([f"at the {v}", f"near the {v}", f"along the {v} edge"])
        v, h = self.pick(_VERT[r]), _HORZ[c]
        return self.pick([f"in the {v} {h}", f"in the {v} {h} corner", f"at the {v} {h}"])

    def bg_np(self) -> str:
        return self.pick(_BG_WORDS[self.background])

    def bg(self) -> str:
        return "on " + self.bg_np()

    def rel(self, a, b) -> str:
        if a["row"] != b["row"]:
            return self.pick(_REL["above" if a["row"] < b["row"] else "below"])
        return self.pick(_REL["left" if a["col"] < b["col"] else "right"])

    def listing(self) -> str:
        parts = [self.np(o) for o in self.objects]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    def count(self) -> str:
        return self.pick(_COUNT_WORDS[len(self.objects)])

    def nword(self) -> str:
        return {2: "two", 3: "three"}[len(self.objects)]


# Style "a": short alt-text-like phrases (training, world-retrieval-a, world-noisy). 25 templates.
_A_SINGLE = [
    lambda w, o: f"{w.np(o, size=True)} {w.pos(o)}",
    lambda w, o: f"{w.np(o)} {w.pos(o)} {w.bg()}",
    lambda w, o: f"{w.np(o, size=True)} {w.bg()}",
    lambda w, o: f"there is {w.np(o)} {w.pos(o)}",
    lambda w, o: f"{w.pos(o)}, {w.np(o, size=True)}",
    lambda w, o: f"{w.bg_np()} with {w.np(o)} {w.pos(o)}",
    lambda w, o: w.np(o, size=False),
    lambda w, o: (lambda size: f"{_article(size)} {size} {w.shape(o)} that is {w.colour(o)}")(w.size(o)),
    lambda w, o: (lambda shape: f"{_article(shape)} {shape} coloured {w.colour(o)} {w.pos(o)}")(w.shape(o)),
    lambda w, o: f"one {w.colour(o)} {w.shape(o)} {w.bg()}",
    lambda w, o: f"{w.np(o, size=True)} sitting {w.pos(o)}",
    lambda w, o: f"a picture of {w.np(o)} {w.bg()}",
]
_A_MULTI = [
    lambda w, a, b: f"{w.listing()} {w.bg()}",
    lambda w, a, b: f"{w.np(a)} {w.rel(a, b)} {w.np(b)}",
    lambda w, a, b: f"{w.np(b)} {w.rel(b, a)} {w.np(a)}",
    lambda w, a, b: f"{w.nword()} shapes: {w.listing()}",
    lambda w, a, b: f"{w.np(a)} {w.pos(a)} and {w.np(b)} {w.pos(b)}",
    lambda w, a, b: f"{w.bg_np()} with {w.listing()}",
    lambda w, a, b: f"a picture of {w.listing()}",
    lambda w, a, b: f"{w.np(a, size=True)} and {w.np(b, size=True)}",
]
_A_COUNT = [
    lambda w, a, b: f"{w.count()} {w.colour(a)} {w.shape(a, True)} {w.bg()}",
    lambda w, a, b: f"{w.count()} {w.size(a)} {w.colour(a)} {w.shape(a, True)}",
    lambda w, a, b: f"a group of {w.nword()} {w.colour(a)} {w.shape(a, True)}",
    lambda w, a, b: f"{w.count()} {w.shape(a, True)}, all {w.colour(a)}",
    lambda w, a, b: f"{w.nword()} identical {w.colour(a)} {w.shape(a, True)} {w.bg()}",
    _A_MULTI[1], _A_MULTI[4], _A_MULTI[5],
]

# Style "b": full sentences in another voice (world-retrieval-b). 15 more templates.
_B_SINGLE = [
    lambda w, o: f"There is {w.np(o)} {w.pos(o)}.",
    lambda w, o: f"The picture shows {w.np(o)} {w.bg()}.",
    lambda w, o: (lambda t: t[0].upper() + t[1:])(f"{w.np(o, size=True)} can be seen {w.pos(o)}."),
    lambda w, o: f"In this image, {w.np(o)} is placed {w.pos(o)} {w.bg()}.",
    lambda w, o: (lambda t: t[0].upper() + t[1:])(f"{w.bg_np()} with {w.np(o)} on it."),
    lambda w, o: f"This is {w.np(o, size=True)} drawn {w.pos(o)}.",
    lambda w, o: f"An image containing {w.np(o)}.",
]
_B_MULTI = [
    lambda w, a, b: f"There are {w.nword()} shapes: {w.listing()}.",
    lambda w, a, b: (lambda t: t[0].upper() + t[1:])(f"{w.np(a)} is {w.rel(a, b)} {w.np(b)}."),
    lambda w, a, b: f"The picture shows {w.listing()} {w.bg()}.",
    lambda w, a, b: f"You can see {w.np(a)} {w.pos(a)} and {w.np(b)} {w.pos(b)}.",
    lambda w, a, b: f"An image containing {w.listing()}.",
]
_B_COUNT = [
    lambda w, a, b: f"There are {w.nword()} {w.colour(a)} {w.shape(a, True)} {w.bg()}.",
    lambda w, a, b: f"The picture shows {w.nword()} {w.size(a)} {w.shape(a, True)}, all of them {w.colour(a)}.",
    lambda w, a, b: f"You can see {w.nword()} {w.colour(a)} {w.shape(a, True)}.",
    _B_MULTI[1], _B_MULTI[3],
]
_STYLES = {"a": (_A_SINGLE, _A_MULTI, _A_COUNT), "b": (_B_SINGLE, _B_MULTI, _B_COUNT)}
N_UNIFORMS = 24  # word choices per caption


def scene_objects(s: dict[str, np.ndarray], i: int, colour_override: dict | None = None) -> list[dict]:
    objects = []
    for j in range(int(s["n_obj"][i])):
        colour = COLOUR_NAMES[int(s["colour"][i, j])]
        shape = SHAPES[int(s["shape"][i, j])]
        if colour_override and j in colour_override:
            colour, shape = colour_override[j]
        objects.append({"shape": shape, "colour": colour, "big": int(s["big"][i, j]),
                        "row": int(s["row"][i, j]), "col": int(s["col"][i, j])})
    return objects


def compose_caption(style: str, template: int, objects: list[dict], count: bool, background: int,
                    u: np.ndarray) -> str:
    single, multi, counted = _STYLES[style]
    words = _Words(u, objects, background)
    if len(objects) == 1:
        return single[template % len(single)](words, objects[0])
    table = counted if count else multi
    return table[template % len(table)](words, objects[0], objects[1])


def _template_count(style: str, n_obj: int, count: bool) -> int:
    single, multi, counted = _STYLES[style]
    return len(single) if n_obj == 1 else len(counted) if count else len(multi)


def write_captions(s, rng: np.random.Generator, style: str,
                   per_image: int) -> tuple[list[list[str]], np.ndarray, np.ndarray]:
    """per_image captions from distinct templates -> (captions, template ids (n, k), uniforms (n, k, U))."""
    n = len(s["n_obj"])
    order = np.argsort(rng.random((n, 16)), axis=1)  # a random permutation of templates per image
    uniforms = rng.random((n, per_image, N_UNIFORMS))
    templates = np.zeros((n, per_image), dtype=np.int64)
    captions = []
    for i in range(n):
        objects = scene_objects(s, i)
        available = _template_count(style, len(objects), bool(s["count"][i]))
        chosen = [int(t) for t in order[i] if t < available][:per_image]
        chosen += chosen[: per_image - len(chosen)]  # only if asked for more captions than templates
        templates[i] = chosen
        captions.append([compose_caption(style, t, objects, bool(s["count"][i]), int(s["background"][i]),
                                         uniforms[i, k]) for k, t in enumerate(chosen)])
    return captions, templates, uniforms
