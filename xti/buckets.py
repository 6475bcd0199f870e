"""Aspect-ratio buckets (`data.buckets`): which bucket each image trains at, how it gets there, and
how a step picks its bucket.

The bucket rule (`bucket_resolutions`): for every width ``w`` that is a multiple of the step, the
tallest height ``h`` (a multiple of the step) with ``w·h ≤ train.resolution²``, and the same with
``w`` and ``h`` swapped; buckets whose long side exceeds ``data.bucket_max_aspect`` times the short one
are dropped, and the square ``resolution × resolution`` is always one of them. The step is
``data.bucket_step``, by default the VAE's downscale factor × 8 (64 px for SD and SDXL, whose latent
sides are then multiples of 8, what their UNets' three downsamplings want; 16 px for the demo model).

Each image goes to the bucket nearest its aspect ratio (`nearest_bucket`: smallest
``|log(w/h) − log(bw/bh)|``, ties to the larger bucket), is resized to the smallest size that covers
the bucket (`cover_size`, the same resize as the square path: short side to the bucket's for a square
bucket) and cropped to it, at the centre or at `data.random_crops` random offsets (`data.center_crop`),
with its mask (`xti.masks`) resized, cropped and flipped alongside (`augment_to_bucket`).

Sampling (`draw_images`): every micro-step's global batch comes from one bucket, drawn with
probability (images in the bucket) / (all images), so every image is as likely to be seen as without
buckets; then the images of the batch uniformly within the bucket. Both use the micro-step's
generator (`xti.step.step_generator`), so a step's batch is a function of (seed, step) and a resumed
run replays it. With one bucket (a square dataset), the draw is exactly the one without buckets.

`prepare_latents` builds the run's latents per bucket through the disk cache (`xti.latent_cache`,
whose key holds the pixels' shape, hence the bucket) and returns one `xti.data.LatentCache` when
there is one bucket, else a `BucketedLatents`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from xti.config import DataConfig
from xti.data import Augmentations, ImageRecord, LatentCache, to_rgb
from xti.errors import XTIError
from xti.latent_cache import LatentDiskCache, LatentReport, cached_latents

logger = logging.getLogger(__name__)


@dataclass(frozen=True, order=True)
class Bucket:
    """A training size in pixels."""

    height: int
    width: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def vae_factor(vae: Any) -> int:
    """The VAE's downscale factor (8 for SD/SDXL), from its config."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def bucket_step(cfg: DataConfig, factor: int) -> int:
    """`data.bucket_step`, or the VAE factor × 8."""
    return cfg.bucket_step if cfg.bucket_step is not None else factor * 8


def bucket_resolutions(resolution: int, step: int, max_aspect: float) -> list[Bucket]:
    """The buckets of about ``resolution²`` pixels (see the module docstring), by aspect ratio."""
    area = resolution * resolution
    found = {Bucket(resolution, resolution)}
    for w in range(step, area // step + 1, step):
        h = (area // w) // step * step
        if h < step:
            break
        for bh, bw in ((h, w), (w, h)):
            if max(bh, bw) <= max_aspect * min(bh, bw) + 1e-9:
                found.add(Bucket(bh, bw))
    return sorted(found, key=lambda b: (b.aspect, b.height * b.width))


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket closest in log aspect ratio to a ``width × height`` image (ties: the larger)."""
    log_aspect = math.log(width / height)
    return min(
        buckets,
        key=lambda b: (round(abs(log_aspect - math.log(b.aspect)), 12), -b.height * b.width),
    )


def cover_size(width: int, height: int, bucket: Bucket) -> tuple[int, int]:
    """``(width, height)`` of the image scaled to just cover the bucket (aspect kept)."""
    scale = max(bucket.width / width, bucket.height / height)
    return max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale))


def crop_offsets(
    size: tuple[int, int],
    bucket: Bucket,
    *,
    center_crop: bool,
    random_crops: int,
    rng: np.random.Generator,
) -> list[tuple[int, int]]:
    """``(top, left)`` of the crops of a resized ``(width, height)`` image; random ones distinct
    (the same draws as the square crops of `xti.data.augment` for a square bucket)."""
    free_x, free_y = size[0] - bucket.width, size[1] - bucket.height
    if center_crop:
        return [(free_y // 2, free_x // 2)]
    positions = (free_x + 1) * (free_y + 1)
    picks = rng.choice(positions, size=min(random_crops, positions), replace=False)
    return [(int(p) // (free_x + 1), int(p) % (free_x + 1)) for p in picks]


def _resize(image: Image.Image, size: tuple[int, int], source: str) -> Image.Image:
    if size == image.size:
        return image
    if size[0] > image.width:
        logger.warning(
            "%s is %dx%d, smaller than its bucket: upscaling it to %dx%d (expect blur; use a "
            "larger image or a lower train.resolution)", source, *image.size, *size,
        )  # fmt: skip
    down = size[0] < image.width
    return image.resize(size, Image.Resampling.LANCZOS if down else Image.Resampling.BICUBIC)


def _resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A ``[H, W]`` float mask resized (bilinear) to ``(width, height)``, kept in [0, 1]."""
    if (mask.shape[1], mask.shape[0]) == size:
        return mask
    img = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32))
    return np.clip(np.asarray(img.resize(size, Image.Resampling.BILINEAR)), 0.0, 1.0)


