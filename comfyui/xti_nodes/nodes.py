"""The ComfyUI nodes of the xti pack: XTI embedding (per-layer conditioning), and, for models
ComfyUI cannot detect (such as xti's demo model), a diffusers-folder loader and VAE decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xti.errors import XTIError
from xti.parsing import parse_assignments

from .conditioning import XTIAttn2Patch, encode_xti

CATEGORY = "conditioning/xti"


def _lines(text: str | None) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _resolve_embedding(name: str) -> str:
    """A file path as given, else a file of ComfyUI's embeddings folders."""
    path = Path(name).expanduser()
    if path.is_file():
        return str(path)
    import folder_paths

    for candidate in (name, f"{name}.safetensors", f"{name}.xti.safetensors"):
        full = folder_paths.get_full_path("embeddings", candidate)
        if full:
            return full
    raise XTIError(
        f"embedding file {name!r} not found (give a path or a file in models/embeddings)"
    )


def parse_files(text: str) -> list[tuple[str, str | None]]:
    """``FILE`` or ``<word>=FILE`` per line."""
    out: list[tuple[str, str | None]] = []
    for line in _lines(text):
        placeholder, sep, path = line.partition("=")
        if sep and placeholder.strip() and not Path(line).is_file():
            out.append((_resolve_embedding(path.strip()), placeholder.strip()))
        else:
            out.append((_resolve_embedding(line), None))
    return out


class XTIEmbedding:
    """Per-layer (XTI / P+) conditioning: a patched MODEL and a CONDITIONING for the stock
    samplers."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "embeddings": ("STRING", {"multiline": True, "default": ""}),
                "text": ("STRING", {"multiline": True, "default": "a photo of <my-concept>"}),
            },
            "optional": {
                "mix": ("STRING", {"multiline": True, "default": ""}),
                "layer_prompts": ("STRING", {"multiline": True, "default": ""}),
            },
        }

    RETURN_TYPES = ("MODEL", "CONDITIONING")
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "XTI embeddings: one file per line (FILE, or <word>=FILE for kohya files); mix lines "
        "'<word>=coarse' (names, groups, ranges, as xti generate --mix); layer prompt lines "
        "'mid=a green lizard'."
    )

    def apply(
        self,
        model: Any,
        clip: Any,
        embeddings: str,
        text: str,
        mix: str = "",
        layer_prompts: str = "",
    ) -> tuple[Any, list[list[Any]]]:
        files = parse_files(embeddings)
        prompts = parse_assignments(_lines(layer_prompts), "layer prompts", split_last=False)
        if not files and not prompts:
            raise XTIError(
                "embeddings: give at least one xti file (one per line, FILE or <word>=FILE), "
                "or per-layer prompts"
            )
        result = encode_xti(
            model,
            clip,
            files,
            text,
            mix=parse_assignments(_lines(mix), "mix", split_last=True) or None,
            layer_prompts=prompts or None,
        )
        patched = model.clone()
        patch = XTIAttn2Patch(
            result.base, result.contexts, transformer=result.scheme.granularity == "transformer"
        )
        patched.set_model_attn2_patch(patch)
        return patched, [[result.base, {"pooled_output": result.pooled}]]


class XTIDiffusersLoader:
    """Load a diffusers Stable Diffusion folder (any size, e.g. xti's demo model) as MODEL and
    CLIP, with configs built from the folder (ComfyUI's detection refuses unknown shapes)."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {"required": {"path": ("STRING", {"default": "data/demo-model"})}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "loaders/xti"

    def load(self, path: str) -> tuple[Any, Any]:
        from .loader import load_diffusers_folder

        loaded = load_diffusers_folder(path)
        return loaded.model, loaded.clip


class XTIDiffusersVAEDecode:
    """Decode latents with a diffusers folder's VAE (for VAEs ComfyUI's own class cannot hold,
    such as the demo model's 8-group one). Imports diffusers when it runs, not when loaded."""

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802
        return {
            "required": {
                "samples": ("LATENT",),
                "path": ("STRING", {"default": "data/demo-model"}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = "latent/xti"

    def decode(self, samples: dict[str, Any], path: str) -> tuple[Any]:
        import torch
        from diffusers import AutoencoderKL

        folder = Path(path).expanduser() / "vae"
        if not (folder / "config.json").is_file():
            raise XTIError(f"{folder}: no diffusers VAE here (vae/config.json)")
        vae = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True).eval()
        with torch.no_grad():
            image = vae.decode(samples["samples"].float()).sample
        return ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu(),)


NODE_CLASS_MAPPINGS = {
    "XTIEmbedding": XTIEmbedding,
    "XTIDiffusersLoader": XTIDiffusersLoader,
    "XTIDiffusersVAEDecode": XTIDiffusersVAEDecode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XTIEmbedding": "XTI embedding (per-layer conditioning)",
    "XTIDiffusersLoader": "Load diffusers folder (xti)",
    "XTIDiffusersVAEDecode": "VAE decode with a diffusers folder (xti)",
}
