"""Inference: per-layer conditioning in stock diffusers pipelines (DESIGN §7).

This module owns everything a user needs to generate with XTI concepts while keeping their own
diffusers pipeline: loading ``.xti.safetensors`` (and kohya 16-key) files for a pipeline, encoding
prompts into per-layer contexts, style mixing, per-layer prompts (P+ without training), running the
pipeline with those contexts, and leaving the pipeline as it was (`XTIAdapter.unload`). It also
holds the small helpers the ``xti generate / inspect / export`` commands use (pipeline loading,
scheduler swap, image grid, file inspection, kohya and plain-TI export).

How it works, for a pipeline ``pipe`` (SD 1.x / 2.x, SDXL; the text-encoder handling is written
per encoder slot: one for SD 1.x/2.x, ``clip_l`` and ``clip_g`` for SDXL):

* `XTIAdapter(pipe)` wraps every attention processor of ``pipe.unet`` in an `XTIAttnProcessor`
  (`xti.attention`); without the ``xti_contexts`` key they call the wrapped processor unchanged,
  so stock calls of ``pipe`` stay bit-identical. Nothing else of the pipeline is modified: the
  adapter tokenizes with a private copy of ``pipe.tokenizer`` that has the placeholder tokens, and
  installs its `ConceptTokenEmbedding` in the text encoder only for the duration of one encoder
  call. `unload()` puts the original processor objects back.
* Per-layer prompts: for layer ``i`` and batch item ``b`` the prompt text is the user's prompt, or
  that layer's per-layer prompt, with mixed placeholders replaced by the concept that owns layer
  ``i`` and every placeholder expanded to its tokens. After tokenizing, a concept token gets the
  virtual id of *layer i's* vector (``first_id + v·N + k``, vector ``k`` of layer variant ``v``);
  layers whose vector is bitwise equal to an earlier layer's share that layer's id. Identical id
  rows (positive and negative, all layers, all batch items) are encoded **once**, in **one**
  text-encoder call, and indexed back into contexts ``[L, batch, T, D]``.
* The pipeline is called with ``prompt_embeds`` / ``negative_prompt_embeds`` (layer 0, which it
  needs for its bookkeeping) and ``cross_attention_kwargs={"xti_contexts": contexts}`` where the
  contexts are already laid out as the UNet batch: ``[negative · n, positive · n]`` under
  classifier-free guidance, positive only without, each prompt repeated ``num_images_per_prompt``
  times in a row (the pipeline never expands a cross-attention kwarg).
* SDXL (`StableDiffusionXLPipeline` and pipelines built on it; DESIGN §5): ``clip_l`` vectors go
  to ``pipe.tokenizer``/``text_encoder``, ``clip_g`` ones to ``tokenizer_2``/``text_encoder_2``;
  both encoders take the same layer's text and variant, and a layer's context is the concatenation
  of their penultimate hidden states (as `xti.embeddings.encode_sdxl_per_layer`). The pooled
  ``text_embeds`` are global: the prompt as written, encoded by ``text_encoder_2`` with each
  concept at its ``clip_g.POOL`` vectors (one more row of the same call), or, when a concept in it
  has no POOL vectors (``xti.pooled = mean``) or there is no prompt, the mean of the layers'
  pooled outputs; they are read at the true EOS position (not ``argmax`` of the ids). Negatives
  follow the stock pipeline: no negative prompt and ``force_zeros_for_empty_prompt`` -> zero
  negative contexts and pooled embeds, otherwise the negative prompt is encoded. The pipeline is
  called with ``pooled_prompt_embeds`` / ``negative_pooled_prompt_embeds`` too.

Bit identity (measured on the 2-core CPU of the dev machines with torch 2.13 CPU, fp32, bf16 and
fp16, on the tiny text encoder, a CLIP-L-shaped and an OpenCLIP-H-shaped one): every row of a
text-encoder batch of 2, 3, 4, 6, 8, 16 or 32 prompts was ``torch.equal`` to the same prompt
encoded alone, so one call over the deduplicated positive and negative rows gives exactly the
hidden states of the stock ``encode_prompt`` (which makes one call for the prompts and one for
the negatives). Hence: a concept whose layers all hold the same vector gives the same images as
``load_textual_inversion`` of that vector, a prompt without placeholders the same images as the
stock pipeline, and per-layer prompts that are all equal the same images as that prompt (tests).
SDXL's ``text_projection`` is the exception: a matmul over one row takes another CPU kernel than
over several (the last bits differ), so the pooled EOS states are projected per side on
``[batch, width]``, the shapes the stock ``encode_prompt`` uses. Deduplication also makes the
common cases cheap: a prompt without placeholders costs the encoder two rows (prompt and
negative), not ``2·L``. On GPUs, kernels chosen by batch size can differ in
the last bits; the images then agree to float precision, not bit for bit.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xti.attention import CONTEXTS_KWARG, XTIAttnProcessor, install_processors
from xti.embeddings import (
    eos_positions,
    expansion_tokens,
    install_token_embedding,
    token_in_vocabulary,
)
from xti.errors import XTIError
from xti.export import (
    POOL_KEY,
    SD1_LAYER_NAMES,
    EmbeddingFile,
    atomic_write_bytes,
    load_embedding_file,
    to_ti_vectors,
)
from xti.layers import LayerScheme, layer_scheme
from xti.paths import check_output_file

logger = logging.getLogger(__name__)

__all__ = [
    "Concept",
    "EncodedPrompts",
    "XTIAdapter",
    "export_kohya",
    "export_ti",
    "image_grid",
    "inspect_embedding",
    "load_pipeline",
    "load_xti",
    "parse_assignments",
    "save_images",
    "set_scheduler",
]

PathLike = str | os.PathLike[str]
Selection = str | Sequence[str]
"""A layer selection: names, groups, ranges (``"coarse"``, ``"IN07-OUT05"``, ``["MID", "0-3"]``)."""

_MAX_NAMES_SHOWN = 20


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Concept:
    """A concept loaded into an `XTIAdapter`.

    Attributes:
        placeholder: the word that stands for it in prompts (``<cat-toy>``).
        vectors: ``[L, n_vectors, d]`` float32, in the adapter's layer order.
        source: the file it came from (or ``"<memory>"``).
        metadata: the file's string metadata (empty for kohya files).
        encoder_vectors: SDXL: ``{"clip_l": [L, n, 768], "clip_g": [L, n, 1280]}``
            (``vectors`` is then the ``clip_l`` set); empty for SD 1.x/2.x.
        pool: SDXL: the ``[n, 1280]`` ``clip_g.POOL`` vectors used for the pooled
            ``text_embeds``; None when the pooled embeds are the mean over the layers'.
    """

    placeholder: str
    vectors: torch.Tensor
    source: str
    metadata: dict[str, str]
    encoder_vectors: dict[str, torch.Tensor] = field(default_factory=dict)
    pool: torch.Tensor | None = None

    @property
    def n_vectors(self) -> int:
        return self.vectors.shape[1]

    def vectors_for(self, key: str | None) -> torch.Tensor:
        """``[L, n, d]`` vectors of one encoder slot (``None``: SD 1.x/2.x's only encoder)."""
        return self.vectors if key is None else self.encoder_vectors[key]


@dataclass
class EncodedPrompts:
    """Per-layer text conditioning for one pipeline call.

    Attributes:
        prompt_embeds: ``[B, T, D]`` layer-0 contexts of the prompts (what the pipeline's
            ``prompt_embeds`` argument expects; it repeats them itself).
        negative_prompt_embeds: ``[B, T, D]`` layer-0 negatives, None without guidance.
        contexts: ``[L, UNet batch, T, D]`` per-layer contexts in the UNet's batch layout:
            ``[negatives · n, prompts · n]`` with guidance, prompts only without, each prompt
            repeated ``num_images_per_prompt`` times in a row.
        num_images_per_prompt: n.
        do_classifier_free_guidance: whether the contexts include the negatives.
        num_sequences: distinct token sequences the text encoder ran on (one call; SDXL: the
            larger of the two encoders' counts).
        pooled_prompt_embeds: SDXL ``[B, P]`` pooled ``text_embeds`` of the prompts.
        negative_pooled_prompt_embeds: SDXL ``[B, P]`` of the negatives (zeros when the
            pipeline's ``force_zeros_for_empty_prompt`` applies), None without guidance.
    """

    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    contexts: torch.Tensor
    num_images_per_prompt: int
    do_classifier_free_guidance: bool
    num_sequences: int
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def pipeline_kwargs(
        self, cross_attention_kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Keyword arguments for the stock pipeline call (your ``cross_attention_kwargs`` merged).

        Pass a ``guidance_scale`` that matches ``do_classifier_free_guidance`` (> 1 with it).
        """
        cak = dict(cross_attention_kwargs or {})
        cak[CONTEXTS_KWARG] = self.contexts
        out = {
            "prompt_embeds": self.prompt_embeds,
            "negative_prompt_embeds": self.negative_prompt_embeds,
            "num_images_per_prompt": self.num_images_per_prompt,
            "cross_attention_kwargs": cak,
        }
        if self.pooled_prompt_embeds is not None:
            out["pooled_prompt_embeds"] = self.pooled_prompt_embeds
            out["negative_pooled_prompt_embeds"] = self.negative_pooled_prompt_embeds
        return out


# ----------------------------------------------------------------------------- helpers


def _names(names: Sequence[str]) -> str:
    names = list(names)
    if len(names) <= _MAX_NAMES_SHOWN:
        return ", ".join(names)
    return f"{', '.join(names[:8])}, ... {', '.join(names[-4:])} ({len(names)} layers)"


def _is_sdxl_pipeline(pipe: Any) -> bool:
    unet = getattr(pipe, "unet", None)
    addition = getattr(getattr(unet, "config", None), "addition_embed_type", None)
    return getattr(pipe, "text_encoder_2", None) is not None or addition == "text_time"


def _check_pipeline(pipe: Any) -> None:
    for name in ("tokenizer", "text_encoder", "unet"):
        if getattr(pipe, name, None) is None:
            raise XTIError(
                f"this pipeline ({type(pipe).__name__}) has no {name}; xti needs a Stable "
                "Diffusion text-to-image pipeline (tokenizer, text_encoder, unet)"
            )
    if _is_sdxl_pipeline(pipe):
        for name in ("tokenizer_2", "text_encoder_2"):
            if getattr(pipe, name, None) is None:
                raise XTIError(
                    f"this SDXL pipeline ({type(pipe).__name__}) has no {name}; xti needs both "
                    "SDXL text encoders (tokenizer, text_encoder, tokenizer_2, text_encoder_2)"
                )


def _as_list(value: str | Sequence[str], batch: int, what: str) -> list[str]:
    if isinstance(value, str):
        return [value] * batch
    items = list(value)
    if not all(isinstance(v, str) for v in items):
        raise XTIError(f"{what}: expected a string or a list of strings")
    if len(items) != batch:
        raise XTIError(f"{what}: has {len(items)} prompts but the batch has {batch}")
    return items


def _batch_size(prompt: Any, layer_prompts: Mapping[Any, Any] | None) -> int:
    if isinstance(prompt, str):
        return 1
    if prompt is not None:
        n = len(list(prompt))
        if n == 0:
            raise XTIError("prompt: the list of prompts is empty")
        return n
    for value in (layer_prompts or {}).values():
        return 1 if isinstance(value, str) else max(1, len(list(value)))
    raise XTIError("give a prompt, or layer prompts that cover every layer")


def _placeholder_regex(placeholders: Iterable[str]) -> re.Pattern[str] | None:
    items = sorted(set(placeholders), key=len, reverse=True)
    return re.compile("|".join(re.escape(p) for p in items)) if items else None


# ----------------------------------------------------------------------------- the adapter


class _EncoderSlot:
    """One text encoder with the private tokenizer that knows the placeholder tokens.

    SD 1.x/2.x have one slot; SDXL will have two (``clip_l``, ``clip_g``), whose hidden states are
    concatenated per layer.
    """

    def __init__(self, key: str | None, tokenizer: Any, text_encoder: nn.Module) -> None:
        self.key = key
        self.source_tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer: Any = None
        self.base_len = -1
        self.first_ids: dict[str, int] = {}

    def width(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[-1])

    def sync(self, concepts: Sequence[Concept]) -> None:
        """(Re)build the private tokenizer when the pipeline's tokenizer changed (e.g. a stock
        ``load_textual_inversion`` after this adapter was made) or concepts were added."""
        wanted = [c.placeholder for c in concepts]
        if (
            self.tokenizer is not None
            and self.base_len == len(self.source_tokenizer)
            and list(self.first_ids) == wanted
        ):
            return
        tokenizer = copy.deepcopy(self.source_tokenizer)
        first_ids: dict[str, int] = {}
        for c in concepts:
            tokens = expansion_tokens(c.placeholder, c.n_vectors)
            if token_in_vocabulary(tokenizer, tokens) is not None:
                raise XTIError(
                    f"placeholder {c.placeholder!r} is already a token of this pipeline's "
                    "tokenizer; load the file with another placeholder"
                )
            tokenizer.add_tokens(list(tokens))
            ids = tokenizer.convert_tokens_to_ids(list(tokens))
            if ids != list(range(ids[0], ids[0] + len(ids))):
                raise XTIError(f"could not add {c.placeholder!r} to the tokenizer as new tokens")
            first_ids[c.placeholder] = ids[0]
        self.tokenizer = tokenizer
        self.base_len = len(self.source_tokenizer)
        self.first_ids = first_ids


class XTIAdapter:
    """Per-layer conditioning for a stock diffusers Stable Diffusion pipeline.

    Creating the adapter wraps the UNet's attention processors (a pass-through for calls without
    xti contexts); `load` adds concepts; `encode` makes per-layer contexts; calling the adapter
    runs the pipeline with them; `unload` restores the pipeline exactly. Also a context manager.

    Example:
        >>> xti = XTIAdapter(pipe)
        >>> xti.load("cat-toy.xti.safetensors")          # placeholder from the file's metadata
        >>> image = xti("a <cat-toy> on the beach", num_inference_steps=30).images[0]
        >>> xti("a photo of <a>", mix={"<a>": "coarse", "<b>": "fine"})
        >>> xti("a red cube", layer_prompts={"mid": "a green lizard"})
        >>> xti.unload()

    Args:
        pipe: a ``StableDiffusionPipeline`` (SD 1.x / 2.x), a ``StableDiffusionXLPipeline``, or a
            pipeline built on either.
        granularity: ``block`` (one layer per cross-attention block, the DESIGN §2 names).
    """

    def __init__(self, pipe: Any, *, granularity: str = "block") -> None:
        _check_pipeline(pipe)
        self.pipe = pipe
        self.scheme: LayerScheme = layer_scheme(
            pipe.unet, "transformer" if granularity == "transformer" else "block"
        )
        self.is_sdxl = _is_sdxl_pipeline(pipe)
        if self.is_sdxl:
            self._slots = [
                _EncoderSlot("clip_l", pipe.tokenizer, pipe.text_encoder),
                _EncoderSlot("clip_g", pipe.tokenizer_2, pipe.text_encoder_2),
            ]
        else:
            self._slots = [_EncoderSlot(None, pipe.tokenizer, pipe.text_encoder)]
        self._concepts: dict[str, Concept] = {}
        self._loaded = True
        current = pipe.unet.attn_processors
        if any(isinstance(p, XTIAttnProcessor) for p in current.values()):
            raise XTIError(
                "this pipeline already carries xti processors (another XTIAdapter?); unload it "
                "first, or load all files into one adapter"
            )
        install_processors(pipe.unet, self.scheme)

    # ------------------------------------------------------------------ concepts

    @property
    def layer_names(self) -> list[str]:
        """The pipeline's layer names in UNet forward order."""
        return self.scheme.names

    @property
    def concepts(self) -> dict[str, Concept]:
        """Loaded concepts by placeholder (a copy)."""
        return dict(self._concepts)

    def load(
        self,
        source: PathLike | EmbeddingFile,
        placeholder: str | None = None,
        *,
        allow_pickle: bool = False,
    ) -> Concept:
        """Load one embedding file (xti or kohya 16-key) as a concept.

        Args:
            source: a file path, or an already loaded `EmbeddingFile`.
            placeholder: the prompt word for it; default: the file's ``xti.placeholder``
                (required for kohya files, which have no metadata).
            allow_pickle: accept pickled ``.pt``/``.bin`` files (read with ``weights_only=True``).

        Raises:
            XTIError: one line, for a file that does not fit the model (naming the file's and the
                model's layers or widths), a missing or clashing placeholder, a refused pickle.
        """
        self._check_loaded()
        if isinstance(source, EmbeddingFile):
            ef, where = source, source.source or "<memory>"
        else:
            where = str(source)
            ef = load_embedding_file(source, allow_pickle=allow_pickle)
        name = placeholder or ef.metadata.get("xti.placeholder")
        if not name or not name.strip():
            raise XTIError(
                f"{where}: the file names no placeholder (kohya files have no metadata); "
                "give one, e.g. load(path, placeholder='<my-concept>') or --embedding '<tok>=PATH'"
            )
        name = name.strip()
        if any(ch.isspace() for ch in name):
            raise XTIError(f"placeholder {name!r} contains whitespace; use one word like <my-toy>")
        if name in self._concepts:
            raise XTIError(
                f"{where}: placeholder {name!r} is already loaded (from "
                f"{self._concepts[name].source}); load it with another placeholder"
            )
        if self.is_sdxl:
            by_encoder, pool = self._sdxl_vectors_for_model(ef, where)
            concept = Concept(
                name, by_encoder["clip_l"], where, dict(ef.metadata), by_encoder, pool
            )
        else:
            concept = Concept(name, self._vectors_for_model(ef, where), where, dict(ef.metadata))
        candidate = [*self._concepts.values(), concept]
        for slot in self._slots:
            slot.sync(candidate)
        self._concepts[name] = concept
        return concept

    def _vectors_for_model(self, ef: EmbeddingFile, where: str) -> torch.Tensor:
        model_layers = self.scheme.names
        if ef.is_sdxl:
            raise XTIError(
                f"{where}: an SDXL file (clip_l/clip_g keys) does not fit this SD 1.x/2.x "
                f"pipeline (layers {_names(model_layers)})"
            )
        keys = _match_layers(ef.layers, self.scheme)
        width = self._slots[0].width()
        file_width = next(iter(ef.vectors.values())).shape[-1]
        if keys is None:
            raise XTIError(
                f"{where}: its layers ({_names(ef.layers)}) do not fit this model's layers "
                f"({_names(model_layers)})"
            )
        if file_width != width:
            family = ef.metadata.get("xti.family", "unknown family")
            raise XTIError(
                f"{where}: its vectors are {file_width} wide ({family}) but this model's text "
                f"encoder takes {width}-wide token embeddings"
            )
        return torch.stack([ef.vectors[k].float() for k in keys]).contiguous()

    def _sdxl_vectors_for_model(
        self, ef: EmbeddingFile, where: str
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        model_layers = self.scheme.names
        if not ef.is_sdxl:
            raise XTIError(
                f"{where}: an SD 1.x/2.x file ({ef.family}, layers {_names(ef.layers)}) does not "
                f"fit this SDXL pipeline (clip_l/clip_g, layers {_names(model_layers)})"
            )
        keys = _match_layers(ef.layers, self.scheme)
        if keys is None:
            raise XTIError(
                f"{where}: its layers ({_names(ef.layers)}) do not fit this model's layers "
                f"({_names(model_layers)})"
            )
        out: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            assert slot.key is not None
            width = slot.width()
            stack = torch.stack([ef.layer_vectors(k, slot.key).float() for k in keys])
            if stack.shape[-1] != width:
                raise XTIError(
                    f"{where}: its {slot.key} vectors are {stack.shape[-1]} wide but this "
                    f"pipeline's {slot.key} text encoder takes {width}-wide token embeddings"
                )
            out[slot.key] = stack.contiguous()
        pool = ef.vectors.get(POOL_KEY)
        mode = ef.metadata.get("xti.pooled") or ("slot" if pool is not None else "mean")
        if mode not in ("slot", "mean"):
            raise XTIError(f"{where}: metadata xti.pooled must be slot or mean, got {mode!r}")
        if mode == "slot" and pool is None:
            raise XTIError(f"{where}: metadata xti.pooled is slot but the file has no {POOL_KEY}")
        if pool is not None and pool.shape[-1] != out["clip_g"].shape[-1]:
            raise XTIError(f"{where}: {POOL_KEY} has another width than the clip_g layers")
        return out, (pool.float().contiguous() if mode == "slot" and pool is not None else None)

    def _check_loaded(self) -> None:
        if not self._loaded:
            raise XTIError("this XTIAdapter was unloaded; make a new one")

    # ------------------------------------------------------------------ encoding

    def encode(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        layer_prompts: Mapping[Any, str | Sequence[str]] | None = None,
        mix: Mapping[str, Selection] | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        clip_skip: int | None = None,
        lora_scale: float | None = None,
    ) -> EncodedPrompts:
        """Encode prompts into per-layer contexts with one text-encoder call.

        Args:
            prompt: a prompt or a list of prompts (the batch); placeholders of loaded concepts
                are allowed anywhere. May be None when ``layer_prompts`` cover every layer.
            negative_prompt: shared by all layers (default ``""``, as in diffusers); a string or
                one per prompt.
            layer_prompts: per-layer prompts (P+ without training): ``{selection: prompt}``, a
                selection being layer names, groups (``coarse``, ``fine``, ``down``, ``mid``,
                ``up``, ``all``) or ranges (``IN07-OUT05``, ``0-5``), comma-separated or a tuple;
                the prompt a string or one per batch item. Later entries win; uncovered layers
                take ``prompt``.
            mix: style mixing ``{placeholder: selection}``: in the selected layers, every
                placeholder of the mix (wherever it stands in a prompt) is filled by this
                concept; other layers keep the placeholder that is written. Later entries win.
            num_images_per_prompt: images per prompt (the contexts are repeated accordingly).
            do_classifier_free_guidance: include the negatives (``guidance_scale > 1``).
            clip_skip: use the hidden states this many layers before the last (plus the final
                layer norm), as diffusers' ``clip_skip``; SDXL as its stock pipeline: both
                encoders' hidden states ``clip_skip + 2`` from the end, no final layer norm, for
                the prompts only (negatives keep the penultimate layer).
            lora_scale: scale of text-encoder LoRA layers for this call (PEFT backend).
        """
        self._check_loaded()
        if num_images_per_prompt < 1:
            raise XTIError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if clip_skip is not None and clip_skip < 0:
            raise XTIError(f"clip_skip must be >= 0, got {clip_skip}")
        concepts = list(self._concepts.values())
        for slot in self._slots:
            slot.sync(concepts)
        num_layers = len(self.scheme)
        batch = _batch_size(prompt, layer_prompts)

        # Per-layer prompt texts [L][B] and the negatives [B].
        per_layer = self._layer_texts(prompt, layer_prompts, batch)
        sides = [per_layer]
        negs: list[str] = []
        # SDXL's stock rule: no negative prompt given -> zero negative embeds and pooled embeds
        zero_negatives = (
            self.is_sdxl
            and do_classifier_free_guidance
            and negative_prompt is None
            and bool(getattr(getattr(self.pipe, "config", None), "force_zeros_for_empty_prompt", 0))
        )
        if do_classifier_free_guidance and not zero_negatives:
            negs = _as_list("" if negative_prompt is None else negative_prompt, batch, "negative")
            sides.insert(0, [negs] * num_layers)
        sides = self._apply_mix(sides, mix)

        device = self.pipe._execution_device
        pooled: torch.Tensor | None = None
        if self.is_sdxl:
            base = None if prompt is None else _as_list(prompt, batch, "prompt")
            pool_texts = ([negs] if negs else []) + [base]
            hidden, pooled, num_sequences = self._encode_sdxl(
                sides, pool_texts, clip_skip, lora_scale
            )
            dtype = self._slots[1].text_encoder.dtype
            pooled = pooled.to(device=device)
            if zero_negatives:
                hidden = torch.cat([torch.zeros_like(hidden), hidden])
                pooled = torch.cat([torch.zeros_like(pooled), pooled])
        else:
            slot = self._slots[0]
            hidden, _, num_sequences = self._encode_slot(slot, sides, clip_skip, lora_scale)
            dtype = slot.text_encoder.dtype
        # hidden: [S, L, B, T, D]; pooled: [S, B, P] (SDXL)
        hidden = hidden.to(device=device, dtype=dtype)
        pos = hidden[-1]
        neg = hidden[0] if do_classifier_free_guidance else None
        n = num_images_per_prompt
        parts = [h.repeat_interleave(n, dim=1) for h in hidden]
        contexts = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return EncodedPrompts(
            prompt_embeds=pos[0],
            negative_prompt_embeds=neg[0] if neg is not None else None,
            contexts=contexts.contiguous(),
            num_images_per_prompt=n,
            do_classifier_free_guidance=do_classifier_free_guidance,
            num_sequences=num_sequences,
            pooled_prompt_embeds=pooled[-1] if pooled is not None else None,
            negative_pooled_prompt_embeds=(
                pooled[0] if pooled is not None and do_classifier_free_guidance else None
            ),
        )

    def _encode_sdxl(
        self,
        sides: list[list[list[str]]],
        pool_texts: list[list[str] | None],
        clip_skip: int | None,
        lora_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """SDXL contexts ``[S, L, B, T, D1 + D2]`` and pooled ``text_embeds`` ``[S, B, P]``.

        Each layer's context concatenates both encoders' hidden states for that layer's texts
        and vectors. The pooled embeds of a side come from an extra ``POOL`` row of the second
        encoder (the prompt as written, concepts at their ``clip_g.POOL`` vectors) when there is
        a prompt and every concept in it has POOL vectors; otherwise they are the mean over the
        layers' pooled outputs. Each encoder runs once.
        """
        num_layers = len(sides[0])
        pattern = _placeholder_regex(self._concepts)
        use_slot = all(t is not None for t in pool_texts)
        if use_slot and pattern is not None:
            for texts in pool_texts:
                for text in texts or ():
                    for m in pattern.finditer(text):
                        if self._concepts[m.group(0)].pool is None:
                            use_slot = False
        slot_l, slot_g = self._slots
        h1, _, n1 = self._encode_slot(slot_l, sides, clip_skip, lora_scale)
        sides_g = sides
        if use_slot:
            sides_g = [[*side, texts] for side, texts in zip(sides, pool_texts, strict=True)]
        h2, pooled, n2 = self._encode_slot(
            slot_g, sides_g, clip_skip, lora_scale, pool_row=use_slot
        )
        if clip_skip:  # [S, L, B, 2, T, D]: as stock, clip_skip for prompts, -2 for negatives
            h1 = torch.stack([h1[s, :, :, int(s < len(sides) - 1)] for s in range(len(sides))])
            h2 = torch.stack([h2[s, :, :, int(s < len(sides) - 1)] for s in range(len(sides))])
        assert pooled is not None  # [S, L(+1), B, width]: EOS hidden states, not yet projected
        # The projection runs per side on [B, width], the shapes of the stock encode_prompt: a
        # matmul over one row takes another CPU kernel than over several, and its last bits
        # differ, so projecting all rows in one call would not be bit-identical to stock.
        projection = slot_g.text_encoder.text_projection
        with torch.no_grad():
            rows = [num_layers] if use_slot else list(range(num_layers))
            pooled = torch.stack(
                [torch.stack([projection(pooled[s, i]) for i in rows]) for s in range(len(sides))]
            )  # [S, 1 or L, B, P]
        if h2.dtype != h1.dtype:  # as torch.concat in the stock encode_prompt
            common = torch.promote_types(h1.dtype, h2.dtype)
            h1, h2 = h1.to(common), h2.to(common)
        contexts = torch.cat([h1, h2[:, :num_layers].to(h1.device)], dim=-1)
        if use_slot:
            pooled_out = pooled[:, 0]
        else:
            layer_pooled = pooled  # [S, L, B, P]
            same = (layer_pooled == layer_pooled[:, :1]).all(dim=-1).all(dim=1)  # [S, B]
            # equal layers give exactly their pooled output (a mean of equal floats may not)
            pooled_out = torch.where(
                same.unsqueeze(-1), layer_pooled[:, 0], layer_pooled.mean(dim=1)
            )
        return contexts, pooled_out, max(n1, n2)

    def _layer_texts(
        self,
        prompt: str | Sequence[str] | None,
        layer_prompts: Mapping[Any, str | Sequence[str]] | None,
        batch: int,
    ) -> list[list[str]]:
        num_layers = len(self.scheme)
        base = None if prompt is None else _as_list(prompt, batch, "prompt")
        texts: list[list[str] | None] = [base] * num_layers
        for selection, value in (layer_prompts or {}).items():
            spec = list(selection) if isinstance(selection, (tuple, list)) else str(selection)
            indices = self.scheme.select(spec)
            if not indices:
                raise XTIError(f"layer prompt {selection!r}: selects no layer")
            values = _as_list(value, batch, f"layer prompt {selection!r}")
            for i in indices:
                texts[i] = values
        missing = [self.scheme.names[i] for i, t in enumerate(texts) if t is None]
        if missing:
            raise XTIError(
                f"no prompt for layers {_names(missing)}: give a prompt, or layer prompts that "
                "cover every layer (e.g. 'all')"
            )
        return texts  # type: ignore[return-value]

    def _apply_mix(
        self, sides: list[list[list[str]]], mix: Mapping[str, Selection] | None
    ) -> list[list[list[str]]]:
        if not mix:
            return sides
        owner: dict[int, str] = {}
        for placeholder, selection in mix.items():
            if placeholder not in self._concepts:
                loaded = ", ".join(self._concepts) or "none"
                raise XTIError(f"mix: {placeholder!r} is not a loaded concept (loaded: {loaded})")
            spec = list(selection) if isinstance(selection, (tuple, list)) else str(selection)
            indices = self.scheme.select(spec)
            if not indices:
                raise XTIError(f"mix: {placeholder}={selection!r} selects no layer")
            for i in indices:
                owner[i] = placeholder
        pattern = _placeholder_regex(mix)
        assert pattern is not None
        if not any(pattern.search(t) for side in sides[-1:] for layer in side for t in layer):
            raise XTIError(f"mix: no prompt contains any of {', '.join(mix)}")
        out = []
        for side in sides:
            new_side = []
            for i, layer in enumerate(side):
                if i in owner:
                    fill = owner[i]
                    layer = [pattern.sub(lambda _m, f=fill: f, t) for t in layer]
                new_side.append(layer)
            out.append(new_side)
        return out

    def _expand(self, text: str, slot: _EncoderSlot) -> str:
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        if convert is not None:  # multi-vector stock TI tokens already in the pipeline
            text = convert(text, slot.source_tokenizer)
        pattern = _placeholder_regex(self._concepts)
        if pattern is None:
            return text
        return pattern.sub(
            lambda m: " ".join(expansion_tokens(m.group(0), self._concepts[m.group(0)].n_vectors)),
            text,
        )

    def _encode_slot(
        self,
        slot: _EncoderSlot,
        sides: list[list[list[str]]],
        clip_skip: int | None,
        lora_scale: float | None,
        *,
        pool_row: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Hidden states ``[S, L, B, T, D]`` of one encoder for all texts, in one call, and for
        SDXL's second encoder its final hidden states at EOS ``[S, L, B, width]`` (else None).

        ``pool_row``: the last "layer" of ``sides`` is SDXL's POOL row (concepts read their
        ``pool`` vectors there)."""
        tokenizer = slot.tokenizer
        num_sides, num_layers, batch = len(sides), len(sides[0]), len(sides[0][0])
        texts = [t for side in sides for layer in side for t in layer]
        distinct = list(dict.fromkeys(texts))
        expanded = [self._expand(t, slot) for t in distinct]
        max_len = tokenizer.model_max_length
        enc = tokenizer(
            expanded, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt"
        )
        _warn_truncated(tokenizer, expanded, max_len)
        row_of = {t: i for i, t in enumerate(distinct)}
        rows = torch.tensor([row_of[t] for t in texts])
        ids = enc.input_ids[rows].view(num_sides, num_layers, batch, -1)
        mask = enc.attention_mask[rows].view(num_sides, num_layers, batch, -1)
        ids, table, first = self._layer_ids(slot, ids, pool_row=pool_row)

        # Encode each distinct id row once, in order of first appearance.
        flat = ids.reshape(-1, ids.shape[-1])
        index_of: dict[tuple[int, ...], int] = {}
        first_rows: list[int] = []
        inverse: list[int] = []
        for r, row in enumerate(flat.tolist()):
            key = tuple(row)
            if key not in index_of:
                index_of[key] = len(first_rows)
                first_rows.append(r)
            inverse.append(index_of[key])
        keep = torch.tensor(first_rows)
        hidden, pooled = self._run_encoder(
            slot,
            flat[keep],
            mask.reshape(-1, mask.shape[-1])[keep],
            table,
            first,
            clip_skip,
            lora_scale,
        )
        back = torch.tensor(inverse, device=hidden.device)
        out = hidden[back].view(num_sides, num_layers, batch, *hidden.shape[1:])
        if pooled is not None:
            pooled = pooled[back.to(pooled.device)].view(num_sides, num_layers, batch, -1)
        return out, pooled, len(first_rows)

    def _layer_ids(
        self, slot: _EncoderSlot, ids: torch.Tensor, *, pool_row: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Shift concept token ids to per-layer virtual ids.

        Returns ``(ids, table, first)``: ``table`` is ``[V, N, d]`` (V = layers, plus SDXL's POOL
        row with ``pool_row``; N = all concept tokens in id order) read by id ``first + v·N + k``;
        layers whose vector k equals an earlier layer's bitwise use that layer's variant, so
        equal layers give equal rows.
        """
        concepts = list(self._concepts.values())
        if not concepts:
            return ids, None, 0
        table = torch.cat([c.vectors_for(slot.key) for c in concepts], dim=1)  # [L, N, d]
        if pool_row:
            pools = [c.pool if c.pool is not None else c.vectors_for(slot.key)[0] for c in concepts]
            table = torch.cat([table, torch.cat(pools).unsqueeze(0)])
        first = slot.first_ids[concepts[0].placeholder]
        num_layers, total = table.shape[0], table.shape[1]
        if ids.shape[1] != num_layers:
            raise AssertionError("texts and vector table disagree on the number of layers")
        same = (table.unsqueeze(0) == table.unsqueeze(1)).all(-1)  # [L, L, N]
        same |= torch.eye(num_layers, dtype=torch.bool).unsqueeze(-1)
        canon = same.int().argmax(dim=1)  # [L, N]: first layer with the same vector
        rel = ids - first
        is_concept = (rel >= 0) & (rel < total)
        layer = torch.arange(num_layers).view(1, num_layers, 1, 1).expand_as(ids)
        variant = canon[layer, rel.clamp(0, total - 1)]
        shifted = torch.where(is_concept, first + variant * total + rel, ids)
        return shifted, table, first

    def _run_encoder(
        self,
        slot: _EncoderSlot,
        ids: torch.Tensor,
        mask: torch.Tensor,
        table: torch.Tensor | None,
        first: int,
        clip_skip: int | None,
        lora_scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        te = slot.text_encoder
        device = self.pipe._execution_device
        use_mask = bool(getattr(te.config, "use_attention_mask", False))
        handle = None
        if table is not None:
            flat = table.reshape(-1, table.shape[-1])
            handle = install_token_embedding(te, first, lambda: flat)
        scaled = _scale_lora(te, lora_scale)
        pooled = None
        try:
            with torch.no_grad():
                kwargs: dict[str, Any] = {}
                if use_mask:
                    kwargs["attention_mask"] = mask.to(device)
                if self.is_sdxl:
                    # as the stock SDXL encode_prompt: penultimate (or clip_skip) hidden states,
                    # no final layer norm; pooled from the 2nd encoder at the true EOS position
                    out = te(ids.to(device), output_hidden_states=True, **kwargs)
                    hidden = out.hidden_states[-((clip_skip or 0) + 2)]
                    if clip_skip:  # stock encodes negatives at -2 whatever clip_skip says
                        hidden = torch.stack([hidden, out.hidden_states[-2]], dim=1)
                    if slot.key == "clip_g":
                        # the final hidden state at the true EOS position; projected later in
                        # the stock pipeline's batch shapes (see `_encode_sdxl`)
                        last = out.last_hidden_state
                        pos = eos_positions(ids, slot.tokenizer.eos_token_id).to(last.device)
                        pooled = last[torch.arange(last.shape[0], device=last.device), pos]
                elif clip_skip is None:
                    hidden = te(ids.to(device), **kwargs)[0]
                else:
                    out = te(ids.to(device), output_hidden_states=True, **kwargs)
                    hidden = _final_layer_norm(te)(out.hidden_states[-(clip_skip + 1)])
        finally:
            if scaled:
                _unscale_lora(te, lora_scale)
            if handle is not None:
                handle.remove()
        return hidden, pooled

    # ------------------------------------------------------------------ running

    def ensure_processors(self) -> None:
        """Make sure the UNet carries this adapter's processors (reinstalled if someone set
        other processors since, wrapping those)."""
        self._check_loaded()
        unet = self.pipe.unet
        current = unet.attn_processors
        if all(isinstance(p, XTIAttnProcessor) for p in current.values()):
            return
        if any(isinstance(p, XTIAttnProcessor) for p in current.values()):
            unet.set_attn_processor(_unwrapped(current))
        install_processors(unet, self.scheme)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        layer_prompts: Mapping[Any, str | Sequence[str]] | None = None,
        mix: Mapping[str, Selection] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float | None = None,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        clip_skip: int | None = None,
        **pipeline_kwargs: Any,
    ) -> Any:
        """Run the pipeline with per-layer contexts; returns the pipeline's output.

        ``prompt``, ``negative_prompt``, ``layer_prompts``, ``mix``, ``clip_skip`` are as in
        `encode`; ``guidance_scale`` defaults to the pipeline's own default; every other keyword
        (``num_inference_steps``, ``generator``, ``height``, ``width``, ``output_type``...) goes to
        the pipeline unchanged.
        """
        self._check_loaded()
        for key in (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        ):
            if key in pipeline_kwargs:
                raise XTIError(f"{key} is made by xti; call the pipeline itself to pass your own")
        if guidance_scale is None:
            guidance_scale = _default_guidance(self.pipe)
        do_cfg = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
        cak = dict(cross_attention_kwargs or {})
        encoded = self.encode(
            prompt,
            negative_prompt=negative_prompt,
            layer_prompts=layer_prompts,
            mix=mix,
            num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=do_cfg,
            clip_skip=clip_skip,
            lora_scale=cak.get("scale"),
        )
        self.ensure_processors()
        return self.pipe(
            guidance_scale=guidance_scale, **encoded.pipeline_kwargs(cak), **pipeline_kwargs
        )

    # ------------------------------------------------------------------ unloading

    def unload(self) -> None:
        """Restore the pipeline: the original attention processor objects are put back, the
        concepts dropped. The tokenizer and text encoder were never changed outside a call."""
        if not self._loaded:
            return
        unet = self.pipe.unet
        current = unet.attn_processors
        if any(isinstance(p, XTIAttnProcessor) for p in current.values()):
            unet.set_attn_processor(_unwrapped(current))
        self._concepts.clear()
        self._loaded = False

    def __enter__(self) -> XTIAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()


def _unwrapped(processors: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, proc in processors.items():
        while isinstance(proc, XTIAttnProcessor):
            proc = proc.inner
        out[key] = proc
    return out


def _match_layers(file_layers: Sequence[str], scheme: LayerScheme) -> list[str] | None:
    """The file's keys in the scheme's order, or None when they do not fit."""
    names = scheme.names
    if set(file_layers) == set(names) and len(file_layers) == len(names):
        return list(names)
    # transformer-granularity names (IN01.0) of a model with one transformer block per layer
    if all(len(layer.cross_attention_paths) == 1 for layer in scheme.layers):
        dotted = [f"{n}.0" for n in names]
        if set(file_layers) == set(dotted) and len(file_layers) == len(dotted):
            return dotted
    return None


def _final_layer_norm(text_encoder: nn.Module) -> nn.Module:
    norm = getattr(text_encoder, "final_layer_norm", None)
    if norm is None:
        norm = getattr(getattr(text_encoder, "text_model", None), "final_layer_norm", None)
    if norm is None:
        raise XTIError("clip_skip: this text encoder has no final_layer_norm")
    return norm


def _scale_lora(text_encoder: nn.Module, scale: float | None) -> bool:
    if scale is None:
        return False
    from diffusers.utils import USE_PEFT_BACKEND, scale_lora_layers

    if not USE_PEFT_BACKEND:
        return False
    scale_lora_layers(text_encoder, scale)
    return True


def _unscale_lora(text_encoder: nn.Module, scale: float | None) -> None:
    from diffusers.utils import unscale_lora_layers

    unscale_lora_layers(text_encoder, scale)


def _warn_truncated(tokenizer: Any, texts: list[str], max_len: int) -> None:
    lengths = [len(ids) for ids in tokenizer(texts).input_ids]
    for text, n in zip(texts, lengths, strict=True):
        if n > max_len:
            logger.warning(
                "prompt truncated to %d tokens (CLIP's limit; it had %d): %r", max_len, n, text
            )


def _default_guidance(pipe: Any) -> float:
    try:
        param = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    except (TypeError, ValueError):
        param = None
    if param is not None and isinstance(param.default, (int, float)):
        return float(param.default)
    return 7.5


def load_xti(
    pipe: Any,
    embeddings: PathLike | Sequence[PathLike] | Mapping[str, PathLike] = (),
    *,
    allow_pickle: bool = False,
) -> XTIAdapter:
    """Make an `XTIAdapter` for ``pipe`` and load embedding files into it.

    Args:
        pipe: a stock SD 1.x / 2.x or SDXL diffusers pipeline.
        embeddings: a path, a list of paths (placeholders from the files' metadata), or
            ``{placeholder: path}``.
        allow_pickle: accept pickled files (read with ``weights_only=True``).
    """
    adapter = XTIAdapter(pipe)
    try:
        if isinstance(embeddings, Mapping):
            for placeholder, path in embeddings.items():
                adapter.load(path, placeholder, allow_pickle=allow_pickle)
        else:
            items = [embeddings] if isinstance(embeddings, (str, os.PathLike)) else embeddings
            for path in items:
                adapter.load(path, allow_pickle=allow_pickle)
    except BaseException:
        adapter.unload()
        raise
    return adapter
