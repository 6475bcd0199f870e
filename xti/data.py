"""Training images: loading, captions and prompts, augmentation, and the cached VAE latents.

This module owns the image side of a training step (DESIGN §3.1):

1. `load_images` reads the concept images once, from a folder (`data.dir`, with captions from
   ``metadata.jsonl`` or ``<stem>.txt``) or from a `datasets` dataset (`data.dataset`), and turns
   every image into 8-bit RGB whatever its mode (grayscale, palette, alpha, CMYK, 16-bit).
2. `check_captions` / `prompts_per_image` give the prompts of each image: its caption, or the object
   / style templates filled with the placeholder; `check_prompt_lengths` makes sure the placeholder
   is not cut off by the text encoder's 77 tokens.
3. `augment` resizes and crops each image with PIL into a fixed set of distinct augmentations (crops,
   each unflipped and flipped), and `encode_latents` runs the VAE encoder once per augmentation and
   keeps the latent *distribution* (mean, std) in a `LatentCache` (`xti.latent_cache` keeps these
   on disk across runs, so a re-run on the same images does not call the VAE).
4. Every step, `pick_augmentations` chooses one augmentation per image and `LatentCache.sample`
   draws latents from its distribution; both use only the generator they are given, so a resumed
   run replays the same data.

Aspect-ratio buckets and loss masks (`data.buckets`, `data.masks`) build on these types:
`xti.buckets` resizes and crops to each image's bucket (masks alongside) and keeps a `LatentCache`
per bucket, `xti.masks` reads the masks into `ImageRecord.mask`.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from xti.config import DataConfig
from xti.errors import XTIError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
METADATA_FILE = "metadata.jsonl"
MASK_SUFFIX = ".mask.png"  # `<stem>.mask.png`: the mask of `<stem>.<ext>` (with data.masks)

# Prompt templates used for images without a caption; "{}" is replaced by the placeholder.
OBJECT_TEMPLATES: list[str] = [
    "a photograph of a {}",
    "a close-up shot of the {}",
    "a {} sitting on a wooden table",
    "a blurry snapshot of a {}",
    "a well-lit studio photo of the {}",
    "an image showing a {}",
    "the {} seen from the side",
    "a {} in soft natural light",
    "a picture of my {}",
    "a cropped photo of the {}",
    "a high-resolution photo of a {}",
    "a {} placed in the middle of the frame",
    "a dim photo of the {}",
    "a {} photographed outdoors",
    "a detailed image of one {}",
    "a small {} on a plain background",
]

STYLE_TEMPLATES: list[str] = [
    "a painting in the style of {}",
    "an illustration done in {} style",
    "a landscape rendered in the style of {}",
    "a portrait in the manner of {}",
    "artwork in the style of {}",
    "a city street drawn in {} style",
    "a still life in the style of {}",
    "a quick sketch in the style of {}",
    "a large canvas painted in the style of {}",
    "a poster designed in the style of {}",
    "an animal depicted in the style of {}",
    "a building pictured in {} style",
    "a dreamy scene in the style of {}",
    "a detailed picture in the style of {}",
    "a simple drawing in the style of {}",
]

_TEMPLATES: dict[str, list[str]] = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """One training image.

    `source` names where it came from (a file path, or ``<dataset>[i]``) for messages; `image` is
    8-bit RGB at its original size; `caption` is None when the image has no caption.
    """

    source: str
    image: Image.Image
    caption: str | None
    mask: np.ndarray | None = None  # [H, W] float32 in [0, 1] (`xti.masks`, with data.masks)


def _composite_on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _high_bit_depth_to_rgb(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit (no clipping of 16-bit)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if peak <= 1.0 else 1.0
    elif img.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:  # "I": 16-bit data in a 32-bit container, unless values say otherwise
        peak = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / 65535.0 if peak <= 65535 else 255.0 / (2**31 - 1)
    out = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(out).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy of `img`: alpha composited on white, 16-bit scaled to 0..255.

    EXIF orientation is applied, and multi-frame images (GIF, TIFF) keep their first frame.
    """
    with contextlib.suppress(Exception):  # broken EXIF must not make a readable image unusable
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        "transparency" in img.info and mode in ("P", "L", "RGB", "1")
    ):
        return _composite_on_white(img)
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(img)
    if mode == "1":
        return img.convert("L").convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, ...