def augment_to_bucket(
    records: Sequence[ImageRecord],
    bucket: Bucket,
    *,
    center_crop: bool,
    random_crops: int,
    flip_p: float,
    seed: int,
    record_ids: Sequence[int] | None = None,
) -> Augmentations:
    """`xti.data.augment` at a bucket's size: resize to cover, crop, flip; masks follow.

    `record_ids` are the records' indices in the whole dataset (they seed the random crops, as in
    `xti.data.augment`); `image_index` of the result counts within `records`. The result's `mask`
    is ``[K, 1, H, W]`` float in [0, 1] when any record has a mask (ones for those without).
    """
    ids = list(record_ids) if record_ids is not None else list(range(len(records)))
    has_masks = any(getattr(r, "mask", None) is not None for r in records)
    crops, masks, meta = [], [], []
    for j, rec in enumerate(records):
        original = rec.image if rec.image.mode == "RGB" else to_rgb(rec.image)
        size = cover_size(original.width, original.height, bucket)
        arr = np.asarray(_resize(original, size, rec.source), dtype=np.uint8)
        mask = rec.mask if getattr(rec, "mask", None) is not None else None
        full = _resize_mask(mask, size) if mask is not None else np.ones(arr.shape[:2], np.float32)
        rng = np.random.default_rng([seed % 2**64, ids[j]])
        for top, left in crop_offsets(
            size, bucket, center_crop=center_crop, random_crops=random_crops, rng=rng
        ):
            window = (slice(top, top + bucket.height), slice(left, left + bucket.width))
            crop, mcrop = arr[window], full[window]
            for flip in (False, True) if flip_p > 0 else (False,):
                crops.append(crop[:, ::-1] if flip else crop)
                masks.append(mcrop[:, ::-1] if flip else mcrop)
                meta.append((j, flip, top, left, original.height, original.width))
    stacked = torch.from_numpy(np.ascontiguousarray(np.stack(crops)))
    pixels = stacked.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0).contiguous()
    aug = Augmentations(
        pixels=pixels,
        image_index=torch.tensor([m[0] for m in meta], dtype=torch.long),
        flipped=torch.tensor([m[1] for m in meta], dtype=torch.bool),
        crop_top_left=torch.tensor([m[2:4] for m in meta], dtype=torch.long),
        original_size=torch.tensor([m[4:6] for m in meta], dtype=torch.long),
    )
    if has_masks:
        aug.mask = torch.from_numpy(np.ascontiguousarray(np.stack(masks)))[:, None].float()
    return aug


