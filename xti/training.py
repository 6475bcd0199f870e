"""The training step maths and the one `train()` loop (DESIGN §3).

The step is built from small pure functions that tests check one by one:

* `step_generator` / `sample_batch`: everything random about a micro-step (which image, which
  augmentation, which prompt, latent sample, noise, timesteps) is a function of ``(seed, micro-step)``
  alone. The *global* batch is drawn and each process takes its slice, so resuming is exact and
  N processes × B images equal one process × N·B images.
* `diffusion_target`, `snr_weights`, `diffusion_loss`: the objective (epsilon or v, min-SNR).
* `compute_loss`: encode per-layer contexts in one text-encoder call, run the UNet with them.
* the KDE term (`xti.kde.add_relative_kde_gradient`) joins the gradient once per optimizer step,
  scaled relative to the complete diffusion gradient; `frozen_fraction` watches for runs that
  do not move.

`train()` wires these into an Accelerate loop: mixed precision with fp32 vectors, gradient
accumulation, DDP over the vectors only, checkpoints and exact resume, snapshots, export, metrics.
What makes a run trustworthy on disk (folder lock and ownership, run identity, pickle-free
checkpoints, stop signals, non-finite guards) lives in `xti.runs`; `train()` calls it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xti import runs
from xti.attention import install_processors
from xti.config import Config
from xti.data import (
    augment,
    check_captions,
    check_prompt_lengths,
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
from xti.kde import KDERegularizer, KDEStats, add_relative_kde_gradient
from xti.latent_cache import LatentDiskCache, LatentReport, cached_latents
from xti.layers import LayerScheme, layer_scheme
from xti.models import ModelBundle, load_model
from xti.tracking import (
    Smoother,
    log_images,
    log_table,
    setup_tracking,
    write_model_card,
)
from xti.validation import DEFAULT_VALIDATION_PROMPTS, validation_grid

logger = logging.getLogger("xti")


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
    *,
    snr_gamma: float | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Diffusion loss of one micro-step (the KDE term is added to the gradient once per optimizer
    step instead, by `xti.kde.add_relative_kde_gradient`).

    Args:
        m: models and concept wiring (the text encoders must carry the concept token embedding).
        batch: this process's batch, on the models' device.
        snr_gamma: min-SNR gamma, or None for plain MSE.

    Returns:
        The scalar loss and a dict of detached parts: ``mse``.
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
    return mse, {"mse": mse.detach()}


FROZEN_CHECK_AT = 0.1
"""Fraction of `train.max_steps` after which a run that has not moved is called frozen."""
FROZEN_THRESHOLD = 0.01
"""A run is frozen when its vectors moved less than this fraction of their initial norm."""


def build_kdes(
    cfg: Config,
    encoders: list[tuple[str, Any, nn.Module]],
    embeddings: dict[str, nn.Embedding],
) -> dict[str, KDERegularizer]:
    """One KDE per text encoder over its reference rows (`kde.reference`, `kde.bandwidth`), built
    where the embedding table lives (before the models move: bad reference words fail early)."""
    out = {}
    for name, tok, _ in encoders:
        try:
            reg = KDERegularizer.from_reference(
                embeddings[name].weight, tok, cfg.kde.reference, cfg.kde.bandwidth
            )
        except ValueError as e:
            raise XTIError(f"{e} ({name} text encoder)") from None
        logger.info(
            "KDE (%s): %d reference rows, bandwidth h=%.4g", name, reg.num_vocab, reg.bandwidth
        )
        out[name] = reg
    return out


def relative_movement(vectors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> float:
    """``||V - V0|| / ||V0||`` over all encoders' vectors together (0 when V0 is all zeros)."""
    moved = sum(
        float((vectors[k].detach().float() - v.float()).square().sum()) for k, v in initial.items()
    )
    size = sum(float(v.float().square().sum()) for v in initial.values())
    return math.sqrt(moved / size) if size > 0 else 0.0