def _open_image(opener: Any) -> Image.Image:
    """Open and fully decode an image (path or file object) into RGB; raises on any failure."""
    with Image.open(opener) as im:
        im.load()
        return to_rgb(im)


def _unreadable(source: str, err: BaseException, on_corrupt: str) -> None:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if on_corrupt == "skip":
        logger.warning("skipping unreadable image %s (%s)", source, reason)
        return
    raise XTIError(
        f"cannot read image {source} ({reason}): fix or remove it, "
        "or set data.on_corrupt=skip to skip unreadable images"
    )


def _read_metadata(folder: Path, caption_key: str) -> dict[str, str | None]:
    """Parse ``metadata.jsonl``: file name -> caption (None when empty or missing)."""
    path = folder / METADATA_FILE
    captions: dict[str, str | None] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise XTIError(f"cannot read {path}: {err}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise XTIError(
                f"{path} line {lineno}: not valid JSON ({err.msg}); each line must look like "
                '{"file_name": "img.png", "text": "a photo of <concept>"}'
            ) from None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise XTIError(
                f'{path} line {lineno}: expected an object with a "file_name" string, e.g. '
                '{"file_name": "img.png", "text": "a photo of <concept>"}'
            )
        name = Path(entry["file_name"]).as_posix()
        if name.startswith("./"):
            name = name[2:]
        if name in captions:
            raise XTIError(f"{path} line {lineno}: file_name {name!r} appears twice")
        key = caption_key if caption_key in entry else "text"
        captions[name] = _clean_caption(entry.get(key))
    return captions


