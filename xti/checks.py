"""Checks of a training run's inputs against each other and against the model, made before anything
is written: the resume checkpoint `train.resume` names, the resolution against the VAE, the mixing
file of the validation grid (`validation.mix_with`, `validation.mix_layers`), and every prompt's
length with the placeholder expanded. Each problem is one line (`XTIError`) naming the setting.

What a config can say about itself is checked by `xti.config` (pydantic); the images and captions by
`xti.data`; the output folder and the run's identity by `xti.runs`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from xti import runs
from xti.config import Config
from xti.data import check_prompt_lengths, prompts_per_image
from xti.embeddings import PlaceholderTokens
from xti.errors import XTIError
from xti.export import EmbeddingFile, load_embedding_file
from xti.families import EncoderPart, ModelFamily
from xti.inference import match_layers
from xti.layers import LayerScheme


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


def check_resolution(cfg: Config, vae) -> None:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if cfg.train.resolution % factor:
        raise XTIError(
            f"train.resolution={cfg.train.resolution} must be a multiple of {factor} for this model's VAE"
        )


def check_buckets(cfg: Config, vae) -> None:
    """`data.bucket_step` must be a multiple of the VAE's factor (bucket sides are whole latents)."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    step = cfg.data.bucket_step
    if cfg.data.buckets and step is not None and step % factor:
        raise XTIError(
            f"data.bucket_step={step} must be a multiple of {factor} for this model's VAE "
            f"(e.g. {max(factor, step // factor * factor)}), or null for {factor * 8}"
        )


def load_mix_with(cfg: Config) -> EmbeddingFile | None:
    """`validation.mix_with`, loaded before the model (one-line errors naming the file)."""
    path = cfg.validation.mix_with
    if not path:
        return None
    if not Path(path).is_file():
        raise XTIError(f"validation.mix_with: {path} does not exist")
    return load_embedding_file(path)


def check_mix_with(
    cfg: Config,
    mix: EmbeddingFile | None,
    scheme: LayerScheme,
    family: ModelFamily,
    embeddings: Mapping[str, nn.Module],
) -> None:
    """Fail before training when the mixing file or `validation.mix_layers` cannot fit the model."""
    if mix is None:
        return
    where = f"validation.mix_with: {cfg.validation.mix_with}"
    other = mix.model_family
    if other.specs != family.specs:  # SD 1.x and 2.x files share a layout (widths checked below)
        raise XTIError(
            f"{where} is an {other.label} file ({other.name}), but the model is {family.label}"
        )
    if match_layers(mix.layers, scheme) is None:
        raise XTIError(
            f"{where}: its layers ({', '.join(mix.layers[:4])}, ...) do not fit this model's "
            f"({', '.join(scheme.names[:4])}, ...)"
        )
    for enc, emb in embeddings.items():
        width = int(emb.weight.shape[-1])
        keys = [family.file_key(enc, layer) for layer in mix.layers]
        found = {int(mix.vectors[k].shape[-1]) for k in keys if k in mix.vectors}
        if found and found != {width}:
            raise XTIError(
                f"{where}: its vectors are {sorted(found)} wide, this model's {enc} text encoder "
                f"takes {width}"
            )
    try:
        scheme.select(cfg.validation.mix_layers)
    except XTIError as err:
        raise XTIError(f"validation.mix_layers: {err}") from None


def check_prompts(
    cfg: Config,
    records: list[Any],
    parts: Sequence[EncoderPart],
    tokens: Mapping[str, PlaceholderTokens],
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
    for part in parts:
        check_prompt_lengths(part.tokenizer, tokens[part.name], unique)
