"""Probe concepts the demo model cannot draw, and how to score them (issue 21's editability probes).

This module owns the *novel* demo concepts: shapes that pretraining (`xti.demo.procedural`) never
drew, so neither a word nor a mix of words gives them back and a learned embedding must carry the
shape itself. That is where editability can be lost: a vector pushed far from the vocabulary to draw
a new shape may stop listening to "green". The concepts are drawn beside the generator's own shapes,
in its colours and backgrounds, on white and gray backgrounds only (so "on a black background" is an
edit, never a training caption).

- ``ring``: an annulus (a circle with a hole of half its radius) — holes never occur in pretraining;
- ``heart``: two lobes over a point;
- ``hourglass``: two triangles meeting at their apexes.

A novel shape cannot be read by `xti.demo.procedural.measure`'s classifier (it only knows `SHAPES`),
so `classify_silhouette` compares a generated image's silhouette (foreground pixels, holes kept),
cropped to its bounding box and resampled to a small grid, with the same for every known shape and
the concept's own shape, and names the closest (intersection over union). Colour and background are
read by `measure`, as for the shipped concepts.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from xti.demo import procedural as P

NOVEL_SHAPES: tuple[str, ...] = ("ring", "heart", "hourglass")
"""Shapes the demo model never saw."""

NOVEL_CONCEPTS: dict[str, dict[str, object]] = {
    "red-ring": {"shape": "ring", "colour": "red", "seed": 501},
    "blue-heart": {"shape": "heart", "colour": "blue", "seed": 502},
    "orange-hourglass": {"shape": "hourglass", "colour": "orange", "seed": 503},
}
"""The probe concepts: one novel shape in one plain colour, 18-24 px, on white and gray."""

TRAIN_BACKGROUNDS: tuple[str, ...] = ("white", "gray")
"""Backgrounds of the novel concepts' training images; black is left for the background edit."""

_GRID = 12  # silhouettes are compared on a _GRID x _GRID resample of their bounding box


def inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Membership of points ``(u, v)`` (units of half the size, centred, v down) in a novel shape
    or any of `xti.demo.procedural.SHAPES`."""
    au = np.abs(u)
    if shape == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= 0.5**2)
    if shape == "heart":  # two lobes of radius 0.5 at (±0.45, -0.35), a point at (0, 1)
        lobes = ((au - 0.45) ** 2 + (v + 0.35) ** 2) <= 0.5**2
        point = (v >= -0.35) & (v <= 1.0) & (au <= 0.95 * (1.0 - v) / 1.35)
        return lobes | point
    if shape == "hourglass":  # apexes meet at the centre, bases at the top and bottom
        return (np.abs(v) <= 1.0) & (au <= np.abs(v) * 0.9 + 0.08)
    return P._inside(shape, u, v)


def render(shape: str, colour: str, background: str, size: float, position: tuple[float, float]):
    """An anti-aliased 32x32 ``uint8`` RGB image of a plain `shape` (novel or known)."""
    n, s = 32, 4
    coords = (np.arange(n * s) + 0.5) / s
    x, y = np.meshgrid(coords, coords)
    half = size / 2.0
    m = inside(shape, (x - position[0]) / half, (y - position[1]) / half)
    fg = np.asarray(P.COLOURS[colour], np.float32)
    bg = np.asarray(P.BACKGROUNDS[background], np.float32)
    img = np.where(m[..., None], fg, bg).reshape(n, s, n, s, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class NovelImage:
    """One training image of a novel concept and what it shows."""

    image: np.ndarray
    shape: str
    colour: str
    background: str
    size: float
    position: tuple[float, float]


def concept_images(name: str, n: int = 6) -> list[NovelImage]:
    """The `n` training images of novel concept `name` (deterministic; backgrounds alternate)."""
    spec = NOVEL_CONCEPTS[name]
    rng = np.random.default_rng(int(spec["seed"]))
    out = []
    for i in range(n):
        bg = TRAIN_BACKGROUNDS[i % len(TRAIN_BACKGROUNDS)]
        size = float(rng.integers(18, 25))
        half = size / 2.0
        lo, hi = 1.0 + half, 31.0 - half
        pos = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
        img = render(str(spec["shape"]), str(spec["colour"]), bg, size, pos)
        out.append(NovelImage(img, str(spec["shape"]), str(spec["colour"]), bg, size, pos))
    return out


def write_concept(name: str, folder: str | Path, n: int = 6) -> Path:
    """Write novel concept `name` as a training folder (``NN.png``, ``metadata.jsonl`` with captions
    ``"a <name> on a white background"``, ``labels.json`` last); returns the folder. A folder that
    already has its ``labels.json`` is left as it is."""
    out = Path(folder) / name
    if (out / "labels.json").is_file():  # written last: the folder is complete (and deterministic)
        return out
    out.mkdir(parents=True, exist_ok=True)
    entries, captions = [], []
    for i, im in enumerate(concept_images(name, n)):
        file = f"{i:02d}.png"
        Image.fromarray(im.image).save(out / file)
        entries.append(
            {"file": file, "shape": im.shape, "colour": im.colour, "background": im.background}
        )
        text = f"a <{name}> on a {im.background} background"
        captions.append(json.dumps({"file_name": file, "text": text}))
    (out / "metadata.jsonl").write_text("\n".join(captions) + "\n")
    (out / "labels.json").write_text(json.dumps({"concept": name, "images": entries}, indent=2))
    return out


def silhouette(img: np.ndarray, threshold: float = 60.0) -> np.ndarray:
    """Foreground pixels (distance to the border's median colour above `threshold`), largest
    4-connected component, holes kept (a ring stays a ring)."""
    a = img.astype(np.float32)
    bg = P.estimate_background(a)
    mask = np.sqrt(((a - bg) ** 2).sum(-1)) > threshold
    return P._largest_component(mask)


def _normalised(mask: np.ndarray) -> np.ndarray:
    """The mask's bounding box resampled to ``_GRID x _GRID`` (nearest pixel), as booleans."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    rows = np.minimum((np.arange(_GRID) + 0.5) * box.shape[0] / _GRID, box.shape[0] - 1)
    cols = np.minimum((np.arange(_GRID) + 0.5) * box.shape[1] / _GRID, box.shape[1] - 1)
    return box[rows.astype(int)][:, cols.astype(int)]


@functools.cache
def _prototype(shape: str) -> np.ndarray:
    return _normalised(silhouette(render(shape, "red", "white", 22.0, (16.0, 16.0))))


def classify_silhouette(img: np.ndarray, shapes: Sequence[str]) -> str | None:
    """The shape among `shapes` whose prototype silhouette best overlaps the image's (IoU of the
    normalised bounding boxes); None without foreground (fewer than 6 pixels)."""
    mask = silhouette(img)
    if mask.sum() < 6:
        return None
    m = _normalised(mask)

    def iou(shape: str) -> float:
        p = _prototype(shape)
        return float((m & p).sum()) / max(1.0, float((m | p).sum()))

    return max(shapes, key=iou)


def shape_kept(img: np.ndarray, shape: str) -> bool:
    """True when the image's silhouette reads as `shape` rather than any known demo shape."""
    return classify_silhouette(img, (*P.SHAPES, shape)) == shape


EDIT_COLOURS: tuple[str, ...] = ("green", "purple")
"""Colours the colour-edit probes ask for (none is a novel concept's own colour)."""


@dataclass(frozen=True)
class NovelProbe:
    """One prompt of a novel concept and what its images must show: `colour`, `background` (None:
    not checked) and the concept's shape always; `mix` goes to `xti.inference.XTIAdapter`."""

    kind: str  # reconstruction, colour_edit, background_edit, mixing
    prompt: str
    colour: str | None
    background: str | None
    mix: dict[str, str] | None = None


def novel_probes(
    name: str,
    style: str | None = None,
    style_colour: str = "teal",
    shape_layers: str = "IN04-OUT08",
) -> list[NovelProbe]:
    """The probes of novel concept `name` (placeholder ``<name>``): reconstruction on each training
    background, "a green <name> on a white background" per `EDIT_COLOURS`, the unseen black
    background, and, with a `style` placeholder, the concept in `shape_layers` and the style in
    the others (expecting `style_colour`)."""
    c = f"<{name}>"
    colour = str(NOVEL_CONCEPTS[name]["colour"])
    probes = [
        NovelProbe("reconstruction", f"a {c} on a {bg} background", colour, bg)
        for bg in TRAIN_BACKGROUNDS
    ]
    probes += [
        NovelProbe("colour_edit", f"a {col} {c} on a white background", col, None)
        for col in EDIT_COLOURS
    ]
    probes.append(NovelProbe("background_edit", f"a {c} on a black background", colour, "black"))
    if style is not None:
        probes.append(
            NovelProbe(
                "mixing",
                f"a {c} on a white background",
                style_colour,
                None,
                mix={style: "all", c: shape_layers},
            )
        )
    return probes


def silhouette_iou(img: np.ndarray, shape: str) -> float:
    """Intersection over union of the image's normalised silhouette with `shape`'s prototype
    (0 without foreground): how much of the concept's shape the image carries, 0-1."""
    mask = silhouette(img)
    if mask.sum() < 6:
        return 0.0
    m, p = _normalised(mask), _prototype(shape)
    return float((m & p).sum()) / max(1.0, float((m | p).sum()))


def score_novel(images: Sequence[np.ndarray], probe: NovelProbe, shape: str) -> dict[str, float]:
    """Hit rates of one probe's images: ``colour`` / ``background`` (the asked attribute right),
    ``all`` (every asked attribute at once) and ``iou``, the mean `silhouette_iou` with the
    concept's shape (the demo model cannot draw these shapes, so this is a degree, not a hit)."""
    hits: dict[str, list[float]] = {"all": [], "iou": []}
    for img in images:
        m = P.measure(img)
        checks = []
        for attr, want in (("colour", probe.colour), ("background", probe.background)):
            if want is not None:
                hit = getattr(m, attr) == want
                hits.setdefault(attr, []).append(float(hit))
                checks.append(hit)
        hits["all"].append(float(all(checks)))
        hits["iou"].append(silhouette_iou(img, shape))
    return {k: float(np.mean(v)) for k, v in hits.items()}
