"""Loading a diffusers Stable Diffusion folder into ComfyUI objects with explicit configs.

ComfyUI recognises checkpoints by the published shapes of SD 1.x/SDXL, so it refuses small or
unusual models (``Could not detect model type``), such as xti's demo model. This module builds the
ComfyUI model config from the folder's own ``config.json`` files with ComfyUI's classes
(`comfy.supported_models.SD15` / `SDXL`, `comfy.model_base`, `comfy.sd.CLIP`), maps the diffusers
weights to ComfyUI's layout with `comfy.utils.unet_to_diffusers`, and returns a ``MODEL`` and a
``CLIP`` that ComfyUI's samplers and text encoding use as they use any checkpoint's. Only what
ComfyUI's UNet hard-codes is passed through its extension points: the GroupNorm group count (its
``operations`` argument) and, for SDXL, the width of the size embeddings (a subclass of its SDXL
model). The scheduler's prediction type and zero-terminal-SNR betas become the model's sampling.
Weights are read with safetensors only (never unpickled). No diffusers import.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from xti.errors import XTIError

__all__ = ["LoadedModel", "load_diffusers_folder", "unet_config_from_diffusers"]


@dataclass
class LoadedModel:
    """What `load_diffusers_folder` returns: ComfyUI's ``MODEL`` (a ModelPatcher) and ``CLIP``."""

    model: Any
    clip: Any
    family: str  # "sd1" or "sdxl"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise XTIError(f"{path}: missing; expected a diffusers Stable Diffusion folder") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise XTIError(f"{path}: cannot read ({exc})") from None


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    for candidate in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        path = folder / name / candidate
        if path.is_file():
            return load_file(str(path))
    raise XTIError(f"{folder / name}: no .safetensors weights (pickled weights are not loaded)")


