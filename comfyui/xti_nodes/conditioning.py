"""Per-layer (XTI / P+) conditioning inside ComfyUI: files in, a patched MODEL and a CONDITIONING out.

How it works, for a prompt with placeholders and a ComfyUI ``MODEL`` / ``CLIP`` pair:

* The layer scheme (DESIGN §1/§2) is read from ComfyUI's UNet itself (`comfy_layer_scheme`): every
  ``SpatialTransformer`` of ``input_blocks[i]`` is ``INii``, of the middle block ``MID``, of
  ``output_blocks[j]`` ``OUTjj`` (``.k`` per transformer block at transformer granularity), the
  names of `xti.layers`, so groups and ranges select the same layers as ``xti generate``.
* Each layer's text (the prompt, or that layer's per-layer prompt, with mixed placeholders filled
  by the concept owning the layer, `xti.mixing`) is tokenized by **ComfyUI's own tokenizer** with
  every placeholder replaced by a marker of ``n_vectors`` digits (CLIP's tokenizer makes one token
  per digit); tokenizing twice with two different digits finds the marker positions exactly, and
  they get that layer's vectors as embedding tokens, the form ComfyUI's ``embedding:NAME`` gives a
  loaded embedding. ``clip.encode_from_tokens`` then encodes them, so clip skip
  (``CLIPSetLastLayer``), prompt weights and long prompts behave as in any ComfyUI prompt, and a
  layer's context equals bit for bit ComfyUI's encoding of the prompt with ``embedding:`` files
  holding that layer's vectors. Layers whose texts and vectors are equal are encoded once.
* The CONDITIONING carries the prompt encoded with each concept's layer mean (what the file's
  fallback keys give a host without this node) and, for SDXL, the pooled output of the POOL
  vectors (or the mean of the layers' pooled outputs). The MODEL is a clone with an
  ``attn2_patch`` (`XTIAttn2Patch`, ``ModelPatcher.set_model_attn2_patch``): in every
  cross-attention it finds, in the conditional chunks only (``extra_options["cond_or_uncond"]``),
  the batch rows equal to that CONDITIONING's context and gives them the layer's own context
  (named from ``extra_options["block"]`` and ``["block_index"]``). Rows of other conditionings,
  the unconditional chunk, and graphs without the node are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xti.errors import XTIError
from xti.export import EmbeddingFile, load_embedding_file, names_list
from xti.families import SD1, SDXL, ModelFamily
from xti.layers import Layer, LayerScheme
from xti.mixing import fill_mix, match_layers, mix_owners, placeholder_regex

__all__ = [
    "NodeConcept",
    "XTIAttn2Patch",
    "XTIConditioning",
    "comfy_layer_scheme",
    "encode_xti",
    "layer_name",
    "load_concept",
]

COND = 0  # ComfyUI's marker of a conditional chunk in extra_options["cond_or_uncond"]
_MARKERS = ("7", "3")


# ----------------------------------------------------------------------------- layer scheme


def layer_name(block: tuple[str, int] | None, block_index: int, transformer: bool) -> str | None:
    """The DESIGN §2 name of the layer an attention patch runs in (None outside the UNet's
    input/middle/output blocks)."""
    if block is None:
        return None
    kind, number = block[0], int(block[1])
    if kind == "input":
        name = f"IN{number:02d}"
    elif kind == "middle":
        name = "MID" if number == 0 else f"MID{number:02d}"
    elif kind == "output":
        name = f"OUT{number:02d}"
    else:
        return None
    return f"{name}.{int(block_index)}" if transformer else name


def comfy_layer_scheme(diffusion_model: Any, granularity: str = "block") -> LayerScheme:
    """The layer scheme of ComfyUI's ``UNetModel`` (``model.model.diffusion_model``), in forward
    order, with the spatial levels that `LayerScheme.group` uses for ``coarse``/``fine``."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    transformer = granularity == "transformer"
    entries: list[tuple[str, str, str, int, Any]] = []
    level = 0
    for i, block in enumerate(diffusion_model.input_blocks):
        for m in block:
            if isinstance(m, SpatialTransformer):
                entries.append((f"IN{i:02d}", f"input_blocks.{i}", "down", level, m))
        if any(isinstance(m, Downsample) for m in block):
            level += 1
    for m in diffusion_model.middle_block:
        if isinstance(m, SpatialTransformer):
            entries.append(("MID", "middle_block", "mid", level, m))
    num_levels = level + 1
    for j, block in enumerate(diffusion_model.output_blocks):
        for m in block:
            if isinstance(m, SpatialTransformer):
                entries.append((f"OUT{j:02d}", f"output_blocks.{j}", "up", level, m))
        if any(isinstance(m, Upsample) for m in block):
            level -= 1
    layers: list[Layer] = []
    for name, path, part, lvl, st in entries:
        ks = [
            k for k, b in enumerate(st.transformer_blocks) if getattr(b, "attn2", None) is not None
        ]
        if transformer:
            for k in ks:
                attn = (f"{path}.transformer_blocks.{k}.attn2",)
                layers.append(
                    Layer(f"{name}.{k}", f"{path}.transformer_blocks.{k}", part, lvl, attn)
                )  # type: ignore[arg-type]
        elif ks:
            attn = tuple(f"{path}.transformer_blocks.{k}.attn2" for k in ks)
            layers.append(Layer(name, path, part, lvl, attn))  # type: ignore[arg-type]
    if not layers:
        raise XTIError(
            "this model has no cross-attention layers; XTI needs a text-conditioned UNet"
        )
    return LayerScheme(tuple(layers), "transformer" if transformer else "block", num_levels)


