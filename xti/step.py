"""The training step's maths (DESIGN §3): pure functions of a batch and the frozen models.

* `step_generator` / `sample_batch`: everything random about a micro-step (which image, which
  augmentation, which prompt, latent sample, noise, timesteps) is a function of ``(seed, micro-step)``
  alone. The *global* batch is drawn and each process takes its slice, so resuming is exact and
  N processes × B images equal one process × N·B images. With aspect-ratio buckets a step's global
  batch comes from one bucket (`xti.buckets.draw_images`); with masks it carries loss weights.
* `diffusion_target`, `snr_weights`, `diffusion_loss`: the objective (epsilon or v, min-SNR); the
  masked loss is `xti.masks.masked_mse`.
* `compute_loss`: encode per-layer contexts (each text encoder runs once, through the per-layer
  encoder inference shares, `xti.embeddings.encode_per_layer`), run the UNet with them.
* `relative_movement`: how far the vectors moved from their start.

The KDE term (`xti.regularizers.base.add_relative_gradient`) joins the gradient once per optimizer step, in
the loop (`xti.training`). ``tests/test_step_maths.py`` checks the sampling and objective functions
one by one against their formulas; ``bench/step.py`` times `compute_loss`. Whatever differs between
SD 1.x/2.x and SDXL (text encoders, pooled embeds, ``time_ids``) the model's
`xti.families.ModelFamily` answers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from xti.buckets import draw_images
from xti.data import pick_augmentations
from xti.embeddings import PlaceholderTokens, encode_per_layer, tokenize
from xti.errors import XTIError
from xti.families import EncoderPart, ModelFamily
from xti.masks import masked_mse


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """CPU generator for one micro-step, a pure function of the run seed and the micro-step."""
    mixed = (seed * 0x9E3779B97F4A7C15 + micro_step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (
        2**63
    )
    return torch.Generator().manual_seed(mixed)


@dataclass
class Batch:
    """One process's share of a micro-step: latents, noise, timesteps and prompt ids.

    ``ids`` holds the prompts' ``[B, T]`` token ids per text encoder (keyed by encoder name:
    ``text``, or ``clip_l`` and ``clip_g``); ``time_ids`` the per-sample ``[B, 6]`` size
    conditioning (original size, crop top-left, target size) of families that use it (SDXL).
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    ids: dict[str, torch.Tensor]
    image_ids: torch.Tensor
    time_ids: torch.Tensor | None = None
    loss_weight: torch.Tensor | None = None  # [B, 1, h, w] of masked images (`xti.masks`)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            latents=self.latents.to(device),
            noise=self.noise.to(device),
            timesteps=self.timesteps.to(device),
            ids={name: ids.to(device) for name, ids in self.ids.items()},
            image_ids=self.image_ids.to(device),
            time_ids=self.time_ids.to(device) if self.time_ids is not None else None,
            loss_weight=None if self.loss_weight is None else self.loss_weight.to(device),
        )


@dataclass
class PromptTable:
    """All prompts tokenized once: per text encoder ``ids[name]: [P, T]`` and, per image, the rows
    it may use."""

    ids: dict[str, torch.Tensor]
    first_row: torch.Tensor  # [num_images] first row of each image's prompts
    count: torch.Tensor  # [num_images] number of prompts of each image

    @classmethod
    def build(
        cls,
        tokenizers: Mapping[str, Any],
        prompts: list[list[str]],
        tokens: Mapping[str, PlaceholderTokens],
    ) -> PromptTable:
        """Tokenize every image's prompts with each encoder's tokenizer (``{name: tokenizer}``),
        the placeholder expanded to that tokenizer's tokens (``{name: PlaceholderTokens}``)."""
        flat = [p for per_image in prompts for p in per_image]
        count = torch.tensor([len(p) for p in prompts])
        first = torch.cumsum(count, 0) - count
        ids = {
            name: tokenize(tok, [tokens[name].expand(p) for p in flat])
            for name, tok in tokenizers.items()
        }
        return cls(ids, first, count)


