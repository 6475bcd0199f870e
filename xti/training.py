"""The training step maths and the one `train()` loop (DESIGN §3).

The step is built from small pure functions that tests check one by one:

* `step_generator` / `sample_batch`: everything random about a micro-step (which image, which
  augmentation, which prompt, latent sample, noise, timesteps) is a function of ``(seed, micro-step)``
  alone. The *global* batch is drawn and each process takes its slice, so resuming is exact and
  N processes × B images equal one process × N·B images.
* `diffusion_target`, `snr_weights`, `diffusion_loss`: the objective (epsilon or v, min-SNR).
* `compute_loss`: encode per-layer contexts in one text-encoder call, run the UNet with them, add the
  KDE term.

`train()` wires these into an Accelerate loop: mixed precision with fp32 vectors, gradient
accumulation, DDP over the vectors only, checkpoints and exact resume, snapshots, export, metrics.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xti.attention import install_processors
from xti.config import Config
from xti.data import (
    augment,
    check_captions,
    encode_latents,
    load_images,
    pick_augmentations,
    prompts_per_image,
)
from xti.embeddings import (
    ConceptSet,
    ConceptVectors,
    PlaceholderTokens,
    add_placeholder_tokens,
    encode_per_layer,
    encode_sdxl_per_layer,
    initializer_vectors,
    install_token_embedding,
    layer_variants,
    tokenize,
)
from xti.errors import XTIError
from xti.export import (
    EmbeddingFile,
    atomic_write_bytes,
    build_metadata,
    load_embedding_file,
    save_embedding_file,
)
from xti.kde import KDERegularizer
from xti.layers import LayerScheme, layer_scheme
from xti.models import ModelBundle, load_model
from xti.tracking import (
    DEFAULT_VALIDATION_PROMPTS,
    Smoother,
    log_images,
    log_table,
    setup_tracking,
    validation_grid,
    write_model_card,
)

logger = logging.getLogger("xti")

CHECKPOINT_STATE = "xti_state.json"


# ----------------------------------------------------------------------------- step maths


def step_generator(seed: int, micro_step: int) -> torch.Generator:
    """CPU generator for one micro-step, a pure function of the run seed and the micro-step."""
    mixed = (seed * 0x9E3779B97F4A7C15 + micro_step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (
        2**63
    )
    return torch.Generator().manual_seed(mixed)


@dataclass
class Batch:
    """One process's share of a micro-step: latents, noise, timesteps and prompt ids.

    SDXL batches also carry the second tokenizer's ids and the per-sample ``time_ids`` (original
    size, crop top-left, target size).
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    input_ids: torch.Tensor
    image_ids: torch.Tensor
    input_ids_2: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()
        }
        return Batch(**moved)


@dataclass
class PromptTable:
    """All prompts tokenized once: ``ids[P, T]`` and, per image, the rows it may use.

    ``ids_2`` holds the same prompts through SDXL's second tokenizer (None otherwise).
    """

    ids: torch.Tensor
    first_row: torch.Tensor  # [num_images] first row of each image's prompts
    count: torch.Tensor  # [num_images] number of prompts of each image
    ids_2: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        tokenizer,
        prompts: list[list[str]],
        tokens: PlaceholderTokens,
        tokenizer_2=None,
        tokens_2: PlaceholderTokens | None = None,
    ) -> PromptTable:
        flat = [p for per_image in prompts for p in per_image]
        count = torch.tensor([len(p) for p in prompts])
        first = torch.cumsum(count, 0) - count
        ids_2 = None
        if tokenizer_2 is not None and tokens_2 is not None:
            ids_2 = tokenize(tokenizer_2, [tokens_2.expand(p) for p in flat])
        return cls(tokenize(tokenizer, [tokens.expand(p) for p in flat]), first, count, ids_2)


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

    With `resolution` and a cache that knows crop positions, the batch carries SDXL ``time_ids``.
    """
    g = step_generator(seed, micro_step)
    num_images = len(prompts.count)
    image_ids = torch.randint(num_images, (global_batch,), generator=g)
    aug = pick_augmentations(cache, image_ids, flip_p, g)
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
        target = torch.tensor([resolution, resolution]).expand(global_batch, 2)
        time_ids = torch.cat([original[aug], cache.crop_top_left[aug], target], dim=1).float()
    per = global_batch // world_size
    s = slice(rank * per, (rank + 1) * per)
    ids_2 = prompts.ids_2[rows][s] if prompts.ids_2 is not None else None
    return Batch(
        latents[s],
        noise[s],
        timesteps[s],
        prompts.ids[rows][s],
        image_ids[s],
        ids_2,
        time_ids[s] if time_ids is not None else None,
    )


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

    For SDXL, ``text_encoder_2``/``tokens_2`` are the second encoder, ``pooled`` says where the
    pooled ``text_embeds`` come from (``slot`` or ``mean``) and ``eos_id`` is its tokenizer's EOS.
    """

    unet: nn.Module
    text_encoder: nn.Module
    scheduler: Any
    tokens: PlaceholderTokens
    variant_of_layer: torch.Tensor
    num_variants: int
    prediction_type: str
    dtype: torch.dtype = torch.float32
    text_encoder_2: nn.Module | None = None
    tokens_2: PlaceholderTokens | None = None
    pooled: str = "slot"
    eos_id: int = 49407


