"""Inference: per-layer conditioning in stock diffusers pipelines (DESIGN §7).

This module owns everything a user needs to generate with XTI concepts while keeping their own
diffusers pipeline: loading ``.xti.safetensors`` (and kohya 16-key) files for a pipeline, encoding
prompts into per-layer contexts, style mixing, per-layer prompts (P+ without training), running the
pipeline with those contexts, and leaving the pipeline as it was (`XTIAdapter.unload`). Loading
pipelines and saving images is `xti.pipelines`; inspecting and converting files is `xti.export`.

How it works, for a pipeline ``pipe`` (SD 1.x / 2.x, SDXL: the family, `xti.families`, says which
text encoders there are and how their states make contexts and pooled embeds):

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
  layers whose vector is bitwise equal to an earlier layer's share that layer's id. The id rows
  go through the per-layer encoder that training uses too (`xti.families.encode_layers`):
  identical rows (positive and negative, all layers, all batch items) are encoded **once**, in
  **one** call per text encoder, and indexed back into contexts ``[L, batch, T, D]``.
* The layer scheme comes from the files: a ``transformer``-granularity file (one layer per
  transformer block, ``IN07.3``) switches the adapter to that scheme on load, and ``block`` files
  loaded beside it give each transformer block its block's vectors (`match_layers`).
* The pipeline is called with ``prompt_embeds`` / ``negative_prompt_embeds`` (layer 0, which it
  needs for its bookkeeping) and ``cross_attention_kwargs={"xti_contexts": contexts}`` where the
  contexts are already laid out as the UNet batch: ``[negative · n, positive · n]`` under
  classifier-free guidance, positive only without, each prompt repeated ``num_images_per_prompt``
  times in a row (the pipeline never expands a cross-attention kwarg).
* SDXL (`StableDiffusionXLPipeline` and pipelines built on it; DESIGN §5): ``clip_l`` vectors go
  to ``pipe.tokenizer``/``text_encoder``, ``clip_g`` ones to ``tokenizer_2``/``text_encoder_2``;
  both encoders take the same layer's text and variant, and a layer's context is the concatenation
  of their penultimate hidden states. The pooled
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

import contextlib
import copy
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from xti.attention import CONTEXTS_KWARG, XTIAttnProcessor, install_processors
from xti.embeddings import expansion_tokens, install_token_embedding, token_in_vocabulary
from xti.errors import XTIError
from xti.export import EmbeddingFile, load_embedding_file, names_list
from xti.families import EncoderPart, ModelFamily, encode_layers, of_pipeline
from xti.layers import LayerScheme, layer_scheme
from xti.mixing import Selection, fill_mix, match_layers, mix_owners, placeholder_regex

logger = logging.getLogger(__name__)

__all__ = ["Concept", "EncodedPrompts", "XTIAdapter", "load_xti", "match_layers"]

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class Concept:
    """A concept loaded into an `XTIAdapter`.

    Attributes:
        placeholder: the word that stands for it in prompts (``<cat-toy>``).
        encoder_vectors: ``{encoder: [L, n_vectors, d]}`` float32 in the adapter's layer order,
            per text encoder of the family (``text``; SDXL ``clip_l`` and ``clip_g``).
        source: the file it came from (or ``"<memory>"``).
        metadata: the file's string metadata (empty for kohya files).
        pool: SDXL: the ``[n, 1280]`` ``clip_g.POOL`` vectors used for the pooled
            ``text_embeds``; None when the pooled embeds are the mean over the layers'.
    """

    placeholder: str
    encoder_vectors: dict[str, torch.Tensor]
    source: str
    metadata: dict[str, str] = field(default_factory=dict)
    pool: torch.Tensor | None = None

    @property
    def vectors(self) -> torch.Tensor:
        """``[L, n, d]`` vectors of the first text encoder."""
        return next(iter(self.encoder_vectors.values()))

    @property
    def n_vectors(self) -> int:
        return self.vectors.shape[1]


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


# ----------------------------------------------------------------------------- the adapter


class _EncoderSlot:
    """One text encoder of the pipeline with the private tokenizer that knows the placeholder
    tokens (the pipeline's own tokenizer is never changed)."""

    def __init__(self, part: EncoderPart) -> None:
        self.name = part.name
        self.source_tokenizer = part.tokenizer
        self.text_encoder = part.text_encoder
        self.tokenizer: Any = None
        self.base_len = -1
        self.first_ids: dict[str, int] = {}

    def part(self) -> EncoderPart:
        """This encoder with the private tokenizer, for `xti.families.encode_layers`."""
        return EncoderPart(self.name, self.tokenizer, self.text_encoder)

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
        granularity: ``block`` (one layer per cross-attention block, the DESIGN §2 names) or
            ``transformer`` (one per transformer block); default: from the files loaded (``block``
            until a ``transformer`` file is loaded).
    """

    def __init__(self, pipe: Any, *, granularity: str | None = None) -> None:
        if granularity not in (None, "block", "transformer"):
            raise XTIError(f"granularity must be block or transformer, got {granularity!r}")
        self.family: ModelFamily = of_pipeline(pipe)
        self.pipe = pipe
        self._fixed_scheme = granularity is not None
        self.scheme: LayerScheme = layer_scheme(pipe.unet, granularity or "block")
        self._slots = [_EncoderSlot(part) for part in self.family.encoders(pipe)]
        self._concepts: dict[str, Concept] = {}
        self._files: dict[str, tuple[EmbeddingFile, str]] = {}
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
        self._fit_scheme(ef, where)
        concept = self._concept(ef, name, where)
        candidate = [*self._concepts.values(), concept]
        for slot in self._slots:
            slot.sync(candidate)
        self._concepts[name] = concept
        self._files[name] = (ef, where)
        return concept

    def _fit_scheme(self, ef: EmbeddingFile, where: str) -> None:
        """Switch to the transformer scheme when a file needs it and the adapter may (its
        granularity came from the files); loaded block concepts are re-mapped onto it."""
        if ef.model_family.specs != self.family.specs:
            raise XTIError(
                f"{where}: an {ef.model_family.label} file ({ef.family}, keys "
                f"{names_list(list(ef.vectors))}) does not fit this {self.family.label} pipeline "
                f"({', '.join(self.family.encoder_names)}; layers {names_list(self.layer_names)})"
            )
        if self._fixed_scheme or match_layers(ef.layers, self.scheme) is not None:
            return
        finer = layer_scheme(self.pipe.unet, "transformer")
        if self.scheme.granularity == "transformer" or match_layers(ef.layers, finer) is None:
            return  # `_concept` names the mismatch
        coarser = self.scheme
        self.scheme = finer
        try:
            remapped = {p: self._concept(f, p, w) for p, (f, w) in self._files.items()}
        except XTIError:
            self.scheme = coarser
            raise
        self._concepts.update(remapped)
        unet = self.pipe.unet
        unet.set_attn_processor(_unwrapped(unet.attn_processors))
        install_processors(unet, finer)

    def _concept(self, ef: EmbeddingFile, name: str, where: str) -> Concept:
        """The file's vectors in this adapter's layer order, checked against the encoders."""
        keys = match_layers(ef.layers, self.scheme)
        if keys is None:
            raise XTIError(
                f"{where}: its layers ({names_list(ef.layers)}) do not fit this model's layers "
                f"({names_list(self.layer_names)})"
            )
        vectors: dict[str, torch.Tensor] = {}
        for slot in self._slots:
            stack = torch.stack([ef.layer_vectors(k, slot.name).float() for k in keys])
            if stack.shape[-1] != slot.width():
                raise XTIError(
                    f"{where}: its {slot.name} vectors are {stack.shape[-1]} wide ({ef.family}) "
                    f"but this pipeline's {slot.name} text encoder takes {slot.width()}-wide "
                    "token embeddings"
                )
            vectors[slot.name] = stack.contiguous()
        return Concept(name, vectors, where, dict(ef.metadata), self.family.pool_vectors(ef, where))

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
        """Encode prompts into per-layer contexts with one call per text encoder.

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
        batch = _batch_size(prompt, layer_prompts)
        zero_negatives = self._zero_negatives(do_classifier_free_guidance, negative_prompt)
        negs = None
        if do_classifier_free_guidance and not zero_negatives:
            negs = _as_list("" if negative_prompt is None else negative_prompt, batch, "negative")
        base = None if prompt is None else _as_list(prompt, batch, "prompt")
        sides = self._sides(base, negs, layer_prompts, mix, batch)
        encoded = self._encode(sides, ([negs] if negs else []) + [base], clip_skip, lora_scale)

        device = self.pipe._execution_device
        hidden, pooled = encoded.contexts, encoded.pooled  # [S, L, B, T, D], [S, B, P]
        if pooled is not None:
            pooled = pooled.to(device=device)
        if zero_negatives:
            hidden = torch.cat([torch.zeros_like(hidden), hidden])
            pooled = torch.cat([torch.zeros_like(pooled), pooled]) if pooled is not None else None
        # the dtype of the stock encode_prompt's embeds: the (last) text encoder's
        hidden = hidden.to(device=device, dtype=self._slots[-1].text_encoder.dtype)
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
            num_sequences=encoded.num_sequences,
            pooled_prompt_embeds=pooled[-1] if pooled is not None else None,
            negative_pooled_prompt_embeds=(
                pooled[0] if pooled is not None and do_classifier_free_guidance else None
            ),
        )

    def _zero_negatives(self, guidance: bool, negative_prompt: Any) -> bool:
        """The stock rule of pipelines with ``force_zeros_for_empty_prompt`` (SDXL): no negative
        prompt -> zero negative contexts and pooled embeds."""
        config = getattr(self.pipe, "config", None)
        forced = bool(getattr(config, "force_zeros_for_empty_prompt", 0))
        return guidance and negative_prompt is None and forced

    def _encode(
        self,
        sides: list[list[list[str]]],
        pool_texts: list[list[str] | None],
        clip_skip: int | None,
        lora_scale: float | None,
    ) -> Any:
        """Tokenize every side's per-layer texts, shift concept tokens to per-layer ids and run
        the shared per-layer encoder (`xti.families.encode_layers`).

        An encoder with a POOL slot (SDXL's ``clip_g``) gets one more row per side, the prompt as
        written with each concept at its POOL vectors, when there is a prompt and every concept in
        it has POOL vectors; the pooled embeds then come from that row, otherwise from the mean
        over the layers'.
        """
        num_layers = len(self.scheme)
        pattern = placeholder_regex(self._concepts)
        use_pool = all(t is not None for t in pool_texts)
        if use_pool and pattern is not None:
            used = {
                m.group(0) for texts in pool_texts for t in texts or () for m in pattern.finditer(t)
            }
            use_pool = all(self._concepts[p].pool is not None for p in used)
        ids: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        tables: dict[str, tuple[torch.Tensor, int] | None] = {}
        for slot in self._slots:
            pool_row = (
                use_pool and self.family.vector_sets(slot.name, num_layers, "slot") > num_layers
            )
            texts = (
                [[*side, t] for side, t in zip(sides, pool_texts, strict=True)]
                if pool_row
                else sides
            )
            slot_ids, masks[slot.name] = self._tokenize(slot, texts)
            ids[slot.name], tables[slot.name] = self._layer_ids(slot, slot_ids, pool_row=pool_row)

        @contextlib.contextmanager
        def around_call(part: EncoderPart) -> Iterator[None]:
            with _encoder_call(part.text_encoder, tables[part.name], lora_scale):
                yield

        with torch.no_grad():
            return encode_layers(
                self.family,
                [slot.part() for slot in self._slots],
                ids,
                num_layers=num_layers,
                masks=masks,
                pool_row=use_pool,
                clip_skip=clip_skip,
                device=self.pipe._execution_device,
                around_call=around_call,
            )

    def _sides(
        self,
        prompts: list[str] | None,
        negatives: list[str] | None,
        layer_prompts: Mapping[Any, str | Sequence[str]] | None,
        mix: Mapping[str, Selection] | None,
        batch: int,
    ) -> list[list[list[str]]]:
        """The texts ``[side][layer][batch]``: the negatives (when given), then the prompts, per
        layer (per-layer prompts applied), with mixed placeholders filled per layer."""
        sides = [self._layer_texts(prompts, layer_prompts, batch)]
        if negatives is not None:
            sides.insert(0, [negatives] * len(self.scheme))
        return self._apply_mix(sides, mix)

    def _layer_texts(
        self,
        base: list[str] | None,
        layer_prompts: Mapping[Any, str | Sequence[str]] | None,
        batch: int,
    ) -> list[list[str]]:
        num_layers = len(self.scheme)
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
                f"no prompt for layers {names_list(missing)}: give a prompt, or layer prompts that "
                "cover every layer (e.g. 'all')"
            )
        return texts  # type: ignore[return-value]

    def _apply_mix(
        self, sides: list[list[list[str]]], mix: Mapping[str, Selection] | None
    ) -> list[list[list[str]]]:
        if not mix:
            return sides
        owner = mix_owners(self.scheme, mix, self._concepts)
        pattern = placeholder_regex(mix)
        assert pattern is not None
        if not any(pattern.search(t) for side in sides[-1:] for layer in side for t in layer):
            raise XTIError(f"mix: no prompt contains any of {', '.join(mix)}")
        out = []
        for side in sides:
            new_side = []
            for i, layer in enumerate(side):
                layer = [fill_mix(t, owner.get(i), pattern) for t in layer]
                new_side.append(layer)
            out.append(new_side)
        return out

    def _expand(self, text: str, slot: _EncoderSlot) -> str:
        convert = getattr(self.pipe, "maybe_convert_prompt", None)
        if convert is not None:  # multi-vector stock TI tokens already in the pipeline
            text = convert(text, slot.source_tokenizer)
        pattern = placeholder_regex(self._concepts)
        if pattern is None:
            return text
        return pattern.sub(
            lambda m: " ".join(expansion_tokens(m.group(0), self._concepts[m.group(0)].n_vectors)),
            text,
        )

    def _tokenize(
        self, slot: _EncoderSlot, sides: list[list[list[str]]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids and attention masks ``[S, R, B, T]`` of one encoder for all texts (each distinct
        text tokenized once)."""
        tokenizer = slot.tokenizer
        num_sides, num_rows, batch = len(sides), len(sides[0]), len(sides[0][0])
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
        shape = (num_sides, num_rows, batch, -1)
        return enc.input_ids[rows].view(shape), enc.attention_mask[rows].view(shape)

    def _layer_ids(
        self, slot: _EncoderSlot, ids: torch.Tensor, *, pool_row: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, int] | None]:
        """Shift concept token ids to per-layer virtual ids.

        Returns ``(ids, (table, first))``: ``table`` is the flat ``[V·N, d]`` form of ``[V, N, d]``
        (V = layers, plus the POOL row with ``pool_row``; N = all concept tokens in id order), read
        by id ``first + v·N + k``; layers whose vector k equals an earlier layer's bitwise use that
        layer's variant, so equal layers give equal rows. No concepts: ``(ids, None)``.
        """
        concepts = list(self._concepts.values())
        if not concepts:
            return ids, None
        table = torch.cat([c.encoder_vectors[slot.name] for c in concepts], dim=1)  # [L, N, d]
        if pool_row:
            pools = [
                c.pool if c.pool is not None else c.encoder_vectors[slot.name][0] for c in concepts
            ]
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
        return shifted, (table.reshape(-1, table.shape[-1]), first)

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
        self._files.clear()
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


@contextlib.contextmanager
def _encoder_call(
    text_encoder: Any, table: tuple[torch.Tensor, int] | None, lora_scale: float | None
) -> Iterator[None]:
    """Around one text-encoder call: the concept table installed, LoRA layers scaled."""
    handle = None
    if table is not None:
        flat, first = table
        handle = install_token_embedding(text_encoder, first, lambda: flat)
    scaled = _scale_lora(text_encoder, lora_scale)
    try:
        yield
    finally:
        if scaled:
            _unscale_lora(text_encoder, lora_scale)
        if handle is not None:
            handle.remove()


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
