"""Model loading: turn a `ModelConfig` into a typed `ModelBundle` of frozen SD 1.x/2.x or SDXL
components.

This module owns where models come from: `resolve_model_path`, the one resolver of a model path
(``builtin:`` names, local diffusers folders, single-file ``.safetensors``/``.ckpt`` checkpoints, hub
ids) that training, ``xti generate``/``sweep``/``layers``/``inspect``, the web UI and the CLI share,
with the same one-line `XTIError` messages for every way a model path can be wrong; and the
prediction type and the training noise scheduler. Which
components a family has, and which family a model is, it asks `xti.families`.
Local loads never touch the network. Components come back in fp32 on the CPU, in eval mode, with the
text encoder, UNet and VAE frozen; moving them to a device or a dtype is the trainer's job.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from xti.builtin import BUILTIN_PREFIX, check_builtin_name, resolve_builtin
from xti.config import ModelConfig
from xti.errors import XTIError
from xti.families import (
    SD1,
    SDXL,
    EncoderPart,
    EncoderSpec,
    ModelFamily,
    detect,
    of_specs,
    resolve,
    specs_of_index,
)

logger = logging.getLogger(__name__)

PredictionType = Literal["epsilon", "v_prediction"]

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")
"""Subfolders a diffusers Stable Diffusion folder must have."""

SAFE_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")

T = TypeVar("T")


@dataclass
class ModelBundle:
    """The frozen components one training run needs, plus what they are.

    Attributes:
        tokenizer: The model's (first) CLIP tokenizer (callers add placeholder tokens to it).
        text_encoder: CLIP text model, fp32, eval, frozen.
        unet: Denoising UNet, fp32, eval, frozen.
        vae: Autoencoder, fp32, eval, frozen.
        noise_scheduler: Training scheduler built from the model's scheduler config (keeps
            prediction_type, rescale_betas_zero_snr, timestep spacing and the beta schedule).
        family: The `xti.families.ModelFamily` (``family.name``: sd1, sd2 or sdxl).
        prediction_type: What the UNet predicts: ``epsilon`` or ``v_prediction``.
        source: What was loaded (the configured path or hub id), for metadata.
        tokenizer_2: SDXL's second tokenizer (None for SD 1.x/2.x).
        text_encoder_2: SDXL's second text encoder, with projection (None for SD 1.x/2.x).
    """

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    noise_scheduler: DDPMScheduler
    family: ModelFamily
    prediction_type: PredictionType
    source: str
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None

    @property
    def text_encoders(self) -> list[EncoderPart]:
        """The family's text encoders with this model's components (DESIGN §6 names)."""
        return self.family.encoders(self)


# --------------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------------


def training_scheduler(config: dict[str, Any]) -> DDPMScheduler:
    """Build the DDPM training scheduler from any SD scheduler config (PNDM, DDIM, Euler...).

    Keys DDPMScheduler understands are kept (beta schedule, prediction_type, rescale_betas_zero_snr,
    timestep_spacing, steps_offset...); the rest (``skip_prk_steps``, ``set_alpha_to_one``...) are
    dropped without a warning.
    """
    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    kept = {k: v for k, v in dict(config).items() if k in accepted}
    return DDPMScheduler.from_config(kept)


def _prediction_type(scheduler: DDPMScheduler, where: str) -> PredictionType:
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred not in ("epsilon", "v_prediction"):
        raise XTIError(
            f"{where}: scheduler prediction_type '{pred}' is not supported (epsilon or v_prediction)"
        )
    return pred


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else ""
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _load(where: str, component: str, fn: Callable[[], T]) -> T:
    """Call a loader, turning any failure into a one-line `XTIError` naming the component."""
    try:
        return fn()
    except XTIError:
        raise
    except Exception as err:  # every loader error becomes a user-facing line
        raise XTIError(f"{where}: cannot load {component} ({_first_line(err)})") from None


def _offline() -> bool:
    """Whether the hub is switched off by the environment."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def looks_like_hub_id(path: str) -> bool:
    """Whether `path` has the ``org/name`` shape of a Hugging Face hub repository id."""
    if path.startswith((".", "/", "~")) or "\\" in path:
        return False
    if path.lower().endswith(SAFE_SUFFIXES + PICKLE_SUFFIXES):
        return False
    return bool(_HUB_ID.match(path))


ModelKind = Literal["builtin", "folder", "file", "hub"]


@dataclass(frozen=True)
class ModelLocation:
    """Where a model path points: its `kind`, what the loaders get (`location`: a folder, a file or
    a hub id) and the path as the user gave it (`shown`, for messages)."""

    kind: ModelKind
    location: str
    shown: str


