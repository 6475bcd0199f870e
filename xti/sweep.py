"""Layer sweep: what each layer of a concept carries, as one grid of images.

A sweep generates the same prompt and seeds once per *row*; each row injects the concept into a
set of layers only. The other layers see the same prompt with the placeholder replaced by a
neutral word: by default the concept's initializer (``xti.initializer`` in the file's metadata,
the word its vectors started from), else nothing (the placeholder is removed). So a row shows what
the learned vectors of its layers add over the word they started from. This is done with per-layer
prompts (`xti.inference.XTIAdapter` ``layer_prompts``): the selected layers keep the prompt as
written, the others get the neutral prompt.

Row sets (``kind``), each starting with a ``none`` row (the neutral prompt in every layer):

* ``growing``: the first layer, the first two, ... up to all layers (forward order);
* ``sliding`` (``single`` is window 1): a window of ``window`` consecutive layers moved one layer at
  a time, then an ``all`` row;
* ``levels``: each resolution level alone (all layers whose feature maps have that size, down and
  up side together), finest first, then an ``all`` row.

Every image is one pipeline call with ``num_images_per_prompt=1`` and
``torch.Generator(device=pipe._execution_device).manual_seed(seed)``, as ``xti generate --seed S``
makes it, so the ``all`` row is pixel-equal to plain generation with the concept (``xti generate
--prompt P --seed S``), and the ``none`` row to generation with the neutral prompt.
``xti sweep FILE --model M`` writes the grid as one PNG (`save_sweep`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from xti.errors import XTIError
from xti.layers import LayerScheme

__all__ = [
    "SWEEP_KINDS",
    "SweepResult",
    "SweepRow",
    "neutral_prompt",
    "run_sweep",
    "save_sweep",
    "selection_text",
    "sweep_grid",
    "sweep_selections",
]

SWEEP_KINDS = ("growing", "sliding", "single", "levels")
"""Row sets of a sweep (``single`` is ``sliding`` with a window of one layer)."""


@dataclass
class SweepRow:
    """One row of a sweep: its label, the layers that take the concept, one image per seed."""

    label: str
    layers: list[str]
    images: list[Any] = field(default_factory=list)


@dataclass
class SweepResult:
    """A finished sweep: the rows (in order) and the settings that made them."""

    placeholder: str
    prompt: str
    neutral_prompt: str
    kind: str
    seeds: list[int]
    rows: list[SweepRow]

    def grid(self) -> Any:
        """The rows as one labelled grid image (`sweep_grid`)."""
        return sweep_grid(self.rows)


def selection_text(indices: Sequence[int], scheme: LayerScheme) -> str:
    """Layer indices as a selection string of forward-order ranges (``IN04-OUT08``,
    ``IN01-IN02,OUT09-OUT11``) that `LayerScheme.select` reads back to the same layers."""
    chosen = sorted(set(indices))
    if not chosen:
        return ""
    names = scheme.names
    parts: list[str] = []
    start = prev = chosen[0]
    for i in [*chosen[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(names[start] if start == prev else f"{names[start]}-{names[prev]}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _level_label(scheme: LayerScheme, level: int, latent_size: tuple[int, int] | None) -> str:
    """``16x16`` (the feature-map size of a level, when the latent size is known) or ``level N``."""
    if latent_size is None:
        return f"level {level}"
    h, w = latent_size
    return f"{max(1, w >> level)}x{max(1, h >> level)}"


def sweep_selections(
    scheme: LayerScheme,
    kind: str,
    *,
    window: int = 1,
    latent_size: tuple[int, int] | None = None,
) -> list[tuple[str, list[int]]]:
    """The rows of a sweep as ``(label, layer indices)``, starting with ``("none", [])``.

    Args:
        scheme: the model's layer scheme.
        kind: ``growing``, ``sliding``, ``single`` or ``levels`` (see the module docstring).
        window: layers per row of a ``sliding`` sweep.
        latent_size: ``(height, width)`` of the latents, to label levels by feature-map size.
    """
    n = len(scheme)
    everything = list(range(n))
    rows: list[tuple[str, list[int]]] = [("none", [])]
    if kind == "growing":
        for k in range(1, n + 1):
            label = selection_text(range(k), scheme)
            rows.append((f"all ({label})" if k == n else label, list(range(k))))
        return rows
    if kind in ("sliding", "single"):
        width = 1 if kind == "single" else window
        if not 1 <= width <= n:
            raise XTIError(
                f"sweep window must be between 1 and {n} (the model's layers), got {width}"
            )
        for i in range(n - width + 1):
            chosen = list(range(i, i + width))
            rows.append((selection_text(chosen, scheme), chosen))
    elif kind == "levels":
        for level in sorted({layer.level for layer in scheme.layers}):
            chosen = [i for i, layer in enumerate(scheme.layers) if layer.level == level]
            label = f"{_level_label(scheme, level, latent_size)}: {selection_text(chosen, scheme)}"
            rows.append((label, chosen))
    else:
        raise XTIError(f"unknown sweep kind {kind!r}: use {', '.join(SWEEP_KINDS)}")
    if rows[-1][1] != everything:
        rows.append(("all", everything))
    return rows


def neutral_prompt(prompt: str, placeholder: str, word: str) -> str:
    """`prompt` with every `placeholder` replaced by `word` (removed when `word` is empty), spaces
    tidied."""
    text = re.sub(re.escape(placeholder), word.strip(), prompt)
    return re.sub(r"\s+", " ", text).strip()


def _neutral_word(adapter: Any, placeholder: str, neutral: str | None) -> str:
    """The word that replaces the placeholder outside the selected layers (see module docstring)."""
    if neutral is not None:
        return neutral
    return adapter.concepts[placeholder].metadata.get("xti.initializer", "")


def _latent_size(pipe: Any, height: int | None, width: int | None) -> tuple[int, int] | None:
    """The latent ``(height, width)`` of a generation (the pipeline's default size when None)."""
    factor = getattr(pipe, "vae_scale_factor", None)
    sample = getattr(getattr(pipe.unet, "config", None), "sample_size", None)
    if not factor:
        return None
    h = height // factor if height else sample
    w = width // factor if width else sample
    if isinstance(h, int) and isinstance(w, int):
        return h, w
    return None


def run_sweep(
    adapter: Any,
    placeholder: str,
    prompt: str,
    *,
    kind: str = "growing",
    seeds: Sequence[int] = (0,),
    window: int = 1,
    neutral: str | None = None,
    negative_prompt: str | None = None,
    num_inference_steps: int = 30,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepResult:
    """Generate a layer sweep of one loaded concept.

    Args:
        adapter: an `xti.inference.XTIAdapter` with the concept loaded.
        placeholder: the concept's placeholder; `prompt` must contain it.
        prompt: the prompt of every row.
        kind, window: the row set (`sweep_selections`).
        seeds: one image per seed in each row (the grid's columns).
        neutral: the word for the placeholder outside the selected layers (default: the
            concept's initializer, else nothing).
        negative_prompt, num_inference_steps, guidance_scale, height, width: as for the adapter.
        progress: called with (images done, images in all) after each image.
    """
    import torch

    if placeholder not in adapter.concepts:
        loaded = ", ".join(adapter.concepts) or "none"
        raise XTIError(f"sweep: {placeholder!r} is not a loaded concept (loaded: {loaded})")
    if placeholder not in prompt:
        raise XTIError(f"sweep: the prompt {prompt!r} does not contain {placeholder}")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise XTIError("sweep: give at least one seed")
    scheme = adapter.scheme
    selections = sweep_selections(
        scheme, kind, window=window, latent_size=_latent_size(adapter.pipe, height, width)
    )
    plain = neutral_prompt(prompt, placeholder, _neutral_word(adapter, placeholder, neutral))
    device = adapter.pipe._execution_device
    rows: list[SweepRow] = []
    total, done = len(selections) * len(seeds), 0
    for label, chosen in selections:
        row = SweepRow(label, [scheme.names[i] for i in chosen])
        others = [i for i in range(len(scheme)) if i not in chosen]
        for seed in seeds:
            text, layer_prompts = prompt, None
            if not chosen:
                text = plain
            elif others:
                layer_prompts = {selection_text(others, scheme): plain}
            out = adapter(
                text,
                layer_prompts=layer_prompts,
                negative_prompt=negative_prompt,
                num_images_per_prompt=1,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                height=height,
                width=width,
                generator=torch.Generator(device=device).manual_seed(seed),
            )
            row.images.append(out.images[0])
            done += 1
            if progress is not None:
                progress(done, total)
        rows.append(row)
    return SweepResult(placeholder, prompt, plain, kind, seeds, rows)


def sweep_grid(rows: Sequence[SweepRow], min_cell: int = 96) -> Any:
    """One grid image: a row per sweep row (its label on the left), a column per seed. Images
    smaller than `min_cell` pixels are enlarged by a whole factor (nearest neighbour) so that
    small models' images and the labels stay readable."""
    from PIL import Image

    from xti.pipelines import image_grid

    if not rows or not rows[0].images:
        raise XTIError("sweep: no images for a grid")
    w, h = rows[0].images[0].size
    factor = max(1, -(-min_cell // min(w, h)))
    images = [
        img.resize((w * factor, h * factor), Image.NEAREST) if factor > 1 else img
        for row in rows
        for img in row.images
    ]
    return image_grid(images, cols=len(rows[0].images), labels=[row.label for row in rows])


def save_sweep(result: SweepResult, path: str | Path, params: dict[str, Any] | None = None) -> Path:
    """Write the sweep grid as a PNG (atomically), with the settings and row labels as JSON in the
    PNG text chunk ``xti``. Returns the path."""
    from PIL.PngImagePlugin import PngInfo

    from xti.paths import atomic_write_bytes

    info = PngInfo()
    meta = {
        **(params or {}),
        "placeholder": result.placeholder,
        "prompt": result.prompt,
        "neutral_prompt": result.neutral_prompt,
        "kind": result.kind,
        "seeds": result.seeds,
        "rows": [{"label": r.label, "layers": r.layers} for r in result.rows],
    }
    info.add_text("xti", json.dumps(meta))
    buf = BytesIO()
    result.grid().save(buf, format="PNG", pnginfo=info)
    target = Path(path)
    atomic_write_bytes(target, buf.getvalue())
    return target
