"""Procedural shape images with known labels, and the measurements that read them back.

This module owns the tiny world the demo model (``data/demo-model``) was trained on:

- the generator: `sample_label` draws a random `Label` (shape, colour, background, pattern, size,
  position) from a seeded numpy generator, `render` draws it as an anti-aliased RGB image (32x32 by
  default), `generate` / `generate_batch` do both; every image comes with its label and a caption
  such as ``"a red striped circle on a white background"``;
- the pretraining vocabulary rules: which colours are named in captions (`NAMED_COLOURS`; teal is drawn
  but never named), which combinations are held out of pretraining (`is_held_out`: striped crosses),
  what pretraining can never draw at all (`never_in_pretraining`: held out, or sized outside
  `SIZE_RANGE`), and `training_caption`, which drops attributes at random;
- the demo concepts (`DEMO_CONCEPTS`, written to ``data/demo-concepts`` by `write_demo_concepts`);
- the measurements used by tests and ``bench/quality.py`` on generated images: `estimate_background`,
  `foreground_mask`, `dominant_hue` / `colour_name`, `classify_shape` (IoU against each shape's template
  fitted to the mask's bounding box), `classify_pattern`, the size class (`GIANT_EXTENT`),
  `background_brightness` / `background_name`, and `measure`, which returns all of them as a
  `Measurement`.

Everything is numpy only and deterministic from the seed. Images are ``uint8`` arrays of shape
``(H, W, 3)``.
"""

from __future__ import annotations

import colorsys
import functools
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------------
# The world: shapes, colours, backgrounds, patterns
# --------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
"""Shapes the generator draws (all upright, never rotated)."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 125, 15),
    "yellow": (235, 225, 20),
    "green": (35, 175, 45),
    "teal": (20, 165, 160),
    "blue": (35, 75, 225),
    "purple": (145, 40, 205),
}
"""Foreground colours (saturated, so that they separate from the grey backgrounds by chroma)."""

NAMED_COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
"""Colours whose name appears in pretraining captions; the others are drawn but never named."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
"""Plain backgrounds, achromatic, at three brightness levels."""

PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted")
"""Surface patterns: none, diagonal stripes, a grid of dots (both in a darker shade of the colour)."""

PATTERN_SHADE = 0.45
"""Pattern pixels are the foreground colour times this factor (same hue, darker)."""

SIZE_RANGE: tuple[int, int] = (12, 24)
"""Shape extent in pixels at 32x32, inclusive (scaled with the resolution)."""

GIANT_EXTENT = SIZE_RANGE[1] + 2
"""A measured extent (bounding-box side of the foreground mask, pixels at 32x32) of at least this is
read as ``giant`` (`size_class`): bigger than anything pretraining drew, whose largest shapes measure
at most ``SIZE_RANGE[1] + 1`` (anti-aliased edge pixels)."""

HELD_OUT: tuple[tuple[str, str], ...] = (("cross", "striped"),)
"""(shape, pattern) combinations never drawn in pretraining: the demo object concept is one."""


@dataclass(frozen=True)
class Label:
    """What one generated image shows.

    Attributes:
        shape: one of `SHAPES`.
        colour: one of `COLOURS`.
        background: one of `BACKGROUNDS`.
        pattern: one of `PATTERNS`.
        size: extent of the shape in pixels at `resolution`.
        position: centre ``(x, y)`` in pixels at `resolution` (x to the right, y down).
        resolution: side of the square image in pixels.
        phase: offset of the pattern in pixels (stripes/dots do not line up between images).
    """

    shape: str
    colour: str
    background: str
    pattern: str = "plain"
    size: float = 18.0
    position: tuple[float, float] = (16.0, 16.0)
    resolution: int = 32
    phase: tuple[float, float] = (0.0, 0.0)

    @property
    def size_class(self) -> str:
        """``giant`` above `SIZE_RANGE` (never drawn in pretraining), ``small`` below it, else
        ``normal``; compares with `Measurement.size_class`."""
        size = self.size * 32.0 / self.resolution
        if size > SIZE_RANGE[1]:
            return "giant"
        return "small" if size < SIZE_RANGE[0] else "normal"

    @property
    def caption(self) -> str:
        """The full caption, e.g. ``"a red striped circle on a white background"``."""
        return caption_for(self.shape, self.colour, self.background, self.pattern)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["position"] = list(self.position)
        d["phase"] = list(self.phase)
        d["caption"] = self.caption
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Label:
        keys = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in keys}
        if "position" in kw:
            kw["position"] = tuple(kw["position"])
        if "phase" in kw:
            kw["phase"] = tuple(kw["phase"])
        return cls(**kw)