def frozen_check_at(max_steps: int, warmup_steps: int) -> int:
    """The step at which `warn_if_frozen` looks: after `FROZEN_CHECK_AT` of the run, and not
    before the learning-rate warm-up is over (a run still warming up has barely moved by design)."""
    return min(max_steps, max(1, math.ceil(FROZEN_CHECK_AT * max_steps), warmup_steps))


def warn_if_frozen(cfg: Config, moved: float, step: int) -> bool:
    """Warn (once, by the caller) when the vectors moved less than `FROZEN_THRESHOLD` of their
    initial norm; True when it warned."""
    if moved >= FROZEN_THRESHOLD:
        return False
    logger.warning(
        "the run looks frozen: after %d of %d steps the vectors moved %.3g%% of their initial norm "
        "(under %g%%). Raise train.lr (now %g) or lower kde.weight (now %g); check "
        "train.lr_warmup_steps (now %d) too.",
        step, cfg.train.max_steps, 100 * moved, 100 * FROZEN_THRESHOLD, cfg.train.lr,
        cfg.kde.weight, cfg.train.lr_warmup_steps,
    )  # fmt: skip
    return True


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


def resume_checkpoint(cfg: Config, out: Path) -> runs.Checkpoint | None:
    """The checkpoint `train.resume` names, read and checked (None for a new run).

    ``latest`` is the newest checkpoint of the run recorded in ``output_dir`` (``xti-run.json``),
    never another run's; ``auto`` is the same, or None when that run has no checkpoint.
    """
    resume = cfg.train.resume
    if not resume:
        return None
    if resume not in ("latest", "auto"):
        return runs.read_checkpoint(Path(resume))
    folder = out / runs.CHECKPOINTS
    run_id = (runs.read_owner(out) or {}).get("run_id")
    latest = runs.latest_checkpoint(folder, run_id) if isinstance(run_id, str) else None
    if latest is not None:
        return runs.read_checkpoint(latest)
    if resume == "auto":
        return None
    if not isinstance(run_id, str):
        raise XTIError(
            f"train.resume=latest: {out} holds no xti run to resume (no {runs.OWNER_FILE}); start a "
            "new run, or give a checkpoint folder"
        )
    raise XTIError(f"train.resume=latest: no complete checkpoint of run {run_id[:8]} in {folder}")


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

    The output folder is locked for the run and must not hold another run's results (unless
    ``train.overwrite`` or a resume of its own run); checkpoints carry the run's identity (`xti.runs`).
    SIGINT and SIGTERM stop at the next step boundary with the vectors and a checkpoint saved, and
    raise `xti.runs.RunInterrupted` (a `KeyboardInterrupt`).

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
        XTIError: bad input, detected before anything is written; or a diverged run (non-finite
            loss or vectors), stopped without exporting.
    """
    with contextlib.ExitStack() as cleanup:
        return _train(
            cfg, bundle=bundle, progress=progress, stop_at_step=stop_at_step, cleanup=cleanup
        )


def _train(
    cfg: Config,
    *,
    bundle: ModelBundle | None,
    progress: bool,
    stop_at_step: int | None,
    cleanup: contextlib.ExitStack,
) -> TrainResult:
    """The body of `train`; `cleanup` releases the folder lock, signal handlers and training hooks
    on every way out."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    process_age = _process_age()  # seconds from the process start to this call
    tc = cfg.train
    out = Path(cfg.output_dir).expanduser()

    # Everything that can fail on bad input happens before the first write, and what needs no
    # model (output folder, resume checkpoint, validation files, images) before the model loads.
    resume_from = resume_checkpoint(cfg, out)
    runs.check_output_folder(
        out, resumed_run=resume_from.run_id if resume_from else None, overwrite=tc.overwrite
    )
    mix_file = _load_mix_with(cfg)
    records = load_images(cfg.data)
    check_captions(records, cfg.concept.placeholder)
    if bundle is None:
        bundle = load_model(cfg.model)
    _check_resolution(cfg, bundle.vae)
    identity = runs.model_identity(bundle)  # before the models are cast to a lower precision
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
    _check_prompts(cfg, records, bundle, tokens)
    # KDE values are always logged; its gradient joins the step only when kde.weight > 0.
    kdes = build_kdes(cfg, encoders, embeddings)
    _check_mix_with(cfg, mix_file, scheme, sdxl, embeddings)

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
    cleanup.callback(_release_accelerator_state)

    # The run's identity; a resumed checkpoint must match it (or train.resume_force).
    fingerprint = runs.run_fingerprint(cfg, identity, world=world)
    run_id = runs.new_run_id()
    if resume_from is not None:
        runs.compare_fingerprints(resume_from, fingerprint, force=tc.resume_force)
        run_id = resume_from.run_id
        later = runs.run_checkpoints(out / runs.CHECKPOINTS, run_id)
        if later and later[-1].step > resume_from.step:
            # Resuming an earlier checkpoint forks the run: the newer ones are another future.
            run_id = runs.new_run_id()
            logger.warning(
                "resuming %s, an earlier checkpoint than its run's newest (%s): this continuation "
                "is a new run (%s)", resume_from.path, later[-1].path, run_id[:8],
            )  # fmt: skip
    if is_main:  # claim the folder: lock, clean up killed writes, record the owner
        out.mkdir(parents=True, exist_ok=True)
        lock = runs.OutputLock(out)
        lock.acquire(runs.lock_info(run_id))
        cleanup.callback(lock.release)
        runs.remove_stale_tmp(out)
        owner = {
            "run_id": run_id,
            "fingerprint": fingerprint,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": str(resume_from.path) if resume_from else None,
            "status": "running",
        }
        runs.write_owner(out, owner)

    # Latent distributions once per distinct augmentation, in fp32, then the VAE is dropped.
    aug = augment(
        records,
        tc.resolution,
        center_crop=cfg.data.center_crop,
        random_crops=cfg.data.random_crops,
        flip_p=cfg.data.flip_p,
        seed=tc.seed,
    )
    # From the disk cache when these pixels were encoded by this VAE before (xti.latent_cache);
    # the VAE then is neither moved nor called.
    cache, latent_report = cached_latents(
        bundle.vae,
        aug,
        cfg.data.encode_batch_size,
        cache=(
            LatentDiskCache(max_bytes=int(cfg.data.latent_cache_max_gb * 2**30))
            if cfg.data.latent_cache
            else None
        ),
        device=device,
        progress=progress and is_main,
    )
    if is_main:
        logger.info("latents: %s", latent_report.describe())
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
        if "processors" not in installed:
            return
        installed.pop("processors").remove()
        for handle in installed.pop("embeddings"):
            handle.remove()

    install_training_hooks()
    cleanup.callback(remove_training_hooks)

    kdes = {name: reg.to(device) for name, reg in kdes.items()}  # computed before the latents
    initial_vectors = {k: v.detach().clone() for k, v in concept().items()}

    lr = runs.effective_lr(tc, world)
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
    if resume_from is not None:  # every process reads it; only safetensors and JSON
        start_step = runs.load_checkpoint(
            resume_from,
            module=raw_concept,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            scaler=accelerator.scaler,
        )
        if is_main:
            logger.info("resumed from %s at step %d", resume_from.path, start_step)

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
        current = raw_concept()
        bad = runs.non_finite(current)
        if bad:  # never write (or replace a file with) a diverged embedding
            raise XTIError(f"{path}: not written, the {', '.join(bad)} vectors are not finite")
        meta = build_metadata(**metadata_common, steps=steps, title=name, extra=extra)
        vectors = export_vectors(current, variant_of_layer, scheme, num_variants)
        return save_embedding_file(path, vectors, meta)

    saved: dict[str, Any] = {"checkpoint": None, "step": None}

    def checkpoint(step: int) -> None:
        """Save a checkpoint of this run (main process; safetensors + JSON), prune its old ones."""
        if is_main:
            folder = out / runs.CHECKPOINTS
            saved["checkpoint"] = runs.save_checkpoint(
                folder,
                step=step,
                run_id=run_id,
                fingerprint=fingerprint,
                config=cfg.model_dump(mode="json"),
                module=raw_concept,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                scaler=accelerator.scaler,
            )
            runs.prune_checkpoints(folder, run_id, tc.checkpoints_total_limit)
        saved["step"] = step
        accelerator.wait_for_everyone()

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
    mix_with = mix_file if is_main else None
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
    step_seconds: list[float] = []  # this process's steps, for the bar, summary and model card
    setup_seconds: float | None = None
    end_step = tc.max_steps if stop_at_step is None else min(tc.max_steps, stop_at_step)
    frozen_check_step = frozen_check_at(tc.max_steps, tc.lr_warmup_steps)
    # SIGINT/SIGTERM stop at the next step boundary; several processes agree on that step.
    stop = cleanup.enter_context(runs.StopSignals(defer_always=world > 1))
    try:
        while step < end_step:
            stop.enter_step()
            t_step = time.perf_counter()
            if setup_seconds is None:
                setup_seconds = t_step - t0
                if is_main:
                    logger.info("first step after %.1f s of setup", setup_seconds)
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
                        concept()  # DDP's forward; the text encoders read the raw parameters
                        loss, parts = compute_loss(models, batch, snr_gamma=tc.snr_gamma)
                    accelerator.backward(loss / accum)
                total_loss += loss.detach() / accum
            # The diffusion gradient is now complete (accumulated, synchronised); unscale it once,
            # then add the KDE gradient relative to it, then clip (DESIGN §4).
            accelerator.unscale_gradients()
            kde_stats = (
                add_relative_kde_gradient(
                    {n: raw_concept.sets[n].vectors for n in kdes}, kdes, cfg.kde.weight
                )
                if cfg.kde.weight > 0
                else None
            )
            if tc.max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    raw_concept.parameters(), tc.max_grad_norm
                )
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
            step_time = time.perf_counter() - t_step  # .item() waited for the device
            step_seconds.append(step_time)
            runs.check_finite_step(
                step,
                mean_loss,
                raw_concept(),
                last_finite=losses[-1] if losses else None,
                last_checkpoint=saved["checkpoint"],
            )
            stop.leave_step()
            losses.append((step, mean_loss))
            if step == frozen_check_step and is_main:
                warn_if_frozen(cfg, relative_movement(raw_concept(), initial_vectors), step)
            bar.set_postfix(  # the median of the last steps: tqdm's own rate is a moving mean
                {"loss": f"{mean_loss:.4f}", "s/step": f"{_median(step_seconds[-20:]):.3g}"},
                refresh=False,
            )
            bar.update(1)
            if step % tc.log_every == 0 or step == end_step:
                logs = _step_logs(
                    mean_loss,
                    parts,
                    lr_scheduler.get_last_lr()[0],
                    grad_norm,
                    raw_concept(),
                    variant_of_layer,
                    layer_names,
                    kdes=kdes,
                    kde_stats=kde_stats,
                    moved=relative_movement(raw_concept(), initial_vectors),
                )
                logs["loss_smoothed"] = smooth.update(mean_loss)
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
            stop.check(accelerator)
    except KeyboardInterrupt:
        bar.close()
        _save_interrupted(
            stop, step, start_step, world, is_main, saved, checkpoint, export, out, name
        )
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
            "run_id": run_id,
            "output_file": str(output_file) if output_file else None,
            "samples_file": str(last_grid[0]) if last_grid else None,
            "steps": step,
            "final_loss": losses[-1][1] if losses else None,
            "world_size": world,
            "ranks_in_sync": in_sync,
            "seconds": round(result.seconds, 2),
            **run_timing(setup_seconds, latent_report, step_seconds, process_age),
            "mixed_precision": accelerator.mixed_precision,
            "device": str(device),
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
                timing={k: summary[k] for k in TIMING_KEYS},
            )
        owner.update(status="finished" if output_file else "stopped", steps=step)
        runs.write_owner(out, owner)
    accelerator.end_training()
    remove_training_hooks()
    _release_accelerator_state()
    return result


