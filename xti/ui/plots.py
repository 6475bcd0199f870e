"""Small charts drawn with Pillow (no plotting library needed): per-layer bars and a heat map.

Both return PIL images, which the page shows like any picture.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SERIES_COLOURS = ((38, 110, 200), (230, 120, 30), (40, 160, 90))


def _font(size: int = 12) -> Any:
    """Pillow's built-in font at `size` pixels."""
    return ImageFont.load_default(size=size)


def _vertical_text(text: str, font: Any) -> Image.Image:
    """`text` drawn black on white, turned 90° to read bottom-up."""
    w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(text, font=font)) + 4
    img = Image.new("RGB", (w, 16), "white")
    ImageDraw.Draw(img).text((2, 1), text, fill="black", font=font)
    return img.rotate(90, expand=True)


def bar_chart(
    labels: Sequence[str], series: dict[str, Sequence[float]], title: str, bar: int = 26
) -> Image.Image:
    """Bars per label (one colour per series, side by side), with a y axis and a legend."""
    font, small = _font(13), _font(11)
    top = max((max(v) for v in series.values() if len(v)), default=1.0) or 1.0
    left, plot_h, bottom, head = 48, 220, 60, 40
    width = left + len(labels) * bar * max(1, len(series)) + len(labels) * 8 + 20
    img = Image.new("RGB", (max(width, 320), head + plot_h + bottom), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), title, fill="black", font=font)
    y0 = head + plot_h
    for k in range(5):  # y axis ticks
        value = top * k / 4
        y = y0 - int(plot_h * k / 4)
        draw.line((left - 4, y, img.width - 10, y), fill=(225, 225, 225))
        draw.text((4, y - 7), f"{value:.3g}", fill=(80, 80, 80), font=small)
    x = left + 6
    for i, label in enumerate(labels):
        for s, values in enumerate(series.values()):
            h = int(plot_h * float(values[i]) / top)
            draw.rectangle((x, y0 - h, x + bar - 3, y0), fill=SERIES_COLOURS[s % 3])
            x += bar
        img.paste(_vertical_text(label, small), (x - bar * len(series) // 2 - 8, y0 + 4))
        x += 8
    for s, name in enumerate(series):  # legend
        lx = img.width - 150
        draw.rectangle((lx, 10 + 16 * s, lx + 10, 20 + 16 * s), fill=SERIES_COLOURS[s % 3])
        draw.text((lx + 16, 8 + 16 * s), name, fill="black", font=small)
    return img


def _diverging(value: float) -> tuple[int, int, int]:
    """Blue (−1) → white (0) → red (+1)."""
    v = max(-1.0, min(1.0, float(value)))
    if v >= 0:
        return (255, int(255 * (1 - v * 0.85)), int(255 * (1 - v)))
    return (int(255 * (1 + v)), int(255 * (1 + v * 0.6)), 255)


def heatmap(labels: Sequence[str], matrix: np.ndarray, title: str, cell: int = 30) -> Image.Image:
    """A labelled square heat map of values in [−1, 1] (each cell shows its value)."""
    font, small = _font(13), _font(10)
    n = len(labels)
    margin = 56
    head = 28
    img = Image.new("RGB", (margin + n * cell + 70, head + margin + n * cell + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 6), title, fill="black", font=font)
    top = head + margin
    for i, label in enumerate(labels):
        draw.text((4, top + i * cell + cell // 2 - 6), label, fill="black", font=small)
        rotated = _vertical_text(label, small)
        img.paste(rotated, (margin + i * cell + cell // 2 - 8, top - rotated.height - 2))
        for j in range(n):
            value = float(matrix[i, j])
            x, y = margin + j * cell, top + i * cell
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_diverging(value))
            ink = "white" if abs(value) > 0.75 else "black"
            draw.text((x + 3, y + cell // 2 - 6), f"{value:.2f}"[:4], fill=ink, font=small)
    bar_x = margin + n * cell + 16
    for k in range(n * cell):  # colour bar, +1 at the top
        draw.line((bar_x, top + k, bar_x + 12, top + k), fill=_diverging(1 - 2 * k / (n * cell)))
    draw.text((bar_x + 16, top - 6), "+1", fill="black", font=small)
    draw.text((bar_x + 16, top + n * cell // 2 - 6), "0", fill="black", font=small)
    draw.text((bar_x + 16, top + n * cell - 8), "-1", fill="black", font=small)
    return img