# ----------------------------------------------------------------------------- concepts


@dataclass(frozen=True)
class NodeConcept:
    """One loaded file, laid out for a layer scheme.

    Attributes:
        placeholder: the word that stands for it in prompts.
        vectors: ``{encoder: [L, n, d]}`` in the scheme's order (``text``; SDXL ``clip_l``/``clip_g``).
        pool: SDXL ``[n, d_g]`` POOL vectors, or None (pooled output = mean of the layers').
        source: the file, for messages.
    """

    placeholder: str
    vectors: dict[str, torch.Tensor]
    pool: torch.Tensor | None
    source: str

    @property
    def n_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[1]

    def mean(self, encoder: str) -> torch.Tensor:
        """``[n, d]`` layer mean of one encoder (the file's fallback key holds the same)."""
        return self.vectors[encoder].mean(dim=0)


def _family_of_clip(tokens: Mapping[str, Any]) -> ModelFamily:
    return SDXL if set(tokens) == {"g", "l"} else SD1


def _encoder_of_key(family: ModelFamily, key: str) -> str:
    """ComfyUI's token-dict key (``l``, ``h``, ``g``) -> xti's encoder name."""
    if family is SDXL:
        return f"clip_{key}"
    return "text"


def load_concept(
    path: str | Path, placeholder: str | None, family: ModelFamily
) -> tuple[EmbeddingFile, str]:
    """Read one file and check it fits the model (one-line `XTIError` otherwise)."""
    ef = load_embedding_file(path)
    if ef.model_family.encoder_names != family.encoder_names:
        raise XTIError(
            f"{path}: an {ef.model_family.label} file ({len(ef.layers)} layers) does not fit this "
            f"{family.label} model; use a file trained for this model family"
        )
    name = placeholder or ef.metadata.get("xti.placeholder")
    if not name:
        raise XTIError(f"{path}: a kohya file names no placeholder; write it as <word>=FILE")
    return ef, name


