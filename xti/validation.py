"""Validation samples during training: a stock pipeline built from the training components, the
current vectors loaded through the same `xti.inference.XTIAdapter` users generate with, and a grid
of fixed-seed samples (one row per prompt, plus a style-mixing row).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from xti.inference import XTIAdapter
from xti.pipelines import image_grid

DEFAULT_VALIDATION_PROMPTS = {
    "object": ["a photo of {}", "a {} on a table", "a close-up photo of {}"],
    "style": [
        "a painting in the style of {}",
        "a house in the style of {}",
        "a cat in the style of {}",
    ],
}


@dataclass
class ValidationGrid:
    """Validation samples of one step: the grid, its caption and the row labels."""

    grid: Image.Image
    caption: str
    rows: list[str]


def validation_grid(
    pipe: Any,
    concept: Any,
    placeholder: str,
    prompts: list[str],
    *,
    seeds: list[int],
    negative_prompt: str,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    mix_with: Any | None = None,
    mix_layers: str = "coarse",
    granularity: str = "block",
    min_cell: int = 96,
) -> ValidationGrid:
    """Generate one image per (prompt, seed) with the concept, plus a style-mixing row.

    The grid has one row per prompt (its text drawn on the left) and one column per seed; samples
    smaller than `min_cell` pixels are enlarged by a whole factor (nearest neighbour), so that a
    32-pixel demo model's samples can be looked at.

    Args:
        pipe: a stock Stable Diffusion pipeline built from the training components (no xti
            processors or concept embeddings installed while this runs).
        concept: the current vectors as an `xti.export.EmbeddingFile`.
        placeholder: the concept's placeholder.
        prompts: prompts containing the placeholder.
        seeds: one sample per seed; ``torch.Generator`` per sample, so samples are reproducible.
        mix_with: a second concept's `EmbeddingFile`: adds a row where ``mix_layers`` take this
            concept and the other layers take the second one.
    """
    images, rows = [], []
    with XTIAdapter(pipe, granularity=granularity) as xti:
        xti.load(concept, placeholder)
        other = None
        if mix_with is not None:
            other = "<xti-validation-mix>"
            xti.load(mix_with, other)
            other_name = mix_with.metadata.get("xti.placeholder") or "mix_with"
        plan = [(p, None) for p in prompts]
        if other is not None:
            # later entries win: the other concept everywhere, then this one in mix_layers
            plan.append((prompts[0], {other: "all", placeholder: mix_layers}))
        for prompt, mix in plan:
            rows.append(
                prompt if mix is None else f"{prompt} [{mix_layers}: this, rest: {other_name}]"
            )
            for seed in seeds:
                out = xti(
                    prompt,
                    negative_prompt=negative_prompt,
                    mix=mix,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    height=resolution,
                    width=resolution,
                    output_type="pil",
                )
                images.append(out.images[0])
    caption = " | ".join(f"row {i}: {r}" for i, r in enumerate(rows)) + f" | seeds {seeds}"
    factor = -(-min_cell // min(images[0].size))
    if factor > 1:
        w, h = images[0].size
        images = [im.resize((w * factor, h * factor), Image.NEAREST) for im in images]
    return ValidationGrid(image_grid(images, cols=len(seeds), labels=rows), caption, rows)
