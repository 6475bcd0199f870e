"""Regenerate data/tiny-concept: ``python data/make_tiny_concept.py``.

Four 64x64 images of one made-up object (an orange square with dark diagonal stripes) at different
positions and sizes on plain backgrounds. Small and deterministic, so the tiny config runs anywhere.
"""

from pathlib import Path

import numpy as np
from PIL import Image

BACKGROUNDS = [(250, 250, 250), (40, 40, 60), (180, 220, 250), (230, 230, 180)]


def draw(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 3), np.uint8) + np.array(BACKGROUNDS[seed % 4], np.uint8)
    size = int(rng.integers(28, 44))
    x0, y0 = (int(v) for v in rng.integers(4, 64 - size - 4, size=2))
    yy, xx = np.mgrid[0:size, 0:size]
    stripes = ((xx + yy) // 4) % 2 == 0
    patch = np.where(
        stripes[..., None], np.array([240, 140, 20], np.uint8), np.array([90, 40, 10], np.uint8)
    )
    img[y0 : y0 + size, x0 : x0 + size] = patch
    return Image.fromarray(img)


if __name__ == "__main__":
    folder = Path(__file__).parent / "tiny-concept"
    folder.mkdir(exist_ok=True)
    for i in range(4):
        draw(i).save(folder / f"{i:02d}.png")
    print(f"wrote 4 images to {folder}")