def sample_batch(
    cache: Any,
    prompts: PromptTable,
    *,
    num_train_timesteps: int,
    global_batch: int,
    rank: int,
    world_size: int,
    seed: int,
    micro_step: int,
    flip_p: float,
    noise_offset: float = 0.0,
    resolution: int | None = None,
) -> Batch:
    """Draw the global batch of a micro-step and return this process's slice.

    With `resolution` (the trainer passes it when the family `uses_time_ids`) and a cache that
    knows crop positions, the batch carries ``time_ids`` (target size: the cache's bucket, else
    `resolution` square). With aspect-ratio buckets (`xti.buckets.BucketedLatents`) the whole
    global batch comes from one bucket (`xti.buckets.draw_images`); with masks it carries the
    latents' ``loss_weight``.
    """
    g = step_generator(seed, micro_step)
    num_images = len(prompts.count)
    cache, local_ids, image_ids = draw_images(cache, num_images, global_batch, g)
    aug = pick_augmentations(cache, local_ids, flip_p, g)
    latents = cache.sample(aug, g)
    pick = (torch.rand(global_batch, generator=g) * prompts.count[image_ids]).long()
    rows = prompts.first_row[image_ids] + pick.clamp(max=prompts.count[image_ids] - 1)
    noise = torch.randn(latents.shape, generator=g)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=g)
    timesteps = torch.randint(0, num_train_timesteps, (global_batch,), generator=g)
    time_ids = None
    original = getattr(cache, "original_size", None)
    if resolution is not None and original is not None:
        size = getattr(cache, "target_size", None) or (resolution, resolution)
        target = torch.tensor(size).expand(global_batch, 2)
        time_ids = torch.cat([original[aug], cache.crop_top_left[aug], target], dim=1).float()
    per = global_batch // world_size
    s = slice(rank * per, (rank + 1) * per)
    return Batch(
        latents=latents[s],
        noise=noise[s],
        timesteps=timesteps[s],
        ids={name: table[rows][s] for name, table in prompts.ids.items()},
        image_ids=image_ids[s],
        time_ids=time_ids[s] if time_ids is not None else None,
        loss_weight=_loss_weight(cache, aug, s),
    )


def _loss_weight(cache: Any, aug: torch.Tensor, s: slice) -> torch.Tensor | None:
    """The batch slice's per-latent-pixel loss weights (masked runs), else None."""
    weight = getattr(cache, "loss_weight", None)
    return None if weight is None else weight[aug][s]


def diffusion_target(
    scheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """The regression target: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise XTIError(f"unsupported prediction_type '{prediction_type}' (epsilon or v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at the timesteps (fp32)."""
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return ac / (1.0 - ac).clamp(min=1e-12)


def snr_weights(snr_values: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma per-sample loss weights (Hang et al. 2023) for epsilon or v targets."""
    clipped = torch.minimum(snr_values, torch.full_like(snr_values, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr_values + 1.0)
    return clipped / snr_values.clamp(min=1e-8)


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error in fp32, optionally weighted per sample."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights
    return per_sample.mean()


@dataclass
class StepModels:
    """The frozen models and concept wiring that one step needs.

    ``parts`` are the family's text encoders (carrying the concept's token embedding) and
    ``tokens`` each one's placeholder tokens, keyed by encoder name; ``pooled`` says where SDXL's
    pooled ``text_embeds`` come from (``slot`` or ``mean``, see `ModelFamily.vector_sets`).
    """

    family: ModelFamily
    parts: list[EncoderPart]
    unet: nn.Module
    scheduler: Any
    tokens: dict[str, PlaceholderTokens]
    variant_of_layer: torch.Tensor
    num_variants: int
    prediction_type: str
    dtype: torch.dtype = torch.float32
    pooled: str = "slot"


def compute_loss(
    m: StepModels,
    batch: Batch,
    *,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Diffusion loss of one micro-step (the KDE term is added to the gradient once per optimizer
    step instead, by `xti.regularizers.base.add_relative_gradient`).

    Args:
        m: models and concept wiring (the text encoders must carry the concept token embedding).
        batch: this process's batch, on the models' device.
        snr_gamma: min-SNR gamma, or None for plain MSE.

    Returns:
        The scalar loss and a dict of detached parts: ``mse``.
    """
    contexts, pooled = encode_per_layer(
        m.family, m.parts, batch.ids, m.tokens, m.variant_of_layer, m.num_variants, m.pooled
    )
    added_cond = m.family.added_cond(pooled, batch.time_ids, m.dtype)
    contexts = contexts.to(m.dtype)
    noisy = m.scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
    pred = m.unet(
        noisy.to(m.dtype),
        batch.timesteps,
        encoder_hidden_states=contexts[0],
        added_cond_kwargs=added_cond,
        cross_attention_kwargs={"xti_contexts": contexts},
    ).sample
    target = diffusion_target(
        m.scheduler, batch.latents, batch.noise, batch.timesteps, m.prediction_type
    )
    weights = None
    if snr_gamma is not None:
        weights = snr_weights(snr(m.scheduler, batch.timesteps), snr_gamma, m.prediction_type)
    if batch.loss_weight is not None:
        mse = masked_mse(pred, target, batch.loss_weight, weights)
    else:
        mse = diffusion_loss(pred, target, weights)
    return mse, {"mse": mse.detach()}


def relative_movement(vectors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    """``||V - V0|| / ||V0||`` over all encoders' vectors together (0 when V0 is all zeros)."""
    moved = sum(
        float((vectors[k].detach().float() - v.float()).square().sum()) for k, v in initial.items()
    )
    size = sum(float(v.float().square().sum()) for v in initial.values())
    return math.sqrt(moved / size) if size > 0 else 0.0
