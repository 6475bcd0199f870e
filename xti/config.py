"""Run configuration: pydantic models, YAML loading and ``key=value`` overrides.

Every section rejects unknown keys, so a typo in a YAML file or on the command line is an error that
names the key instead of a silently ignored setting. `load_config` is the one entry point: it reads a
YAML file (optional), applies dotted overrides such as ``train.lr=1e-3`` and validates the result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from xti.errors import XTIError
from xti.paths import file_name_problem

_YAML_WORDS = "yes/no/on/off/true/false"


class _Section(BaseModel):
    # Every number must be finite: `train.lr=.inf` is an input error, not a diverged run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yaml_boolean_words(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads unquoted yes/no/on/off as booleans: a text field that gets one says so
        (fields where a boolean means something map it first, in their own validators)."""
        words = v if isinstance(v, list) else [v]
        if info.field_name is None or not any(isinstance(w, bool) for w in words):
            return v
        if _accepts_bool(cls.model_fields[info.field_name].annotation):
            return v
        raise ValueError(
            f"YAML read an unquoted word ({_YAML_WORDS}) as true/false: quote it, e.g. 'on'"
        )


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type takes a bool as such (``bool``, or a union or list holding one)."""
    import typing

    if annotation is bool:
        return True
    return any(_accepts_bool(a) for a in typing.get_args(annotation) if a is not type(None))


class ModelConfig(_Section):
    """Which Stable Diffusion model to invert against."""

    path: str = Field(
        "builtin:tiny-sd1",
        description="Diffusers folder, single .safetensors/.ckpt file, hub id, or builtin:tiny-sd1.",
    )
    family: Literal["auto", "sd1", "sd2", "sdxl"] = Field(
        "auto", description="Model family; auto detects it from the components."
    )
    single_file_config: str | None = Field(
        None,
        description="Local diffusers config folder used to load a single-file checkpoint offline.",
    )
    revision: str | None = Field(None, description="Hub revision when `path` is a hub id.")
    variant: str | None = Field(
        None, description="Weight variant to load (e.g. fp16) from a diffusers folder or hub id."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow loading a pickled .ckpt checkpoint (weights_only); off by default.",
    )


class DataConfig(_Section):
    """Where the concept images come from and how they are augmented."""

    dir: str | None = Field(
        None, description="Folder of images, with optional metadata.jsonl or .txt captions."
    )
    dataset: str | None = Field(
        None,
        description="HF datasets imagefolder: a local dataset folder or a hub id (instead of `dir`).",
    )
    dataset_split: str = Field("train", description="Split to read from `dataset`.")
    image_column: str = Field("image", description="Image column of `dataset`.")
    caption_column: str = Field(
        "text", description="Caption column of `dataset` (missing column: templates are used)."
    )
    template: Literal["object", "style"] = Field(
        "object", description="Prompt templates used when images have no caption."
    )
    center_crop: bool = Field(
        True, description="Crop the centre after resizing; false takes `random_crops` random crops."
    )
    random_crops: int = Field(
        4, ge=1, description="Distinct random crops per image when center_crop is false."
    )
    flip_p: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Probability of a horizontal flip (each flip state is cached once).",
    )
    on_corrupt: Literal["fail", "skip"] = Field(
        "fail", description="What to do with an unreadable image: fail, or skip it with a warning."
    )
    encode_batch_size: int = Field(4, ge=1, description="Images per VAE call when caching latents.")
    latent_cache: bool = Field(
        True,
        description="Reuse VAE latents across runs from the disk cache ($XTI_LATENT_CACHE, else $XTI_CACHE/latents); false encodes every run and writes nothing.",
    )
    latent_cache_max_gb: float = Field(
        10.0,
        gt=0.0,
        description="Size cap of the latent disk cache in GiB; the least recently used entries are removed beyond it.",
    )
    buckets: bool = Field(
        False,
        description="Aspect-ratio buckets: each image goes to the bucket (about train.resolution² pixels) nearest its aspect, with a minimal crop, instead of a square crop (xti.buckets).",
    )
    bucket_step: int | None = Field(
        None,
        ge=1,
        description="Bucket side step in pixels; null = the VAE's downscale factor x 8 (64 for SD/SDXL, 16 for the demo model).",
    )
    bucket_max_aspect: float = Field(
        4.0,
        ge=1.0,
        description="Longest bucket side over its shortest at most this; wider images go to the widest bucket and are cropped.",
    )
    masks: bool = Field(
        False,
        description="Weight the loss by each image's mask: metadata.jsonl's `mask` column, a <stem>.mask.png beside it, or its alpha channel (xti.masks).",
    )
    mask_floor: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="Loss weight of masked-out pixels (0: ignored; 1: as if there were no mask); 0.1 keeps the subject's outline (README, masks).",
    )


class ConceptConfig(_Section):
    """The concept being learned."""

    placeholder: str = Field(
        "<concept>", description="New token that stands for the concept in prompts."
    )
    initializer: str = Field(
        "object", description="Word(s) whose embeddings initialise the vectors."
    )
    n_vectors: int = Field(
        1,
        ge=1,
        le=75,
        description="Vectors per layer; the placeholder expands to this many tokens (at most 75, CLIP's 77 minus start and end, less the prompt's other words).",
    )
    init_from: str | None = Field(
        None,
        description="Start from this embedding (.safetensors: an xti file, a kohya XTI file or a plain TI file, copied to every layer); a new run with a fresh optimizer, not a resume.",
    )

    @field_validator("placeholder")
    @classmethod
    def _placeholder_single_word(cls, v: str) -> str:
        if not v.strip() or any(c.isspace() for c in v):
            raise ValueError("must be one non-empty word without spaces, e.g. <cat-toy>")
        return v

    @field_validator("initializer")
    @classmethod
    def _initializer_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty: give a word close to the concept, e.g. 'toy'")
        return v


class ConceptEntry(ConceptConfig):
    """One concept of a several-concept run (`concepts:`): the `concept` fields, its name and images."""

    name: str | None = Field(
        None,
        description="Folder and file-name stem of this concept (default: placeholder without <>).",
    )
    data: str = Field(
        ..., description="This concept's image folder (replaces data.dir; other data.* are shared)."
    )

    @field_validator("name")
    @classmethod
    def _entry_name_is_a_file_name(cls, v: str | None) -> str | None:
        problem = file_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(f"{problem} (it names a folder and files, e.g. my-concept)")
        return v

    @property
    def concept_name(self) -> str:
        """`name`, or the placeholder's file-name stem."""
        return self.name or placeholder_stem(self.placeholder)