def _layout(
    ef: EmbeddingFile, placeholder: str, scheme: LayerScheme, widths: Mapping[str, int]
) -> NodeConcept:
    keys = match_layers(ef.layers, scheme)
    if keys is None:
        raise XTIError(
            f"{ef.source}: its layers ({names_list(ef.layers)}) do not fit this model's "
            f"({names_list(scheme.names)})"
        )
    family = ef.model_family
    vectors: dict[str, torch.Tensor] = {}
    for enc in family.encoder_names:
        stack = torch.stack([ef.layer_vectors(k, enc) for k in keys]).float()
        want = widths.get(enc)
        if want is not None and stack.shape[-1] != want:
            raise XTIError(
                f"{ef.source}: its {enc} vectors are {stack.shape[-1]} wide but this model's text "
                f"encoder takes {want}-wide token embeddings; use a file trained for this model"
            )
        vectors[enc] = stack
    pool = family.pool_vectors(ef, str(ef.source)) if family is SDXL else None
    return NodeConcept(placeholder, vectors, pool, str(ef.source))


def clip_widths(clip: Any, family: ModelFamily) -> dict[str, int]:
    """Token-embedding width of each text encoder of a ComfyUI CLIP."""
    out: dict[str, int] = {}
    model = clip.cond_stage_model
    for attr in ("clip_l", "clip_h", "clip_g"):
        sub = getattr(model, attr, None)
        if sub is None:
            continue
        width = int(sub.transformer.get_input_embeddings().weight.shape[1])
        out[_encoder_of_key(family, attr[-1])] = width
    return out


# ----------------------------------------------------------------------------- tokenizing


@dataclass
class _Tokenized:
    """A text tokenized by ComfyUI with the placeholder slots found: ``slots[key]`` lists, in
    order, ``(chunk, position)`` of every placeholder token; ``order`` the placeholder of each
    occurrence."""

    tokens: dict[str, list[list[tuple[Any, float]]]]
    slots: dict[str, list[tuple[int, int]]]
    order: list[str]


