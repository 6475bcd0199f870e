"""Loss masks (`data.masks`): where each image's mask comes from, its checks, and the masked loss.

A mask says which pixels are the concept: white (1) counts fully, black (0) counts
`data.mask_floor` (default 0.1), grey in between. At 0 the background's errors do not count at all,
and nothing holds the subject's outline: on the demo's cluttered cross the masked vectors drew the
cross too large and, on dark backgrounds, often not as a cross; 0.1 kept more of the shape and kept
the clutter's colours out as well as 0 did (README, ``bench/quality.py --masks``). Per image, the first of:

1. the ``mask`` column of ``metadata.jsonl`` (a file path relative to `data.dir`);
2. a ``<stem>.mask.png`` beside the image (such files are then not training images themselves);
3. the image's own alpha channel (RGBA, LA, PA or a palette/RGB transparency): opaque = subject.

An image without any of them counts everywhere (weight 1), with one warning for the lot; a run where
no image has a mask is an error. A mask must have its image's size, and must not be empty (all
black): both are one-line errors naming the file. Masks are read from `data.dir` only.

Masks follow every resize, crop and flip of their image (`xti.buckets.augment_to_bucket`); at
latent resolution each weight is the *area* mean of the mask over the latent pixel's
``factor × factor`` pixels (`latent_weights`), then ``floor + (1 − floor) · mask``. The loss
(`masked_mse`) is, per sample, ``Σ w·(pred − target)² / Σ w``: the mean squared error over the
weighted pixels, so that a small subject trains as strongly as a large one.

A mask is not a crop: the UNet still sees the whole (noised) image, background included; the mask
only decides which pixels' errors the loss counts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from xti.config import DataConfig
from xti.data import MASK_SUFFIX, METADATA_FILE, ImageRecord
from xti.errors import XTIError

logger = logging.getLogger(__name__)

MASK_COLUMN = "mask"
"""The ``metadata.jsonl`` key naming an image's mask file."""

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_mask_column(folder: Path) -> dict[str, str]:
    """``file_name -> mask path`` for the ``metadata.jsonl`` lines that have a ``mask`` key (the
    file's other errors are `xti.data`'s, which reads it first)."""
    path = folder / METADATA_FILE
    if not path.is_file():
        return {}
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line) if line.strip() else None
        if isinstance(entry, dict) and isinstance(entry.get(MASK_COLUMN), str):
            name = Path(entry["file_name"]).as_posix().removeprefix("./")
            out[name] = entry[MASK_COLUMN]
    return out


def mask_array(img: Image.Image) -> np.ndarray:
    """A mask image as ``[H, W]`` float32 in [0, 1] (its luminance; EXIF orientation applied)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I", "I;16", "F") or img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.float64)
        peak = (
            1.0 if img.mode == "F" and arr.max() <= 1.0 else (65535.0 if arr.max() > 255 else 255.0)
        )
        return np.clip(arr / peak, 0.0, 1.0).astype(np.float32)
    return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def alpha_mask(path: Path) -> np.ndarray | None:
    """The image's alpha channel as a mask, or None when it has none."""
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode not in _ALPHA_MODES and "transparency" not in im.info:
            return None
        return np.asarray(im.convert("RGBA").getchannel("A"), dtype=np.float32) / 255.0


def load_mask_file(path: Path, image: str, size: tuple[int, int]) -> np.ndarray:
    """Read and check the mask file of `image` (whose ``(width, height)`` is `size`)."""
    try:
        with Image.open(path) as im:
            im.load()
            mask = mask_array(im)
    except FileNotFoundError:
        raise XTIError(f"{path}: the mask of {image} does not exist: fix the path") from None
    except Exception as err:
        raise XTIError(
            f"{path}: cannot read the mask of {image} ({err}): re-save it as PNG"
        ) from None
    return check_mask(mask, str(path), image, size)


def check_mask(mask: np.ndarray, where: str, image: str, size: tuple[int, int]) -> np.ndarray:
    """The mask, or a one-line error naming `where` when its size is not the image's or it is empty."""
    h, w = mask.shape
    if (w, h) != size:
        raise XTIError(
            f"{where}: the mask is {w}x{h} but its image {image} is {size[0]}x{size[1]}: "
            "save the mask at the image's size"
        )
    if float(mask.max()) < 0.5 / 255:
        raise XTIError(
            f"{where}: the mask is empty (all black), so {image} would not train at all: paint the "
            "subject white, or remove the mask"
        )
    return mask


def find_mask(path: Path, record: ImageRecord, column: dict[str, str]) -> np.ndarray | None:
    """The mask of the image file `path` (module docstring: column, ``.mask.png``, alpha)."""
    size = record.image.size
    if path.name in column:
        return load_mask_file(path.parent / column[path.name], record.source, size)
    beside = path.with_name(path.stem + MASK_SUFFIX)
    if beside.is_file():
        return load_mask_file(beside, record.source, size)
    alpha = alpha_mask(path)
    if alpha is None:
        return None
    return check_mask(alpha, f"{path} (alpha channel)", record.source, size)


def attach_masks(records: Sequence[ImageRecord], cfg: DataConfig) -> None:
    """Give every record its mask (`ImageRecord.mask`); errors for bad masks or none at all."""
    if not cfg.dir:
        raise XTIError(
            "data.masks=true reads masks beside the images of data.dir: use data.dir (not "
            "data.dataset), or set data.masks=false"
        )
    folder = Path(cfg.dir).expanduser()
    column = read_mask_column(folder)
    images = {Path(r.source).resolve() for r in records}
    for name, mask in column.items():
        if (folder / mask).resolve() in images:
            raise XTIError(
                f"{folder / METADATA_FILE}: the mask of {name}, {mask}, is itself a training image "
                f"in data.dir: move it to a subfolder or name it {Path(name).stem}{MASK_SUFFIX}"
            )
    missing = []
    for rec in records:
        rec.mask = find_mask(Path(rec.source), rec, column)
        if rec.mask is None:
            missing.append(Path(rec.source).name)
    if len(missing) == len(records):
        raise XTIError(
            f"data.masks=true but no image in {folder} has a mask: add <stem>{MASK_SUFFIX} files, "
            f"a '{MASK_COLUMN}' column in {METADATA_FILE} or an alpha channel, or set data.masks=false"
        )
    if missing:
        logger.warning(
            "%d of %d images have no mask and count everywhere: %s",
            len(missing), len(records), ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
        )  # fmt: skip


def latent_weights(mask: torch.Tensor, factor: int, floor: float) -> torch.Tensor:
    """Per-latent-pixel loss weights ``[K, 1, h, w]`` of pixel masks ``[K, 1, H, W]``: the area
    mean over each ``factor × factor`` cell, then ``floor + (1 − floor) · m``."""
    area = F.avg_pool2d(mask.float(), kernel_size=factor, stride=factor)
    return floor + (1.0 - floor) * area


def masked_mse(
    pred: torch.Tensor,
    target: torch.Tensor,
    loss_weight: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per sample ``Σ w·(pred − target)² / Σ w`` in fp32 (w broadcast over channels), optionally
    times per-sample `weights` (min-SNR), then the mean over the batch."""
    w = loss_weight.float().expand_as(pred)
    err = (pred.float() - target.float()).pow(2)
    per_sample = (err * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp(min=1e-8)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()