def resolve_model_path(
    path: str | None, *, build: bool = True, what: str = "model path"
) -> ModelLocation:
    """Resolve a model path: ``builtin:<name>`` (built on first use; with ``build=False`` only its
    name is checked and `location` is empty), an existing diffusers folder, an existing single
    checkpoint file, or a hub id (nothing is downloaded here). `what` starts the messages.

    Raises:
        XTIError: one line naming the path, for an empty path, an unknown builtin, something that
            is neither a folder nor a file, or a path that does not exist and is no hub id.
    """
    shown = str(path or "").strip()
    if not shown:
        raise XTIError(
            f"{what}: give a diffusers folder, a single .safetensors file, a hub id or "
            "builtin:tiny-sd1"
        )
    if shown.startswith(BUILTIN_PREFIX):
        if not build:
            check_builtin_name(shown)
            return ModelLocation("builtin", "", shown)
        return ModelLocation("builtin", str(resolve_builtin(shown)), shown)
    local = Path(shown).expanduser()
    if local.is_dir():
        return ModelLocation("folder", str(local), shown)
    if local.is_file():
        return ModelLocation("file", str(local), shown)
    if local.exists():
        raise XTIError(f"{shown}: not a folder or a file")
    if looks_like_hub_id(shown):
        return ModelLocation("hub", shown, shown)
    raise XTIError(
        f"{what} {shown} does not exist (give a diffusers folder, a .safetensors file, "
        "a hub id like org/name, or builtin:tiny-sd1)"
    )


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether the hub cache holds the ``model_index.json`` of `repo_id` (no network access)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "model_index.json", revision=revision)
    except Exception:
        return False
    return isinstance(found, str)


def _finish(
    parts: dict[str, Any], scheduler_config: dict[str, Any], cfg: ModelConfig, source: str
) -> ModelBundle:
    """Freeze the components (fp32, CPU, eval), detect the family and build the bundle."""
    for model in parts.values():
        if not isinstance(model, torch.nn.Module):
            continue
        if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in model.parameters()):
            model.to(device="cpu", dtype=torch.float32)
        model.eval()
        model.requires_grad_(False)
    noise_scheduler = _load(source, "scheduler", lambda: training_scheduler(scheduler_config))
    try:
        detected = detect(parts["unet"], parts["text_encoder"])
    except XTIError as err:
        raise XTIError(f"{source}: {err}") from None
    return ModelBundle(
        **parts,
        noise_scheduler=noise_scheduler,
        family=resolve(cfg.family, detected, source),
        prediction_type=_prediction_type(noise_scheduler, source),
        source=source,
    )


def _load_components(
    location: str,
    cfg: ModelConfig,
    source: str,
    *,
    local: bool,
    revision: str | None,
    specs: tuple[EncoderSpec, ...] | None = None,
) -> ModelBundle:
    """Load the components from a diffusers folder or hub repository: the UNet, the VAE, and the
    tokenizers and text encoders its family has (`xti.families.specs_of_index`)."""
    common: dict[str, Any] = {"local_files_only": local}
    if revision is not None:
        common["revision"] = revision
    weights: dict[str, Any] = dict(common)
    if cfg.variant:
        weights["variant"] = cfg.variant
    specs = specs or _encoder_specs(location, common)
    resolve(
        cfg.family, of_specs(specs), source
    )  # a contradicting model.family fails before loading
    parts: dict[str, Any] = {}
    for spec in specs:
        encoder_class = CLIPTextModelWithProjection if spec.projection else CLIPTextModel
        parts[spec.tokenizer] = _load(
            source,
            f"{spec.tokenizer}/",
            lambda s=spec: CLIPTokenizer.from_pretrained(location, subfolder=s.tokenizer, **common),
        )
        parts[spec.text_encoder] = _load(
            source,
            f"{spec.text_encoder}/",
            lambda s=spec, c=encoder_class: c.from_pretrained(
                location, subfolder=s.text_encoder, **weights
            ),
        )
    parts["unet"] = _load(
        source,
        "unet/",
        lambda: UNet2DConditionModel.from_pretrained(location, subfolder="unet", **weights),
    )
    parts["vae"] = _load(
        source, "vae/", lambda: AutoencoderKL.from_pretrained(location, subfolder="vae", **weights)
    )
    scheduler_config = _load(
        source,
        "scheduler/",
        lambda: DDPMScheduler.load_config(location, subfolder="scheduler", **common),
    )
    return _finish(parts, scheduler_config, cfg, source)


