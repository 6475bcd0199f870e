r"""The training run (DESIGN §3): `train()` and the `Trainer` that wires the step into an Accelerate
loop.

The step's maths (sampling a batch from ``(seed, micro-step)``, the objective, `compute_loss`) lives in
`xti.step`; what a run reports (step scalars, timing, the frozen-run warning) in `xti.tracking`; the
checks of its inputs in `xti.checks`; what makes a run trustworthy on disk (folder lock and
ownership, run identity, pickle-free checkpoints, stop signals, non-finite guards) in `xti.runs`.

The `Trainer` holds a handful of named parts, each a small record built by one step of its visible
`Trainer.setup` (concept plan, run identity, data, models, optimizer), runs the optimizer steps
(the accumulated diffusion gradient, the KDE term joined once per optimizer step relative to it,
clipping, AdamW) and then the after-step events (log, validate, checkpoint, snapshot) and the
after-run events (summary, model card, run record). Callers may add their own `TrainCallback`\ s
(checkpoint saved, validation images saved, run finished). Mixed precision with fp32 vectors,
gradient accumulation, DDP over the vectors only, exact resume. Everything it changes on the
caller's models (concept embeddings, attention processors, gradient checkpointing) and
Accelerate's process-wide state is undone on every way out.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xti import runs
from xti.attention import install_processors
from xti.buckets import prepare_latents
from xti.callbacks import (
    CheckpointSaved,
    EventLog,
    RunFinished,
    TrainCallback,
    ValidationImagesSaved,
    dispatch,
)
from xti.checks import (
    check_buckets,
    check_mix_with,
    check_prompts,
    check_resolution,
    load_mix_with,
    resume_checkpoint,
)
from xti.config import Config
from xti.data import augment, check_captions, load_images, prompts_per_image
from xti.distributed import check_world_size
from xti.embeddings import (
    ConceptSet,
    ConceptVectors,
    PlaceholderTokens,
    add_placeholder_tokens,
    initializer_vectors,
    install_token_embedding,
    layer_variants,
)
from xti.errors import XTIError
from xti.export import EmbeddingFile, build_metadata, save_embedding_file
from xti.families import EncoderPart
from xti.init_from import InitTarget, InitVectors, load_init_from
from xti.kde import KDERegularizer, KDEStats
from xti.latent_cache import LatentDiskCache, LatentReport, cached_latents
from xti.layers import LayerScheme, layer_scheme
from xti.masks import attach_masks
from xti.models import ModelBundle, load_model
from xti.paths import atomic_write_bytes
from xti.regularizers import (
    Regularization,
    add_relative_gradient,
    regularizer_terms,
    variant_weights,
)
from xti.step import (
    Batch,
    PromptTable,
    StepModels,
    compute_loss,
    relative_movement,
    sample_batch,
)
from xti.tracking import (
    TIMING_KEYS,
    Smoother,
    flat_config,
    frozen_check_at,
    log_images,
    log_table,
    median,
    nearest_vocabulary_tokens,
    peak_memory_gb,
    per_encoder,
    process_age,
    run_timing,
    setup_tracking,
    step_logs,
    warn_if_frozen,
    write_model_card,
)
from xti.validation import DEFAULT_VALIDATION_PROMPTS, validation_grid

logger = logging.getLogger("xti")


def build_kdes(
    cfg: Config,
    parts: Sequence[EncoderPart],
    embeddings: Mapping[str, nn.Embedding],
) -> dict[str, KDERegularizer]:
    """One KDE per text encoder over its reference rows (`kde.reference`, `kde.bandwidth`), built
    where the embedding table lives (before the models move: bad reference words fail early)."""
    out = {}
    for part in parts:
        try:
            reg = KDERegularizer.from_reference(
                embeddings[part.name].weight, part.tokenizer, cfg.kde.reference, cfg.kde.bandwidth
            )
            if cfg.kde.bandwidth_scale != 1.0:
                reg = KDERegularizer.from_reference(
                    embeddings[part.name].weight,
                    part.tokenizer,
                    cfg.kde.reference,
                    reg.bandwidth * cfg.kde.bandwidth_scale,
                )
        except ValueError as e:
            raise XTIError(f"{e} ({part.name} text encoder)") from None
        logger.info(
            "KDE (%s): %d reference rows, bandwidth h=%.4g", part.name, reg.num_vocab, reg.bandwidth
        )
        out[part.name] = reg
    return out


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


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def train(
    cfg: Config,
    *,
    bundle: ModelBundle | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    callbacks: Sequence[TrainCallback] = (),
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
            The concept embeddings and attention processors installed for training are removed
            again on every way out.
        progress: show a progress bar on the main process.
        stop_at_step: stop (after checkpointing, if due) once this step is reached, as if interrupted;
            the final export is skipped. For chunked runs and resume tests.
        callbacks: `xti.callbacks.TrainCallback`\\ s told (on the main process) about each
            checkpoint, validation grid and the end of the run.

    Returns:
        A `TrainResult`; the main process's `output_file` is the exported ``.xti.safetensors``.

    Raises:
        XTIError: bad input, detected before anything is written; or a diverged run (non-finite
            loss or vectors), stopped without exporting.
    """
    if cfg.concepts is not None:
        raise XTIError("this config lists concepts: train it with xti.concepts.train_concepts")
    with Trainer(
        cfg, bundle=bundle, progress=progress, stop_at_step=stop_at_step, callbacks=callbacks
    ) as trainer:
        trainer.setup()
        trainer.run_steps()
        return trainer.finish()


