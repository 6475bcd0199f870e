"""The Mix tab's work: the layer board, its presets, generation, and what a mix is saved as.

The board assigns each layer a loaded concept or leaves it to the prompt's text (`PROMPT`). An
assignment becomes the adapter's ``mix`` (``{placeholder: layers}``, `mix_of`): in a concept's
layers every placeholder of the mix in the prompt is filled by that concept; layers left to the
prompt keep the placeholders as written. Generation is the adapter called as ``xti generate``
calls it (one ``torch.Generator(device).manual_seed(seed)`` per seed, ``count`` images per seed),
and each seed's picture is `xti.pipelines.image_grid` of its images, the file ``xti generate
--grid`` writes, so the page shows exactly what the command in `generate_commands` makes.

A saved mix (`save_mix`, the library's `xti.mixing.save_mix`, as ``xti mix``) is one xti file whose
every layer holds the vectors of the concept assigned to it; layers left to the prompt hold the
vectors of the first loaded concept that the prompt names (what those layers see when generating).
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xti.errors import XTIError
from xti.layers import LayerScheme

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
    from xti.mix_file import mix_selections

    unknown = sorted({v for v in board.values() if v != PROMPT and v not in concepts})
    if unknown:
        raise XTIError(f"the board names {', '.join(unknown)}, which is not loaded")
    owners = [board.get(name) if board.get(name) != PROMPT else None for name in scheme.names]
    return mix_selections(scheme, owners, concepts)


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


def save_mix(
    adapter: Any,
    board: Mapping[str, str],
    prompt: str | None,
    path: str | Path,
    *,
    placeholder: str,
    model: str,
) -> Path:
    """Write the board's mix as one xti file with the new `placeholder` (`xti.mixing.save_mix`:
    layers left to the prompt hold the prompt's first concept)."""
    from xti.mix_file import base_concept
    from xti.mix_file import save_mix as save

    concepts = list(adapter.concepts)
    mix_of(adapter.scheme, board, concepts)  # one line when the board names a concept not loaded
    owners = [None if board.get(n, PROMPT) == PROMPT else board[n] for n in adapter.layer_names]
    base = base_concept(concepts, prompt)
    return save(adapter, owners, base, path, placeholder=placeholder, model=model)