def _same_token(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _tokenize(clip: Any, text: str, concepts: Mapping[str, NodeConcept]) -> _Tokenized:
    pattern = placeholder_regex(concepts)
    order = [m.group(0) for m in pattern.finditer(text)] if pattern else []
    if not order:
        return _Tokenized(clip.tokenize(text), {}, [])
    assert pattern is not None
    variants = []
    for digit in _MARKERS:
        marked = pattern.sub(lambda m, d=digit: f" {d * concepts[m.group(0)].n_vectors} ", text)
        variants.append(clip.tokenize(marked))
    a, b = variants
    slots: dict[str, list[tuple[int, int]]] = {}
    wanted = sum(concepts[p].n_vectors for p in order)
    for key in a:
        found = []
        if len(a[key]) != len(b[key]):
            raise XTIError("could not place the placeholders in this prompt (tokenizer mismatch)")
        for c, (chunk_a, chunk_b) in enumerate(zip(a[key], b[key], strict=True)):
            for pos, (ta, tb) in enumerate(zip(chunk_a, chunk_b, strict=True)):
                if not _same_token(ta[0], tb[0]):
                    found.append((c, pos))
        if len(found) != wanted:
            raise XTIError(
                f"could not place the placeholders of {text!r} in ComfyUI's tokens "
                f"({len(found)} of {wanted} found)"
            )
        slots[key] = found
    return _Tokenized(a, slots, order)


def _fill(
    tok: _Tokenized,
    concepts: Mapping[str, NodeConcept],
    family: ModelFamily,
    pick: Any,
) -> dict[str, list[list[tuple[Any, float]]]]:
    """The tokens with every placeholder slot holding vectors: ``pick(concept, encoder)`` gives the
    ``[n, d]`` vectors to use."""
    out = {key: [list(chunk) for chunk in chunks] for key, chunks in tok.tokens.items()}
    for key, slots in tok.slots.items():
        enc = _encoder_of_key(family, key)
        it = iter(slots)
        for placeholder in tok.order:
            vecs = pick(concepts[placeholder], enc)
            for v in range(vecs.shape[0]):
                c, pos = next(it)
                weight = out[key][c][pos][1]
                out[key][c][pos] = (vecs[v], weight)
    return out


# ----------------------------------------------------------------------------- encoding


@dataclass
class XTIConditioning:
    """The node's result before it becomes ComfyUI objects.

    Attributes:
        scheme: the layer scheme used.
        contexts: ``{layer name: [1, T, D]}`` per-layer contexts (float32, CPU).
        base: ``[1, T, D]`` the CONDITIONING's context (the prompt with each concept's layer mean).
        pooled: ``[1, P]`` the CONDITIONING's pooled output.
        num_encodes: distinct CLIP encodings made.
    """

    scheme: LayerScheme
    contexts: dict[str, torch.Tensor]
    base: torch.Tensor
    pooled: torch.Tensor | None
    num_encodes: int = 0
    layer_pooled: list[torch.Tensor] = field(default_factory=list)


def _scheme_for(model: Any, files: Sequence[EmbeddingFile]) -> LayerScheme:
    diffusion_model = model.model.diffusion_model
    block = comfy_layer_scheme(diffusion_model, "block")
    if all(match_layers(ef.layers, block) is not None for ef in files):
        return block
    return comfy_layer_scheme(diffusion_model, "transformer")


def encode_xti(
    model: Any,
    clip: Any,
    files: Sequence[tuple[str | Path, str | None]],
    text: str,
    *,
    mix: Mapping[str, str] | None = None,
    layer_prompts: Mapping[str, str] | None = None,
) -> XTIConditioning:
    """Per-layer contexts of ``text`` (and the CONDITIONING's context) with ComfyUI's CLIP.

    ``files``: ``(path, placeholder or None)``; ``mix``: ``{placeholder: selection}``;
    ``layer_prompts``: ``{selection: prompt}`` (layers not selected take ``text``).
    """
    family = _family_of_clip(clip.tokenize(""))
    loaded: list[tuple[EmbeddingFile, str]] = []
    for path, placeholder in files:
        loaded.append(load_concept(path, placeholder, family))
    names = [p for _, p in loaded]
    if len(set(names)) != len(names):
        raise XTIError(
            f"two files use the same placeholder ({', '.join(names)}); name them <word>=FILE"
        )
    scheme = _scheme_for(model, [ef for ef, _ in loaded])
    widths = clip_widths(clip, family)
    concepts = {p: _layout(ef, p, scheme, widths) for ef, p in loaded}

    # the text of every layer
    texts = [text] * len(scheme)
    for selection, prompt in (layer_prompts or {}).items():
        indices = scheme.select(selection)
        if not indices:
            raise XTIError(f"layer prompt {selection!r}: selects no layer")
        for i in indices:
            texts[i] = prompt
    if mix:
        owner = mix_owners(scheme, mix, concepts)
        pattern = placeholder_regex(mix)
        if pattern is None or not any(pattern.search(t) for t in texts):
            raise XTIError(f"mix: the prompt contains none of {', '.join(mix)}")
        texts = [fill_mix(t, owner.get(i), pattern) for i, t in enumerate(texts)]
    every = placeholder_regex(concepts)
    if concepts and not any(every.search(t) for t in [text, *texts]):  # type: ignore[union-attr]
        raise XTIError(
            f"the prompt has none of the placeholders {', '.join(concepts)}: write one where the "
            "concept goes (e.g. 'a photo of " + next(iter(concepts)) + "')"
        )

    # canonical layer of each concept's vectors: equal layers share one encoding
    canon: dict[str, list[int]] = {}
    for p, c in concepts.items():
        flat = torch.cat([v.flatten(1) for v in c.vectors.values()], dim=1)
        canon[p] = [
            next(j for j in range(i + 1) if torch.equal(flat[j], flat[i]))
            for i in range(len(scheme))
        ]

    cache_tok: dict[str, _Tokenized] = {}
    cache_enc: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def encode(t: str, key: tuple[Any, ...], pick: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if t not in cache_tok:
            cache_tok[t] = _tokenize(clip, t, concepts)
        tok = cache_tok[t]
        full = (t, key if tok.order else ())
        if full not in cache_enc:
            cond, pooled = clip.encode_from_tokens(
                _fill(tok, concepts, family, pick), return_pooled=True
            )
            cache_enc[full] = (
                cond.detach().float().cpu(),
                None if pooled is None else pooled.detach().float().cpu(),
            )
        return cache_enc[full]

    contexts: dict[str, torch.Tensor] = {}
    layer_pooled: list[torch.Tensor] = []
    for i, name in enumerate(scheme.names):
        key = tuple(canon[p][i] for p in concepts)
        cond, pooled = encode(texts[i], ("layer", key), lambda c, e, i=i: c.vectors[e][i])
        contexts[name] = cond
        if pooled is not None:
            layer_pooled.append(pooled)
    base, base_pooled = encode(text, ("mean",), lambda c, e: c.mean(e))
    pooled = base_pooled
    if family is SDXL:
        in_prompt = [m.group(0) for m in every.finditer(text)] if every else []
        if in_prompt and all(concepts[p].pool is not None for p in in_prompt):
            _, pooled = encode(
                text,
                ("pool",),
                lambda c, e: c.pool if e == "clip_g" and c.pool is not None else c.mean(e),
            )
        elif layer_pooled:
            pooled = torch.stack(layer_pooled).mean(dim=0)
    return XTIConditioning(scheme, contexts, base, pooled, len(cache_enc), layer_pooled)


# ----------------------------------------------------------------------------- the patch


class XTIAttn2Patch:
    """ComfyUI ``attn2_patch``: gives the rows of the conditional chunks whose context is one of
    this patch's CONDITIONING contexts the context of the layer it runs in.

    Immutable after construction (so model clones share it; `__deepcopy__` returns itself).
    """

    def __init__(
        self, base: torch.Tensor, contexts: Mapping[str, torch.Tensor], transformer: bool
    ) -> None:
        self.base = base[0]
        self.contexts = {k: v[0] for k, v in contexts.items()}
        self.transformer = transformer
        self._cast: dict[tuple[Any, ...], torch.Tensor] = {}
        self._rows: tuple[Any, list[tuple[int, int]]] | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> XTIAttn2Patch:
        return self

    def _get(self, name: str, t: torch.Tensor) -> torch.Tensor:
        key = (name, t.dtype, t.device)
        if key not in self._cast:
            src = self.base if name == "" else self.contexts[name]
            self._cast[key] = src.to(device=t.device, dtype=t.dtype)
        return self._cast[key]

    def _matching_rows(
        self, context: torch.Tensor, cond_or_uncond: Sequence[int] | None
    ) -> list[tuple[int, int]]:
        """``(row, repeats)`` of the rows to replace (cached for the context object of a step)."""
        if self._rows is not None and self._rows[0] is context:
            return self._rows[1]
        base = self._get("", context)
        t = base.shape[0]
        rows: list[tuple[int, int]] = []
        n = context.shape[0]
        chunks = list(cond_or_uncond) if cond_or_uncond else [COND]
        size = n // len(chunks) if n % len(chunks) == 0 else n
        if context.shape[1] % t == 0 and context.shape[2] == base.shape[1]:
            reps = context.shape[1] // t
            ref = base.repeat(reps, 1) if reps > 1 else base
            for r in range(n):
                chunk = chunks[r // size] if size else COND
                if chunk == COND and torch.equal(context[r], ref):
                    rows.append((r, reps))
        self._rows = (context, rows)
        return rows

    def __call__(
        self,
        n: torch.Tensor,
        context: torch.Tensor,
        value: torch.Tensor,
        extra_options: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = layer_name(
            extra_options.get("block"), extra_options.get("block_index", 0), self.transformer
        )
        if name is None or name not in self.contexts:
            return n, context, value
        rows = self._matching_rows(context, extra_options.get("cond_or_uncond"))
        if not rows:
            return n, context, value
        layer = self._get(name, context)
        out = context.clone()
        for r, reps in rows:
            out[r] = layer.repeat(reps, 1) if reps > 1 else layer
        return n, out, out if value is context else value
