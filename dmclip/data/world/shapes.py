"""What the world is made of: the shapes and colours (the zero-shot classes), the backgrounds, and each shape's
outline as a signed distance in pixels.

Shapes are drawn with an anti-aliased edge from a signed distance (in pixels) to the outline: each shape is a
union of convex polygons, circles and annuli (``_SHAPES``), in local coordinates of unit radius, y up.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "ring", "diamond", "hexagon", "arrow")
COLOURS = {
    "red": (222, 38, 38), "orange": (247, 137, 20), "yellow": (244, 222, 40), "green": (36, 168, 62),
    "cyan": (34, 206, 214), "blue": (38, 82, 226), "purple": (142, 58, 206), "pink": (250, 132, 194),
    "brown": (140, 84, 34), "white": (246, 246, 246),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = ("plain", "gradient", "noise", "stripes", "checker", "bright")  # the last two: world-shift only
CLASSNAMES = [f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES]  # label = colour * 10 + shape
ZEROSHOT_TEMPLATES = [
    "a photo of a {}.", "a drawing of a {}.", "a picture of a {}.", "a rendering of a {}.", "an image of a {}.",
    "a {}.", "a large {}.", "a {} shape.", "a {} on a background.", "a simple drawing of the {}.",
]


def _regular(n: int, radius: float, start_deg: float, dy: float = 0.0) -> list[tuple[float, float]]:
    return [(radius * math.cos(math.radians(start_deg + 360 * k / n)),
             radius * math.sin(math.radians(start_deg + 360 * k / n)) + dy) for k in range(n)]


def _star_kites(tip: float = 1.05, inner: float = 0.45, reach: float = 0.3, behind: float = 0.2) -> list:
    """A five-pointed star as five convex kites that overlap (no shared inner edge, so no seam is drawn):
    each kite's apex sits ``behind`` past the centre and its inner vertices reach ``reach`` past the star's."""
    kites = []
    point = lambda r, deg: np.array([r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg)) - 0.05])
    for k in range(5):
        a = 90 + 72 * k
        top = point(tip, a)
        left, right = point(inner, a - 36), point(inner, a + 36)
        apex = point(-behind, a)
        left, right = left + reach * (left - top), right + reach * (right - top)
        kites.append(("poly", [tuple(apex), tuple(left), tuple(top), tuple(right)]))
    return kites


# local coordinates: unit radius, y up; parts are ("poly", vertices) | ("circle", x, y, r) | ("annulus", r_in, r_out)
_SHAPES: dict[str, list] = {
    "circle": [("circle", 0.0, 0.0, 1.0)],
    "square": [("poly", [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)])],
    "triangle": [("poly", _regular(3, 1.12, 90, dy=-0.14))],
    "star": _star_kites(),
    "cross": [("poly", [(-1.0, -0.3), (1.0, -0.3), (1.0, 0.3), (-1.0, 0.3)]),
              ("poly", [(-0.3, -1.0), (0.3, -1.0), (0.3, 1.0), (-0.3, 1.0)])],
    "heart": [("poly", [(0.0, -0.85), (0.78, -0.07), (0.0, 0.71), (-0.78, -0.07)]),
              ("circle", 0.39, 0.32, 0.553), ("circle", -0.39, 0.32, 0.553)],
    "ring": [("annulus", 0.58, 1.0)],
    "diamond": [("poly", [(0.0, 1.08), (0.64, 0.0), (0.0, -1.08), (-0.64, 0.0)])],
    "hexagon": [("poly", _regular(6, 0.98, 0))],
    "arrow": [("poly", [(-1.0, -0.22), (0.3, -0.22), (0.3, 0.22), (-1.0, 0.22)]),
              ("poly", [(0.02, -0.66), (1.0, 0.0), (0.02, 0.66)])],
}


def shape_distance(shape: str, cx, cy, r, cos, sin, xs, ys) -> np.ndarray:
    """Signed distance in pixels (negative inside) for b objects of one shape -> (b, S, S) float32.

    cx, cy, r, cos, sin: (b,) float64 in pixels; xs: (1, 1, S) and ys: (1, S, 1) pixel centres.
    """
    col = lambda v: v.astype(np.float32)[:, None, None]
    best = None
    for part in _SHAPES[shape]:
        if part[0] == "poly":
            local = np.asarray(part[1], dtype=np.float64)  # (V, 2)
            wx = cx[:, None] + r[:, None] * (cos[:, None] * local[:, 0] - sin[:, None] * local[:, 1])  # (b, V)
            wy = cy[:, None] - r[:, None] * (sin[:, None] * local[:, 0] + cos[:, None] * local[:, 1])
            ex, ey = np.roll(wx, -1, axis=1) - wx, np.roll(wy, -1, axis=1) - wy
            length = np.sqrt(ex * ex + ey * ey)
            nx, ny = ey / length, -ex / length
            centre_x, centre_y = wx.mean(axis=1, keepdims=True), wy.mean(axis=1, keepdims=True)
            flip = np.where(nx * (centre_x - wx) + ny * (centre_y - wy) > 0, -1.0, 1.0)  # normals point outward
            nx, ny = nx * flip, ny * flip
            offset = nx * wx + ny * wy
            d = None
            for e in range(local.shape[0]):
                plane = col(nx[:, e]) * xs + (col(ny[:, e]) * ys - col(offset[:, e]))
                d = plane if d is None else np.maximum(d, plane)
        else:
            if part[0] == "circle":
                _, px, py, radius = part
                ox = cx + r * (cos * px - sin * py)
                oy = cy - r * (sin * px + cos * py)
            else:
                ox, oy = cx, cy
            dx, dy = xs - col(ox), ys - col(oy)
            dist = np.sqrt(dx * dx + dy * dy)
            if part[0] == "circle":
                d = dist - col(r * radius)
            else:
                _, inner, outer = part
                d = np.abs(dist - col(r * (inner + outer) / 2)) - col(r * (outer - inner) / 2)
        best = d if best is None else np.minimum(best, d)
    return best


def erode(alpha: np.ndarray, steps: int) -> np.ndarray:
    """Min over a diamond of radius ``steps`` pixels (outside the image counts as empty)."""
    out = alpha
    for _ in range(steps):
        nxt = out.copy()
        nxt[:, 1:, :] = np.minimum(nxt[:, 1:, :], out[:, :-1, :])
        nxt[:, :-1, :] = np.minimum(nxt[:, :-1, :], out[:, 1:, :])
        nxt[:, :, 1:] = np.minimum(nxt[:, :, 1:], out[:, :, :-1])
        nxt[:, :, :-1] = np.minimum(nxt[:, :, :-1], out[:, :, 1:])
        nxt[:, 0, :] = 0
        nxt[:, -1, :] = 0
        nxt[:, :, 0] = 0
        nxt[:, :, -1] = 0
        out = nxt
    return out
