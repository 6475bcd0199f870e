"""Placeholder tokens, the trainable per-layer vectors, and per-layer text encoding (DESIGN §3, step 2).

How a concept lives in the text encoder without touching its vocabulary:

* The tokenizer gets ``n_vectors`` new tokens (``<tok>``, ``<tok>_1``, …); a prompt's placeholder is
  expanded to all of them. Their ids ``first_id … first_id+n-1`` are the *variant-0* ids.
* The trainable `ConceptVectors` holds ``[V, n, d]`` fp32 vectors, one vector set per *variant*
  (V = number of layers for XTI, 1 for ``shared``). Variant v, vector k has the *virtual* id
  ``first_id + v·n + k``; `variant_ids` makes the V variants of a batch with tensor ops.
* `ConceptTokenEmbedding` is installed with the text encoder's own extension point
  (`set_input_embeddings`): original ids read the frozen table, virtual ids read the vectors. No
  vocabulary row is written and the optimizer sees only the vectors.
* `encode_per_layer` builds a training batch's per-layer id rows (`layer_rows`) and runs them
  through the per-layer encoder that inference shares (`xti.families.encode_layers`): each text
  encoder runs once, contexts are ``[L, B, T, D]``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from xti.errors import XTIError
from xti.families import EncoderPart, ModelFamily, encode_layers


@dataclass(frozen=True)
class PlaceholderTokens:
    """A placeholder and the tokenizer tokens it expands to."""

    placeholder: str
    tokens: tuple[str, ...]
    first_id: int

    @property
    def n_vectors(self) -> int:
        return len(self.tokens)

    def expand(self, prompt: str) -> str:
        """Replace the placeholder in a prompt by its ``n_vectors`` tokens."""
        return prompt.replace(self.placeholder, " ".join(self.tokens))


def expansion_tokens(placeholder: str, n_vectors: int) -> tuple[str, ...]:
    """The tokens a placeholder expands to: itself, then ``<p>_1`` … (stock diffusers TI's naming)."""
    return tuple([placeholder] + [f"{placeholder}_{i}" for i in range(1, n_vectors)])


def token_in_vocabulary(tokenizer, tokens: Sequence[str]) -> str | None:
    """The first of `tokens` the tokenizer already has (as a word or a word piece), else None."""
    vocab = tokenizer.get_vocab()
    return next((t for t in tokens if t in vocab or f"{t}</w>" in vocab), None)


def add_placeholder_tokens(tokenizer, placeholder: str, n_vectors: int) -> PlaceholderTokens:
    """Add the placeholder's tokens to the tokenizer (they must be new and get consecutive ids).

    Raises:
        XTIError: the placeholder (or one of its expansion tokens) is already in the vocabulary.
    """
    if n_vectors < 1:
        raise XTIError(f"concept.n_vectors must be >= 1, got {n_vectors}")
    tokens = expansion_tokens(placeholder, n_vectors)
    clash = token_in_vocabulary(tokenizer, tokens)
    if clash is not None:
        raise XTIError(
            f"concept.placeholder: '{clash}' is already in the tokenizer vocabulary; "
            "choose a new word such as <my-concept>"
        )
    added = tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if added != len(tokens) or ids != list(range(ids[0], ids[0] + len(ids))):
        raise XTIError(f"concept.placeholder: could not add '{placeholder}' as new tokens")
    return PlaceholderTokens(placeholder, tokens, ids[0])


def initializer_vectors(
    tokenizer, embedding: nn.Embedding, initializer: str, n_vectors: int
) -> torch.Tensor:
    """Initial ``[n_vectors, d]`` fp32 vectors from an initializer word or phrase.

    The initializer's tokens are split into ``n_vectors`` consecutive groups, as equal as possible,
    and each vector starts at the mean embedding of its group (one vector and "teddy bear": the mean
    of both tokens). With fewer tokens than vectors the tokens are repeated in order.
    """
    ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not initializer.strip() or not ids:
        raise XTIError("concept.initializer must contain at least one word, e.g. 'toy'")
    weight = embedding.weight.detach().float().cpu()
    rows = weight[torch.tensor(ids)]
    if len(ids) >= n_vectors:
        groups = torch.tensor_split(torch.arange(len(ids)), n_vectors)
        return torch.stack([rows[g].mean(0) for g in groups]).clone()
    return rows[torch.arange(n_vectors) % len(ids)].clone()


class ConceptVectors(nn.Module):
    """The only trainable parameters: ``[num_variants, n_vectors, d]`` fp32 vectors.

    `forward()` returns the vectors; calling it through an Accelerate/DDP wrapper is what lets DDP
    see the forward pass and synchronise gradients.
    """

    def __init__(self, init: torch.Tensor, num_variants: int) -> None:
        super().__init__()
        if init.dim() != 2:
            raise ValueError("init must be [n_vectors, d]")
        self.vectors = nn.Parameter(init.detach().float().unsqueeze(0).repeat(num_variants, 1, 1))

    @property
    def num_variants(self) -> int:
        return self.vectors.shape[0]

    def forward(self) -> torch.Tensor:
        return self.vectors


class ConceptTokenEmbedding(nn.Module):
    """Token embedding that reads concept vectors for virtual ids and the frozen table otherwise.

    Args:
        original: the text encoder's embedding (kept as a submodule, frozen, restored on removal).
        first_id: first virtual id (the id of the placeholder's first token).
        source: callable returning the ``[V, n, d]`` vectors; usually the (possibly DDP-wrapped)
            `ConceptVectors`. It is held outside the module tree so that casting or freezing the text
            encoder never touches the trainable vectors.
    """

    def __init__(
        self, original: nn.Embedding, first_id: int, source: Callable[[], torch.Tensor]
    ) -> None:
        super().__init__()
        self.original = original
        self.first_id = first_id
        self._source = (source,)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen original table (for code that reads ``get_input_embeddings().weight``)."""
        return self.original.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self._source[0]()
        flat = table.reshape(-1, table.shape[-1])
        rel = input_ids - self.first_id
        is_concept = (rel >= 0) & (rel < flat.shape[0])
        base = self.original(torch.where(is_concept, torch.zeros_like(input_ids), input_ids))
        extra = flat.to(device=base.device, dtype=base.dtype)[rel.clamp(0, flat.shape[0] - 1)]
        return torch.where(is_concept.unsqueeze(-1), extra, base)


class TokenEmbeddingHandle:
    """Installed `ConceptTokenEmbedding`; `remove()` puts the original embedding back."""

    def __init__(self, text_encoder: nn.Module, module: ConceptTokenEmbedding) -> None:
        self.text_encoder = text_encoder
        self.module = module

    def remove(self) -> None:
        if self.text_encoder.get_input_embeddings() is self.module:
            self.text_encoder.set_input_embeddings(self.module.original)


def install_token_embedding(
    text_encoder: nn.Module, first_id: int, source: Callable[[], torch.Tensor]
) -> TokenEmbeddingHandle:
    """Install a `ConceptTokenEmbedding` in a transformers text encoder."""
    original = text_encoder.get_input_embeddings()
    if isinstance(original, ConceptTokenEmbedding):
        raise XTIError("a concept embedding is already installed in this text encoder")
    module = ConceptTokenEmbedding(original, first_id, source)
    text_encoder.set_input_embeddings(module)
    return TokenEmbeddingHandle(text_encoder, module)


def variant_ids(
    input_ids: torch.Tensor, first_id: int, n_vectors: int, num_variants: int
) -> torch.Tensor:
    """Make the ``[V, B, T]`` per-variant ids: placeholder ids of variant v are shifted by ``v·n``."""
    return _shift_placeholders(
        input_ids, first_id, n_vectors, torch.arange(num_variants, device=input_ids.device)
    )


def _shift_placeholders(
    input_ids: torch.Tensor, first_id: int, n_vectors: int, variants: torch.Tensor
) -> torch.Tensor:
    """``[R, B, T]``: row r is `input_ids` with the placeholder ids of variant ``variants[r]``."""
    is_placeholder = (input_ids >= first_id) & (input_ids < first_id + n_vectors)
    offsets = variants.to(input_ids.device).view(-1, 1, 1) * n_vectors
    return input_ids.unsqueeze(0) + offsets * is_placeholder.unsqueeze(0)


def layer_variants(num_layers: int, granularity: str) -> torch.Tensor:
    """Which variant each layer reads: layer i → i for XTI, all → 0 for ``shared``."""
    if granularity == "shared":
        return torch.zeros(num_layers, dtype=torch.long)
    return torch.arange(num_layers)


def layer_rows(
    input_ids: torch.Tensor,
    tokens: PlaceholderTokens,
    variant_of_layer: torch.Tensor,
    extra_variants: Sequence[int] = (),
) -> torch.Tensor:
    """The ``[1, R, B, T]`` id rows of `xti.families.encode_layers` for one training batch.

    Row i is the batch with the placeholder ids of layer i's variant (`variant_of_layer`), then one
    row per `extra_variants` entry (SDXL's POOL slot is variant V).
    """
    extra = torch.tensor(list(extra_variants), dtype=torch.long, device=variant_of_layer.device)
    rows = torch.cat([variant_of_layer, extra])
    return _shift_placeholders(input_ids, tokens.first_id, tokens.n_vectors, rows).unsqueeze(0)


def encode_per_layer(
    family: ModelFamily,
    parts: Sequence[EncoderPart],
    input_ids: Mapping[str, torch.Tensor],
    tokens: Mapping[str, PlaceholderTokens],
    variant_of_layer: torch.Tensor,
    num_variants: int,
    pooled: str = "slot",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-layer contexts ``[L, B, T, D]`` (and SDXL's pooled ``[B, P]``) of a training batch.

    The text encoders carry the concept's `ConceptTokenEmbedding`; each runs once, through the
    per-layer encoder that inference shares (`xti.families.encode_layers`). An encoder with more
    vector sets than layer variants (SDXL's POOL slot) gets its extra rows too. When layers share
    vector sets (fewer variants than layers: ``shared``), each set's rows are encoded once (B rows
    per set, not one per layer) and indexed back to the layers; the forward values are the same,
    the gradients of the shared rows are summed in another order (last bits). XTI (one variant per
    layer) encodes the L rows as before.

    Args:
        family: the model family.
        parts: its text encoders.
        input_ids: per encoder ``[B, T]`` ids (placeholder expanded to its variant-0 tokens).
        tokens: per encoder, the concept's placeholder tokens.
        variant_of_layer: ``[L]`` variant index per layer (see `layer_variants`).
        num_variants: V, the number of layer vector sets.
        pooled: SDXL: ``slot`` (the POOL vector set) or ``mean`` (of the layers' pooled outputs).
    """
    ids, row_index = {}, {}
    pool_row = False
    shared = num_variants < len(variant_of_layer)
    for part in parts:
        extra = range(num_variants, family.vector_sets(part.name, num_variants, pooled))
        pool_row = pool_row or len(extra) > 0
        if shared:
            sets = torch.arange(num_variants + len(extra), device=variant_of_layer.device)
            rows_of = sets[:num_variants]
            row_index[part.name] = torch.cat([variant_of_layer, sets[num_variants:]])
        else:
            rows_of = variant_of_layer
        ids[part.name] = layer_rows(input_ids[part.name], tokens[part.name], rows_of, extra)
    out = encode_layers(
        family,
        parts,
        ids,
        num_layers=len(variant_of_layer),
        pool_row=pool_row,
        distinct=False,
        row_index=row_index or None,
    )
    return out.contexts[0], (out.pooled[0] if out.pooled is not None else None)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Tokenize prompts padded/truncated to the tokenizer's max length: ``[P, T]`` long."""
    return tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids


class ConceptSet(nn.Module):
    """One concept's trainable vectors for each text encoder, keyed by encoder name (``text`` for
    SD 1.x/2.x, ``clip_l`` and ``clip_g`` for SDXL). `forward()` returns ``{name: [V, n, d]}``."""

    def __init__(self, vectors: dict[str, ConceptVectors]) -> None:
        super().__init__()
        self.sets = nn.ModuleDict(vectors)

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: module.vectors for name, module in self.sets.items()}

    def shapes(self) -> dict[str, list[int]]:
        return {name: list(module.vectors.shape) for name, module in self.sets.items()}