def assign_buckets(
    records: Sequence[ImageRecord], resolution: int, cfg: DataConfig, factor: int
) -> list[Bucket]:
    """Each record's bucket: the nearest of `bucket_resolutions` with `data.buckets`, else the
    square ``resolution × resolution``."""
    if not cfg.buckets:
        return [Bucket(resolution, resolution)] * len(records)
    buckets = bucket_resolutions(resolution, bucket_step(cfg, factor), cfg.bucket_max_aspect)
    return [nearest_bucket(r.image.width, r.image.height, buckets) for r in records]


@dataclass
class BucketedLatents:
    """The latents of a run with several buckets: one `xti.data.LatentCache` per bucket (its image
    ids local to the bucket) and, per bucket, the dataset-wide ids of its images."""

    buckets: list[Bucket]
    caches: list[LatentCache]
    members: list[torch.Tensor]

    def __len__(self) -> int:
        return sum(len(c) for c in self.caches)

    @property
    def num_images(self) -> int:
        return sum(len(m) for m in self.members)

    @property
    def sizes(self) -> torch.Tensor:
        return torch.tensor([len(m) for m in self.members], dtype=torch.float64)


def draw_images(
    cache: Any, num_images: int, global_batch: int, g: torch.Generator
) -> tuple[LatentCache, torch.Tensor, torch.Tensor]:
    """``(bucket's cache, ids within it, dataset-wide ids)`` of a micro-step's images (module
    docstring: the bucket with probability proportional to its images, then uniform within it)."""
    if not isinstance(cache, BucketedLatents):
        ids = torch.randint(num_images, (global_batch,), generator=g)
        return cache, ids, ids
    cumulative = torch.cumsum(cache.sizes / cache.sizes.sum(), 0)
    u = torch.rand(1, generator=g, dtype=torch.float64)
    b = min(int(torch.searchsorted(cumulative, u, right=True)), len(cache.caches) - 1)
    members = cache.members[b]
    local = torch.randint(len(members), (global_batch,), generator=g)
    return cache.caches[b], local, members[local]


def _combined(reports: Sequence[LatentReport]) -> LatentReport:
    statuses = {r.status for r in reports}
    status = statuses.pop() if len(statuses) == 1 else "partial"
    return LatentReport(
        status,
        sum(r.total for r in reports),
        sum(r.encoded for r in reports),
        sum(r.corrupt for r in reports),
        sum(r.seconds for r in reports),
        reports[0].folder,
    )


def prepare_latents(
    records: Sequence[ImageRecord],
    cfg: DataConfig,
    *,
    resolution: int,
    seed: int,
    vae: Any,
    disk: LatentDiskCache | None,
    device: Any,
    progress: bool,
) -> tuple[LatentCache | BucketedLatents, LatentReport]:
    """The latents of every augmentation, per bucket, with the loss weights of masked images."""
    from xti.masks import latent_weights

    if not records:
        raise XTIError("no training images")
    factor = vae_factor(vae)
    assigned = assign_buckets(records, resolution, cfg, factor)
    buckets = sorted(set(assigned), key=lambda b: (b.aspect, b.height * b.width))
    caches, members, reports = [], [], []
    for bucket in buckets:
        ids = [i for i, b in enumerate(assigned) if b == bucket]
        aug = augment_to_bucket(
            [records[i] for i in ids], bucket, center_crop=cfg.center_crop,
            random_crops=cfg.random_crops, flip_p=cfg.flip_p, seed=seed, record_ids=ids,
        )  # fmt: skip
        cache, report = cached_latents(
            vae, aug, cfg.encode_batch_size, cache=disk, device=device, progress=progress
        )
        cache.target_size = (bucket.height, bucket.width)
        if aug.mask is not None:
            cache.loss_weight = latent_weights(aug.mask, factor, cfg.mask_floor)
        caches.append(cache)
        members.append(torch.tensor(ids, dtype=torch.long))
        reports.append(report)
    if len(buckets) > 1:
        counts = ", ".join(f"{b}: {len(m)}" for b, m in zip(buckets, members, strict=True))
        logger.info("aspect-ratio buckets (images): %s", counts)
        return BucketedLatents(buckets, caches, members), _combined(reports)
    return caches[0], reports[0]