TIMING_KEYS = (
    "setup_seconds",
    "launch_to_first_step_seconds",
    "latent_seconds",
    "latent_cache",
    "latents_encoded",
    "latents_total",
    "median_step_seconds",
    "steps_timed",
    "mixed_precision",
    "device",
)
"""The timing fields of ``summary.json`` (and the model card), see `run_timing`."""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _process_age() -> float | None:
    """Seconds since this process started (None where psutil cannot tell)."""
    try:
        import psutil  # a dependency of accelerate

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


def run_timing(
    setup_seconds: float | None,
    latents: LatentReport,
    step_seconds: list[float],
    process_age: float | None = None,
) -> dict[str, Any]:
    """The timing fields of ``summary.json``: ``setup_seconds`` (from `train()` to the first step
    of this process), ``launch_to_first_step_seconds`` (from the process start, interpreter and
    imports included), ``latent_seconds`` and ``latent_cache`` (hit, miss, partial or off) with
    ``latents_encoded`` of ``latents_total`` going through the VAE, and ``median_step_seconds``
    over the ``steps_timed`` optimizer steps this process ran (validation and checkpoints not
    included). `process_age` is the process's age when `train()` was called. (The summary adds
    ``mixed_precision`` and ``device``, which the times depend on.)"""
    launch = None
    if setup_seconds is not None and process_age is not None:
        launch = round(process_age + setup_seconds, 2)
    return {
        "setup_seconds": round(setup_seconds, 2) if setup_seconds is not None else None,
        "launch_to_first_step_seconds": launch,
        "latent_seconds": round(latents.seconds, 2),
        "latent_cache": latents.status,
        "latents_encoded": latents.encoded,
        "latents_total": latents.total,
        "median_step_seconds": round(_median(step_seconds), 4) if step_seconds else None,
        "steps_timed": len(step_seconds),
    }


