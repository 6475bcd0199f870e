"""Model families: the one place that knows Stable Diffusion 1.x/2.x from SDXL.

A `ModelFamily` is detected once from the UNet (`detect`; `of_pipeline`, `of_file` and
`of_folder` for pipelines, embedding files and model folders) and asked about everything that
differs between the families. Nothing else in xti branches on the family:

* the text encoders (`encoder_specs`, `encoders`): SD 1.x/2.x have one, named ``text``; SDXL has
  ``clip_l`` and ``clip_g`` (DESIGN §5); the names are the embedding file's key prefixes;
* how many vector sets each encoder trains (`vector_sets`): SDXL's ``clip_g`` gets one more, the
  ``POOL`` slot, when the pooled ``text_embeds`` come from it;
* how one encoder's hidden states are read (`encoder_states`: the final layer-normed states for
  SD, the penultimate ones for SDXL, ``clip_skip`` as the stock pipelines), how per-layer contexts
  and the pooled embeds are built from them (`finish`), and the UNet's added conditioning
  (`added_cond`, `uses_time_ids`);
* how vectors map to file keys and back (`file_key`, `file_vectors`, `expected_keys`), and the
  family's metadata (`metadata_extra`);
* which diffusers pipeline it is and how to build one from components (`pipeline_class`,
  `build_pipeline`).

`encode_layers` is the one per-layer encoder that training, validation and inference share: from
per-encoder token-id rows (placeholder ids already shifted to per-layer virtual ids) it runs each
text encoder once on the distinct rows and builds the per-layer contexts and pooled embeds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xti.errors import XTIError

POOL = "POOL"
"""The name of SDXL's extra ``clip_g`` vector set that makes the pooled ``text_embeds``."""


@dataclass(frozen=True)
class EncoderSpec:
    """One text encoder of a family.

    Attributes:
        name: ``text`` (SD 1.x/2.x), ``clip_l`` or ``clip_g`` (SDXL): the key of its vectors.
        tokenizer: the component (and folder) name of its tokenizer.
        text_encoder: the component (and folder) name of the text encoder.
        projection: whether it is a ``CLIPTextModelWithProjection`` (SDXL's second encoder).
    """

    name: str
    tokenizer: str
    text_encoder: str
    projection: bool = False


@dataclass(frozen=True)
class EncoderPart:
    """A family's text encoder with the components of one model or pipeline."""

    name: str
    tokenizer: Any
    text_encoder: nn.Module


@dataclass
class LayerEncoding:
    """What `encode_layers` returns.

    Attributes:
        contexts: ``[S, L, B, T, D]`` per-layer contexts, S sides (e.g. negatives, prompts).
        pooled: SDXL ``[S, B, P]`` pooled ``text_embeds``; None for SD 1.x/2.x.
        num_sequences: distinct id rows the busiest text encoder ran on (one call each).
    """

    contexts: torch.Tensor
    pooled: torch.Tensor | None
    num_sequences: int


