"""The Mix tab's work: the layer board, its presets, generation, and what a mix is saved as.

The board assigns each layer a loaded concept or leaves it to the prompt's text (`PROMPT`). An
assignment becomes the adapter's ``mix`` (``{placeholder: layers}``, `mix_of`): in a concept's
layers every placeholder of the mix in the prompt is filled by that concept; layers left to the
prompt keep the placeholders as written. Generation is the adapter called as ``xti generate``
calls it (one ``torch.Generator(device).manual_seed(seed)`` per seed, ``count`` images per seed),
and each seed's picture is `xti.pipelines.image_grid` of its images, the file ``xti generate
--grid`` writes, so the page shows exactly what the command in `generate_commands` makes.

A saved mix (`save_mix`) is one xti file whose every layer holds the vectors of the concept
assigned to it; layers left to the prompt hold the vectors of the first loaded concept that the
prompt names (what those layers see when generating).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xti.errors import XTIError
from xti.layers import LayerScheme
from xti.sweep import selection_text

PROMPT = "(prompt)"
"""The board's value for a layer that keeps the prompt's text."""

PRESETS = ("all", "coarse/fine", "down/mid/up", "shape/colour", "clear")
"""Board presets; each gives the loaded concepts, in order, the parts it names."""

PRESET_HELP = (
    "all: the first concept everywhere · coarse/fine: first coarse, second fine · down/mid/up: "
    "first, second, third · shape/colour (the demo's split): the first in every layer but the "
    "finest level, the second in the finest · clear: all layers keep the prompt"
)


def level_groups(
    scheme: LayerScheme, sample_size: int | None = None
) -> list[tuple[str, list[str]]]:
    """The board's columns: runs of consecutive layers (forward order) at one resolution, each
    labelled by its feature-map size (``16x16``; ``level N`` when the size is unknown)."""
    groups: list[tuple[str, list[str]]] = []
    last = None
    for layer in scheme.layers:
        if layer.level != last:
            size = max(1, sample_size >> layer.level) if sample_size else None
            label = f"{size}x{size}" if size else f"level {layer.level}"
            groups.append((f"{layer.part} {label}", []))
            last = layer.level
        groups[-1][1].append(layer.name)
    return groups


def preset_assignment(scheme: LayerScheme, concepts: Sequence[str], preset: str) -> dict[str, str]:
    """The board a preset gives: ``{layer: placeholder or PROMPT}``."""
    names = scheme.names
    pick = list(concepts) + [PROMPT] * 3

    def parts(*selections: list[int]) -> dict[str, str]:
        board = dict.fromkeys(names, PROMPT)
        for concept, chosen in zip(pick, selections, strict=False):
            for i in chosen:
                board[names[i]] = concept
        return board

    if not concepts and preset != "clear":
        raise XTIError("load at least one embedding file first")
    if preset == "all":
        return parts(scheme.group("all"))
    if preset == "coarse/fine":
        return parts(scheme.group("coarse"), scheme.group("fine"))
    if preset == "down/mid/up":
        return parts(scheme.group("down"), scheme.group("mid"), scheme.group("up"))
    if preset == "shape/colour":
        finest = min(layer.level for layer in scheme.layers)
        colour = [i for i, layer in enumerate(scheme.layers) if layer.level == finest]
        return parts([i for i in range(len(names)) if i not in colour], colour)
    if preset == "clear":
        return parts()
    raise XTIError(f"unknown preset {preset!r}: use {', '.join(PRESETS)}")


def mix_of(
    scheme: LayerScheme, board: Mapping[str, str], concepts: Sequence[str]
) -> dict[str, str]:
    """The adapter's ``mix`` for a board: ``{placeholder: selection}`` in loading order, for the
    concepts that own at least one layer."""
    unknown = sorted({v for v in board.values() if v != PROMPT and v not in concepts})
    if unknown:
        raise XTIError(f"the board names {', '.join(unknown)}, which is not loaded")
    mix = {}
    for concept in concepts:
        chosen = [i for i, name in enumerate(scheme.names) if board.get(name) == concept]
        if chosen:
            mix[concept] = selection_text(chosen, scheme)
    return mix


def parse_layer_prompts(text: str) -> dict[str, str]:
    """Per-layer prompts, one ``LAYERS=PROMPT`` per line (``mid=a green lizard``)."""
    from xti.parsing import parse_assignments

    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    return parse_assignments(lines, "per-layer prompts", split_last=False)


def parse_size(text: str) -> tuple[int | None, int | None]:
    """``512`` or ``512x768`` (empty: the model's size), as ``xti generate --size``."""
    from xti.parsing import parse_size

    return parse_size(str(text).strip() or None)


def generate(
    adapter: Any,
    *,
    prompt: str | None,
    negative_prompt: str | None,
    mix: Mapping[str, str] | None,
    layer_prompts: Mapping[str, str] | None,
    seeds: Sequence[int],
    count: int,
    steps: int,
    guidance: float,
    width: int | None = None,
    height: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[tuple[Any, str]]:
    """One picture per seed: the grid of its `count` images, as ``xti generate --seed S --count
    N --grid`` writes it; returns ``[(grid, "seed S")]``."""
    import torch

    from xti.pipelines import image_grid

    if count < 1 or steps < 1:
        raise XTIError("images per seed and steps must be >= 1")
    out = []
    total = len(seeds) * steps
    for k, seed in enumerate(seeds):

        def tick(pipe: Any, i: int, t: Any, kwargs: dict, k: int = k) -> dict:
            if progress is not None:
                progress(k * steps + i + 1, total)
            return {}

        result = adapter(
            prompt,
            negative_prompt=negative_prompt,
            layer_prompts=layer_prompts or None,
            mix=mix or None,
            num_images_per_prompt=count,
            guidance_scale=guidance,
            num_inference_steps=steps,
            height=height,
            width=width,
            generator=torch.Generator(device=adapter.pipe._execution_device).manual_seed(seed),
            callback_on_step_end=tick,
        )
        out.append((image_grid(result.images), f"seed {seed}"))
    return out


def generate_commands(
    *,
    model: str,
    files: Sequence[str],
    prompt: str | None,
    negative_prompt: str | None,
    mix: Mapping[str, str],
    layer_prompts: Mapping[str, str],
    seeds: Sequence[int],
    count: int,
    steps: int,
    guidance: float,
    size: str = "",
    out_dir: str = "outputs/mix",
) -> str:
    """The ``xti generate`` command of each seed (one per line) that writes the same grids."""
    lines = []
    for seed in seeds:
        args = ["xti", "generate", "--model", model]
        for f in files:
            args += ["-e", f]
        if prompt:
            args += ["--prompt", prompt]
        if negative_prompt:
            args += ["--negative-prompt", negative_prompt]
        if mix:
            args += ["--mix", *[f"{c}={sel}" for c, sel in mix.items()]]
        for sel, text in layer_prompts.items():
            args += ["--layer-prompt", f"{sel}={text}"]
        args += ["--steps", str(steps), "--guidance", f"{guidance:g}", "--seed", str(seed)]
        args += ["--count", str(count)]
        if size.strip():
            args += ["--size", size.strip()]
        args += ["--grid", "--out-dir", out_dir, "--name", "mix"]
        lines.append(" ".join(shlex.quote(a) for a in args))
    return "\n".join(lines)


def _base_concept(adapter: Any, prompt: str | None) -> str | None:
    """The first loaded concept (loading order) whose placeholder the prompt contains."""
    return next((p for p in adapter.concepts if prompt and p in prompt), None)


def mixed_vectors(
    adapter: Any, board: Mapping[str, str], prompt: str | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The saved mix's tensors ``{file key: [n, d]}`` and facts for its metadata: each layer the
    vectors of its concept (layers left to the prompt: the prompt's first concept)."""
    concepts = adapter.concepts
    base = _base_concept(adapter, prompt)
    owners = []
    for name in adapter.layer_names:
        owner = board.get(name, PROMPT)
        if owner == PROMPT:
            if base is None:
                raise XTIError(
                    f"layer {name} keeps the prompt, which names no loaded concept: assign it, or "
                    "put a placeholder in the prompt"
                )
            owner = base
        if owner not in concepts:
            raise XTIError(f"the board names {owner}, which is not loaded")
        owners.append(owner)
    widths = {concepts[o].n_vectors for o in owners}
    if len(widths) > 1:
        raise XTIError("the mixed concepts have different numbers of vectors per layer")
    family = adapter.family
    tensors = {}
    for encoder in family.encoder_names:
        for i, (name, owner) in enumerate(zip(adapter.layer_names, owners, strict=True)):
            tensors[family.file_key(encoder, name)] = concepts[owner].encoder_vectors[encoder][i]
    pool_owner = base or owners[0]
    pool = concepts[pool_owner].pool
    if pool is not None and family.pool_key is not None:
        tensors[family.pool_key] = pool
    dims = {
        enc: int(concepts[owners[0]].encoder_vectors[enc].shape[-1]) for enc in family.encoder_names
    }
    return tensors, {"n_vectors": widths.pop(), "text_dims": dims, "pooled": pool is not None}


def save_mix(
    adapter: Any,
    board: Mapping[str, str],
    prompt: str | None,
    path: str | Path,
    *,
    placeholder: str,
    model: str,
) -> Path:
    """Write the board's mix as one xti file with the new `placeholder` (see module docstring)."""
    from xti.export import build_metadata, save_embedding_file

    if not placeholder.strip() or any(c.isspace() for c in placeholder.strip()):
        raise XTIError("mix name: one word without spaces, e.g. <my-mix>")
    tensors, facts = mixed_vectors(adapter, board, prompt)
    mix = mix_of(adapter.scheme, board, list(adapter.concepts))
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