def _save_interrupted(
    stop: runs.StopSignals,
    step: int,
    start_step: int,
    world: int,
    is_main: bool,
    saved: dict[str, Any],
    checkpoint: Any,
    export: Any,
    out: Path,
    name: str,
) -> None:
    """On SIGINT/SIGTERM: a checkpoint (when the state is at a step boundary) and the vectors."""
    at_boundary = stop.at_boundary or (world == 1 and not stop.in_step)
    where = []
    if at_boundary and step > start_step and saved["step"] != step:
        checkpoint(step)
    if at_boundary and saved["step"] == step and saved["checkpoint"] is not None:
        where.append(f"checkpoint {saved['checkpoint']} (continue with train.resume=latest)")
    if is_main:
        try:
            file = export(out / f"{name}.interrupted.xti.safetensors", step)
            where.insert(0, f"vectors saved to {file}")
        except XTIError as err:
            where.insert(0, str(err))
        print(f"interrupted at step {step}; {'; '.join(where)}", flush=True)


def _load_mix_with(cfg: Config) -> EmbeddingFile | None:
    """`validation.mix_with`, loaded before the model (one-line errors naming the file)."""
    path = cfg.validation.mix_with
    if not path:
        return None
    if not Path(path).is_file():
        raise XTIError(f"validation.mix_with: {path} does not exist")
    return load_embedding_file(path)


