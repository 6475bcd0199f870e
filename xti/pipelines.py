"""Pipelines for generation: loading a stock diffusers pipeline, swapping its scheduler, and
writing the images it makes (grids, PNGs with their parameters).

`xti generate`, the model card's example and validation use these; the per-layer conditioning
itself is `xti.inference`. Which pipeline class a model needs comes from its family
(`xti.families`), read from the folder's ``model_index.json`` by diffusers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from xti.errors import XTIError
from xti.families import of_pipeline
from xti.paths import atomic_write_bytes

PathLike = str | os.PathLike[str]

__all__ = ["SCHEDULER_ALIASES", "image_grid", "load_pipeline", "save_images", "set_scheduler"]


def load_pipeline(
    model: str,
    *,
    device: str | None = None,
    dtype: str | None = None,
    config: str | None = None,
) -> Any:
    """Load a diffusers SD 1.x/2.x or SDXL pipeline from any model path (`xti.models.
    resolve_model_path`: a ``builtin:`` name, a folder, a single checkpoint file or a hub id); the
    class comes from its ``model_index.json`` (for a single file: its config's, see
    `xti.models.single_file_pipeline`).

    Args:
        model: ``builtin:tiny-sd1``, ``builtin:tiny-sdxl``, a local diffusers folder, a single
            ``.safetensors`` checkpoint, or a hub id (cached when offline).
        device: ``cpu``, ``cuda``, ``cuda:1``...; default cuda when available.
        dtype: ``fp32``, ``fp16`` or ``bf16``; default fp16 on cuda, fp32 on cpu.
        config: for a single file, its ``model.single_file_config`` (a diffusers folder of the
            same model type, or a hub id); needed offline.
    """
    from diffusers import DiffusionPipeline

    from xti.config import ModelConfig
    from xti.models import resolve_model_path, single_file_pipeline

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    name = dtype or ("fp16" if dev.startswith("cuda") else "fp32")
    if name not in dtypes:
        raise XTIError(f"dtype {name!r}: use fp32, fp16 or bf16")
    where = resolve_model_path(model)
    path = where.shown
    if where.kind == "file":
        cfg = ModelConfig(path=path, single_file_config=config)
        pipe, _ = single_file_pipeline(Path(where.location), cfg, path)
    elif where.kind == "folder" and not (Path(where.location) / "model_index.json").is_file():
        raise XTIError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
    try:
        if where.kind == "file":  # converted in fp32; casting fp32 to fp32 makes diffusers warn
            pipe = pipe.to(dev) if name == "fp32" else pipe.to(dev, dtypes[name])
        else:
            pipe = DiffusionPipeline.from_pretrained(where.location, dtype=dtypes[name]).to(dev)
    except XTIError:
        raise
    except Exception as err:  # any loader failure becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise XTIError(
            f"{path}: cannot load the pipeline ({type(err).__name__}: {first})"
        ) from None
    of_pipeline(pipe)  # one line when a component is missing
    return pipe


SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "dpmpp": "DPMSolverMultistepScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "deis": "DEISMultistepScheduler",
}
"""Short scheduler names for ``--scheduler`` (any diffusers scheduler class name works too)."""


def set_scheduler(pipe: Any, name: str) -> None:
    """Swap ``pipe.scheduler`` for another diffusers scheduler built from the same config."""
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not cls_name.endswith("Scheduler"):
        known = ", ".join(sorted(SCHEDULER_ALIASES))
        raise XTIError(f"unknown scheduler {name!r}: use {known} or a diffusers class name")
    try:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    except Exception as err:  # e.g. a scheduler whose optional dependency is missing
        raise XTIError(f"scheduler {name}: {type(err).__name__}: {err}") from None


def image_grid(
    images: Sequence[Any], cols: int | None = None, labels: Sequence[str] | None = None
) -> Any:
    """Paste PIL images into one grid image, row by row.

    Args:
        images: the images; each is resized to the first one's size.
        cols: images per row (default: about the square root of their number).
        labels: one text per row, drawn in a margin on the left.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise XTIError("no images for a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    pad = 0
    if labels:
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        pad = int(max(measure.textlength(s) for s in labels)) + 12
    grid = Image.new("RGB", (pad + cols * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), (pad + (i % cols) * w, (i // cols) * h))
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(labels or []):
        draw.text((4, r * h + 2), text, fill="black")
    return grid


def save_images(
    images: Sequence[Any],
    out_dir: PathLike,
    prefix: str,
    *,
    params: Mapping[str, Any] | None = None,
    grid: bool = False,
) -> list[Path]:
    """Write PIL images as ``<prefix>-<i>.png`` (and ``<prefix>-grid.png``), each atomically, with
    ``params`` as JSON in the PNG text chunk ``xti``. Returns the paths written."""
    from io import BytesIO

    from PIL.PngImagePlugin import PngInfo

    folder = Path(out_dir)
    written: list[Path] = []

    def save(img: Any, name: str, extra: Mapping[str, Any]) -> None:
        info = PngInfo()
        info.add_text("xti", json.dumps({**(params or {}), **extra}))
        buf = BytesIO()
        img.save(buf, format="PNG", pnginfo=info)
        atomic_write_bytes(folder / name, buf.getvalue())
        written.append(folder / name)

    for i, img in enumerate(images):
        save(img, f"{prefix}-{i:02d}.png", {"index": i})
    if grid:
        save(image_grid(images), f"{prefix}-grid.png", {"grid": len(images)})
    return written
