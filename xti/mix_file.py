"""A mix saved as one file: each layer holds the vectors of the concept assigned to it.

Concepts are those an `xti.inference.XTIAdapter` loaded (aligned to the model's layer scheme); a mix
says which concept owns which layers (`layer_owners`, from ``{placeholder: selection}`` as
``xti generate --mix`` takes it; later entries win). Layers no concept owns hold the vectors of the
*base* concept (`base_concept`: the first loaded concept the prompt names), which is what those
layers see when generating with the prompt. `save_mix` writes the file (``xti mix … -o FILE``, the
web UI's "save this mix"); the new file's metadata records the mix (``xti.mix``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xti.errors import XTIError
from xti.export import build_metadata, save_embedding_file
from xti.layers import LayerScheme
from xti.mixing import mix_owners
from xti.sweep import selection_text


def layer_owners(
    scheme: LayerScheme, mix: Mapping[str, str | list[str]], concepts: Sequence[str]
) -> list[str | None]:
    """Per layer (forward order), the concept a mix ``{placeholder: selection}`` gives it, or None
    where the mix names none (later entries win; `xti.mixing.mix_owners` as a list)."""
    owners: list[str | None] = [None] * len(scheme)
    for i, placeholder in mix_owners(scheme, mix, concepts).items():
        owners[i] = placeholder
    return owners


def base_concept(concepts: Sequence[str], prompt: str | None) -> str | None:
    """The first loaded concept (loading order) whose placeholder the prompt contains."""
    return next((p for p in concepts if prompt and p in prompt), None)


def mix_selections(
    scheme: LayerScheme, owners: Sequence[str | None], concepts: Sequence[str]
) -> dict[str, str]:
    """The mix as ``{placeholder: selection}`` in loading order, for concepts owning a layer."""
    mix = {}
    for concept in concepts:
        chosen = [i for i, owner in enumerate(owners) if owner == concept]
        if chosen:
            mix[concept] = selection_text(chosen, scheme)
    return mix


def _filled_owners(
    names: Sequence[str], owners: Sequence[str | None], base: str | None
) -> list[str]:
    """Every layer's concept: its owner, or the base concept."""
    filled = []
    for name, owner in zip(names, owners, strict=True):
        if owner is None:
            if base is None:
                raise XTIError(
                    f"layer {name} keeps the prompt, which names no loaded concept: assign it, or "
                    "put a placeholder in the prompt"
                )
            owner = base
        filled.append(owner)
    return filled


def mixed_vectors(
    adapter: Any, owners: Sequence[str | None], base: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved mix's tensors ``{file key: [n, d]}`` and facts for its metadata (``n_vectors``,
    ``text_dims``, ``pooled``): each layer the vectors of its concept (unowned layers: `base`)."""
    concepts = adapter.concepts
    filled = _filled_owners(adapter.layer_names, owners, base)
    unknown = sorted({o for o in filled if o not in concepts})
    if unknown:
        raise XTIError(f"the mix names {', '.join(unknown)}, which is not loaded")
    widths = {concepts[o].n_vectors for o in filled}
    if len(widths) > 1:
        raise XTIError("the mixed concepts have different numbers of vectors per layer")
    family = adapter.family
    tensors = {}
    for encoder in family.encoder_names:
        for i, (name, owner) in enumerate(zip(adapter.layer_names, filled, strict=True)):
            tensors[family.file_key(encoder, name)] = concepts[owner].encoder_vectors[encoder][i]
    pool = concepts[base or filled[0]].pool
    if pool is not None and family.pool_key is not None:
        tensors[family.pool_key] = pool
    dims = {
        enc: int(concepts[filled[0]].encoder_vectors[enc].shape[-1]) for enc in family.encoder_names
    }
    return tensors, {"n_vectors": widths.pop(), "text_dims": dims, "pooled": pool is not None}


def save_mix(
    adapter: Any,
    owners: Sequence[str | None],
    base: str | None,
    path: str | Path,
    *,
    placeholder: str,
    model: str,
) -> Path:
    """Write a mix (per layer its owner, None for the `base` concept) as one xti file with the new
    `placeholder`; returns the path written (atomically)."""
    if not placeholder.strip() or any(c.isspace() for c in placeholder.strip()):
        raise XTIError("mix name: one word without spaces, e.g. <my-mix>")
    tensors, facts = mixed_vectors(adapter, owners, base)
    mix = mix_selections(adapter.scheme, owners, list(adapter.concepts))
    pooled = "slot" if facts["pooled"] else "mean"
    extra = {"xti.mix": json.dumps(mix), **(adapter.family.metadata_extra(pooled) or {})}
    meta = build_metadata(
        layers=adapter.layer_names,
        granularity=adapter.scheme.granularity,
        placeholder=placeholder.strip(),
        initializer=", ".join(f"{c} in {sel}" for c, sel in mix.items()) or "mix",
        n_vectors=facts["n_vectors"],
        family=adapter.family.name,
        base_model=model,
        text_dims=facts["text_dims"],
        steps=0,
        kde_weight=0.0,
        extra=extra,
    )
    return save_embedding_file(path, tensors, meta)
