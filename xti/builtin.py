"""Built-in models (``builtin:`` names) and model builders from configs: reference SD configs,
random-weight models and the tiny test models.

This module owns everything that makes a Stable Diffusion model without downloading one:

- reference configs (plain dicts) of the real SD 1.5 and SD 2.1 (768-v) components, to build
  full-size models on the ``meta`` device (structure tests) or with random weights (benchmarks);
- `build_tiny_sd1`, a complete, deterministic, few-megabyte ``StableDiffusionPipeline`` folder in the
  SD1 block layout (16 cross-attention layers) with the real CLIP tokenizer, used by tests, examples
  and ``builtin:tiny-sd1``;
- `resolve_builtin`, which maps ``builtin:<name>`` model paths to a cached folder, built on first use.

The reference text-encoder configs keep the ids of the published files (bos 0, eos 2, pad 1), which
make transformers pool the EOS position by ``argmax`` of the ids; SD 1.x/2.x never use the pooled
output, and the tiny model sets the true ids (49406/49407) so that pooling stays right with added tokens.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from xti.errors import XTIError
from xti.paths import cache_dir
from xti.tokenizer import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    build_clip_tokenizer,
    save_clip_tokenizer,
)

# --------------------------------------------------------------------------------------------------
# Reference configs (values of the published runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-2-1 config.json files, without the "_class_name"/"_diffusers_version"
# bookkeeping keys).
# --------------------------------------------------------------------------------------------------

_SD_DOWN_BLOCKS = [
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
]
_SD_UP_BLOCKS = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN_BLOCKS),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD_UP_BLOCKS),
}
"""UNet2DConditionModel config of SD 1.5 (859,520,964 parameters, 16 cross-attention layers)."""

SD21_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": list(_SD_DOWN_BLOCKS),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": list(_SD_UP_BLOCKS),
    "upcast_attention": True,
    "use_linear_projection": True,
}
"""UNet2DConditionModel config of SD 2.1 768-v (OpenCLIP-H conditioning, linear projections)."""

CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
"""CLIPTextModel config of SD 1.x (OpenAI CLIP ViT-L/14 text tower)."""

OPENCLIP_H_TEXT_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "pad_token_id": 1,
    "projection_dim": 512,
    "vocab_size": 49408,
}
"""CLIPTextModel config of SD 2.x (OpenCLIP ViT-H/14 text tower without its last layer)."""

OPENCLIP_BIGG_TEXT_CONFIG: dict[str, Any] = dict(
    OPENCLIP_H_TEXT_CONFIG,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)
"""CLIPTextModelWithProjection config of SDXL's second text encoder (OpenCLIP ViT-bigG/14)."""

SD_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
"""AutoencoderKL config shared by SD 1.x and 2.x (8x downsampling, 4 latent channels)."""

SD1_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
"""Scheduler config shipped with SD 1.5 (PNDM, epsilon prediction)."""

SD2_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
"""Scheduler config shipped with SD 2.1 768-v (DDIM, v-prediction)."""

SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
"""UNet of stabilityai/stable-diffusion-xl-base-1.0: 11 Transformer2DModels, 70 transformer blocks."""

# --------------------------------------------------------------------------------------------------
# Tiny model settings
# --------------------------------------------------------------------------------------------------

TINY_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
    "pad_token_id": EOS_TOKEN_ID,
}
"""Tiny CLIPTextModel: real vocabulary, hidden 32; eos is the true id so pooling finds it."""

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": list(_SD_DOWN_BLOCKS),
    "up_block_types": list(_SD_UP_BLOCKS),
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "cross_attention_dim": TINY_TEXT_CONFIG["hidden_size"],
}
"""Tiny UNet in the SD1 layout: 16 cross-attention layers; 2 heads keep it fast on CPU."""

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
"""Tiny AutoencoderKL: 32x32 images to 16x16x4 latents."""


TINY_SDXL_TEXT_CONFIG: dict[str, Any] = dict(
    TINY_TEXT_CONFIG, hidden_size=32, hidden_act="quick_gelu"
)
"""First tiny SDXL text encoder (the CLIP-L slot): hidden 32."""

TINY_SDXL_TEXT2_CONFIG: dict[str, Any] = dict(
    TINY_TEXT_CONFIG, hidden_size=48, intermediate_size=96, projection_dim=48, hidden_act="gelu"
)
"""Second tiny SDXL text encoder (the OpenCLIP-bigG slot, with projection): hidden 48."""

TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 1, 2],
    "norm_num_groups": 8,
    "attention_head_dim": 2,
    "use_linear_projection": True,
    "cross_attention_dim": 32 + 48,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,
}
"""Tiny UNet in the SDXL layout: 11 Transformer2DModels, 17 transformer blocks (block/transformer
granularity differ), text_time added conditioning fed by the second encoder's pooled output."""