def compute_loss(
    m: StepModels,
    batch: Batch,
    vectors: torch.Tensor | dict[str, torch.Tensor],
    *,
    kde: nn.Module | dict[str, nn.Module] | None = None,
    kde_weight: float = 0.0,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Loss of one micro-step: diffusion MSE + kde_weight · mean KDE of the vectors.

    Args:
        m: models and concept wiring (the text encoders must carry the concept token embedding).
        batch: this process's batch, on the models' device.
        vectors: the ``[V, n, d]`` trainable vectors (the KDE term reads them), or one such tensor
            per text encoder, keyed like `kde`.
        kde: the KDE regulariser (or one per text encoder, keyed by encoder name), or None.
        kde_weight: λ; with 0 the KDE value is still reported but does not enter the loss.
        snr_gamma: min-SNR gamma, or None for plain MSE.

    Returns:
        The scalar loss and a dict of detached parts: ``mse``, ``kde`` (summed over encoders) and
        ``kde_per_vector`` (``{encoder: [V, n]}``).
    """
    added_cond = None
    if m.text_encoder_2 is None:
        contexts = encode_per_layer(
            m.text_encoder, batch.input_ids, m.tokens, m.variant_of_layer, m.num_variants
        )
    else:
        contexts, pooled = encode_sdxl_per_layer(
            (m.text_encoder, m.text_encoder_2),
            (batch.input_ids, batch.input_ids_2),
            (m.tokens, m.tokens_2),
            m.variant_of_layer,
            m.num_variants,
            m.eos_id,
            m.pooled,
        )
        added_cond = {"text_embeds": pooled.to(m.dtype), "time_ids": batch.time_ids.to(m.dtype)}
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
    mse = diffusion_loss(pred, target, weights)
    parts: dict[str, Any] = {"mse": mse.detach()}
    loss = mse
    if kde is not None:
        kdes = kde if isinstance(kde, dict) else {"text": kde}
        vecs = vectors if isinstance(vectors, dict) else {"text": vectors}
        total = torch.zeros((), device=mse.device)
        per_vector = {}
        for name, reg in kdes.items():
            v = vecs[name]
            with torch.set_grad_enabled(kde_weight > 0 and torch.is_grad_enabled()):
                values = reg(v.reshape(-1, v.shape[-1]))
            total = total + values.mean()
            per_vector[name] = values.detach().reshape(v.shape[:-1])
        if kde_weight > 0:
            loss = loss + kde_weight * total
        parts["kde"] = total.detach()
        parts["kde_per_vector"] = per_vector
    return loss, parts


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainResult:
    """What a `train()` call did."""

    output_file: Path | None
    steps: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    vectors: torch.Tensor | None = None  # the first (SD 1.x/2.x: only) encoder's [V, n, d]
    layer_names: list[str] = field(default_factory=list)
    world_size: int = 1
    ranks_in_sync: bool = True
    seconds: float = 0.0
    trainable_shapes: list[tuple[int, ...]] = field(default_factory=list)
    all_vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    samples_file: Path | None = None  # the last validation grid (PNG), when validation ran


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint with the highest step in `folder`, or None."""
    if not folder.is_dir():
        return None
    done = [
        p
        for p in folder.iterdir()
        if p.is_dir() and (p / CHECKPOINT_STATE).is_file() and not p.name.endswith(".tmp")
    ]
    return max(
        done, key=lambda p: json.loads((p / CHECKPOINT_STATE).read_text())["step"], default=None
    )


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _check_resolution(cfg: Config, vae) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.train.resolution % factor:
        raise XTIError(
            f"train.resolution={cfg.train.resolution} must be a multiple of {factor} for this model's VAE"
        )


def export_vectors(
    vectors: dict[str, torch.Tensor],
    variant_of_layer: torch.Tensor,
    scheme: LayerScheme,
    num_variants: int,
) -> dict[str, torch.Tensor]:
    """The embedding file's tensors (DESIGN §6) from ``{encoder: [V(+1), n, d]}`` vectors.

    SD 1.x/2.x (one encoder, ``text``): ``{layer: [n, d]}``. SDXL: ``{"clip_l.<layer>": …,
    "clip_g.<layer>": …}`` plus ``clip_g.POOL`` when the second encoder has the extra slot.
    """
    out: dict[str, torch.Tensor] = {}
    prefix = len(vectors) > 1
    for enc, tensor in vectors.items():
        v = tensor.detach().float().cpu()
        for i, layer in enumerate(scheme.names):
            out[f"{enc}.{layer}" if prefix else layer] = v[int(variant_of_layer[i])].clone()
        if v.shape[0] > num_variants:
            out[f"{enc}.POOL"] = v[num_variants].clone()
    return out


def train(
    cfg: Config,
    *,
    bundle: ModelBundle | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
) -> TrainResult:
    """Train one concept as configured and export it.

    Args:
        cfg: the validated run configuration.
        bundle: an already loaded model to train against (default: load ``cfg.model``). Its
            tokenizer gains the placeholder tokens; its models are frozen and moved to the device.
        progress: show a progress bar on the main process.
        stop_at_step: stop (after checkpointing, if due) once this step is reached, as if interrupted;
            the final export is skipped. For chunked runs and resume tests.

    Returns:
        A `TrainResult`; the main process's `output_file` is the exported ``.xti.safetensors``.

    Raises:
        XTIError: bad input, detected before anything is written.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    tc = cfg.train
    out = Path(cfg.output_dir)

    # Everything that can fail on bad input happens before the first write.
    records = load_images(cfg.data)
    check_captions(records, cfg.concept.placeholder)
    if bundle is None:
        bundle = load_model(cfg.model)
    _check_resolution(cfg, bundle.vae)
    encoders = bundle.text_encoders  # [(name, tokenizer, text encoder)]: one, or two for SDXL
    # Validation pipelines need the tokenizers without our placeholder tokens; copy them only then.
    validating = cfg.validation.every > 0
    clean_tokenizer = copy.deepcopy(bundle.tokenizer) if validating else None
    clean_tokenizer_2 = copy.deepcopy(bundle.tokenizer_2) if validating else None
    tokens = {
        name: add_placeholder_tokens(tok, cfg.concept.placeholder, cfg.concept.n_vectors)
        for name, tok, _ in encoders
    }
    embeddings = {name: te.get_input_embeddings() for name, _, te in encoders}
    inits = {
        name: initializer_vectors(
            tok, embeddings[name], cfg.concept.initializer, cfg.concept.n_vectors
        )
        for name, tok, _ in encoders
    }
    granularity = cfg.xti.granularity
    sdxl = bundle.family == "sdxl"
    scheme = layer_scheme(bundle.unet, "transformer" if granularity == "transformer" else "block")
    variant_of_layer = layer_variants(len(scheme), granularity)
    num_variants = 1 if granularity == "shared" else len(scheme)
    pooled = cfg.xti.pooled
    # SDXL's second encoder has one more vector set, the POOL slot, when pooled comes from it.
    variants_per_encoder = {
        name: num_variants + (1 if sdxl and pooled == "slot" and name == "clip_g" else 0)
        for name, _, _ in encoders
    }
    resume_from = None
    if tc.resume:
        resume_from = (
            latest_checkpoint(out / "checkpoints") if tc.resume == "latest" else Path(tc.resume)
        )
        if resume_from is None or not (resume_from / CHECKPOINT_STATE).is_file():
            where = out / "checkpoints" if tc.resume == "latest" else tc.resume
            raise XTIError(f"train.resume: no complete checkpoint at {where}")

    if cfg.validation.mix_with and not Path(cfg.validation.mix_with).is_file():
        raise XTIError(f"validation.mix_with: {cfg.validation.mix_with} does not exist")
    report_to = setup_tracking(cfg.tracking.report_to)
    accelerator = Accelerator(
        mixed_precision=tc.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    set_seed(tc.seed)
    device = accelerator.device
    dtype = _weight_dtype(accelerator.mixed_precision)
    world = accelerator.num_processes
    is_main = accelerator.is_main_process

    # Latent distributions once per distinct augmentation, in fp32, then the VAE is dropped.
    aug = augment(
        records,
        tc.resolution,
        center_crop=cfg.data.center_crop,
        random_crops=cfg.data.random_crops,
        flip_p=cfg.data.flip_p,
        seed=tc.seed,
    )
    cache = encode_latents(
        bundle.vae.to(device),
        aug,
        cfg.data.encode_batch_size,
        device=device,
        progress=progress and is_main,
    )
    bundle.vae.to("cpu")
    prompts = PromptTable.build(
        bundle.tokenizer,
        prompts_per_image(records, cfg.concept.placeholder, cfg.data.template),
        tokens[encoders[0][0]],
        bundle.tokenizer_2,
        tokens.get("clip_g"),
    )

    unet = bundle.unet
    for model in (unet, *(te for _, _, te in encoders)):
        model.requires_grad_(False)
        model.eval()
        model.to(device)
        if dtype != torch.float32:  # casting fp32 to fp32 makes diffusers log a spurious warning
            model.to(dtype=dtype)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()

    concept = ConceptSet(
        {name: ConceptVectors(inits[name], variants_per_encoder[name]) for name, _, _ in encoders}
    )
    raw_concept = concept
    # Each text encoder reads its raw parameter; the wrapped module's forward is called once per
    # step so that DDP sees a forward pass. Both are the same leaf, so gradients accumulate once.
    installed: dict[str, Any] = {}

    def install_training_hooks() -> None:
        installed["embeddings"] = [
            install_token_embedding(
                te, tokens[name].first_id, lambda n=name: raw_concept.sets[n].vectors
            )
            for name, _, te in encoders
        ]
        installed["processors"] = install_processors(unet, scheme)

    def remove_training_hooks() -> None:
        installed["processors"].remove()
        for handle in installed["embeddings"]:
            handle.remove()

    install_training_hooks()

    # KDE values are always logged; they enter the loss only when kde.weight > 0.
    kdes = {
        name: KDERegularizer.from_embedding(
            embeddings[name].weight, tok.all_special_ids, cfg.kde.bandwidth
        ).to(device)
        for name, tok, _ in encoders
    }

    lr = tc.lr * (tc.batch_size * tc.gradient_accumulation_steps * world if tc.scale_lr else 1)
    optimizer = torch.optim.AdamW(
        concept.parameters(),
        lr=lr,
        betas=(tc.adam_beta1, tc.adam_beta2),
        eps=tc.adam_epsilon,
        weight_decay=tc.weight_decay,
    )
    lr_scheduler = get_scheduler(
        tc.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=tc.lr_warmup_steps,
        num_training_steps=tc.max_steps,
    )
    concept, optimizer = accelerator.prepare(concept, optimizer)
    raw_concept = accelerator.unwrap_model(concept)
    accelerator.register_for_checkpointing(lr_scheduler)

    models = StepModels(
        unet=unet,
        text_encoder=bundle.text_encoder,
        scheduler=bundle.noise_scheduler,
        tokens=tokens[encoders[0][0]],
        variant_of_layer=variant_of_layer.to(device),
        num_variants=num_variants,
        prediction_type=bundle.prediction_type,
        dtype=dtype,
        text_encoder_2=bundle.text_encoder_2,
        tokens_2=tokens.get("clip_g"),
        pooled=pooled,
        eos_id=bundle.tokenizer_2.eos_token_id if sdxl else bundle.tokenizer.eos_token_id,
    )

    start_step = 0
    if resume_from is not None:
        state = json.loads((resume_from / CHECKPOINT_STATE).read_text())
        if state["shape"] != raw_concept.shapes():
            raise XTIError(
                f"train.resume: checkpoint {resume_from} holds vectors of shape {state['shape']}, "
                f"this config makes {raw_concept.shapes()} (placeholder, n_vectors or granularity "
                "changed?)"
            )
        accelerator.load_state(str(resume_from))
        start_step = int(state["step"])
        if is_main:
            logger.info("resumed from %s at step %d", resume_from, start_step)

    name = cfg.concept_name
    metadata_common = dict(
        layers=scheme.names,
        granularity=granularity,
        placeholder=cfg.concept.placeholder,
        initializer=cfg.concept.initializer,
        n_vectors=cfg.concept.n_vectors,
        family=bundle.family,
        base_model=bundle.source,
        text_dims={name: int(inits[name].shape[-1]) for name, _, _ in encoders},
        kde_weight=cfg.kde.weight,
    )

    extra = {"xti.pooled": pooled} if sdxl else None

    def export(path: Path, steps: int) -> Path:
        meta = build_metadata(**metadata_common, steps=steps, title=name, extra=extra)
        vectors = export_vectors(raw_concept(), variant_of_layer, scheme, num_variants)
        return save_embedding_file(path, vectors, meta)

    def checkpoint(step: int) -> None:
        folder = out / "checkpoints"
        final = folder / f"step-{step:06d}"
        tmp = folder / f"step-{step:06d}.tmp"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if is_main:
            state = {
                "step": step,
                "shape": raw_concept.shapes(),
                "config": cfg.model_dump(mode="json"),
            }
            (tmp / CHECKPOINT_STATE).write_text(json.dumps(state, indent=1))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            if tc.checkpoints_total_limit:
                done = sorted(
                    p for p in folder.iterdir() if p.is_dir() and not p.name.endswith(".tmp")
                )
                for old in done[: max(0, len(done) - tc.checkpoints_total_limit)]:
                    shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
    if report_to:
        run_name = cfg.tracking.run_name or name
        accelerator.init_trackers(
            cfg.tracking.project,
            config=_flat_config(cfg),
            init_kwargs={"wandb": {"name": run_name, "tags": cfg.tracking.tags, "dir": str(out)}},
        )

    layer_names = scheme.names
    bar = tqdm(
        total=tc.max_steps,
        initial=start_step,
        disable=not (progress and is_main),
        desc=f"xti {name}",
        unit="step",
    )
    losses: list[tuple[int, float]] = []
    smooth = Smoother()
    vc = cfg.validation
    mix_with = load_embedding_file(vc.mix_with) if vc.mix_with and is_main else None
    last_grid: list[Path] = []

    def validate(step: int) -> None:
        """Sample with fixed seeds (main process; no_grad; hooks and devices restored after)."""
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        template = DEFAULT_VALIDATION_PROMPTS.get(
            cfg.data.template, DEFAULT_VALIDATION_PROMPTS["object"]
        )
        prompts_v = vc.prompts or [t.format(cfg.concept.placeholder) for t in template]
        concept_file = EmbeddingFile(
            layers=scheme.names,
            vectors=export_vectors(raw_concept(), variant_of_layer, scheme, num_variants),
            metadata={},
        )
        remove_training_hooks()
        vae_device = next(bundle.vae.parameters()).device
        try:
            scheduler = DDIMScheduler.from_config(bundle.noise_scheduler.config)
            if sdxl:
                pipe = StableDiffusionXLPipeline(
                    vae=bundle.vae.to(device),
                    text_encoder=bundle.text_encoder,
                    text_encoder_2=bundle.text_encoder_2,
                    tokenizer=clean_tokenizer,
                    tokenizer_2=clean_tokenizer_2,
                    unet=unet,
                    scheduler=scheduler,
                    add_watermarker=False,
                )
            else:
                pipe = StableDiffusionPipeline(
                    vae=bundle.vae.to(device),
                    text_encoder=bundle.text_encoder,
                    tokenizer=clean_tokenizer,
                    unet=unet,
                    scheduler=scheduler,
                    safety_checker=None,
                    feature_extractor=None,
                    requires_safety_checker=False,
                )
            pipe.set_progress_bar_config(disable=True)
            with torch.no_grad(), accelerator.autocast():
                vg = validation_grid(
                    pipe,
                    concept_file,
                    cfg.concept.placeholder,
                    prompts_v,
                    seeds=vc.seeds,
                    negative_prompt=vc.negative_prompt,
                    num_inference_steps=vc.num_inference_steps,
                    guidance_scale=vc.guidance_scale,
                    resolution=tc.resolution,
                    mix_with=mix_with,
                    mix_layers=vc.mix_layers,
                    granularity="transformer" if granularity == "transformer" else "block",
                )
        finally:
            bundle.vae.to(vae_device)
            install_training_hooks()
        path = out / "validation" / f"{name}-step{step:06d}.png"
        buf = io.BytesIO()
        vg.grid.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        last_grid[:] = [path]
        log_images(accelerator, "validation", vg.grid, vg.caption, step)
        nearest_v = _nearest_tokens(
            kdes[encoders[0][0]],
            raw_concept.sets[encoders[0][0]].vectors,
            variant_of_layer,
            layer_names,
            encoders[0][1],
        )
        log_table(
            accelerator, "nearest_tokens", ["layer", "nearest vocabulary tokens"],
            [[layer, " ".join(toks)] for layer, toks in nearest_v.items()], step,
        )  # fmt: skip

    global_batch = tc.batch_size * world
    accum = tc.gradient_accumulation_steps
    step = start_step
    end_step = tc.max_steps if stop_at_step is None else min(tc.max_steps, stop_at_step)
    try:
        while step < end_step:
            t_step = time.perf_counter()
            total_loss = torch.zeros((), device=device)
            parts: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                batch = sample_batch(
                    cache,
                    prompts,
                    num_train_timesteps=bundle.noise_scheduler.config.num_train_timesteps,
                    global_batch=global_batch,
                    rank=accelerator.process_index,
                    world_size=world,
                    seed=tc.seed,
                    micro_step=step * accum + micro,
                    flip_p=cfg.data.flip_p,
                    noise_offset=tc.noise_offset,
                    resolution=tc.resolution if sdxl else None,
                ).to(device)
                sync = (
                    contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(concept)
                )
                with sync:
                    with accelerator.autocast():
                        vectors = concept()
                        loss, parts = compute_loss(
                            models,
                            batch,
                            vectors,
                            kde=kdes,
                            kde_weight=cfg.kde.weight,
                            snr_gamma=tc.snr_gamma,
                        )
                    accelerator.backward(loss / accum)
                total_loss += loss.detach() / accum
            if tc.max_grad_norm is not None:
                grad_norm = accelerator.clip_grad_norm_(raw_concept.parameters(), tc.max_grad_norm)
            else:
                grad_norm = torch.cat(
                    [p.grad.detach().flatten() for p in raw_concept.parameters()]
                ).norm()
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            mean_loss = accelerator.reduce(total_loss, reduction="mean").item()
            losses.append((step, mean_loss))
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}")
            if step % tc.log_every == 0 or step == end_step:
                logs = _step_logs(
                    mean_loss,
                    parts,
                    lr_scheduler.get_last_lr()[0],
                    grad_norm,
                    raw_concept(),
                    variant_of_layer,
                    layer_names,
                )
                logs["loss_smoothed"] = smooth.update(mean_loss)
                step_time = time.perf_counter() - t_step
                logs["step_time"] = step_time
                logs["samples_per_s"] = global_batch * accum / step_time
                logs["peak_memory_gb"] = _peak_memory_gb(device)
                accelerator.log(logs, step=step)
            if vc.every and (step % vc.every == 0 or step == tc.max_steps):
                if is_main:
                    validate(step)
                accelerator.wait_for_everyone()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                checkpoint(step)
            if tc.snapshot_every and step % tc.snapshot_every == 0 and is_main:
                export(out / "snapshots" / f"{name}-step{step:06d}.xti.safetensors", step)
    except KeyboardInterrupt:
        if is_main:
            saved = export(out / f"{name}.interrupted.xti.safetensors", step)
            print(f"interrupted at step {step}; vectors saved to {saved}")
        raise
    finally:
        bar.close()

    flat = torch.cat([v.detach().reshape(-1) for v in raw_concept().values()])
    gathered = accelerator.gather(flat.reshape(1, -1))
    in_sync = bool((gathered == gathered[0:1]).all())
    output_file = None
    if is_main and step >= tc.max_steps:
        output_file = export(out / f"{name}.xti.safetensors", step)
    accelerator.wait_for_everyone()
    result = TrainResult(
        output_file=output_file,
        steps=step,
        losses=losses,
        vectors=raw_concept.sets[encoders[0][0]].vectors.detach().cpu().clone(),
        all_vectors={k: v.detach().cpu().clone() for k, v in raw_concept().items()},
        layer_names=layer_names,
        world_size=world,
        ranks_in_sync=in_sync,
        seconds=time.perf_counter() - t0,
        trainable_shapes=[tuple(p.shape) for g in optimizer.param_groups for p in g["params"]],
        samples_file=last_grid[0] if last_grid else None,
    )
    if is_main:
        summary = {
            "output_file": str(output_file) if output_file else None,
            "samples_file": str(last_grid[0]) if last_grid else None,
            "steps": step,
            "final_loss": losses[-1][1] if losses else None,
            "world_size": world,
            "ranks_in_sync": in_sync,
            "seconds": round(result.seconds, 2),
        }
        nearest = {
            enc: _nearest_tokens(
                kdes[enc], raw_concept.sets[enc].vectors, variant_of_layer, layer_names, tok
            )
            for enc, tok, _ in encoders
        }
        summary["nearest_tokens"] = nearest if sdxl else nearest[encoders[0][0]]
        atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=1).encode())
        if output_file is not None:
            write_model_card(
                out,
                name=name,
                embedding_file=output_file,
                config=cfg.model_dump(mode="json"),
                family=bundle.family,
                base_model=bundle.source,
                layers=layer_names,
                steps=step,
                final_loss=summary["final_loss"],
                grid=last_grid[0] if last_grid else None,
            )
    accelerator.end_training()
    remove_training_hooks()
    _release_accelerator_state()
    return result


def _peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on GPUs, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _release_accelerator_state() -> None:
    """Forget this run's Accelerate settings so a later `train()` in the same process may use
    another mixed precision (Accelerate keeps them in a process-wide singleton). The process
    group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()


def _flat_config(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = (
                node if isinstance(node, (int, float, str, bool)) or node is None else str(node)
            )

    walk("", cfg.model_dump(mode="json"))
    return flat


def _step_logs(
    loss: float,
    parts: dict[str, Any],
    lr: float,
    grad_norm: torch.Tensor,
    vectors: dict[str, torch.Tensor],
    variant_of_layer: torch.Tensor,
    layer_names: list[str],
) -> dict[str, float]:
    """Scalars of one step: loss parts, lr, gradient norm, and per layer the mean vector norm and
    KDE value (``norm/<layer>``; ``norm/<encoder>/<layer>`` when there are two encoders)."""
    logs: dict[str, float] = {
        "loss": loss,
        "mse": float(parts["mse"]),
        "lr": float(lr),
        "grad_norm": float(grad_norm),
    }
    if "kde" in parts:
        logs["kde"] = float(parts["kde"])
    kde_v = parts.get("kde_per_vector", {})
    for enc, tensor in vectors.items():
        prefix = f"{enc}/" if len(vectors) > 1 else ""
        norms = tensor.detach().float().norm(dim=-1).mean(-1)  # [V]
        for i, name in enumerate(layer_names):
            v = int(variant_of_layer[i])
            logs[f"norm/{prefix}{name}"] = float(norms[v])
            if enc in kde_v:
                logs[f"kde/{prefix}{name}"] = float(kde_v[enc][v].mean())
    return logs


def _nearest_tokens(
    kde, vectors: torch.Tensor, variant_of_layer: torch.Tensor, layer_names: list[str], tokenizer
) -> dict[str, list[str]]:
    if kde is None:
        return {}
    with torch.no_grad():
        _, idx = kde.nearest(vectors.detach().float().reshape(-1, vectors.shape[-1]), k=1)
    idx = idx.reshape(vectors.shape[0], vectors.shape[1], -1)[..., 0]
    out = {}
    for i, name in enumerate(layer_names):
        out[name] = tokenizer.convert_ids_to_tokens(idx[int(variant_of_layer[i])].tolist())
    return out