def _check_mix_with(
    cfg: Config,
    mix: EmbeddingFile | None,
    scheme: LayerScheme,
    sdxl: bool,
    embeddings: dict[str, nn.Module],
) -> None:
    """Fail before training when the mixing file or `validation.mix_layers` cannot fit the model."""
    if mix is None:
        return
    where = f"validation.mix_with: {cfg.validation.mix_with}"
    if mix.is_sdxl != sdxl:
        kind = "an SDXL file" if mix.is_sdxl else f"an SD 1.x/2.x file ({mix.family})"
        raise XTIError(f"{where} is {kind}, but the model is {'SDXL' if sdxl else 'SD 1.x/2.x'}")
    from xti.inference import _match_layers

    if _match_layers(mix.layers, scheme) is None:
        raise XTIError(
            f"{where}: its layers ({', '.join(mix.layers[:4])}, ...) do not fit this model's "
            f"({', '.join(scheme.names[:4])}, ...)"
        )
    for enc, emb in embeddings.items():
        width = int(emb.weight.shape[-1])
        keys = [k for k in mix.vectors if not sdxl or k.startswith(f"{enc}.")]
        found = {int(mix.vectors[k].shape[-1]) for k in keys}
        if found and found != {width}:
            raise XTIError(
                f"{where}: its vectors are {sorted(found)} wide, this model's {enc} text encoder "
                f"takes {width}"
            )
    try:
        scheme.select(cfg.validation.mix_layers)
    except XTIError as err:
        raise XTIError(f"validation.mix_layers: {err}") from None