def tiny_scheduler_config(
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
) -> dict[str, Any]:
    """DDPMScheduler settings of Stable Diffusion with the given prediction type."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "prediction_type": prediction_type,
    }


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's RNG state after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clean(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def build_meta_unet(config: dict[str, Any]) -> UNet2DConditionModel:
    """Build a UNet on the ``meta`` device: full structure, no memory, well under a second.

    Args:
        config: A UNet2DConditionModel config, e.g. `SD15_UNET_CONFIG`.
    """
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(_clean(config))


def build_meta_text_encoder(config: dict[str, Any]) -> CLIPTextModel:
    """Build a CLIPTextModel on the ``meta`` device (structure only)."""
    with torch.device("meta"):
        return CLIPTextModel(CLIPTextConfig(**_clean(config)))


def build_unet(config: dict[str, Any], seed: int = 0) -> UNet2DConditionModel:
    """Build a UNet with random weights (fp32, CPU, eval mode), deterministic from `seed`."""
    with _seeded(seed):
        unet = UNet2DConditionModel.from_config(_clean(config))
    return unet.eval()


def build_text_encoder(config: dict[str, Any], seed: int = 0) -> CLIPTextModel:
    """Build a CLIPTextModel with random weights (fp32, CPU, eval mode), deterministic from `seed`."""
    with _seeded(seed):
        model = CLIPTextModel(CLIPTextConfig(**_clean(config)))
    return model.eval()


def build_vae(config: dict[str, Any], seed: int = 0) -> AutoencoderKL:
    """Build an AutoencoderKL with random weights (fp32, CPU, eval mode), deterministic from `seed`."""
    with _seeded(seed):
        vae = AutoencoderKL.from_config(_clean(config))
    return vae.eval()


def build_text_encoder_with_projection(
    config: dict[str, Any], seed: int = 0
) -> CLIPTextModelWithProjection:
    """Build a CLIPTextModelWithProjection (SDXL's second encoder) with random weights."""
    with _seeded(seed):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**_clean(config)))
    return model.eval()


def build_tiny_sdxl_components(*, seed: int = 0) -> dict[str, Any]:
    """The tiny SDXL model's components in memory (StableDiffusionXLPipeline keyword arguments)."""
    tokenizer_2 = build_clip_tokenizer()
    return {
        "tokenizer": build_clip_tokenizer(),
        "tokenizer_2": tokenizer_2,
        "text_encoder": build_text_encoder(TINY_SDXL_TEXT_CONFIG, seed),
        "text_encoder_2": build_text_encoder_with_projection(TINY_SDXL_TEXT2_CONFIG, seed + 3),
        "unet": build_unet(TINY_SDXL_UNET_CONFIG, seed + 1),
        "vae": build_vae(TINY_VAE_CONFIG, seed + 2),
        "scheduler": DDPMScheduler.from_config(tiny_scheduler_config("epsilon")),
    }