class XTISection(_Section):
    """How vectors are shared across the UNet's cross-attention layers."""

    granularity: Literal["block", "transformer", "shared"] = Field(
        "block",
        description="block: one vector set per cross-attention block (XTI); transformer: per transformer block; shared: one set for all (classic TI).",
    )
    pooled: Literal["slot", "mean"] = Field(
        "slot",
        description="SDXL pooled text_embeds: from an extra POOL vector set of the second encoder (slot) or the mean over layer variants (mean).",
    )


class KDEConfig(_Section):
    """KDE regulariser keeping vectors in dense regions of the vocabulary (DESIGN §4)."""

    weight: float = Field(
        0.01,
        ge=0.0,
        description="λ: the KDE gradient is added at λ times the diffusion gradient's norm (0.01 = a hundredth; chosen by bench/kde.py); 0 turns it off.",
    )
    reference: Literal["vocabulary"] | list[str] = Field(
        "vocabulary",
        description="Reference rows R of the density: 'vocabulary' (every ordinary token) or a list of words whose token rows form R.",
    )
    bandwidth: float | None = Field(
        None,
        gt=0.0,
        description="Kernel bandwidth h; null uses the median nearest-neighbour distance within R.",
    )
    bandwidth_scale: float = Field(
        1.0,
        gt=0.0,
        description="Multiplies the bandwidth h (the given one or the nearest-neighbour median): 0.5 = a density twice as sharp.",
    )
    layer_weights: dict[str, float] = Field(
        default_factory=dict,
        description="Weight of the KDE per layer selection (a group such as fine or coarse, a name or a range); unnamed layers weigh 1, {} is the plain mean.",
    )

    @field_validator("layer_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, w in v.items() if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise ValueError(f"weights must be finite and >= 0 (see {', '.join(bad)})")
        return v

    @field_validator("weight", "bandwidth", "bandwidth_scale")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v

    @field_validator("reference", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(w, bool) for w in v):
            raise ValueError(
                "YAML read a word as true/false: quote words such as 'on', 'off', 'yes', 'no'"
            )
        return v

    @field_validator("reference")
    @classmethod
    def _words(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and (not v or any(not str(w).strip() for w in v)):
            raise ValueError("must be 'vocabulary' or a non-empty list of non-empty words")
        return v


class InitPullConfig(_Section):
    """The pull toward the initializer (`xti.regularizers.init_pull`)."""

    weight: float = Field(
        0.1,
        ge=0.0,
        description="λ: its gradient is added at λ times the diffusion gradient's norm; 0 turns it off.",
    )

    @field_validator("weight")
    @classmethod
    def _finite(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class NormRegularizerConfig(InitPullConfig):
    """The norm regulariser (`xti.regularizers.norm`): its λ as the pull's, and a target norm."""

    target: Literal["initializer", "reference"] = Field(
        "initializer",
        description="Target norm: the initializer's vectors' mean norm, or the KDE reference rows' mean norm.",
    )


class RegularizerConfig(_Section):
    """Which regulariser joins the diffusion gradient (`xti.regularizers`); the KDE's own settings
    stay in the ``kde`` section."""

    kind: Literal["kde", "norm", "init_pull", "none"] = Field(
        "kde",
        description="kde (settings in the kde section), norm, init_pull or none.",
    )
    norm: NormRegularizerConfig = Field(
        default_factory=NormRegularizerConfig, description="The norm regulariser's settings."
    )
    init_pull: InitPullConfig = Field(
        default_factory=InitPullConfig, description="The initializer pull's settings."
    )


class TrainConfig(_Section):
    """Optimisation and loop settings."""

    max_steps: int = Field(500, gt=0, description="Optimizer steps to train.")
    batch_size: int = Field(1, gt=0, description="Images per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    lr: float = Field(5e-3, gt=0.0, description="Learning rate of AdamW.")
    scale_lr: bool = Field(
        False, description="Multiply lr by batch size, accumulation steps and process count."
    )
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = Field(
        "constant_with_warmup",
        description="Learning-rate schedule (diffusers get_scheduler names).",
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the vectors.")
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Gradient clipping norm; null disables clipping."
    )
    resolution: int = Field(
        512, gt=0, le=4096, description="Training image size in pixels (square, at most 4096)."
    )
    seed: int = Field(0, description="Seed of initialisation, data order, noise and timesteps.")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = Field(
        None,
        description="Mixed precision of the frozen models: no (fp32), fp16 or bf16; null lets `accelerate launch` decide.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in backward to save memory."
    )
    noise_offset: float = Field(0.0, ge=0.0, description="Offset-noise strength (0 disables).")
    snr_gamma: float | None = Field(
        None, gt=0.0, description="Min-SNR loss weighting gamma (null disables; 5 is common)."
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Save a resumable checkpoint every N steps (0 disables)."
    )
    checkpoints_total_limit: int | None = Field(
        3, ge=1, description="Keep at most this many checkpoints (null keeps all)."
    )
    resume: str | None = Field(
        None,
        description="Resume this output_dir's run: 'latest' (its newest checkpoint), 'auto' (latest if there is one, else start), or a checkpoint folder.",
    )
    resume_force: bool = Field(
        False,
        description="Resume even when the checkpoint's run fingerprint (seed, lr, schedule, batch, model...) differs from this config; the differences are logged.",
    )
    overwrite: bool = Field(
        False,
        description="Allow a new run into an output_dir that holds another run's results (replacing its files).",
    )
    snapshot_every: int = Field(
        0, ge=0, description="Write an embedding file every N steps (0 disables)."
    )
    log_every: int = Field(1, ge=1, description="Log metrics every N steps.")

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _precision_as_typed(cls, v: Any) -> Any:
        return parse_mixed_precision(v)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume_off(cls, v: Any) -> Any:
        # `resume: no` / `train.resume=false`: YAML's false means "do not resume", like null.
        return None if v is False else v


class TrackingConfig(_Section):
    """Where metrics go."""

    report_to: Literal["wandb", "tensorboard", "jsonl", "none"] = Field(
        "none",
        description="Tracker: wandb (offline unless configured), tensorboard, jsonl (output_dir/logs/metrics.jsonl, one JSON line per log) or none.",
    )
    project: str = Field("xti", description="Tracker project name.")
    run_name: str | None = Field(None, description="Run name (default: the concept name).")
    tags: list[str] = Field(default_factory=list, description="Tracker tags.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_nowhere(cls, v: Any) -> Any:
        # `report_to: no` / `off` / `false` (YAML booleans) and null mean "none".
        return "none" if v is False or v is None else v


class ValidationConfig(_Section):
    """Sample images during training (main process, fixed seeds) for the dashboard and output folder."""

    every: int = Field(
        0, ge=0, description="Generate validation samples every N steps (0 disables)."
    )
    prompts: list[str] = Field(
        default_factory=list,
        description="Prompts with the placeholder; empty uses a few object/style templates.",
    )
    negative_prompt: str = Field("", description="Negative prompt of the validation samples.")
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1],
        min_length=1,
        description="One sample per seed and prompt (at least one seed).",
    )
    num_inference_steps: int = Field(20, gt=0, description="Denoising steps per sample.")
    guidance_scale: float = Field(5.0, ge=0.0, description="Classifier-free guidance scale.")
    mix_with: str | None = Field(
        None, description="A second concept file (.xti.safetensors) for a style-mixing panel."
    )
    mix_layers: str = Field(
        "coarse",
        description="Layers that take this run's concept in the mixing panel; the rest take mix_with.",
    )


def placeholder_stem(placeholder: str) -> str:
    """A placeholder as a file-name stem: brackets stripped, other characters made safe."""
    stem = placeholder.strip().strip("<>[]{}") or "concept"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)


class Config(_Section):
    """A complete training run."""

    name: str | None = Field(
        None, description="Concept name used in file names (default: placeholder without <>)."
    )
    output_dir: str = Field(
        "outputs", description="Folder for the embedding file, checkpoints and logs."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training images.")
    concept: ConceptConfig = Field(
        default_factory=ConceptConfig, description="Placeholder, initializer, vectors."
    )
    xti: XTISection = Field(default_factory=XTISection, description="Layer granularity.")
    kde: KDEConfig = Field(default_factory=KDEConfig, description="KDE regulariser.")
    regularizer: RegularizerConfig = Field(
        default_factory=RegularizerConfig,
        description="Which regulariser (kde, norm, init_pull, none).",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Loop settings.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Metrics tracker.")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig, description="Validation samples."
    )
    concepts: list[ConceptEntry] | None = Field(
        None,
        description="Several concepts trained in one process (each: placeholder, initializer, data, n_vectors, init_from, name) instead of `concept`; see xti.concepts.",
    )

    @field_validator("concepts")
    @classmethod
    def _concepts_distinct(cls, v: list[ConceptEntry] | None) -> list[ConceptEntry] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("must list at least one concept (or leave it out and use concept:)")
        for what, values in (
            ("name", [c.concept_name for c in v]),
            ("placeholder", [c.placeholder for c in v]),
        ):
            dup = next((x for x in values if values.count(x) > 1), None)
            if dup is not None:
                raise ValueError(f"two concepts have the {what} {dup!r}; give each its own")
        return v

    @model_validator(mode="after")
    def _concepts_or_concept(self) -> Config:
        """With `concepts:`, the one-concept fields (`concept`, `name`, `data.dir`/`data.dataset`)
        must stay unset: each concept has its own."""
        if self.concepts is None:
            return self
        given = [k for k in ("concept", "name") if k in self.model_fields_set]
        given += [f"data.{k}" for k in ("dir", "dataset") if getattr(self.data, k) is not None]
        if given:
            raise ValueError(
                f"with concepts:, {', '.join(given)} must not be set: give each concept its own "
                "placeholder, initializer, name and data"
            )
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, v: str | None) -> str | None:
        problem = file_name_problem(v) if v is not None else None
        if problem:
            raise ValueError(f"{problem} (it names files, e.g. my-concept)")
        return v

    @field_validator("output_dir")
    @classmethod
    def _output_dir_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty (use . for the current folder)")
        return v

    @property
    def concept_name(self) -> str:
        """File-name stem of the concept: `name`, or the placeholder's (`placeholder_stem`)."""
        return self.name or placeholder_stem(self.concept.placeholder)


PRECISIONS: dict[str, str] = {"no": "no", "fp32": "no", "fp16": "fp16", "bf16": "bf16"}
"""How `train.mixed_precision` may be typed (any case) and what it means."""


def parse_mixed_precision(v: Any) -> Any:
    """`train.mixed_precision` as users type it: ``no`` (also ``fp32``, and YAML's unquoted
    ``no``/``off``/``false``, which arrive as False), ``fp16``, ``bf16``, in any case; None
    (let accelerate decide) stays None. Anything else is returned for pydantic to reject."""
    if v is False:
        return "no"
    if v is True:
        raise ValueError(
            f"YAML read an unquoted word ({_YAML_WORDS}) as true: say which precision, "
            "no, fp16 or bf16"
        )
    if isinstance(v, str) and v.strip().lower() in PRECISIONS:
        return PRECISIONS[v.strip().lower()]
    return v


def _parse_value(text: str) -> Any:
    """Parse an override value the way YAML would (numbers, booleans, null, lists)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise XTIError(f"override '{item}' is not key=value (e.g. train.lr=1e-3)")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            raise XTIError(f"override '{item}' has an empty key part")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise XTIError(f"override '{item}': '{part}' is not a section")
            node = child
        node[parts[-1]] = _parse_value(raw)
    return data


def _format_validation_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "<root>"
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; `xti config` lists the keys)"
    else:
        msg = first["msg"]
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {field}: {msg}{more}"


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict, turning pydantic errors into a one-line `XTIError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise XTIError(_format_validation_error(err, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults when `path` is None) and apply overrides."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise XTIError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            raise XTIError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise XTIError(f"{p}: top level must be a mapping of sections")
        data = loaded
    if overrides:
        apply_overrides(data, overrides)
        source += " + overrides"
    return config_from_dict(data, source)


def describe_fields(model: type[BaseModel] = Config, prefix: str = "") -> list[str]:
    """One line per leaf key: ``section.key = default  # description`` (for `xti config`)."""
    lines = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(describe_fields(ann, f"{prefix}{name}."))
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"{prefix}{name} = {default!r}  # {field.description}")
    return lines