def caption_for(
    shape: str | None,
    colour: str | None = None,
    background: str | None = None,
    pattern: str | None = None,
) -> str:
    """Caption from attributes; a None attribute (or ``plain`` pattern) is left out.

    ``caption_for("circle", "red", "white", "striped")`` → ``"a red striped circle on a white
    background"``; ``caption_for("square")`` → ``"a square"``; no shape gives ``"shape"`` as the noun.
    """
    words = []
    if colour:
        words.append(colour)
    if pattern and pattern != "plain":
        words.append(pattern)
    words.append(shape or "shape")
    text = ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)
    if background:
        text += f" on a {background} background"
    return text


def is_held_out(label: Label) -> bool:
    """True for labels never drawn in pretraining (`HELD_OUT` combinations)."""
    return (label.shape, label.pattern) in HELD_OUT


def never_in_pretraining(label: Label) -> bool:
    """True for labels the demo model's pretraining can never draw, for any of its own reasons.

    Pretraining draws ``generate_batch(n, seed, exclude=is_held_out)`` with every other argument at
    its default, so a label is never drawn when it is `is_held_out`, or its size (at 32 px) is outside
    `SIZE_RANGE`, or its shape, colour, background or pattern is not one of the generator's. This
    only reads those rules; it adds none (the shipped model's data must not change).
    """
    size = label.size * 32.0 / label.resolution
    return (
        is_held_out(label)
        or not SIZE_RANGE[0] <= size <= SIZE_RANGE[1]
        or label.shape not in SHAPES
        or label.colour not in COLOURS
        or label.background not in BACKGROUNDS
        or label.pattern not in PATTERNS
    )


# --------------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _star_polygon() -> np.ndarray:
    angles = np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return np.stack([radii * np.sin(angles), -radii * np.cos(angles)], axis=1)