@dataclass
class StepOutcome:
    """What one optimizer step did: what the after-step events (log, validate, ...) look at."""

    step: int
    loss: float  # mean over micro-steps and processes
    loss_parts: dict[str, torch.Tensor]  # the last micro-step's (`compute_loss`)
    grad_norm: torch.Tensor  # after the KDE term and clipping
    kde_stats: dict[str, KDEStats] | None  # when the KDE gradient was applied
    seconds: float


# ----------------------------------------------------------------------------- the Trainer's parts


@dataclass
class RunInputs:
    """What the run reads before anything is written, each checked (`xti.checks`)."""

    resume_from: runs.Checkpoint | None  # the checkpoint `train.resume` names
    mix_file: EmbeddingFile | None  # `validation.mix_with`
    records: list[Any]  # the training images (`xti.data.ImageRecord`)
    bundle: ModelBundle  # the model, fp32 on the CPU
    identity: dict[str, Any]  # the model's identity (`xti.runs.model_identity`), before any cast


@dataclass
class ConceptPlan:
    """What the concept is on this model: its placeholder tokens and initial vectors per text
    encoder, the layer scheme and which vector set each layer reads, and the KDEs."""

    tokens: dict[str, PlaceholderTokens]
    inits: dict[str, torch.Tensor]  # per encoder, the initializer's [n, d] vectors
    granularity: str  # `xti.granularity`
    block_scheme: str  # the layer scheme's granularity: block or transformer
    scheme: LayerScheme
    variant_of_layer: torch.Tensor  # [L] the vector set each layer reads
    num_variants: int
    pooled: str  # `xti.pooled`
    kdes: dict[str, KDERegularizer]  # per encoder (values always logged; gradient when weight > 0)
    regularization: Regularization  # `regularizer.kind`'s term per encoder and its λ
    clean_tokenizers: dict[str, Any]  # copies without the placeholder (validation pipelines)
    start: InitVectors | None = None  # `concept.init_from`'s vectors (None: the initializer's)

    @property
    def layer_names(self) -> list[str]:
        return self.scheme.names


@dataclass
class RunIdentity:
    """Which run this is: its id, its fingerprint, where it resumes from, its ownership record."""

    run_id: str
    fingerprint: dict[str, Any]
    resume_from: runs.Checkpoint | None
    owner: dict[str, Any] = field(default_factory=dict)  # ``xti-run.json`` (main process)


@dataclass
class RunData:
    """The training data: latent distributions per distinct augmentation and the prompt table."""

    cache: Any  # `xti.data.LatentCache`
    latent_report: LatentReport
    prompts: PromptTable


@dataclass
class Optimization:
    """The trainable vectors and what moves them."""

    raw: ConceptSet  # the vectors (what the text encoders read)
    wrapped: nn.Module  # the same, as Accelerate prepared it (DDP-wrapped with several processes)
    initial: dict[str, torch.Tensor]  # the vectors at the start (for `vectors/moved`)
    optimizer: Any
    lr_scheduler: Any


# ----------------------------------------------------------------------------- the Trainer