def _check_prompts(
    cfg: Config, records: list[Any], bundle: ModelBundle, tokens: dict[str, PlaceholderTokens]
) -> None:
    """Every training prompt (captions or templates) and validation prompt fits CLIP's tokens with
    the placeholder expanded: an error when the placeholder would be cut, a warning otherwise."""
    placeholder = cfg.concept.placeholder
    per_image = prompts_per_image(records, placeholder, cfg.data.template)
    items = []
    for rec, prompts_ in zip(records, per_image, strict=True):
        where = rec.source if rec.caption is not None else f"data.template={cfg.data.template}"
        items += [(where, p) for p in prompts_]
    if cfg.validation.every > 0:
        items += [("validation.prompts", p) for p in cfg.validation.prompts]
    unique = list(dict.fromkeys(items))
    for name, tok, _ in bundle.text_encoders:
        check_prompt_lengths(tok, tokens[name], unique)


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
    *,
    kdes: dict[str, KDERegularizer] | None = None,
    kde_stats: dict[str, KDEStats] | None = None,
    moved: float | None = None,
) -> dict[str, float]:
    """Scalars of one step: loss parts, lr, gradient norm (after the KDE and clipping), the KDE
    figures (K, ``grad_norm/diffusion``, ``grad_norm/kde``, ``kde/effective_weight``, summed over
    encoders; present when the KDE was applied this step), ``vectors/moved`` (``||V - V0|| /
    ||V0||``), and per layer the mean vector norm and KDE value (``norm/<layer>``, ``kde/<layer>``;
    ``norm/<encoder>/<layer>`` when there are two encoders)."""
    logs: dict[str, float] = {
        "loss": loss,
        "mse": float(parts["mse"]),
        "lr": float(lr),
        "grad_norm": float(grad_norm),
    }
    if moved is not None:
        logs["vectors/moved"] = moved
    if kde_stats:
        logs["grad_norm/diffusion"] = math.sqrt(
            sum(x.grad_diffusion**2 for x in kde_stats.values())
        )
        logs["grad_norm/kde"] = math.sqrt(sum(x.grad_kde**2 for x in kde_stats.values()))
        logs["kde/effective_weight"] = max(x.effective_weight for x in kde_stats.values())
    kdes = kdes or {}
    kde_total = 0.0
    for enc, tensor in vectors.items():
        prefix = f"{enc}/" if len(vectors) > 1 else ""
        norms = tensor.detach().float().norm(dim=-1).mean(-1)  # [V]
        kde_v = None
        if enc in kdes:
            with torch.no_grad():
                kde_v = kdes[enc](tensor.detach())  # [V, n]
            kde_total += float(kde_v.mean())
        for i, name in enumerate(layer_names):
            v = int(variant_of_layer[i])
            logs[f"norm/{prefix}{name}"] = float(norms[v])
            if kde_v is not None:
                logs[f"kde/{prefix}{name}"] = float(kde_v[v].mean())
    if kdes:
        logs["kde"] = kde_total
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