def _in_polygon(u: np.ndarray, v: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon test, vectorised over points."""
    inside = np.zeros(np.broadcast(u, v).shape, dtype=bool)
    n = len(poly)
    for i in range(n):
        (ua, va), (ub, vb) = poly[i], poly[(i + 1) % n]
        crosses = (va > v) != (vb > v)
        with np.errstate(divide="ignore", invalid="ignore"):
            u_at = ua + (v - va) * (ub - ua) / (vb - va)
        inside ^= crosses & (u < u_at)
    return inside


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points ``(u, v)`` in units of half the size, centred on the shape (v down)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (au <= 1.0) & (av <= 1.0)
    if shape == "triangle":  # apex up, base at the bottom
        return (v >= -1.0) & (v <= 1.0) & (au <= (v + 1.0) / 2.0)
    if shape == "diamond":
        return au + av <= 1.0
    if shape == "cross":
        arm = 1.0 / 3.0
        return ((au <= arm) & (av <= 1.0)) | ((av <= arm) & (au <= 1.0))
    if shape == "star":  # five points, one up, inner radius 0.42
        return _in_polygon(u, v, _star_polygon())
    raise ValueError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


@functools.cache
def _extent(shape: str) -> tuple[float, float, float, float]:
    """Bounding box ``(u0, u1, v0, v1)`` of a shape in its own units, measured on a fine grid."""
    g = np.linspace(-1.05, 1.05, 841)
    u, v = np.meshgrid(g, g)
    m = _inside(shape, u, v)
    return float(u[m].min()), float(u[m].max()), float(v[m].min()), float(v[m].max())


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    """Where the darker pattern shade goes, at pixel coordinates ``x, y`` (32-pixel units × scale)."""
    if pattern == "plain":
        return np.zeros_like(x, dtype=bool)
    if pattern == "striped":  # diagonal stripes, period 4 px at 32x32, half dark
        return np.mod((x + y) / scale, 4.0) < 2.0
    if pattern == "dotted":  # dots of radius 1.1 px on a 4 px grid
        dx = np.mod(x / scale, 4.0) - 2.0
        dy = np.mod(y / scale, 4.0) - 2.0
        return dx * dx + dy * dy <= 1.1**2
    raise ValueError(f"unknown pattern {pattern!r}; patterns are {', '.join(PATTERNS)}")


def coverage(label: Label, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the shape (float array ``(H, W)`` in [0, 1])."""
    n, s = label.resolution, supersample
    coords = (np.arange(n * s) + 0.5) / s
    x, y = np.meshgrid(coords, coords)
    half = label.size / 2.0
    inside = _inside(label.shape, (x - label.position[0]) / half, (y - label.position[1]) / half)
    return inside.reshape(n, s, n, s).mean(axis=(1, 3))


def render(label: Label, supersample: int = 4) -> np.ndarray:
    """Draw `label` as an anti-aliased ``uint8`` RGB image of ``label.resolution`` pixels square."""
    n, s = label.resolution, supersample
    coords = (np.arange(n * s) + 0.5) / s  # sub-pixel centres in pixel units
    x, y = np.meshgrid(coords, coords)
    half = label.size / 2.0
    cx, cy = label.position
    inside = _inside(label.shape, (x - cx) / half, (y - cy) / half)
    scale = n / 32.0
    dark = _pattern_mask(
        label.pattern, x + label.phase[0] * scale, y + label.phase[1] * scale, scale
    )
    fg = np.asarray(COLOURS[label.colour], np.float32)
    bg = np.asarray(BACKGROUNDS[label.background], np.float32)
    img = np.where(inside[..., None], np.where(dark[..., None], fg * PATTERN_SHADE, fg), bg).astype(
        np.float32
    )
    img = img.reshape(n, s, n, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_scene(
    labels: Sequence[Label], width: int, height: int, background: str, supersample: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Draw several shapes on one ``width × height`` canvas, later labels on top (positions in
    canvas pixels, patterns at the 32-px scale). Returns the ``uint8`` RGB image and the fraction of
    each pixel the *last* label covers where it shows (``(H, W)`` in [0, 1]): its mask."""
    s = supersample
    x, y = np.meshgrid((np.arange(width * s) + 0.5) / s, (np.arange(height * s) + 0.5) / s)
    img = np.broadcast_to(np.asarray(BACKGROUNDS[background], np.float32), x.shape + (3,)).copy()
    inside = np.zeros(x.shape, dtype=bool)
    for label in labels:
        half = label.size / 2.0
        cx, cy = label.position
        inside = _inside(label.shape, (x - cx) / half, (y - cy) / half)
        dark = _pattern_mask(label.pattern, x + label.phase[0], y + label.phase[1], 1.0)
        fg = np.asarray(COLOURS[label.colour], np.float32)
        img[inside] = np.where(dark[inside][:, None], fg * PATTERN_SHADE, fg)
    img = img.reshape(height, s, width, s, 3).mean(axis=(1, 3))
    mask = inside.reshape(height, s, width, s).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------


def sample_label(
    rng: np.random.Generator,
    *,
    shapes: Sequence[str] = SHAPES,
    colours: Sequence[str] = tuple(COLOURS),
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    patterns: Sequence[str] = PATTERNS,
    resolution: int = 32,
    size_range: tuple[float, float] = SIZE_RANGE,
    exclude: Callable[[Label], bool] | None = None,
) -> Label:
    """Draw a random label: uniform attributes, size in `size_range` (at 32 px, scaled), and a
    position that keeps the whole shape one pixel inside the image.

    Args:
        rng: numpy generator (the only source of randomness).
        shapes, colours, backgrounds, patterns: the choices for each attribute.
        resolution: image side in pixels.
        size_range: inclusive range of the shape extent at 32 px.
        exclude: labels for which this returns True are redrawn (e.g. `is_held_out`).
    """
    scale = resolution / 32.0
    for _ in range(1000):
        shape = shapes[int(rng.integers(len(shapes)))]
        colour = colours[int(rng.integers(len(colours)))]
        background = backgrounds[int(rng.integers(len(backgrounds)))]
        pattern = patterns[int(rng.integers(len(patterns)))]
        size = float(rng.integers(int(size_range[0]), int(size_range[1]) + 1)) * scale
        u0, u1, v0, v1 = _extent(shape)
        half = size / 2.0
        margin = 1.0 * scale
        x_lo, x_hi = margin - u0 * half, resolution - margin - u1 * half
        y_lo, y_hi = margin - v0 * half, resolution - margin - v1 * half
        cx = float(rng.uniform(x_lo, max(x_lo, x_hi)))
        cy = float(rng.uniform(y_lo, max(y_lo, y_hi)))
        phase = (float(rng.uniform(0, 4)), float(rng.uniform(0, 4)))
        label = Label(shape, colour, background, pattern, size, (cx, cy), resolution, phase)
        if exclude is None or not exclude(label):
            return label
    raise ValueError("no label satisfies the constraints (exclude rejects everything)")


def generate(seed: int | np.random.Generator, **constraints: Any) -> tuple[np.ndarray, Label]:
    """Draw one random image and its label; `constraints` are `sample_label` keyword arguments."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    label = sample_label(rng, **constraints)
    return render(label), label


def generate_batch(
    n: int, seed: int | np.random.Generator, **constraints: Any
) -> tuple[np.ndarray, list[Label]]:
    """Draw `n` images (``uint8`` array ``(n, H, W, 3)``) and their labels, deterministic from `seed`."""
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    labels = [sample_label(rng, **constraints) for _ in range(n)]
    images = np.stack([render(lab) for lab in labels]) if labels else np.zeros((0, 32, 32, 3))
    return images.astype(np.uint8), labels


def training_caption(
    label: Label,
    rng: np.random.Generator,
    *,
    p_empty: float = 0.1,
    p_drop_colour: float = 0.1,
    p_drop_background: float = 0.15,
    p_drop_pattern: float = 0.1,
    p_drop_shape: float = 0.05,
) -> str:
    """A pretraining caption for `label`: each attribute is dropped with its probability, colours
    outside `NAMED_COLOURS` are never named, and with `p_empty` the caption is empty (for
    classifier-free guidance)."""
    if rng.random() < p_empty:
        return ""
    colour = label.colour if label.colour in NAMED_COLOURS else None
    if colour and rng.random() < p_drop_colour:
        colour = None
    background = None if rng.random() < p_drop_background else label.background
    pattern = None if rng.random() < p_drop_pattern else label.pattern
    shape = None if rng.random() < p_drop_shape else label.shape
    return caption_for(shape, colour, background, pattern)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def _as_float(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float32)
    a = a.astype(np.float32)
    return a * 255.0 if a.max() <= 1.0 + 1e-6 else a


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Background colour: the per-channel median of the image's one-pixel border (RGB, 0-255)."""
    a = _as_float(img)
    border = np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])
    return np.median(border, axis=0)


def foreground_mask(img: np.ndarray, threshold: float = 35.0) -> np.ndarray:
    """Pixels that belong to the shape.

    Each pixel's distance to the background colour (`estimate_background`) is compared with the
    largest distance in its 3x3 neighbourhood (a pixel half covered by the shape is about half as far
    from the background as its covered neighbour). Pixels above `threshold` (RGB 0-255) and a quarter
    of that local maximum are candidates, so that dark pattern pixels on a black background count;
    candidates below half of it that touch the outside (partly covered edge pixels) are dropped. The
    largest 4-connected component is kept, with its holes filled.
    """
    a = _as_float(img)
    bg = estimate_background(a)
    dist = np.sqrt(((a - bg) ** 2).sum(-1))
    h, w = dist.shape
    padded = np.pad(dist, 1, mode="edge")
    local = np.max([padded[i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=0)
    weak = (dist > threshold) & (dist >= 0.25 * local)
    strong = weak & (dist >= 0.5 * local)
    p = np.pad(weak, 1, constant_values=False)
    touches_outside = ~(p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])
    mask = weak & ~(~strong & touches_outside)
    mask = _largest_component(mask)
    return _fill_holes(mask)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background) by iterative min-propagation."""
    h, w = mask.shape
    lab = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), 0)
    big = h * w + 1
    while True:
        cur = np.where(mask, lab, big)
        nb = cur.copy()
        nb[1:] = np.minimum(nb[1:], cur[:-1])
        nb[:-1] = np.minimum(nb[:-1], cur[1:])
        nb[:, 1:] = np.minimum(nb[:, 1:], cur[:, :-1])
        nb[:, :-1] = np.minimum(nb[:, :-1], cur[:, 1:])
        new = np.where(mask, nb, 0)
        if np.array_equal(new, lab):
            break
        lab = new
    ids = np.unique(lab[lab > 0])
    return lab, len(ids)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    lab, _ = _components(mask)
    ids, counts = np.unique(lab[lab > 0], return_counts=True)
    return lab == ids[np.argmax(counts)]


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image border."""
    outside = ~mask
    lab, _ = _components(outside)
    border_ids = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    border_ids = border_ids[border_ids > 0]
    return mask | (outside & ~np.isin(lab, border_ids))


def dominant_hue(img: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """Chroma-weighted circular mean hue (degrees, 0-360) of the foreground; None if it is empty
    or grey."""
    a = _as_float(img) / 255.0
    if mask is None:
        mask = foreground_mask(img)
    px = a[mask]
    if len(px) == 0:
        return None
    mx, mn = px.max(-1), px.min(-1)
    chroma = mx - mn
    keep = chroma > 0.08
    if not keep.any():
        return None
    px, chroma = px[keep], chroma[keep]
    hues = np.array([colorsys.rgb_to_hsv(*p)[0] for p in px]) * 2 * np.pi
    x, y = (chroma * np.cos(hues)).sum(), (chroma * np.sin(hues)).sum()
    return float(np.degrees(np.arctan2(y, x)) % 360.0)


@functools.cache
def _colour_hues() -> dict[str, float]:
    return {
        name: colorsys.rgb_to_hsv(*(c / 255.0 for c in rgb))[0] * 360.0
        for name, rgb in COLOURS.items()
    }


def colour_name(hue: float | None, colours: Sequence[str] | None = None) -> str | None:
    """The colour of `COLOURS` (or of `colours`) with the nearest hue; None for None."""
    if hue is None:
        return None
    table = _colour_hues()
    names = list(colours) if colours is not None else list(table)

    def dist(name: str) -> float:
        d = abs(hue - table[name]) % 360.0
        return min(d, 360.0 - d)

    return min(names, key=dist)


def shape_scores(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> dict[str, float]:
    """IoU of `mask` with each shape's template placed on the mask's bounding box (4x supersampled
    template, thresholded at half coverage). Empty masks score 0 everywhere."""
    if not mask.any():
        return {s: 0.0 for s in shapes}
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1  # pixel edges
    h, w = mask.shape
    s = 4
    gx = (np.arange(w * s) + 0.5) / s
    gy = (np.arange(h * s) + 0.5) / s
    x, y = np.meshgrid(gx, gy)
    scores = {}
    for shape in shapes:
        u0, u1, v0, v1 = _extent(shape)
        # affine map from pixel coordinates to shape units so that the extent fills the bbox
        u = u0 + (x - x0) / max(x1 - x0, 1e-6) * (u1 - u0)
        v = v0 + (y - y0) / max(y1 - y0, 1e-6) * (v1 - v0)
        cover = _inside(shape, u, v).reshape(h, s, w, s).mean(axis=(1, 3))
        tmpl = cover >= 0.5
        inter = (tmpl & mask).sum()
        union = (tmpl | mask).sum()
        scores[shape] = float(inter / union) if union else 0.0
    return scores


def classify_shape(mask: np.ndarray, shapes: Sequence[str] = SHAPES) -> str | None:
    """The shape whose bbox-fitted template overlaps `mask` best (None for an empty mask)."""
    if not mask.any():
        return None
    scores = shape_scores(mask, shapes)
    return max(scores, key=scores.__getitem__)


def pattern_fraction(img: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Share of foreground pixels (eroded by one pixel) clearly darker than the foreground's bright
    level: ~0 plain, ~0.2 dotted, ~0.5 striped."""
    a = _as_float(img)
    if mask is None:
        mask = foreground_mask(img)
    core = mask.copy()
    core[1:] &= mask[:-1]
    core[:-1] &= mask[1:]
    core[:, 1:] &= mask[:, :-1]
    core[:, :-1] &= mask[:, 1:]
    if core.sum() < 4:
        core = mask
    if not core.any():
        return 0.0
    value = a[core].max(-1)
    bright = np.percentile(value, 90)
    return float((value < bright * (1.0 + PATTERN_SHADE) / 2.0).mean())


def classify_pattern(img: np.ndarray, mask: np.ndarray | None = None) -> str:
    """``plain``, ``dotted`` or ``striped`` from `pattern_fraction`."""
    f = pattern_fraction(img, mask)
    if f < 0.05:
        return "plain"
    return "dotted" if f < 0.33 else "striped"


def background_brightness(img: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean luma (0-1) of the pixels outside the foreground mask (the whole image if none)."""
    a = _as_float(img) / 255.0
    if mask is None:
        mask = foreground_mask(img)
    px = a[~mask] if (~mask).any() else a.reshape(-1, 3)
    luma = px @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(luma.mean())


def background_is_grey(img: np.ndarray, max_chroma: float = 40.0) -> bool:
    """True when the estimated background colour is a grey (chroma below `max_chroma`, RGB 0-255),
    as all `BACKGROUNDS` are; False e.g. when the foreground colour fills the whole image."""
    bg = estimate_background(img)
    return bool(bg.max() - bg.min() < max_chroma)


def background_name(brightness: float) -> str:
    """The background of `BACKGROUNDS` with the nearest brightness."""
    levels = {name: np.mean(rgb) / 255.0 for name, rgb in BACKGROUNDS.items()}
    return min(levels, key=lambda n: abs(levels[n] - brightness))


@dataclass
class Measurement:
    """What the measurements read from one image.

    `shape`, `colour` and `pattern` are None where no foreground was found; `background` is None where
    the background is not a grey (e.g. the colour fills the whole image). `extent` is the longer side
    of the foreground's bounding box in pixels at 32x32 (0 without foreground); `size_class` is
    ``giant`` from `GIANT_EXTENT` on, else ``normal`` (None without foreground; ``small`` is never
    read: small stars and crosses measure like smaller shapes).
    """

    shape: str | None
    colour: str | None
    background: str | None
    pattern: str | None
    hue: float | None
    brightness: float
    foreground_fraction: float
    shape_scores: dict[str, float] = field(default_factory=dict)
    extent: float = 0.0
    size_class: str | None = None

    def matches(
        self, label: Label, attributes: Sequence[str] = ("shape", "colour", "background")
    ) -> bool:
        """True when every attribute in `attributes` equals the label's."""
        return all(getattr(self, a) == getattr(label, a) for a in attributes)


def measure(img: np.ndarray) -> Measurement:
    """Read shape, colour, background and pattern from one image (``uint8`` HxWx3 or float 0-1)."""
    mask = foreground_mask(img)
    hue = dominant_hue(img, mask)
    bright = background_brightness(img, mask)
    scores = shape_scores(mask)
    has_fg = bool(mask.sum() >= 4)
    extent = 0.0
    if has_fg:
        ys, xs = np.nonzero(mask)
        side = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
        extent = float(side) * 32.0 / mask.shape[0]
    return Measurement(
        shape=max(scores, key=scores.__getitem__) if has_fg else None,
        colour=colour_name(hue) if has_fg else None,
        background=background_name(bright) if background_is_grey(img) else None,
        pattern=classify_pattern(img, mask) if has_fg else None,
        hue=hue,
        brightness=bright,
        foreground_fraction=float(mask.mean()),
        shape_scores=scores,
        extent=extent,
        size_class=("giant" if extent >= GIANT_EXTENT else "normal") if has_fg else None,
    )


# --------------------------------------------------------------------------------------------------
# Demo concepts (data/demo-concepts)
# --------------------------------------------------------------------------------------------------

DEMO_CONCEPTS: dict[str, dict[str, Any]] = {
    "striped-cross": {
        "kind": "object",
        "description": "an orange cross with dark diagonal stripes: crosses and stripes were both in "
        "pretraining, striped crosses never (HELD_OUT), so no caption describes it",
        "seed": 101,
        "constraints": {
            "shapes": ("cross",),
            "colours": ("orange",),
            "patterns": ("striped",),
            "size_range": (18, 24),
        },
    },
    "giant-dotted-diamond": {
        "kind": "object",
        "description": "a yellow diamond with dark dots, 27-29 px wide: yellow dotted diamonds were "
        "in pretraining, but only 12-24 px (SIZE_RANGE), so the model never drew one this big",
        "seed": 303,
        "constraints": {
            "shapes": ("diamond",),
            "colours": ("yellow",),
            "patterns": ("dotted",),
            "size_range": (27, 29),
        },
    },
    "giant-striped-triangle": {
        "kind": "object",
        "description": "a purple triangle with dark diagonal stripes, 27-29 px wide: purple striped "
        "triangles were in pretraining, but only 12-24 px (SIZE_RANGE), so the model never drew one "
        "this big",
        "seed": 404,
        "constraints": {
            "shapes": ("triangle",),
            "colours": ("purple",),
            "patterns": ("striped",),
            "size_range": (27, 29),
        },
    },
    "teal-dotted": {
        "kind": "style",
        "description": "teal with dark dots on any shape: teal was drawn in pretraining but never "
        "named in a caption (not in NAMED_COLOURS), so only a learned token can ask for it",
        "seed": 202,
        "constraints": {
            "shapes": ("circle", "square", "triangle", "diamond", "star"),
            "colours": ("teal",),
            "patterns": ("dotted",),
            "size_range": (18, 24),
        },
    },
}
"""The demo concepts: how their images are drawn (constraints for `sample_label`).

Every object concept is something pretraining never drew (`never_in_pretraining`): `striped-cross`
by `HELD_OUT`, the two giant ones by size (pretraining's captions never mention size, so words can
ask for their shape, colour and pattern but not for how big they are). The style `teal-dotted` uses
a colour pretraining drew but never named."""

DEMO_OBJECTS: tuple[str, ...] = tuple(n for n, s in DEMO_CONCEPTS.items() if s["kind"] == "object")
"""Names of the object concepts of `DEMO_CONCEPTS`, in order."""


def demo_concept(name: str, n: int = 6) -> tuple[np.ndarray, list[Label]]:
    """The `n` images and labels of demo concept `name` (deterministic; backgrounds cycle)."""
    spec = DEMO_CONCEPTS[name]
    rng = np.random.default_rng(spec["seed"])
    backgrounds = tuple(BACKGROUNDS)
    labels = []
    for i in range(n):
        bg = backgrounds[i % len(backgrounds)]
        labels.append(sample_label(rng, backgrounds=(bg,), **spec["constraints"]))
    return np.stack([render(lab) for lab in labels]), labels


def demo_caption(name: str, label: Label) -> str:
    """Training caption of a demo-concept image: the placeholder ``<name>`` stands for what is new.

    The object concept replaces colour, pattern and shape (``"a <striped-cross> on a gray
    background"``); the style concept replaces colour and pattern and keeps the shape (``"a
    <teal-dotted> star on a black background"``), in the grammar the demo model was trained on.
    """
    if DEMO_CONCEPTS[name]["kind"] == "object":
        return f"a <{name}> on a {label.background} background"
    return f"a <{name}> {label.shape} on a {label.background} background"


def write_demo_concepts(folder: str, n: int = 6) -> list[str]:
    """Write every `DEMO_CONCEPTS` entry as ``<folder>/<name>/NN.png``, ``labels.json`` (generator
    labels) and ``metadata.jsonl`` (training captions with the placeholder ``<name>``)."""
    import json
    from pathlib import Path

    from PIL import Image

    written = []
    for name, spec in DEMO_CONCEPTS.items():
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        images, labels = demo_concept(name, n)
        entries = []
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            file = f"{i:02d}.png"
            Image.fromarray(img).save(out / file)
            entries.append({"file": file, **lab.to_dict()})
        meta = {
            "concept": name,
            "kind": spec["kind"],
            "description": spec["description"],
            "generator": "xti.demo.procedural.demo_concept",
            "seed": spec["seed"],
            "images": entries,
        }
        (out / "labels.json").write_text(json.dumps(meta, indent=2) + "\n")
        captions = [
            json.dumps({"file_name": f"{i:02d}.png", "text": demo_caption(name, lab)})
            for i, lab in enumerate(labels)
        ]
        (out / "metadata.jsonl").write_text("\n".join(captions) + "\n")
        written.append(str(out))
    return written


if __name__ == "__main__":  # python -m xti.demo.procedural data/demo-concepts
    import sys

    for path in write_demo_concepts(sys.argv[1] if len(sys.argv) > 1 else "data/demo-concepts"):
        print(f"wrote {path}")