class Trainer:
    """One `train()` run: a handful of named parts built by `setup`, then the steps.

    `setup` reads and checks the inputs, plans the concept, starts Accelerate, establishes the run's
    identity and claims the folder, prepares the data, the models and the optimizer, resumes and
    starts the trackers. `run_steps` runs the optimizer steps, each followed by the `after_step`
    events (log, validate, checkpoint and snapshot when due), and `finish` exports and runs the
    `after_run` events (summary, model card, run record); the `callbacks` hear about checkpoints,
    validation grids and the end. Used as a context manager: on every way out (an error, a stop
    signal, the end) `cleanup` puts back what the run changed on the caller's models (concept
    embeddings, attention processors, gradient checkpointing), restores the signal handlers,
    releases the folder lock and forgets Accelerate's process-wide settings.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        bundle: ModelBundle | None = None,
        progress: bool = True,
        stop_at_step: int | None = None,
        callbacks: Sequence[TrainCallback] = (),
    ) -> None:
        self.t0 = time.perf_counter()
        self.process_age = process_age()  # seconds from the process start to this call
        self.cfg, self.tc, self.given_bundle = cfg, cfg.train, bundle
        self.progress, self.stop_at_step = progress, stop_at_step
        self.out = Path(cfg.output_dir).expanduser()
        self.name = cfg.concept_name
        self.cleanup = contextlib.ExitStack()
        self.hooks: list[Any] = []  # installed concept embeddings and processors
        self.callbacks: list[TrainCallback] = [EventLog(self.out), *callbacks]
        # progress, updated by the steps
        self.step = self.start_step = 0
        self.losses: list[tuple[int, float]] = []
        self.step_seconds: list[float] = []  # this process's steps: bar, summary, model card
        self.setup_seconds: float | None = None
        self.saved_checkpoint: Path | None = None  # the newest checkpoint this run wrote
        self.saved_step: int | None = None  # the step of the newest checkpoint
        self.last_grid: Path | None = None  # the newest validation grid
        self.summary: dict[str, Any] = {}
        self.bar: Any = None  # the progress bar while the steps run
        self.after_step: list[Callable[[StepOutcome], None]] = [
            self.log_if_due,
            self.validate_if_due,
            self.checkpoint_if_due,
            self.snapshot_if_due,
        ]
        self.after_run: list[Callable[[TrainResult], None]] = [
            self.write_summary,
            self.write_model_card,
            self.record_end,
            self.announce_end,
        ]

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self.cleanup.__exit__(*exc)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Build the run's parts in order. Everything that can fail on bad input happens before the
        first write, and what needs no model (output folder, resume checkpoint, validation files,
        images) before the model loads."""
        self.inputs = self.read_inputs()
        self.bundle = self.inputs.bundle
        self.family, self.parts = self.bundle.family, self.bundle.text_encoders
        self.plan = self.plan_concept()
        self.accelerator = self.start_accelerator()  # seeds torch: after the plan, as always
        self.device = self.accelerator.device
        self.dtype = _weight_dtype(self.accelerator.mixed_precision)
        self.world = self.accelerator.num_processes
        check_world_size(self.world)  # a launcher that formed no group: one line, nothing written
        self.is_main = self.accelerator.is_main_process
        self.run = self.identify_run()
        self.claim_folder()
        self.data = self.prepare_data()
        self.models = self.prepare_models()
        self.opt = self.make_optimizer()
        self.install_training_hooks()
        self.cleanup.callback(self.remove_training_hooks)
        self.resume()
        self.start_trackers()
        self.smooth = Smoother()
        self.mix_with = self.inputs.mix_file if self.is_main else None
        self.global_batch = self.tc.batch_size * self.world
        self.accum = self.tc.gradient_accumulation_steps
        self.end_step = self.tc.max_steps
        if self.stop_at_step is not None:
            self.end_step = min(self.tc.max_steps, self.stop_at_step)
        self.frozen_check_step = frozen_check_at(self.tc.max_steps, self.tc.lr_warmup_steps)
        # SIGINT/SIGTERM stop at the next step boundary; several processes agree on that step.
        self.stop = self.cleanup.enter_context(runs.StopSignals(defer_always=self.world > 1))

    def read_inputs(self) -> RunInputs:
        """The resume checkpoint, the output folder, the mixing file, the images, the model."""
        cfg = self.cfg
        resume_from = resume_checkpoint(cfg, self.out)
        runs.check_output_folder(
            self.out,
            resumed_run=resume_from.run_id if resume_from else None,
            overwrite=self.tc.overwrite,
        )
        mix_file = load_mix_with(cfg)
        records = load_images(cfg.data)
        check_captions(records, cfg.concept.placeholder)
        if cfg.data.masks:
            attach_masks(records, cfg.data)
        bundle = self.given_bundle if self.given_bundle is not None else load_model(cfg.model)
        check_resolution(cfg, bundle.vae)
        check_buckets(cfg, bundle.vae)
        identity = runs.model_identity(bundle)  # before the models are cast
        return RunInputs(resume_from, mix_file, records, bundle, identity)

    def plan_concept(self) -> ConceptPlan:
        """Placeholder tokens, initial vectors, layers and vector sets, KDEs; prompt checks."""
        cfg, parts = self.cfg, self.parts
        concept = cfg.concept
        # Validation pipelines need the tokenizers without our placeholder tokens; copy them only then.
        clean = {p.name: copy.deepcopy(p.tokenizer) for p in parts} if cfg.validation.every else {}
        tokens = {
            p.name: add_placeholder_tokens(p.tokenizer, concept.placeholder, concept.n_vectors)
            for p in parts
        }
        embeddings = {p.name: p.text_encoder.get_input_embeddings() for p in parts}
        inits = {
            p.name: initializer_vectors(
                p.tokenizer, embeddings[p.name], concept.initializer, concept.n_vectors
            )
            for p in parts
        }
        granularity = cfg.xti.granularity
        block_scheme = "transformer" if granularity == "transformer" else "block"
        scheme = layer_scheme(self.bundle.unet, block_scheme)
        check_prompts(cfg, self.inputs.records, parts, tokens)
        # KDE values are always logged; its gradient joins the step only when kde.weight > 0.
        kdes = build_kdes(cfg, parts, embeddings)
        check_mix_with(cfg, self.inputs.mix_file, scheme, self.family, embeddings)
        variant_of_layer = layer_variants(len(scheme), granularity)
        num_variants = 1 if granularity == "shared" else len(scheme)
        weights = variant_weights(
            cfg.kde.layer_weights, scheme.select, variant_of_layer, num_variants, scheme.names
        )
        start = None
        if concept.init_from:
            widths = {name: int(init.shape[-1]) for name, init in inits.items()}
            target = InitTarget(
                self.family, widths, scheme.names, variant_of_layer, num_variants,
                cfg.xti.pooled, concept.n_vectors,
            )  # fmt: skip
            start = load_init_from(concept.init_from, target)
        return ConceptPlan(
            tokens=tokens,
            inits=inits,
            granularity=granularity,
            block_scheme=block_scheme,
            scheme=scheme,
            variant_of_layer=variant_of_layer,
            num_variants=num_variants,
            pooled=cfg.xti.pooled,
            kdes=kdes,
            regularization=regularizer_terms(cfg, kdes, inits, weights),
            clean_tokenizers=clean,
            start=start,
        )

    def start_accelerator(self) -> Any:
        """The Accelerator (devices, processes, mixed precision, trackers) and the seed."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        tc, out = self.tc, self.out
        accelerator = Accelerator(
            mixed_precision=tc.mixed_precision,
            log_with=setup_tracking(self.cfg.tracking.report_to),
            project_config=ProjectConfiguration(
                project_dir=str(out), logging_dir=str(out / "logs")
            ),
        )
        self.cleanup.callback(_release_accelerator_state)
        set_seed(tc.seed)
        return accelerator

    def identify_run(self) -> RunIdentity:
        """The run's identity; a resumed checkpoint must match it (or train.resume_force)."""
        fingerprint = runs.run_fingerprint(self.cfg, self.inputs.identity, world=self.world)
        run_id = runs.new_run_id()
        resume_from = self.inputs.resume_from
        if resume_from is not None:
            runs.compare_fingerprints(resume_from, fingerprint, force=self.tc.resume_force)
            run_id = resume_from.run_id
            later = runs.run_checkpoints(self.out / runs.CHECKPOINTS, run_id)
            if later and later[-1].step > resume_from.step:
                # Resuming an earlier checkpoint forks the run: the newer ones are another future.
                run_id = runs.new_run_id()
                logger.warning(
                    "resuming %s, an earlier checkpoint than its run's newest (%s): this "
                    "continuation is a new run (%s)", resume_from.path, later[-1].path,
                    run_id[:8],
                )  # fmt: skip
        return RunIdentity(run_id, fingerprint, resume_from)

    def claim_folder(self) -> None:
        """The main process locks the output folder, cleans up killed writes, records the owner."""
        if not self.is_main:
            return
        run = self.run
        self.out.mkdir(parents=True, exist_ok=True)
        lock = runs.OutputLock(self.out)
        lock.acquire(runs.lock_info(run.run_id))
        self.cleanup.callback(lock.release)
        runs.remove_stale_tmp(self.out)
        run.owner = {
            "run_id": run.run_id,
            "fingerprint": run.fingerprint,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "resumed_from": str(run.resume_from.path) if run.resume_from else None,
            "status": "running",
        }
        runs.write_owner(self.out, run.owner)

    def prepare_data(self) -> RunData:
        """Latent distributions once per distinct augmentation, in fp32 (from the disk cache when
        this VAE encoded these pixels before: the VAE is then neither moved nor called), and the
        tokenized prompts."""
        cfg, tc, records = self.cfg, self.tc, self.inputs.records
        if cfg.data.buckets or cfg.data.masks:
            return self.prepare_bucketed_data()
        aug = augment(
            records,
            tc.resolution,
            center_crop=cfg.data.center_crop,
            random_crops=cfg.data.random_crops,
            flip_p=cfg.data.flip_p,
            seed=tc.seed,
        )
        disk = LatentDiskCache(max_bytes=int(cfg.data.latent_cache_max_gb * 2**30))
        cache, report = cached_latents(
            self.bundle.vae,
            aug,
            cfg.data.encode_batch_size,
            cache=disk if cfg.data.latent_cache else None,
            device=self.device,
            progress=self.progress and self.is_main,
        )
        return self.run_data(cache, report)

    def prepare_bucketed_data(self) -> RunData:
        """`prepare_data` with aspect-ratio buckets or masks: latents per bucket, with the masks'
        loss weights (`xti.buckets.prepare_latents`)."""
        cfg, tc, records = self.cfg, self.tc, self.inputs.records
        disk = LatentDiskCache(max_bytes=int(cfg.data.latent_cache_max_gb * 2**30))
        cache, report = prepare_latents(
            records, cfg.data, resolution=tc.resolution, seed=tc.seed, vae=self.bundle.vae,
            disk=disk if cfg.data.latent_cache else None, device=self.device,
            progress=self.progress and self.is_main,
        )  # fmt: skip
        return self.run_data(cache, report)

    def run_data(self, cache: Any, report: Any) -> RunData:
        """The prepared latents with this run's prompt table (and a line on how they were made)."""
        cfg = self.cfg
        if self.is_main:
            logger.info("latents: %s", report.describe())
        prompts = PromptTable.build(
            {p.name: p.tokenizer for p in self.parts},
            prompts_per_image(self.inputs.records, cfg.concept.placeholder, cfg.data.template),
            self.plan.tokens,
        )
        return RunData(cache, report, prompts)

    def prepare_models(self) -> StepModels:
        """Freeze the models and move them to the device (and the mixed-precision dtype), the KDEs
        too; what one step needs of them."""
        unet, plan = self.bundle.unet, self.plan
        for model in (unet, *(p.text_encoder for p in self.parts)):
            model.requires_grad_(False)
            model.eval()
            model.to(self.device)
            if self.dtype != torch.float32:  # casting fp32 to fp32 makes diffusers log a warning
                model.to(dtype=self.dtype)
        if self.tc.gradient_checkpointing and not unet.is_gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            self.cleanup.callback(unet.disable_gradient_checkpointing)
        plan.kdes = {name: reg.to(self.device) for name, reg in plan.kdes.items()}
        return StepModels(
            family=self.family,
            parts=self.parts,
            unet=unet,
            scheduler=self.bundle.noise_scheduler,
            tokens=plan.tokens,
            variant_of_layer=plan.variant_of_layer.to(self.device),
            num_variants=plan.num_variants,
            prediction_type=self.bundle.prediction_type,
            dtype=self.dtype,
            pooled=plan.pooled,
        )

    def make_optimizer(self) -> Optimization:
        """The trainable vectors, AdamW over them only, the learning-rate schedule, Accelerate's
        wrapping."""
        from diffusers.optimization import get_scheduler

        tc, plan = self.tc, self.plan
        raw = ConceptSet(
            {
                p.name: ConceptVectors(
                    plan.inits[p.name],
                    self.family.vector_sets(p.name, plan.num_variants, plan.pooled),
                )
                for p in self.parts
            }
        )
        if plan.start is not None:  # a new run from a file: its vectors, a fresh optimizer
            plan.start.copy_into(raw.sets)
        initial = {k: v.detach().clone() for k, v in raw().items()}
        optimizer = torch.optim.AdamW(
            raw.parameters(),
            lr=runs.effective_lr(tc, self.world),
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
        wrapped, optimizer = self.accelerator.prepare(raw, optimizer)
        raw = self.accelerator.unwrap_model(wrapped)
        return Optimization(raw, wrapped, initial, optimizer, lr_scheduler)

    def install_training_hooks(self) -> None:
        """Each text encoder reads its raw parameter; the wrapped module's forward is called once
        per step so that DDP sees a forward pass. Both are the same leaf, so gradients accumulate
        once. The UNet gets the per-layer attention processors."""
        for p in self.parts:
            first_id = self.plan.tokens[p.name].first_id
            vectors = functools.partial(self.concept_vectors, p.name)
            self.hooks.append(install_token_embedding(p.text_encoder, first_id, vectors))
        self.hooks.append(install_processors(self.bundle.unet, self.plan.scheme))

    def concept_vectors(self, encoder: str) -> torch.Tensor:
        """One encoder's raw ``[V, n, d]`` vector parameter (what its token embedding reads)."""
        return self.opt.raw.sets[encoder].vectors

    def remove_training_hooks(self) -> None:
        """Put the original token embeddings and attention processors back (newest first)."""
        while self.hooks:
            self.hooks.pop().remove()

    def resume(self) -> None:
        """Load the resume checkpoint (every process reads it; only safetensors and JSON)."""
        resume_from = self.run.resume_from
        if resume_from is None:
            return
        self.start_step = self.step = runs.load_checkpoint(
            resume_from,
            module=self.opt.raw,
            optimizer=self.opt.optimizer,
            lr_scheduler=self.opt.lr_scheduler,
            scaler=self.accelerator.scaler,
        )
        if self.is_main:
            logger.info("resumed from %s at step %d", resume_from.path, self.start_step)

    def start_trackers(self) -> None:
        """The experiment trackers (when `tracking.report_to` names any)."""
        cfg = self.cfg
        if cfg.tracking.report_to == "none":
            return
        run_name = cfg.tracking.run_name or self.name
        self.accelerator.init_trackers(
            cfg.tracking.project,
            config=flat_config(cfg),
            init_kwargs={
                "wandb": {"name": run_name, "tags": cfg.tracking.tags, "dir": str(self.out)}
            },
        )

    # ------------------------------------------------------------------ steps

    def run_steps(self) -> None:
        """Optimizer steps until the end step, each followed by the `after_step` events. On
        SIGINT/SIGTERM: a checkpoint and the vectors are saved, then the interrupt goes on."""
        with contextlib.closing(self.open_progress()):
            try:
                while self.step < self.end_step:
                    self.step_once()
                    self.stop.check(self.accelerator)
            except KeyboardInterrupt:
                self.bar.close()
                self.save_interrupted()
                raise

    def open_progress(self) -> Any:
        """The progress bar of the steps (main process, when `progress`)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=self.tc.max_steps,
            initial=self.start_step,
            disable=not (self.progress and self.is_main),
            desc=f"xti {self.name}",
            unit="step",
        )
        return self.bar

    def step_once(self) -> StepOutcome:
        """One optimizer step, recorded, then its `after_step` events (`run_steps`' loop body;
        `xti.concepts` drives several Trainers with it)."""
        self.stop.enter_step()
        outcome = self.optimizer_step()
        self.record(outcome)
        for event in self.after_step:
            event(outcome)
        return outcome

    def micro_batch(self, micro_step: int) -> Batch:
        """This process's batch of one micro-step, on the device."""
        return sample_batch(
            self.data.cache,
            self.data.prompts,
            num_train_timesteps=self.bundle.noise_scheduler.config.num_train_timesteps,
            global_batch=self.global_batch,
            rank=self.accelerator.process_index,
            world_size=self.world,
            seed=self.tc.seed,
            micro_step=micro_step,
            flip_p=self.cfg.data.flip_p,
            noise_offset=self.tc.noise_offset,
            resolution=self.tc.resolution if self.family.uses_time_ids else None,
        ).to(self.device)

    def optimizer_step(self) -> StepOutcome:
        """One optimizer step: the accumulated diffusion gradient, the KDE term, clipping, AdamW."""
        accelerator, accum = self.accelerator, self.accum
        t_step = time.perf_counter()
        if self.setup_seconds is None:
            self.setup_seconds = t_step - self.t0
            if self.is_main:
                logger.info("first step after %.1f s of setup", self.setup_seconds)
        total_loss = torch.zeros((), device=self.device)
        parts: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.micro_batch(self.step * accum + micro)
            last = micro == accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.opt.wrapped):
                with accelerator.autocast():
                    self.opt.wrapped()  # DDP's forward; the text encoders read the raw parameters
                    loss, parts = compute_loss(self.models, batch, snr_gamma=self.tc.snr_gamma)
                accelerator.backward(loss / accum)
            total_loss += loss.detach() / accum
        # The diffusion gradient is now complete (accumulated, synchronised); unscale it once,
        # then add the KDE gradient relative to it, then clip (DESIGN §4).
        accelerator.unscale_gradients()
        kde_stats = self.regularize()
        params = list(self.opt.raw.parameters())
        if self.tc.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.tc.max_grad_norm)
        else:
            grad_norm = torch.cat([p.grad.detach().flatten() for p in params]).norm()
        self.opt.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:
            self.opt.lr_scheduler.step()
        self.opt.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        mean_loss = accelerator.reduce(total_loss, reduction="mean").item()
        seconds = time.perf_counter() - t_step  # .item() waited for the device
        return StepOutcome(self.step, mean_loss, parts, grad_norm, kde_stats, seconds)

    def regularize(self) -> dict[str, KDEStats] | None:
        """The regulariser's gradient joined to the complete diffusion gradient (DESIGN §4,
        `xti.regularizers`); None when it is off (λ = 0 or kind none)."""
        reg = self.plan.regularization
        if not reg.weight > 0 or not reg.terms:
            return None
        vectors = {n: self.opt.raw.sets[n].vectors for n in reg.terms}
        return add_relative_gradient(vectors, reg.terms, reg.weight)

    def record(self, s: StepOutcome) -> None:
        """Keep the step's loss and time (after the non-finite guard), warn once about a frozen
        run, move the progress bar."""
        self.step_seconds.append(s.seconds)
        runs.check_finite_step(
            s.step,
            s.loss,
            self.opt.raw(),
            last_finite=self.losses[-1] if self.losses else None,
            last_checkpoint=self.saved_checkpoint,
        )
        self.stop.leave_step()
        self.losses.append((s.step, s.loss))
        if s.step == self.frozen_check_step and self.is_main:
            warn_if_frozen(self.cfg, self.moved(), s.step)
        self.bar.set_postfix(  # the median of the last steps: tqdm's own rate is a moving mean
            {"loss": f"{s.loss:.4f}", "s/step": f"{median(self.step_seconds[-20:]):.3g}"},
            refresh=False,
        )
        self.bar.update(1)

    def moved(self) -> float:
        return relative_movement(self.opt.raw(), self.opt.initial)

    # ------------------------------------------------------------------ after-step events

    def log_if_due(self, s: StepOutcome) -> None:
        """Every `train.log_every` steps and at the end step: the step's scalars (`step_logs`)."""
        if s.step % self.tc.log_every and s.step != self.end_step:
            return
        logs = step_logs(
            s.loss,
            s.loss_parts,
            self.opt.lr_scheduler.get_last_lr()[0],
            s.grad_norm,
            self.opt.raw(),
            self.plan.variant_of_layer,
            self.plan.layer_names,
            kdes=self.plan.kdes,
            kde_stats=s.kde_stats,
            moved=self.moved(),
        )
        logs["loss_smoothed"] = self.smooth.update(s.loss)
        logs["step_time"] = s.seconds
        logs["samples_per_s"] = self.global_batch * self.accum / s.seconds
        logs["peak_memory_gb"] = peak_memory_gb(self.device)
        self.accelerator.log(logs, step=s.step)

    def validate_if_due(self, s: StepOutcome) -> None:
        """Every `validation.every` steps and at the last step: samples (main process)."""
        every = self.cfg.validation.every
        if not every or (s.step % every and s.step != self.tc.max_steps):
            return
        if self.is_main:
            self.validate(s.step)
        self.accelerator.wait_for_everyone()

    def checkpoint_if_due(self, s: StepOutcome) -> None:
        if self.tc.checkpoint_every and s.step % self.tc.checkpoint_every == 0:
            self.checkpoint(s.step)

    def snapshot_if_due(self, s: StepOutcome) -> None:
        if self.tc.snapshot_every and s.step % self.tc.snapshot_every == 0 and self.is_main:
            self.export(self.out / "snapshots" / f"{self.name}-step{s.step:06d}.xti.safetensors")

    # ------------------------------------------------------------------ files

    def file_vectors(self) -> dict[str, torch.Tensor]:
        """The embedding file's tensors of the current vectors (keys as the family writes them)."""
        return self.family.file_vectors(
            self.opt.raw(),
            self.plan.variant_of_layer,
            self.plan.layer_names,
            self.plan.num_variants,
        )

    def export(self, path: Path) -> Path:
        """Write the current vectors as an ``.xti.safetensors`` file (never non-finite ones)."""
        bad = runs.non_finite(self.opt.raw())
        if bad:  # never write (or replace a file with) a diverged embedding
            raise XTIError(f"{path}: not written, the {', '.join(bad)} vectors are not finite")
        c = self.cfg.concept
        meta = build_metadata(
            layers=self.plan.layer_names,
            granularity=self.plan.granularity,
            placeholder=c.placeholder,
            initializer=c.initializer,
            n_vectors=c.n_vectors,
            family=self.family.name,
            base_model=self.bundle.source,
            text_dims={name: int(init.shape[-1]) for name, init in self.plan.inits.items()},
            # the KDE's λ when it is the regulariser (the model card names any other one)
            kde_weight=self.cfg.kde.weight if self.cfg.regularizer.kind == "kde" else 0.0,
            steps=self.step,
            title=self.name,
            extra=self.metadata_extra(),
        )
        return save_embedding_file(path, self.file_vectors(), meta)

    def metadata_extra(self) -> dict[str, str] | None:
        """The family's file metadata, and the start file's (`xti.init_from`) when there is one."""
        extra = self.family.metadata_extra(self.plan.pooled)
        if self.plan.start is None:
            return extra
        return {**(extra or {}), **self.plan.start.source.metadata()}

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint of this run (main process; safetensors + JSON), prune its old ones."""
        if self.is_main:
            folder = self.out / runs.CHECKPOINTS
            self.saved_checkpoint = runs.save_checkpoint(
                folder,
                step=step,
                run_id=self.run.run_id,
                fingerprint=self.run.fingerprint,
                config=self.cfg.model_dump(mode="json"),
                module=self.opt.raw,
                optimizer=self.opt.optimizer,
                lr_scheduler=self.opt.lr_scheduler,
                scaler=self.accelerator.scaler,
            )
            runs.prune_checkpoints(folder, self.run.run_id, self.tc.checkpoints_total_limit)
            dispatch(self.callbacks, CheckpointSaved(step, self.saved_checkpoint))
        self.saved_step = step
        self.accelerator.wait_for_everyone()

    def save_interrupted(self) -> None:
        """On SIGINT/SIGTERM: a checkpoint (when the state is at a step boundary) and the vectors."""
        stop, step = self.stop, self.step
        at_boundary = stop.at_boundary or (self.world == 1 and not stop.in_step)
        where = []
        if at_boundary and step > self.start_step and self.saved_step != step:
            self.checkpoint(step)
        if at_boundary and self.saved_step == step and self.saved_checkpoint is not None:
            where.append(f"checkpoint {self.saved_checkpoint} (continue with train.resume=latest)")
        if self.is_main:
            try:
                file = self.export(self.out / f"{self.name}.interrupted.xti.safetensors")
                where.insert(0, f"vectors saved to {file}")
            except XTIError as err:
                where.insert(0, str(err))
            print(f"interrupted at step {step}; {'; '.join(where)}", flush=True)

    # ------------------------------------------------------------------ validation

    def validation_pipeline(self) -> Any:
        """A stock pipeline of the model's family from the training components, with the
        tokenizers as they were before the placeholder tokens were added."""
        from diffusers import DDIMScheduler

        bundle = self.bundle
        parts = [
            EncoderPart(p.name, self.plan.clean_tokenizers[p.name], p.text_encoder)
            for p in self.parts
        ]
        pipe = self.family.build_pipeline(
            vae=bundle.vae.to(self.device),
            unet=bundle.unet,
            scheduler=DDIMScheduler.from_config(bundle.noise_scheduler.config),
            parts=parts,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self, step: int) -> None:
        """Sample with fixed seeds (main process; no_grad; hooks and devices restored after)."""
        cfg, vc = self.cfg, self.cfg.validation
        placeholder = cfg.concept.placeholder
        template = DEFAULT_VALIDATION_PROMPTS.get(
            cfg.data.template, DEFAULT_VALIDATION_PROMPTS["object"]
        )
        prompts = vc.prompts or [t.format(placeholder) for t in template]
        concept_file = EmbeddingFile(
            layers=self.plan.layer_names, vectors=self.file_vectors(), metadata={}
        )
        self.remove_training_hooks()
        vae_device = next(self.bundle.vae.parameters()).device
        try:
            pipe = self.validation_pipeline()
            with torch.no_grad(), self.accelerator.autocast():
                vg = validation_grid(
                    pipe,
                    concept_file,
                    placeholder,
                    prompts,
                    seeds=vc.seeds,
                    negative_prompt=vc.negative_prompt,
                    num_inference_steps=vc.num_inference_steps,
                    guidance_scale=vc.guidance_scale,
                    resolution=self.tc.resolution,
                    mix_with=self.mix_with,
                    mix_layers=vc.mix_layers,
                    granularity=self.plan.block_scheme,
                )
        finally:
            self.bundle.vae.to(vae_device)
            self.install_training_hooks()
        path = self.out / "validation" / f"{self.name}-step{step:06d}.png"
        buf = io.BytesIO()
        vg.grid.save(buf, format="PNG")
        atomic_write_bytes(path, buf.getvalue())
        self.last_grid = path
        dispatch(self.callbacks, ValidationImagesSaved(step, path))
        log_images(self.accelerator, "validation", vg.grid, vg.caption, step)
        nearest = self.nearest_tokens(self.parts[:1])[self.parts[0].name]
        log_table(
            self.accelerator, "nearest_tokens", ["layer", "nearest vocabulary tokens"],
            [[layer, " ".join(toks)] for layer, toks in nearest.items()], step,
        )  # fmt: skip

    def nearest_tokens(
        self, parts: Sequence[EncoderPart] | None = None
    ) -> dict[str, dict[str, list[str]]]:
        """Per text encoder (default: all) and layer, each vector's nearest vocabulary token."""
        return {
            p.name: nearest_vocabulary_tokens(
                self.plan.kdes[p.name],
                self.opt.raw.sets[p.name].vectors,
                self.plan.variant_of_layer,
                self.plan.layer_names,
                p.tokenizer,
            )
            for p in (self.parts if parts is None else parts)
        }

    # ------------------------------------------------------------------ the end

    def finish(self) -> TrainResult:
        """Check the ranks agree, export (when the run reached `train.max_steps`), run the
        `after_run` events on the main process, end the trackers."""
        accelerator = self.accelerator
        current = self.opt.raw()
        flat = torch.cat([v.detach().reshape(-1) for v in current.values()])
        gathered = accelerator.gather(flat.reshape(1, -1))
        in_sync = bool((gathered == gathered[0:1]).all())
        output_file = None
        if self.is_main and self.step >= self.tc.max_steps:
            output_file = self.export(self.out / f"{self.name}.xti.safetensors")
        accelerator.wait_for_everyone()
        result = TrainResult(
            output_file=output_file,
            steps=self.step,
            losses=self.losses,
            vectors=current[self.parts[0].name].detach().cpu().clone(),
            all_vectors={k: v.detach().cpu().clone() for k, v in current.items()},
            layer_names=self.plan.layer_names,
            world_size=self.world,
            ranks_in_sync=in_sync,
            seconds=time.perf_counter() - self.t0,
            trainable_shapes=[
                tuple(p.shape) for g in self.opt.optimizer.param_groups for p in g["params"]
            ],
            samples_file=self.last_grid,
        )
        if self.is_main:
            for event in self.after_run:
                event(result)
        accelerator.end_training()
        return result

    # ------------------------------------------------------------------ after-run events

    def write_summary(self, result: TrainResult) -> None:
        """``summary.json``: the run's outcome, timing and nearest vocabulary tokens."""
        self.summary = {
            "run_id": self.run.run_id,
            "output_file": str(result.output_file) if result.output_file else None,
            "samples_file": str(result.samples_file) if result.samples_file else None,
            "steps": result.steps,
            "final_loss": result.losses[-1][1] if result.losses else None,
            "world_size": result.world_size,
            "ranks_in_sync": result.ranks_in_sync,
            "seconds": round(result.seconds, 2),
            **run_timing(
                self.setup_seconds, self.data.latent_report, self.step_seconds, self.process_age
            ),
            "mixed_precision": self.accelerator.mixed_precision,
            "device": str(self.device),
            "nearest_tokens": per_encoder(self.nearest_tokens()),
        }
        atomic_write_bytes(self.out / "summary.json", json.dumps(self.summary, indent=1).encode())

    def write_model_card(self, result: TrainResult) -> None:
        """The folder's ``README.md``, when the run exported its file."""
        if result.output_file is None:
            return
        write_model_card(
            self.out,
            name=self.name,
            embedding_file=result.output_file,
            config=self.cfg.model_dump(mode="json"),
            family=self.family.name,
            base_model=self.bundle.source,
            layers=self.plan.layer_names,
            steps=result.steps,
            final_loss=self.summary["final_loss"],
            grid=result.samples_file,
            timing={k: self.summary[k] for k in TIMING_KEYS},
            init_from=self.plan.start.source.as_dict() if self.plan.start else None,
        )

    def record_end(self, result: TrainResult) -> None:
        """The run record (``xti-run.json``): finished, or stopped before `train.max_steps`."""
        self.run.owner.update(
            status="finished" if result.output_file else "stopped", steps=result.steps
        )
        runs.write_owner(self.out, self.run.owner)

    def announce_end(self, result: TrainResult) -> None:
        """Tell the callbacks that the run ended (`xti.callbacks.RunFinished`)."""
        summary = self.out / "summary.json"
        event = RunFinished(
            steps=result.steps,
            output_file=result.output_file,
            samples_file=result.samples_file,
            summary_file=summary if summary.is_file() else None,
        )
        dispatch(self.callbacks, event)


def _release_accelerator_state() -> None:
    """Forget this run's Accelerate settings so a later `train()` in the same process may use
    another mixed precision (Accelerate keeps them in a process-wide singleton). The process
    group (PartialState) is kept."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