def _per_block(value: Any, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


def unet_config_from_diffusers(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComfyUI's ``unet_config`` (LDM ``UNetModel`` arguments) for a diffusers
    ``UNet2DConditionModel`` config."""
    channels = [int(c) for c in cfg["block_out_channels"]]
    n = len(channels)
    base = channels[0]
    res = _per_block(cfg.get("layers_per_block", 2), n)
    depth = _per_block(cfg.get("transformer_layers_per_block", 1), n)
    attn_down = ["CrossAttn" in t for t in cfg["down_block_types"]]
    attn_up = ["CrossAttn" in t for t in cfg["up_block_types"]]
    reverse = cfg.get("reverse_transformer_layers_per_block")
    depth_up = _per_block(reverse, n) if reverse is not None else list(reversed(depth))
    heads = _per_block(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n)
    transformer_depth = [depth[i] if attn_down[i] else 0 for i in range(n) for _ in range(res[i])]
    res_up = list(reversed(res))
    # ComfyUI's UNetModel pops this list from the end: the last output block comes first
    transformer_depth_output = [
        depth_up[b] if attn_up[b] else 0 for b in range(n) for _ in range(res_up[b] + 1)
    ][::-1]
    attn_levels = [i for i in range(n) if attn_down[i]]
    if len({heads[i] for i in attn_levels}) <= 1:
        num_heads, head_channels = heads[attn_levels[0]] if attn_levels else 8, -1
    else:
        per_head = {channels[i] // heads[i] for i in attn_levels}
        if len(per_head) != 1:
            raise XTIError("this UNet's attention heads cannot be expressed in ComfyUI's UNetModel")
        num_heads, head_channels = -1, per_head.pop()
    text_time = cfg.get("addition_embed_type") == "text_time"
    return {
        "use_checkpoint": False,
        "image_size": 32,
        "in_channels": int(cfg.get("in_channels", 4)),
        "out_channels": int(cfg.get("out_channels", 4)),
        "model_channels": base,
        "num_res_blocks": res,
        "channel_mult": [c // base for c in channels],
        "transformer_depth": transformer_depth,
        "transformer_depth_output": transformer_depth_output,
        "transformer_depth_middle": depth[-1],
        "context_dim": int(cfg["cross_attention_dim"]),
        "use_linear_in_transformer": bool(cfg.get("use_linear_projection", False)),
        "use_spatial_transformer": True,
        "legacy": False,
        "adm_in_channels": int(cfg["projection_class_embeddings_input_dim"]) if text_time else None,
        "num_classes": "sequential" if text_time else None,
        "num_heads": num_heads,
        "num_head_channels": head_channels,
        "use_temporal_attention": False,
        "use_temporal_resblock": False,
    }


def _unet_factory(groups: int) -> Any:
    """ComfyUI's UNetModel with GroupNorms of `groups` groups (ComfyUI hard-codes 32), through the
    ``operations`` argument it takes."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    class GroupNorm(comfy.ops.disable_weight_init.GroupNorm):
        def __init__(self, num_groups: int, num_channels: int, *args: Any, **kwargs: Any) -> None:
            super().__init__(groups, num_channels, *args, **kwargs)

    ops = type("XTIOps", (comfy.ops.disable_weight_init,), {"GroupNorm": GroupNorm})

    def build(**kwargs: Any) -> Any:
        kwargs["operations"] = ops
        return UNetModel(**kwargs)

    return build


def _sampling(scheduler: dict[str, Any], prediction: str) -> Any:
    """ComfyUI's discrete model sampling for the folder's scheduler: its betas (rescaled to zero
    terminal SNR when ``rescale_betas_zero_snr``), with its prediction type."""
    import comfy.model_sampling as ms

    kind = {"epsilon": ms.EPS, "v_prediction": ms.V_PREDICTION}[prediction]
    cls = type("XTIModelSampling", (ms.ModelSamplingDiscrete, kind), {})
    sampling = cls()
    steps = int(scheduler.get("num_train_timesteps", 1000))
    start, end = (
        float(scheduler.get("beta_start", 0.00085)),
        float(scheduler.get("beta_end", 0.012)),
    )
    schedule = scheduler.get("beta_schedule", "scaled_linear")
    if schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    else:
        raise XTIError(f"scheduler beta_schedule {schedule!r} is not supported here")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if scheduler.get("rescale_betas_zero_snr"):
        root = alphas_cumprod.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        alphas_cumprod = root**2
        # a sigma of infinity cannot be sampled: ComfyUI's own zero-SNR mode uses this value
        alphas_cumprod[-1] = 4.8973451890853435e-08
    sampling.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
    return sampling


def _text_config(path: Path, tmp: Path, name: str) -> str:
    """A copy of a transformers text-encoder config that ComfyUI's CLIP reads."""
    cfg = _read_json(path)
    out = tmp / f"{name}.json"
    out.write_text(json.dumps(cfg))
    return str(out)


def _clip_state(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # transformers 5 saves CLIPTextModel weights without the "text_model." prefix ComfyUI expects
    out = {}
    for k, v in sd.items():
        out[k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"] = v
    return out


def load_diffusers_folder(path: str | Path) -> LoadedModel:
    """Load a diffusers SD 1.x-layout or SDXL folder (UNet, text encoders, scheduler) as ComfyUI
    objects, whatever its size. One-line `XTIError` for what is missing or unsupported."""
    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.utils

    folder = Path(path).expanduser()
    if not (folder / "unet" / "config.json").is_file():
        raise XTIError(f"{folder}: not a diffusers Stable Diffusion folder (no unet/config.json)")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    vae_cfg = (
        _read_json(folder / "vae" / "config.json")
        if (folder / "vae" / "config.json").is_file()
        else {}
    )
    sdxl = unet_cfg.get("addition_embed_type") == "text_time"
    if not sdxl and int(unet_cfg.get("cross_attention_dim", 768)) == 1024:
        raise XTIError(
            f"{folder}: an SD 2.x folder; this loader builds SD 1.x and SDXL layouts, load SD 2.x "
            "checkpoints with ComfyUI's own loaders (the XTI embedding node works with them)"
        )
    unet_config = unet_config_from_diffusers(unet_cfg)
    heads = {k: unet_config[k] for k in ("num_heads", "num_head_channels")}
    config_cls = comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15
    model_config = config_cls(unet_config)
    model_config.unet_config.update(heads)  # BASE.__init__ puts the published model's heads in
    scale = float(vae_cfg.get("scaling_factor", 0.13025 if sdxl else 0.18215))
    model_config.latent_format = comfy.latent_formats.SD15(scale_factor=scale)
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise XTIError(f"scheduler prediction_type {prediction!r} is not supported here")
    model_type = (
        comfy.model_base.ModelType.V_PREDICTION
        if prediction == "v_prediction"
        else (comfy.model_base.ModelType.EPS)
    )
    factory = _unet_factory(int(unet_cfg.get("norm_num_groups", 32)))
    if sdxl:
        model = _SDXL(model_config, model_type, int(unet_cfg["addition_time_embed_dim"]), factory)
    else:
        model = comfy.model_base.BaseModel(model_config, model_type=model_type, unet_model=factory)
    keys = comfy.utils.unet_to_diffusers(unet_config)
    unet_sd = _weights(folder, "unet")
    ldm = {}
    # the map lists every key a UNet of this config may have (e.g. resnet shortcuts)
    ldm = {ldm_key: unet_sd[k] for k, ldm_key in keys.items() if k in unet_sd}
    missing, _ = model.diffusion_model.load_state_dict(ldm, strict=False)
    if missing:
        raise XTIError(
            f"{folder / 'unet'}: ComfyUI's UNet has weights the folder lacks: {missing[:5]}"
        )
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=comfy.model_management.unet_offload_device()
    )
    patcher.add_object_patch("model_sampling", _sampling(scheduler, prediction))

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if sdxl:
            for name in ("text_encoder", "text_encoder_2"):
                layers = _read_json(folder / name / "config.json").get("num_hidden_layers", 0)
                if int(layers) < 3:
                    raise XTIError(
                        f"{folder / name}: {layers} layers; ComfyUI's SDXL text encoding takes "
                        "the penultimate layer of encoders with at least 3"
                    )
            l_cfg = _text_config(folder / "text_encoder" / "config.json", tmp, "l")
            g_cfg = _text_config(folder / "text_encoder_2" / "config.json", tmp, "g")
            target = comfy.supported_models_base.ClipTarget(
                comfy.sdxl_clip.SDXLTokenizer, _SDXLClip
            )
            target.params = {"l_config": l_cfg, "g_config": g_cfg}
        else:
            cfg = _text_config(folder / "text_encoder" / "config.json", tmp, "l")
            target = comfy.supported_models_base.ClipTarget(
                comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel
            )
            target.params = {"textmodel_json_config": cfg}
        import folder_paths  # ComfyUI's: its embeddings folders serve `embedding:NAME`

        clip = comfy.sd.CLIP(
            target, embedding_directory=folder_paths.get_folder_paths("embeddings")
        )
    if sdxl:
        clip.cond_stage_model.clip_l.load_sd(_clip_state(_weights(folder, "text_encoder")))
        clip.cond_stage_model.clip_g.load_sd(_clip_state(_weights(folder, "text_encoder_2")))
    else:
        clip.load_sd(_clip_state(_weights(folder, "text_encoder")))
    return LoadedModel(patcher, clip, "sdxl" if sdxl else "sd1")


def _sdxl_class() -> type:
    import comfy.model_base
    from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

    class XTISDXLModel(comfy.model_base.SDXL):
        """ComfyUI's SDXL model with the size embeddings of the folder's UNet (ComfyUI fixes them
        at 256 wide) and its GroupNorms; everything else is ComfyUI's."""

        def __init__(self, model_config: Any, model_type: Any, time_dim: int, factory: Any) -> None:
            comfy.model_base.BaseModel.__init__(
                self, model_config, model_type=model_type, unet_model=factory
            )
            self.embedder = Timestep(time_dim)
            self.noise_augmentor = None

    return XTISDXLModel


def _SDXL(model_config: Any, model_type: Any, time_dim: int, factory: Any) -> Any:  # noqa: N802
    return _sdxl_class()(model_config, model_type, time_dim, factory)


def _SDXLClip(device: Any = "cpu", dtype: Any = None, *, l_config: str, g_config: str) -> Any:  # noqa: N802
    """ComfyUI's SDXL text encoding (`comfy.sdxl_clip.SDXLClipModel`) with the folder's two
    encoders: penultimate hidden states, no final layer norm, clip_g padded with 0."""
    import comfy.sd1_clip
    import comfy.sdxl_clip

    class XTISDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
        def __init__(self) -> None:
            torch.nn.Module.__init__(self)
            common = {"device": device, "dtype": dtype, "layer": "hidden", "layer_idx": -2}
            common["layer_norm_hidden_state"] = False
            self.clip_l = comfy.sd1_clip.SDClipModel(textmodel_json_config=l_config, **common)
            self.clip_g = comfy.sd1_clip.SDClipModel(
                textmodel_json_config=g_config,
                special_tokens={"start": 49406, "end": 49407, "pad": 0},
                **common,
            )

    return XTISDXLClipModel()