def _encoder_specs(location: str, common: dict[str, Any]) -> tuple[EncoderSpec, ...]:
    """The text encoders a diffusers folder or repo holds (from its model_index.json)."""
    folder = Path(location)
    if folder.is_dir():
        index_file = folder / "model_index.json"
        return specs_of_index(_read_json(index_file) if index_file.is_file() else None, folder)
    from diffusers import DiffusionPipeline

    index = _load(
        location, "model_index.json", lambda: DiffusionPipeline.load_config(location, **common)
    )
    return specs_of_index(index)


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from a model folder, or a one-line `XTIError` naming the file."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise XTIError(
            f"{file}: not valid JSON ({_first_line(err)}); repair or re-download the model folder"
        ) from None
    if not isinstance(data, dict):
        raise XTIError(f"{file}: expected a JSON object; repair or re-download the model folder")
    return data


def _check_folder(folder: Path, shown: str) -> tuple[EncoderSpec, ...]:
    """Fail with one line when a component folder is missing; the text encoders it holds."""
    specs = _encoder_specs(str(folder), {})
    needed = list(COMPONENTS) + [
        n for s in specs for n in (s.tokenizer, s.text_encoder) if n not in COMPONENTS
    ]
    missing = [c for c in needed if not (folder / c).is_dir()]
    if missing:
        names = ", ".join(f"{m}/" for m in missing)
        raise XTIError(
            f"{shown}: not a complete diffusers folder, missing {names} "
            "(a diffusers Stable Diffusion folder needs tokenizer/, text_encoder/, unet/, vae/, "
            "scheduler/; for a single .safetensors file give the file itself)"
        )
    return specs


def _check_single_file(file: Path, cfg: ModelConfig, shown: str) -> None:
    """Refuse pickles without ``model.allow_pickle`` and files that are no checkpoint."""
    suffix = file.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not cfg.allow_pickle:
        raise XTIError(
            f"{shown}: {suffix} checkpoints are pickled and can run code when loaded; convert it to "
            ".safetensors or set model.allow_pickle=true to load it (weights only)"
        )
    if suffix not in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        raise XTIError(
            f"{shown}: not a model checkpoint (expected a diffusers folder, a .safetensors or "
            ".ckpt file, or a hub id)"
        )


def _single_file_config(cfg: ModelConfig, shown: str) -> tuple[str | None, bool]:
    """The config a single file is converted with (`model.single_file_config`: a local folder, or
    a hub id, cached when offline) and whether it is read from disk only."""
    config, offline = cfg.single_file_config, _offline()
    if config is None:
        if offline:
            raise XTIError(
                f"{shown}: a single-file checkpoint needs model.single_file_config (a local diffusers "
                "folder of the same model type, e.g. a saved SD 1.5 pipeline) when offline"
            )
        return None, False
    config_path = Path(config).expanduser()
    if config_path.is_dir():
        return str(config_path), True
    if not looks_like_hub_id(config):
        raise XTIError(
            f"model.single_file_config {config} does not exist (give a local diffusers folder "
            "or a hub id)"
        )
    if offline and not _in_hub_cache(config, None):
        raise XTIError(
            f"model.single_file_config {config} is not a local folder and the hub is offline "
            "(give a local diffusers folder)"
        )
    return config, offline


SDXL_CHECKPOINT_KEY = "conditioner.embedders.1."
"""The prefix of the second text encoder's weights in an original-format SDXL checkpoint."""


def _checkpoint_specs(file: Path) -> tuple[EncoderSpec, ...]:
    """The text encoders of an original-format checkpoint, from its tensor names (a safetensors
    header is read, no weights): SDXL's two, else SD 1.x/2.x's one."""
    if file.suffix.lower() in SAFE_SUFFIXES:
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
            if any(k.startswith(SDXL_CHECKPOINT_KEY) for k in names):
                return SDXL.specs
        except Exception:  # an unreadable file fails later, in the converter, with one line
            pass
    return SD1.specs


def single_file_pipeline(file: Path, cfg: ModelConfig, shown: str) -> tuple[Any, ModelFamily]:
    """A stock pipeline converted from a single checkpoint file, and its family (from the config's
    ``model_index.json``, local or from the hub, else from the checkpoint's tensor names)."""
    _check_single_file(file, cfg, shown)
    config, local = _single_file_config(cfg, shown)
    if config is None:
        specs = _checkpoint_specs(file)
    elif Path(config).is_dir():
        specs = _encoder_specs(config, {})
    else:
        specs = _encoder_specs(config, {"local_files_only": local})
    family = of_specs(specs)
    pipeline_class = family.pipeline_type()
    # With local_files_only=True and no config, diffusers would fall back to downloading; a local
    # config folder keeps the whole load offline.
    pipe = _load(
        shown,
        "the checkpoint",
        lambda: pipeline_class.from_single_file(
            str(file), config=config, local_files_only=local, **family.pipeline_extra()
        ),
    )
    return pipe, family