class ModelFamily:
    """What one family of Stable Diffusion models does its own way (see the module docstring)."""

    name: str
    label: str
    architecture: str  # the file's ``modelspec.architecture``
    specs: tuple[EncoderSpec, ...]
    pipeline_class: str
    uses_time_ids = False
    has_pool_slot = False
    pool_encoder: str | None = None  # the encoder whose extra vector set is the POOL slot

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ components

    @property
    def encoder_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def encoders(self, components: Any) -> list[EncoderPart]:
        """The text encoders of a `ModelBundle` or a diffusers pipeline, in the family's order."""
        return [
            EncoderPart(
                s.name, getattr(components, s.tokenizer), getattr(components, s.text_encoder)
            )
            for s in self.specs
        ]

    def check_components(self, components: Any) -> None:
        """Fail with one line when a pipeline lacks a component this family needs."""
        needed = ["tokenizer", "text_encoder", "unet"]
        needed += [n for s in self.specs for n in (s.tokenizer, s.text_encoder) if n not in needed]
        for name in needed:
            if getattr(components, name, None) is None:
                raise XTIError(
                    f"this {self.label} pipeline ({type(components).__name__}) has no {name}; "
                    f"xti needs a text-to-image pipeline with {', '.join(needed)}"
                )

    def vector_sets(self, encoder: str, num_variants: int, pooled: str) -> int:
        """Vector sets an encoder trains: the layer variants, plus SDXL's POOL slot."""
        return num_variants

    # ------------------------------------------------------------------ files

    def file_key(self, encoder: str, layer: str) -> str:
        """The embedding file's key for one encoder's vectors of one layer (DESIGN §6)."""
        raise NotImplementedError

    def expected_keys(self, layers: Sequence[str]) -> tuple[list[str], list[str]]:
        """The keys a file of these layers must have, and the optional ones."""
        return [self.file_key(s.name, layer) for layer in layers for s in self.specs], []

    def ti_key(self, encoder: str) -> str:
        """The key of one encoder's vectors in a plain textual-inversion file."""
        raise NotImplementedError

    def fallback_key(self, encoder: str) -> str:
        """The key under which an xti file also holds one encoder's layer mean, for hosts without
        an XTI loader: the key ComfyUI's (and for SDXL A1111's and InvokeAI's) embedding loader
        looks up for that text encoder (DESIGN §6 fallback; readers of the per-layer file ignore
        it)."""
        raise NotImplementedError

    @property
    def fallback_keys(self) -> list[str]:
        """All fallback keys of the family's files, in encoder order."""
        return [self.fallback_key(e) for e in self.encoder_names]

    def file_vectors(
        self,
        vectors: Mapping[str, torch.Tensor],
        variant_of_layer: torch.Tensor,
        layer_names: Sequence[str],
        num_variants: int,
    ) -> dict[str, torch.Tensor]:
        """The file's tensors from ``{encoder: [V(+1), n, d]}`` trained vectors."""
        out: dict[str, torch.Tensor] = {}
        for enc, tensor in vectors.items():
            v = tensor.detach().float().cpu()
            for i, layer in enumerate(layer_names):
                out[self.file_key(enc, layer)] = v[int(variant_of_layer[i])].clone()
            if v.shape[0] > num_variants:
                out[self.file_key(enc, POOL)] = v[num_variants].clone()
        return out

    @property
    def pool_key(self) -> str | None:
        """The file key of the POOL vectors (None for a family without the slot)."""
        return None if self.pool_encoder is None else self.file_key(self.pool_encoder, POOL)

    def pool_vectors(self, ef: Any, where: str) -> torch.Tensor | None:
        """A file's POOL vectors when its pooled embeds come from them (None: layer mean)."""
        return None

    def metadata_extra(self, pooled: str) -> dict[str, str] | None:
        """Family-specific file metadata of a training run."""
        return None

    # ------------------------------------------------------------------ encoding

    def encoder_states(
        self,
        part: EncoderPart,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        clip_skip: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder's hidden states ``[R, T, D]`` for id rows, and the final hidden state at EOS
        ``[R, W]`` for the encoder that makes the pooled embeds (else None)."""
        raise NotImplementedError

    def finish(
        self,
        hidden: Mapping[str, torch.Tensor],
        eos: torch.Tensor | None,
        parts: Sequence[EncoderPart],
        *,
        num_layers: int,
        pool_row: bool,
        clip_skip: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Contexts ``[S, L, B, T, D]`` and pooled embeds ``[S, B, P]`` from each encoder's
        hidden states ``[S, R, B, T, D]`` (R = L, or L + 1 with SDXL's POOL row)."""
        raise NotImplementedError

    def added_cond(
        self, pooled: torch.Tensor | None, time_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (None when the family has none)."""
        return None

    # ------------------------------------------------------------------ pipelines

    def pipeline_type(self) -> type:
        """The diffusers pipeline class."""
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def pipeline_extra(self) -> dict[str, Any]:
        """Keyword arguments the pipeline class needs beyond the components."""
        return {}

    def build_pipeline(self, *, vae: nn.Module, unet: nn.Module, scheduler: Any, parts: Any) -> Any:
        """A stock pipeline of this family from components (``parts``: `EncoderPart` list)."""
        kwargs: dict[str, Any] = {"vae": vae, "unet": unet, "scheduler": scheduler}
        for spec, part in zip(self.specs, parts, strict=True):
            kwargs[spec.tokenizer] = part.tokenizer
            kwargs[spec.text_encoder] = part.text_encoder
        return self.pipeline_type()(**kwargs, **self.pipeline_extra())


class StableDiffusion(ModelFamily):
    """SD 1.x (768-wide CLIP-L) and SD 2.x (1024-wide OpenCLIP-H): one text encoder, the final
    layer-normed hidden states as context, no added conditioning."""

    label = "SD 1.x/2.x"
    specs = (EncoderSpec("text", "tokenizer", "text_encoder"),)
    pipeline_class = "StableDiffusionPipeline"

    def __init__(self, name: str, architecture: str) -> None:
        self.name = name
        self.architecture = architecture

    def file_key(self, encoder: str, layer: str) -> str:
        return layer

    def ti_key(self, encoder: str) -> str:
        return "emb_params"

    def fallback_key(self, encoder: str) -> str:
        # ComfyUI's SD1 tokenizer reads "clip_l", its SD2 (OpenCLIP-H) tokenizer "clip_h"
        return "clip_h" if self.name == "sd2" else "clip_l"

    def pipeline_extra(self) -> dict[str, Any]:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encoder_states(self, part, ids, mask, clip_skip):
        kwargs = {} if mask is None else {"attention_mask": mask}
        if clip_skip is None:
            return part.text_encoder(ids, **kwargs)[0], None
        out = part.text_encoder(ids, output_hidden_states=True, **kwargs)
        return _final_layer_norm(part.text_encoder)(out.hidden_states[-(clip_skip + 1)]), None

    def finish(self, hidden, eos, parts, *, num_layers, pool_row, clip_skip):
        return hidden[self.specs[0].name], None


class StableDiffusionXL(ModelFamily):
    """SDXL (DESIGN §5): two text encoders whose penultimate hidden states are concatenated per
    layer; pooled ``text_embeds`` from the second one's EOS state (a POOL slot or the layer mean);
    ``time_ids`` added conditioning."""

    name = "sdxl"
    label = "SDXL"
    architecture = "stable-diffusion-xl-v1-base/xti"
    specs = (
        EncoderSpec("clip_l", "tokenizer", "text_encoder"),
        EncoderSpec("clip_g", "tokenizer_2", "text_encoder_2", projection=True),
    )
    pipeline_class = "StableDiffusionXLPipeline"
    uses_time_ids = True
    has_pool_slot = True
    pool_encoder = "clip_g"

    def file_key(self, encoder: str, layer: str) -> str:
        return f"{encoder}.{layer}"

    def expected_keys(self, layers):
        required, _ = super().expected_keys(layers)
        return required, [self.pool_key]

    def ti_key(self, encoder: str) -> str:
        return encoder

    def fallback_key(self, encoder: str) -> str:
        return encoder

    def vector_sets(self, encoder, num_variants, pooled):
        return num_variants + (1 if pooled == "slot" and encoder == self.pool_encoder else 0)

    def metadata_extra(self, pooled):
        return {"xti.pooled": pooled}

    def pipeline_extra(self):
        return {"add_watermarker": False}

    def pool_vectors(self, ef, where):
        key = self.pool_key
        pool = ef.vectors.get(key)
        mode = ef.metadata.get("xti.pooled") or ("slot" if pool is not None else "mean")
        if mode not in ("slot", "mean"):
            raise XTIError(f"{where}: metadata xti.pooled must be slot or mean, got {mode!r}")
        if mode == "slot" and pool is None:
            raise XTIError(f"{where}: metadata xti.pooled is slot but the file has no {key}")
        width = ef.vectors[self.file_key(self.pool_encoder, ef.layers[0])].shape[-1]
        if pool is not None and pool.shape[-1] != width:
            raise XTIError(f"{where}: {key} has another width than the {self.pool_encoder} layers")
        return pool.float().contiguous() if mode == "slot" and pool is not None else None

    def encoder_states(self, part, ids, mask, clip_skip):
        # as the stock SDXL encode_prompt: penultimate (or clip_skip) hidden states, no final layer
        # norm; with clip_skip the negatives keep the penultimate states (stacked as [R, 2, T, D])
        kwargs = {} if mask is None else {"attention_mask": mask}
        out = part.text_encoder(ids, output_hidden_states=True, **kwargs)
        hidden = out.hidden_states[-((clip_skip or 0) + 2)]
        if clip_skip:
            hidden = torch.stack([hidden, out.hidden_states[-2]], dim=1)
        eos = None
        if part.name == self.pool_encoder:  # projected later, in the stock pipeline's shapes
            last = out.last_hidden_state
            pos = eos_positions(ids, part.tokenizer.eos_token_id).to(last.device)
            eos = last[torch.arange(last.shape[0], device=last.device), pos]
        return hidden, eos

    def finish(self, hidden, eos, parts, *, num_layers, pool_row, clip_skip):
        h1, h2 = hidden["clip_l"], hidden["clip_g"]
        sides = h1.shape[0]
        if clip_skip:  # [S, R, B, 2, T, D]: as stock, clip_skip for the last side (prompts)
            h1 = torch.stack([h1[s, :, :, int(s < sides - 1)] for s in range(sides)])
            h2 = torch.stack([h2[s, :, :, int(s < sides - 1)] for s in range(sides)])
        assert eos is not None  # [S, R, B, W]
        # Projected per side on [B, width], the shapes of the stock encode_prompt: a matmul over
        # one row takes another CPU kernel than over several, and its last bits differ.
        projection = parts[1].text_encoder.text_projection
        rows = [num_layers] if pool_row else list(range(num_layers))
        pooled = torch.stack(
            [torch.stack([projection(eos[s, i]) for i in rows]) for s in range(sides)]
        )  # [S, 1 or L, B, P]
        if h2.dtype != h1.dtype:  # as torch.concat in the stock encode_prompt
            common = torch.promote_types(h1.dtype, h2.dtype)
            h1, h2 = h1.to(common), h2.to(common)
        contexts = torch.cat([h1[:, :num_layers], h2[:, :num_layers].to(h1.device)], dim=-1)
        if pool_row:
            return contexts, pooled[:, 0]
        same = (pooled == pooled[:, :1]).all(dim=-1).all(dim=1)  # [S, B]
        # equal layers give exactly their pooled output (a mean of equal floats may not); the
        # gradient is the mean's either way (training spreads it over every layer's vectors).
        # mean + (p0 - mean) is exactly p0: the difference of two floats this close is exact.
        mean = pooled.mean(dim=1)
        exact = mean + (pooled[:, 0] - mean).detach()
        return contexts, torch.where(same.unsqueeze(-1), exact, mean)

    def added_cond(self, pooled, time_ids, dtype):
        if pooled is None or time_ids is None:
            raise XTIError("SDXL needs pooled text embeds and time_ids for every sample")
        return {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}


SD1 = StableDiffusion("sd1", "stable-diffusion-v1/xti")
SD2 = StableDiffusion("sd2", "stable-diffusion-v2/xti")
SDXL = StableDiffusionXL()
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL)}


# ---------------------------------------------------------------------------------- detection


def named(name: str) -> ModelFamily:
    """The family called ``sd1``, ``sd2`` or ``sdxl``."""
    if name not in FAMILIES:
        raise XTIError(f"unknown model family {name!r} (sd1, sd2, sdxl)")
    return FAMILIES[name]


def _cross_attention_dim(unet: Any) -> int | None:
    dim = getattr(unet.config, "cross_attention_dim", None)
    if isinstance(dim, (list, tuple)):
        dim = dim[0] if len(set(dim)) == 1 else None
    return dim


def detect(unet: Any | None, text_encoder: Any | None = None) -> ModelFamily:
    """The family of a model, from its UNet (and text encoder).

    A UNet with ``text_time`` added conditioning is SDXL. Otherwise a conditioning width of 1024
    (OpenCLIP-H) means ``sd2``; 768 (CLIP-L) and anything else (tiny test models) mean ``sd1``,
    whose layer layout is the same.

    Raises:
        XTIError: When the text encoder width does not match the UNet's cross-attention width.
    """
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return SDXL
    config = getattr(text_encoder, "config", None)
    text_dim = getattr(config, "hidden_size", None)
    unet_dim = _cross_attention_dim(unet) if unet is not None else None
    if text_dim is not None and unet_dim is not None and text_dim != unet_dim:
        raise XTIError(
            f"text encoder width {text_dim} does not match the UNet cross_attention_dim {unet_dim}: "
            "the components come from different models"
        )
    dim = unet_dim if unet_dim is not None else text_dim
    return SD2 if dim == 1024 else SD1


def resolve(requested: str, detected: ModelFamily, where: str) -> ModelFamily:
    """The family to use when ``model.family`` is `requested` (``auto`` or a name).

    ``sd1`` and ``sd2`` share a layout, so either may relabel the other (it only changes the
    metadata); asking for SDXL on an SD model or the other way round is one error line.
    """
    if requested == "auto":
        return detected
    wanted = named(requested)
    if type(wanted) is not type(detected):
        raise XTIError(
            f"{where}: model.family={requested} but this is an {detected.label} model; "
            f"set model.family=auto or {detected.name}"
        )
    return wanted


def of_pipeline(pipe: Any) -> ModelFamily:
    """The family of a diffusers pipeline, with its components checked (one-line errors)."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        family = SDXL
    else:
        family = detect(getattr(pipe, "unet", None), getattr(pipe, "text_encoder", None))
    family.check_components(pipe)
    return family


def specs_of_index(
    index: Mapping[str, Any] | None, folder: Path | None = None
) -> tuple[EncoderSpec, ...]:
    """The text encoders a diffusers folder holds: from its ``model_index.json`` (SDXL names a
    second text encoder), or without one from its subfolders."""
    second = SDXL.specs[1].text_encoder
    if index is None:
        has_second = folder is not None and (folder / second).is_dir()
    else:
        entry = index.get(second)
        has_second = isinstance(entry, (list, tuple)) and entry[0] is not None
    return SDXL.specs if has_second else SD1.specs


def of_specs(specs: Sequence[EncoderSpec]) -> ModelFamily:
    """The family whose text encoders these are (SD 1.x for one encoder)."""
    return SDXL if tuple(specs) == SDXL.specs else SD1


def of_file(metadata: Mapping[str, str], keys: Iterable[str]) -> ModelFamily:
    """The family of an embedding file: its ``xti.family`` metadata, else its key layout."""
    family = metadata.get("xti.family")
    if family in FAMILIES:
        return FAMILIES[family]
    prefixes = tuple(f"{s.name}." for s in SDXL.specs)
    return SDXL if any(str(k).startswith(prefixes) for k in keys) else SD1


# ---------------------------------------------------------------------------------- encoding


def eos_positions(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Index of the first EOS token of each row (added tokens have larger ids, so not ``argmax``)."""
    is_eos = input_ids == eos_id
    if not bool(is_eos.any(dim=-1).all()):
        raise XTIError(
            "a tokenized prompt has no end-of-text token; tokenize with padding to max length"
        )
    return is_eos.int().argmax(dim=-1)


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    if norm is None:
        raise XTIError("clip_skip: this text encoder has no final_layer_norm")
    return norm


def distinct_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first occurrence of each distinct row of ``[N, T]`` ids (in order), and for every row
    the index of its distinct row."""
    index_of: dict[tuple[int, ...], int] = {}
    first: list[int] = []
    inverse: list[int] = []
    for r, row in enumerate(rows.tolist()):
        key = tuple(row)
        if key not in index_of:
            index_of[key] = len(first)
            first.append(r)
        inverse.append(index_of[key])
    return torch.tensor(first), torch.tensor(inverse)


def encode_layers(
    family: ModelFamily,
    parts: Sequence[EncoderPart],
    ids: Mapping[str, torch.Tensor],
    *,
    num_layers: int,
    masks: Mapping[str, torch.Tensor] | None = None,
    pool_row: bool = False,
    clip_skip: int | None = None,
    device: torch.device | str | None = None,
    around_call: Any = None,
    distinct: bool = True,
    row_index: Mapping[str, torch.Tensor] | None = None,
) -> LayerEncoding:
    """Per-layer contexts (and SDXL's pooled embeds) from per-encoder id rows.

    Each encoder runs **once**; with `distinct`, on the distinct rows of its ids only (identical
    rows, e.g. the layers of a ``shared`` concept or a prompt without placeholders, are encoded
    once; on CPU every row of a batch equals the row encoded alone, so the values do not change).
    Training passes ``distinct=False``, so that each batch item keeps its own row (gradients of
    identical items summed in another order would change the last bits of XTI runs), and says
    which layers share a row with `row_index` instead (``shared`` mode: B rows, not L·B).

    Args:
        family: the model family.
        parts: the family's text encoders (concept embeddings installed, or installed by
            ``around_call``).
        ids: per encoder ``[S, R, B, T]`` ids: S sides, R = L rows (one per layer; placeholder ids
            already shifted to that layer's virtual ids) or L + 1 for the encoder whose last row
            is SDXL's POOL row (``pool_row``).
        num_layers: L.
        masks: attention masks like ``ids``, passed to encoders configured to use them.
        pool_row: the pooled embeds come from the POOL row (else: the mean over the layers').
        clip_skip: as the stock pipelines' ``clip_skip``.
        device: where the encoders run (default: where the ids are).
        around_call: ``(part) -> context manager`` entered around each encoder call (inference
            installs its concept table and LoRA scale there).
        distinct: encode identical rows once.
        row_index: per encoder, ``[R]`` indices into the rows of its ids when those hold only the
            rows that differ (``[S, R', B, T]``, R' ≤ R): output row r is encoded row
            ``row_index[r]``. Encoders not named here hold all R rows.
    """
    hidden: dict[str, torch.Tensor] = {}
    eos: torch.Tensor | None = None
    calls = 0
    for part in parts:
        part_ids = ids[part.name]
        shape = part_ids.shape  # [S, R, B, T]
        flat = part_ids.reshape(-1, shape[-1])
        keep, back = distinct_rows(flat) if distinct else (None, None)
        run_ids = (flat if keep is None else flat[keep.to(flat.device)]).to(device or flat.device)
        mask = None
        if masks is not None and getattr(part.text_encoder.config, "use_attention_mask", False):
            m = masks[part.name].reshape(-1, shape[-1])
            mask = (m if keep is None else m[keep.to(m.device)]).to(run_ids.device)
        with ExitStack() as stack:
            if around_call is not None:
                stack.enter_context(around_call(part))
            h, e = family.encoder_states(part, run_ids, mask, clip_skip)
        if back is not None:
            h, e = h[back.to(h.device)], (e[back.to(e.device)] if e is not None else None)
        h = h.view(*shape[:3], *h.shape[1:])
        e = e.view(*shape[:3], -1) if e is not None else None
        if row_index is not None and part.name in row_index:
            rows = row_index[part.name].to(h.device)
            h, e = h.index_select(1, rows), (e.index_select(1, rows) if e is not None else None)
        hidden[part.name] = h
        if e is not None:
            eos = e
        calls = max(calls, len(run_ids))
    contexts, pooled = family.finish(
        hidden, eos, parts, num_layers=num_layers, pool_row=pool_row, clip_skip=clip_skip
    )
    return LayerEncoding(contexts, pooled, calls)