def _sdxl_model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sdxl(folder: str | Path, *, seed: int = 0, overwrite: bool = True) -> Path:
    """Write a tiny random-weight ``StableDiffusionXLPipeline`` folder (two CLIP encoders, 11
    cross-attention blocks, text_time conditioning), atomically like `build_tiny_sd1`."""
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        parts = build_tiny_sdxl_components(seed=seed)
        save_clip_tokenizer(tmp / "tokenizer")
        save_clip_tokenizer(tmp / "tokenizer_2")
        for name in ("text_encoder", "text_encoder_2", "unet", "vae", "scheduler"):
            parts[name].save_pretrained(str(tmp / name))
        (tmp / "model_index.json").write_text(json.dumps(_sdxl_model_index(), indent=2) + "\n")
        _replace_dir(tmp, folder, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _model_index() -> dict[str, Any]:
    import diffusers

    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def build_tiny_sd1_components(
    *, seed: int = 0, prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
) -> dict[str, Any]:
    """Build the tiny model's components in memory, exactly as `build_tiny_sd1` saves them.

    Returns:
        A dict with ``tokenizer``, ``text_encoder``, ``unet``, ``vae`` and ``scheduler``, the keyword
        arguments of ``StableDiffusionPipeline`` (without the safety checker).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise XTIError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
    return {
        "tokenizer": build_clip_tokenizer(),
        "text_encoder": build_text_encoder(TINY_TEXT_CONFIG, seed),
        "unet": build_unet(TINY_UNET_CONFIG, seed + 1),
        "vae": build_vae(TINY_VAE_CONFIG, seed + 2),
        "scheduler": DDPMScheduler.from_config(tiny_scheduler_config(prediction_type)),
    }


def _write_tiny_sd1(folder: Path, seed: int, prediction_type: str) -> None:
    """Write every component of the tiny model into an existing empty `folder`."""
    parts = build_tiny_sd1_components(seed=seed, prediction_type=prediction_type)  # type: ignore[arg-type]
    save_clip_tokenizer(folder / "tokenizer")
    for name in ("text_encoder", "unet", "vae", "scheduler"):
        parts[name].save_pretrained(str(folder / name))
    (folder / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")


def _replace_dir(src: Path, dst: Path, overwrite: bool) -> None:
    """Move folder `src` to `dst` by renames; an existing `dst` is replaced or, without
    `overwrite`, kept (`src` is then left for the caller to delete)."""
    if dst.exists():
        if not overwrite:
            return
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)


def build_tiny_sd1(
    folder: str | Path,
    *,
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    overwrite: bool = True,
) -> Path:
    """Write a tiny, random-weight ``StableDiffusionPipeline`` folder in the SD1 layout.

    The folder loads offline with ``StableDiffusionPipeline.from_pretrained(folder)``: real CLIP
    tokenizer, a 2-layer CLIPTextModel (hidden 32), an SD1-layout UNet with 16 cross-attention layers
    (channels 32/32/64/64, 16x16 latents), an AutoencoderKL taking 32x32 images to 16x16x4 latents and
    a DDPMScheduler with SD's beta schedule. Weights depend only on `seed`.

    The model is written into a temporary sibling folder and renamed into place, so an interrupted
    build never leaves a half-written `folder`.

    Args:
        folder: Destination folder.
        seed: Seed of all random weights.
        prediction_type: What the UNet predicts, recorded in the scheduler config.
        overwrite: Replace an existing `folder`; when False, an existing folder (e.g. one another
            process finished first) is kept and the new build discarded.

    Returns:
        The folder as a `Path`.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise XTIError(f"prediction_type must be epsilon or v_prediction, not {prediction_type!r}")
    folder = Path(folder).expanduser()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_tiny_sd1(tmp, seed, prediction_type)
        _replace_dir(tmp, folder, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------------------------------
# builtin:<name>
# --------------------------------------------------------------------------------------------------

BUILTIN_PREFIX = "builtin:"
BUILTINS: dict[str, dict[str, Any]] = {
    "tiny-sd1": {"seed": 0, "prediction_type": "epsilon"},
    "tiny-sd1-v": {"seed": 0, "prediction_type": "v_prediction"},
    "tiny-sdxl": {"seed": 0, "sdxl": True},
}
"""Known builtin models and the `build_tiny_sd1` arguments that make them."""

BUILTIN_FORMAT = 1
"""Bumped when the tiny model changes, so stale cached folders are not reused."""


def check_builtin_name(path: str) -> str:
    """The name of a ``builtin:<name>`` path, or a one-line `XTIError` listing the known ones."""
    name = path[len(BUILTIN_PREFIX) :].strip()
    if name not in BUILTINS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTINS)
        raise XTIError(f"unknown builtin model '{path}': known builtin models are {known}")
    return name


def resolve_builtin(path: str) -> Path | None:
    """Return the cached folder of a ``builtin:<name>`` model, building it on first use.

    Args:
        path: A model path from the config.

    Returns:
        The folder for ``builtin:tiny-sd1`` / ``builtin:tiny-sd1-v``; None when `path` is not a
        ``builtin:`` path.

    Raises:
        XTIError: For an unknown builtin name.
    """
    if not path.startswith(BUILTIN_PREFIX):
        return None
    name = check_builtin_name(path)
    # Weight files are written in the installed transformers' layout (v5 drops the "text_model."
    # prefix), so each major version gets its own cached copy.
    import transformers

    tf_major = transformers.__version__.split(".")[0]
    folder = cache_dir() / "builtin" / f"v{BUILTIN_FORMAT}-tf{tf_major}" / name
    if (folder / "model_index.json").is_file():
        return folder
    if folder.exists():  # not ours or damaged: rebuild
        shutil.rmtree(folder, ignore_errors=True)
    try:
        args = dict(BUILTINS[name])
        if args.pop("sdxl", False):
            build_tiny_sdxl(folder, overwrite=False, **args)
        else:
            build_tiny_sd1(folder, overwrite=False, **args)
    except OSError as err:
        if (folder / "model_index.json").is_file():  # another process finished first
            return folder
        raise XTIError(
            f"cannot build {path} in {folder}: {err} (set XTI_CACHE to a writable folder)"
        ) from None
    return folder