def _load_single_file(file: Path, cfg: ModelConfig, shown: str) -> ModelBundle:
    pipe, family = single_file_pipeline(file, cfg, shown)
    names = ["unet", "vae"] + [n for s in family.specs for n in (s.tokenizer, s.text_encoder)]
    parts = {n: getattr(pipe, n) for n in names}
    return _finish(parts, dict(pipe.scheduler.config), cfg, str(file))


def load_model(cfg: ModelConfig) -> ModelBundle:
    """Load the model a config names.

    `cfg.path` may be ``builtin:tiny-sd1`` (or another builtin, built on first use), a local diffusers
    folder, a single ``.safetensors`` (or, with ``allow_pickle``, ``.ckpt``) checkpoint, or a hub id
    (needs network unless cached).

    Args:
        cfg: The ``model`` section of the run config.

    Returns:
        The components as a `ModelBundle`, fp32 on CPU, eval mode, frozen.

    Raises:
        XTIError: With one line naming the path and what to do, for a missing path, an incomplete
            folder, a refused pickle, a single file without a config when offline, or a component
            that fails to load.
    """
    where = resolve_model_path(cfg.path)
    path = where.shown
    if where.kind == "builtin":
        return _load_components(where.location, cfg, path, local=True, revision=None)
    if where.kind == "folder":
        specs = _check_folder(Path(where.location), path)
        return _load_components(
            where.location, cfg, where.location, local=True, revision=None, specs=specs
        )
    if where.kind == "file":
        return _load_single_file(Path(where.location), cfg, path)
    offline = _offline()
    if offline and not _in_hub_cache(path, cfg.revision):
        raise XTIError(
            f"model path {path} is neither a local folder nor in the hub cache, and the hub is "
            "offline (HF_HUB_OFFLINE): download it first or give a local diffusers folder"
        )
    return _load_components(path, cfg, path, local=offline, revision=cfg.revision)


def load_unet_structure(path: str, config: str | None = None) -> UNet2DConditionModel:
    """Build a model's UNet on the meta device from its config alone (no weights read).

    Enough for structure questions such as the layer scheme (`xti layers`). `path` is any model path
    (`resolve_model_path`); a single checkpoint file is converted once (`config`: its
    ``model.single_file_config``) and its UNet's config used.
    """
    where = resolve_model_path(path)
    if where.kind == "file":
        cfg = ModelConfig(path=where.shown, single_file_config=config)
        pipe, _ = single_file_pipeline(Path(where.location), cfg, where.shown)
        unet_config = dict(pipe.unet.config)
    elif where.kind == "hub":
        unet_config = _load(
            where.shown,
            "unet config",
            lambda: UNet2DConditionModel.load_config(where.location, subfolder="unet"),
        )
    else:
        config_file = Path(where.location) / "unet" / "config.json"
        if not config_file.is_file():
            raise XTIError(
                f"{where.shown}: no unet/config.json (expected a diffusers model folder)"
            )
        unet_config = _read_json(config_file)
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config)


def load_text_encoder(
    model: str, spec: EncoderSpec, config: str | None = None
) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """One tokenizer and text encoder of a model (any model path, `resolve_model_path`; `config`:
    a single file's ``model.single_file_config``), in eval mode: enough for questions about its
    vocabulary (`xti inspect --model`)."""
    where = resolve_model_path(model)
    if where.kind == "file":
        cfg = ModelConfig(path=where.shown, single_file_config=config)
        pipe, _ = single_file_pipeline(Path(where.location), cfg, where.shown)
        tokenizer, text_encoder = getattr(pipe, spec.tokenizer), getattr(pipe, spec.text_encoder)
        if tokenizer is None or text_encoder is None:
            raise XTIError(f"{where.shown}: has no {spec.tokenizer}/{spec.text_encoder}")
        return tokenizer, text_encoder.eval()
    cls = CLIPTextModelWithProjection if spec.projection else CLIPTextModel
    location = where.location
    try:
        tokenizer = CLIPTokenizer.from_pretrained(location, subfolder=spec.tokenizer)
        text_encoder = cls.from_pretrained(location, subfolder=spec.text_encoder)
    except Exception as err:  # any loader failure becomes one line
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise XTIError(
            f"{where.shown}: cannot load its {spec.tokenizer}/{spec.text_encoder} ({first})"
        ) from None
    return tokenizer, text_encoder.eval()