def _clean_caption(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _load_dir(cfg: DataConfig) -> list[ImageRecord]:
    folder = Path(cfg.dir).expanduser()  # type: ignore[arg-type]
    if not folder.exists():
        raise XTIError(f"data.dir {folder} does not exist: point data.dir at a folder of images")
    if not folder.is_dir():
        raise XTIError(f"data.dir {folder} is not a folder: point data.dir at a folder of images")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not (cfg.masks and p.name.lower().endswith(MASK_SUFFIX))
    )
    if not files:
        exts = ", ".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
        raise XTIError(f"data.dir {folder} contains no images ({exts}): add some images to it")

    if not cfg.masks and any(p.name.lower().endswith(MASK_SUFFIX) for p in files):
        logger.warning(
            "%s holds *%s files, read as training images: set data.masks=true to use them as "
            "masks", folder, MASK_SUFFIX,
        )  # fmt: skip
    metadata: dict[str, str | None] | None = None
    if (folder / METADATA_FILE).is_file():
        metadata = _read_metadata(folder, cfg.caption_column)
        unknown = sorted(set(metadata) - {p.name for p in files})
        for name in unknown:
            logger.warning(
                "%s lists %r, which is not an image in %s; ignored", METADATA_FILE, name, folder
            )

    records: list[ImageRecord] = []
    for path in files:
        try:
            image = _open_image(path)
        except Exception as err:
            _unreadable(str(path), err, cfg.on_corrupt)
            continue
        caption: str | None = None
        if metadata is not None and path.name in metadata:
            caption = metadata[path.name]
        else:
            txt = path.with_suffix(".txt")
            if txt.is_file():
                try:
                    caption = _clean_caption(txt.read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError) as err:
                    raise XTIError(
                        f"cannot read caption file {txt} ({err}): save it as UTF-8 text"
                    ) from None
        records.append(ImageRecord(source=str(path), image=image, caption=caption))
    if not records:
        raise XTIError(
            f"no readable images in data.dir {folder}: every image was unreadable and skipped"
        )
    return records


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _load_dataset_object(cfg: DataConfig) -> tuple[Any, Path | None]:
    import datasets  # imported lazily: it is slow and only needed for data.dataset

    name = cfg.dataset
    assert name is not None
    local = Path(name).expanduser()
    split = cfg.dataset_split
    if local.is_dir() and _is_saved_dataset(local):
        try:
            ds = datasets.load_from_disk(str(local))
        except Exception as err:
            raise XTIError(f"cannot load the saved dataset {local}: {_first_line(err)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise XTIError(
                    f"dataset {local} has no split {split!r} (splits: {', '.join(ds)}): "
                    "set data.dataset_split"
                )
            ds = ds[split]
        return ds, local
    try:
        ds = datasets.load_dataset(str(local) if local.is_dir() else name, split=split)
    except Exception as err:
        where = "local folder" if local.is_dir() else "dataset (not a local folder; tried the hub)"
        raise XTIError(
            f"cannot load {where} {name!r}, split {split!r}: {_first_line(err)}"
        ) from None
    return ds, (local if local.is_dir() else None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_dataset(cfg: DataConfig) -> list[ImageRecord]:
    import datasets

    ds, root = _load_dataset_object(cfg)
    name = cfg.dataset
    columns = list(ds.column_names)
    if cfg.image_column not in columns:
        raise XTIError(
            f"dataset {name!r} has no image column {cfg.image_column!r} (columns: "
            f"{', '.join(columns)}): set data.image_column"
        )
    has_captions = cfg.caption_column in columns
    if not has_captions:
        logger.info(
            "dataset %r has no caption column %r; prompt templates are used",
            name,
            cfg.caption_column,
        )
    keep = [cfg.image_column] + ([cfg.caption_column] if has_captions else [])
    ds = ds.select_columns(keep)
    # Decode the images ourselves, so that one corrupt image is reported (or skipped) by index.
    if isinstance(ds.features[cfg.image_column], datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    if len(ds) == 0:
        raise XTIError(f"dataset {name!r} split {cfg.dataset_split!r} is empty: add images to it")

    records: list[ImageRecord] = []
    for i, row in enumerate(ds):
        value = row[cfg.image_column]
        source = f"{name}[{i}]"
        try:
            image, file_path = _decode_dataset_image(value, root)
            if file_path:
                source = f"{name}[{i}] ({file_path})"
        except Exception as err:
            _unreadable(source, err, cfg.on_corrupt)
            continue
        caption = _clean_caption(row[cfg.caption_column]) if has_captions else None
        records.append(ImageRecord(source=source, image=image, caption=caption))
    if not records:
        raise XTIError(
            f"no readable images in dataset {name!r}: every image was unreadable and skipped"
        )
    return records


def _decode_dataset_image(value: Any, root: Path | None) -> tuple[Image.Image, str | None]:
    """Decode one value of an image column: encoded dict, PIL image, path string or bytes."""
    if isinstance(value, Image.Image):
        value.load()
        return to_rgb(value), None
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _open_image(io.BytesIO(data)), path
        if path:
            return _open_image(path), path
        raise ValueError("empty image value")
    if isinstance(value, (bytes, bytearray)):
        return _open_image(io.BytesIO(value)), None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute() and root is not None:
            path = root / path
        return _open_image(path), str(path)
    if value is None:
        raise ValueError("missing image")
    raise ValueError(f"unsupported image value of type {type(value).__name__}")


def load_images(cfg: DataConfig) -> list[ImageRecord]:
    """Load every training image of `cfg` as 8-bit RGB, with its caption (or None).

    Reads `cfg.dir` (sorted image files, hidden files ignored) or `cfg.dataset` (a saved dataset, an
    imagefolder or a hub id). Unreadable images fail the run unless ``on_corrupt="skip"``.
    """
    if cfg.dir and cfg.dataset:
        raise XTIError(
            f"both data.dir ({cfg.dir}) and data.dataset ({cfg.dataset}) are set: keep only one"
        )
    if cfg.dir:
        records = _load_dir(cfg)
    elif cfg.dataset:
        records = _load_dataset(cfg)
    else:
        raise XTIError(
            "no training images: set data.dir=<folder of images> or data.dataset=<dataset folder or hub id>"
        )
    n_captions = sum(r.caption is not None for r in records)
    logger.info("loaded %d images (%d with captions)", len(records), n_captions)
    return records


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


def check_captions(records: Sequence[ImageRecord], placeholder: str) -> None:
    """Fail when a caption does not mention the placeholder (its vectors would never be used)."""
    for rec in records:
        if rec.caption is not None and placeholder not in rec.caption:
            raise XTIError(
                f"the caption of {rec.source} ({rec.caption!r}) does not contain the placeholder "
                f"{placeholder!r}: write it where the concept appears (e.g. 'a photo of "
                f"{placeholder}'), or remove the caption to use the prompt templates"
            )


def check_prompt_lengths(tokenizer: Any, tokens: Any, prompts: Sequence[tuple[str, str]]) -> None:
    """Check that each ``(where, prompt)`` fits the tokenizer's length with the placeholder expanded.

    CLIP reads ``model_max_length`` tokens (77) including start and end, so 75 prompt tokens. A
    placeholder token past that is cut and its vectors would never train: `XTIError` naming
    `where` (a caption's image file, ``data.template=…``, ``validation.prompts``). When only other
    words are cut, a warning naming `where` (once per place).

    Args:
        tokenizer: the tokenizer, with the placeholder tokens added.
        tokens: the `xti.embeddings.PlaceholderTokens` of the concept.
        prompts: ``(where, prompt)`` pairs.
    """
    room = int(tokenizer.model_max_length) - 2
    ids_of_placeholder = set(range(tokens.first_id, tokens.first_id + tokens.n_vectors))
    warned: set[str] = set()
    for where, prompt in prompts:
        ids = tokenizer(tokens.expand(prompt), add_special_tokens=False, verbose=False).input_ids
        if len(ids) <= room:
            continue
        if any(t in ids_of_placeholder for t in ids[room:]):
            others = sum(t not in ids_of_placeholder for t in ids)
            fit = room - others
            hint = (
                f"use concept.n_vectors<={fit} or shorten the prompt"
                if fit >= 1
                else "shorten the prompt"
            )
            raise XTIError(
                f"{where}: the prompt {prompt!r} is {len(ids)} tokens with {tokens.placeholder} "
                f"expanded to concept.n_vectors={tokens.n_vectors}, but the text encoder reads "
                f"{room}: the placeholder would be cut off and its vectors never trained; {hint}"
            )
        if where not in warned:
            warned.add(where)
            logger.warning(
                "%s: the prompt %r is %d tokens; the text encoder reads %d, the words after that are "
                "ignored",
                where, prompt, len(ids), room,
            )  # fmt: skip


def prompts_per_image(
    records: Sequence[ImageRecord], placeholder: str, template: str
) -> list[list[str]]:
    """Prompts of each image: ``[caption]`` when it has one, else every template of `template`."""
    if template not in _TEMPLATES:
        raise XTIError(f"unknown data.template {template!r}: use one of {', '.join(_TEMPLATES)}")
    filled = [t.replace("{}", placeholder) for t in _TEMPLATES[template]]
    return [[rec.caption] if rec.caption is not None else list(filled) for rec in records]


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


@dataclass
class Augmentations:
    """The distinct augmentations of all images, in record order, each crop unflipped then flipped.

    `pixels` [K, 3, R, R] float32 in [-1, 1]; `image_index` [K] long (record of each augmentation);
    `flipped` [K] bool; `crop_top_left` [K, 2] long (top, left of the crop in the resized image);
    `original_size` [K, 2] long (height, width of the original image); `mask` [K, 1, H, W] float
    in [0, 1], cropped and flipped with the pixels, when the images have masks (`xti.buckets`).
    """

    pixels: torch.Tensor
    image_index: torch.Tensor
    flipped: torch.Tensor | None = None
    crop_top_left: torch.Tensor | None = None
    original_size: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        k = self.pixels.shape[0]
        if self.flipped is None:
            self.flipped = torch.zeros(k, dtype=torch.bool)
        if self.crop_top_left is None:
            self.crop_top_left = torch.zeros(k, 2, dtype=torch.long)
        if self.original_size is None:
            self.original_size = torch.full((k, 2), self.pixels.shape[-1], dtype=torch.long)

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


def _resize_short_side(image: Image.Image, resolution: int, source: str) -> Image.Image:
    w, h = image.size
    short = min(w, h)
    if short == resolution:
        return image
    if short < resolution:
        logger.warning(
            "%s is %dx%d, smaller than the training resolution %d: upscaling it (expect blur; "
            "use a larger image or a lower train.resolution)",
            source,
            w,
            h,
            resolution,
        )
    scale = resolution / short
    new_w = resolution if w == short else max(resolution, round(w * scale))
    new_h = resolution if h == short else max(resolution, round(h * scale))
    method = Image.Resampling.LANCZOS if short > resolution else Image.Resampling.BICUBIC
    return image.resize((new_w, new_h), method)


def _crop_offsets(
    width: int,
    height: int,
    resolution: int,
    *,
    center_crop: bool,
    random_crops: int,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """(top, left) offsets of the crops of a resized image; random ones are distinct."""
    free_x, free_y = width - resolution, height - resolution
    if center_crop:
        return [(free_y // 2, free_x // 2)]
    positions = (free_x + 1) * (free_y + 1)
    k = min(random_crops, positions)
    picks = rng.choice(positions, size=k, replace=False)
    return [(int(p) // (free_x + 1), int(p) % (free_x + 1)) for p in picks]


def augment(
    records: Sequence[ImageRecord],
    resolution: int,
    *,
    center_crop: bool,
    random_crops: int,
    flip_p: float,
    seed: int,
) -> Augmentations:
    """Resize (short side = `resolution`) and crop every image into its distinct augmentations.

    A centre crop, or `random_crops` distinct crops at offsets drawn from `seed` (fewer when the
    resized image has fewer possible positions, e.g. a square image has one). With ``flip_p > 0``
    every crop is kept twice, unflipped then flipped; the sampler flips with probability `flip_p`.
    """
    if not records:
        raise XTIError("no training images to augment")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if random_crops < 1:
        raise ValueError(f"random_crops must be at least 1, got {random_crops}")
    if not 0.0 <= flip_p <= 1.0:
        raise ValueError(f"flip_p must be within [0, 1], got {flip_p}")

    crops: list[np.ndarray] = []
    image_index: list[int] = []
    flipped: list[bool] = []
    offsets: list[tuple[int, int]] = []
    sizes: list[tuple[int, int]] = []
    for i, rec in enumerate(records):
        original = rec.image if rec.image.mode == "RGB" else to_rgb(rec.image)
        resized = _resize_short_side(original, resolution, rec.source)
        arr = np.asarray(resized, dtype=np.uint8)
        rng = np.random.default_rng([seed % 2**64, i])
        for top, left in _crop_offsets(
            resized.width,
            resized.height,
            resolution,
            center_crop=center_crop,
            random_crops=random_crops,
            rng=rng,
        ):
            crop = arr[top : top + resolution, left : left + resolution]
            variants = [(crop, False)] + ([(crop[:, ::-1], True)] if flip_p > 0 else [])
            for pixels, is_flipped in variants:
                crops.append(pixels)
                image_index.append(i)
                flipped.append(is_flipped)
                offsets.append((top, left))
                sizes.append((original.height, original.width))

    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(crops)))  # [K, R, R, 3] uint8
    pixels = stacked.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0).contiguous()
    return Augmentations(
        pixels=pixels,
        image_index=torch.tensor(image_index, dtype=torch.long),
        flipped=torch.tensor(flipped, dtype=torch.bool),
        crop_top_left=torch.tensor(offsets, dtype=torch.long),
        original_size=torch.tensor(sizes, dtype=torch.long),
    )


# ---------------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------------


@dataclass
class LatentCache:
    """VAE latent distribution of every augmentation, float32 on the CPU.

    `sample` returns ``(mean + std * noise - shift_factor) * scaling_factor`` — the latents the
    UNet is trained on — with the noise drawn from the given CPU generator. `target_size` is the
    (height, width) in pixels of its augmentations (a bucket, `xti.buckets`; None: the square
    `train.resolution`); `loss_weight` [K, 1, h, w] the per-latent-pixel loss weights of masked
    images (`xti.masks`), None without masks.
    """

    mean: torch.Tensor
    std: torch.Tensor
    image_index: torch.Tensor
    flipped: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0
    crop_top_left: torch.Tensor | None = None
    original_size: torch.Tensor | None = None
    target_size: tuple[int, int] | None = None
    loss_weight: torch.Tensor | None = None
    _by_image: list[tuple[torch.Tensor, torch.Tensor]] = field(
        init=False, repr=False, compare=False, default_factory=list
    )

    def __post_init__(self) -> None:
        if self.mean.shape != self.std.shape:
            raise ValueError(
                f"mean {tuple(self.mean.shape)} and std {tuple(self.std.shape)} differ"
            )
        k = self.mean.shape[0]
        if self.image_index.shape != (k,) or self.flipped.shape != (k,):
            raise ValueError("image_index and flipped must have one entry per augmentation")
        self.image_index = self.image_index.to(torch.long)
        self.flipped = self.flipped.to(torch.bool)
        # Per image: its unflipped augmentations, and the flipped ones in the same crop order.
        n_images = int(self.image_index.max()) + 1 if k else 0
        for i in range(n_images):
            mine = self.image_index == i
            self._by_image.append(
                (
                    torch.nonzero(mine & ~self.flipped).flatten(),
                    torch.nonzero(mine & self.flipped).flatten(),
                )
            )

    def __len__(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_images(self) -> int:
        """Number of distinct source images."""
        return len(self._by_image)

    def sample(self, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents of the augmentations `indices` [B], sampled with `generator` (CPU)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        mean = self.mean[indices]
        std = self.std[indices]
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        return (mean + std * noise - self.shift_factor) * self.scaling_factor


def encode_latents(
    vae: Any,
    aug: Augmentations,
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LatentCache:
    """Encode every augmentation once with `vae` and cache its latent mean and std.

    The VAE is used as it is (it is not moved or cast); the pixels go to `device` as `dtype`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    k = len(aug)
    n_batches = math.ceil(k / batch_size)
    means: list[torch.Tensor] = []
    stds: list[torch.Tensor] = []
    with (
        torch.no_grad(),
        tqdm(
            total=k, desc="caching latents", unit="img", disable=not (progress and n_batches > 1)
        ) as bar,
    ):
        for start in range(0, k, batch_size):
            x = aug.pixels[start : start + batch_size].to(device=device, dtype=dtype)
            out = vae.encode(x)
            dist = getattr(out, "latent_dist", None)
            if dist is not None:
                mean, std = dist.mean, dist.std
            else:  # VAEs without a distribution (e.g. tiny autoencoders): deterministic latents
                mean = out.latents if hasattr(out, "latents") else out[0]
                std = torch.zeros_like(mean)
            means.append(mean.detach().to("cpu", torch.float32))
            stds.append(std.detach().to("cpu", torch.float32))
            bar.update(x.shape[0])
    mean = torch.cat(means)
    std = torch.cat(stds)
    if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
        raise XTIError(
            f"the VAE produced NaN/inf latents in {dtype}: run the VAE in float32 "
            "(some VAEs, e.g. SDXL's, overflow in float16)"
        )
    return latent_cache_from(mean, std, vae, aug)


def latent_cache_from(
    mean: torch.Tensor, std: torch.Tensor, vae: Any, aug: Augmentations
) -> LatentCache:
    """A `LatentCache` of the per-augmentation ``mean``/``std`` [K, C, h, w] of `aug`, with the
    VAE config's scaling and shift factors (the VAE is not called)."""
    config = getattr(vae, "config", {})
    scaling = config.get("scaling_factor", None) if hasattr(config, "get") else None
    shift = config.get("shift_factor", None) if hasattr(config, "get") else None
    return LatentCache(
        mean=mean,
        std=std,
        image_index=aug.image_index.clone(),
        flipped=aug.flipped.clone(),
        scaling_factor=float(scaling) if scaling is not None else 1.0,
        shift_factor=float(shift) if shift is not None else 0.0,
        crop_top_left=None if aug.crop_top_left is None else aug.crop_top_left.clone(),
        original_size=None if aug.original_size is None else aug.original_size.clone(),
    )


def pick_augmentations(
    cache: LatentCache, image_ids: torch.Tensor, flip_p: float, generator: torch.Generator
) -> torch.Tensor:
    """One augmentation index per image id: a uniform crop, flipped with probability `flip_p`.

    Draws exactly ``2 * len(image_ids)`` uniforms from `generator` whatever the data, so the result
    is a pure function of the generator state and the ids.
    """
    ids = torch.as_tensor(image_ids, dtype=torch.long).flatten()
    n = ids.numel()
    u_crop = torch.rand(n, generator=generator, device="cpu")
    u_flip = torch.rand(n, generator=generator, device="cpu")
    out = torch.empty(n, dtype=torch.long)
    for j, image_id in enumerate(ids.tolist()):
        if not 0 <= image_id < cache.num_images:
            raise ValueError(
                f"image id {image_id} out of range (cache has {cache.num_images} images)"
            )
        plain, mirrored = cache._by_image[image_id]
        use_flip = len(mirrored) > 0 and bool(u_flip[j] < flip_p)
        if len(plain) == 0:  # only flipped variants were cached
            plain, use_flip = mirrored, False
        if len(plain) == 0:
            raise ValueError(f"image id {image_id} has no cached augmentation")
        choice = min(int(u_crop[j] * len(plain)), len(plain) - 1)
        out[j] = mirrored[min(choice, len(mirrored) - 1)] if use_flip else plain[choice]
    return out
