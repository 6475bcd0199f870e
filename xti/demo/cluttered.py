"""The demo's non-square concept with masks: `cluttered-cross` (data/demo-concepts/cluttered-cross).

The subject is the `striped-cross` concept's orange striped cross (a combination the demo model never
drew), 14-18 px, on 40x24 canvases (5:3: the demo model's 40x24 bucket at ``train.resolution=32``
with ``data.bucket_step=8``, so the images train whole instead of losing 8 px at each side to a
square crop), among three smaller shapes in other colours, drawn behind it: the clutter. Beside each
image, ``NN.mask.png`` is the cross's visible coverage (anti-aliased). The captions only say ``"a
<cluttered-cross> on a <bg> background"``: without the mask nothing explains the clutter, and the
vectors have to account for it (`configs/demo-cluttered-cross.yaml`; ``python bench/quality.py
--masks`` compares the two runs).

``labels.json`` lists each image's subject label (what `xti.quality.load_concept` reads: shape,
colour, pattern, background), its mask file and the clutter's labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xti.demo import procedural as P

NAME = "cluttered-cross"
SIZE: tuple[int, int] = (40, 24)
"""Canvas (width, height) in pixels."""
SEED = 505
CLUTTER_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
CLUTTER_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "blue", "purple")
N_CLUTTER = 3


def _subject(rng: np.random.Generator, background: str) -> P.Label:
    width, height = SIZE
    size = float(rng.integers(14, 19))
    half = size / 2.0
    cx = float(rng.uniform(1 + half, width - 1 - half))
    cy = float(rng.uniform(1 + half, height - 1 - half))
    phase = (float(rng.uniform(0, 4)), float(rng.uniform(0, 4)))
    return P.Label("cross", "orange", background, "striped", size, (cx, cy), 32, phase)


def _clutter(rng: np.random.Generator, background: str) -> P.Label:
    width, height = SIZE
    return P.Label(
        CLUTTER_SHAPES[int(rng.integers(len(CLUTTER_SHAPES)))],
        CLUTTER_COLOURS[int(rng.integers(len(CLUTTER_COLOURS)))],
        background,
        P.PATTERNS[int(rng.integers(len(P.PATTERNS)))],
        float(rng.integers(8, 14)),
        (float(rng.uniform(0, width)), float(rng.uniform(0, height))),
        32,
        (float(rng.uniform(0, 4)), float(rng.uniform(0, 4))),
    )


def cluttered_concept(
    n: int = 8,
) -> tuple[list[np.ndarray], list[np.ndarray], list[P.Label], list[list[P.Label]]]:
    """Images, masks, subject labels and clutter labels of the concept (deterministic;
    backgrounds cycle white, gray, black)."""
    rng = np.random.default_rng(SEED)
    images, masks, subjects, clutters = [], [], [], []
    for i in range(n):
        bg = tuple(P.BACKGROUNDS)[i % len(P.BACKGROUNDS)]
        subject = _subject(rng, bg)
        clutter = [_clutter(rng, bg) for _ in range(N_CLUTTER)]
        img, mask = P.render_scene([*clutter, subject], *SIZE, bg)
        images.append(img)
        masks.append(mask)
        subjects.append(subject)
        clutters.append(clutter)
    return images, masks, subjects, clutters


def clean_reference(label: P.Label) -> np.ndarray:
    """The subject alone, centred on a 32x32 canvas of its background: what reconstruction aims at."""
    return P.render(P.Label(**{**label.__dict__, "position": (16.0, 16.0), "resolution": 32}))


def write_cluttered_concept(folder: str | Path, n: int = 8) -> Path:
    """Write ``<folder>/cluttered-cross``: ``NN.png``, ``NN.mask.png``, ``labels.json`` and
    ``metadata.jsonl``."""
    from PIL import Image

    out = Path(folder) / NAME
    out.mkdir(parents=True, exist_ok=True)
    images, masks, subjects, clutters = cluttered_concept(n)
    entries, captions = [], []
    for i, (img, mask, lab, clutter) in enumerate(
        zip(images, masks, subjects, clutters, strict=True)
    ):
        file, mask_file = f"{i:02d}.png", f"{i:02d}.mask.png"
        Image.fromarray(img).save(out / file)
        Image.fromarray(np.rint(mask * 255).astype(np.uint8)).save(out / mask_file)
        entries.append(
            {
                "file": file,
                "mask": mask_file,
                **lab.to_dict(),
                "clutter": [c.to_dict() for c in clutter],
            }
        )
        captions.append(
            json.dumps({"file_name": file, "text": f"a <{NAME}> on a {lab.background} background"})
        )
    meta = {
        "concept": NAME,
        "kind": "object",
        "description": "an orange striped cross among three smaller shapes of other colours, on "
        "40x24 canvases; NN.mask.png is the cross",
        "generator": "xti.demo.cluttered.cluttered_concept",
        "seed": SEED,
        "images": entries,
    }
    (out / "labels.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "metadata.jsonl").write_text("\n".join(captions) + "\n")
    return out


if __name__ == "__main__":  # python -m xti.demo.cluttered data/demo-concepts
    import sys

    print(
        f"wrote {write_cluttered_concept(sys.argv[1] if len(sys.argv) > 1 else 'data/demo-concepts')}"
    )
