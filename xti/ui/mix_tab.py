"""The Mix tab: load a model and embedding files, assign layers on the board, generate, save.

Wiring only; the work is `xti.ui.mix`. The board is drawn by ``gr.render`` from a state that holds
the model's layers (grouped by resolution, in forward order), the loaded concepts and the board's
values; each layer is a dropdown (``·`` = the prompt's text, ``A``, ``B``, … = the concepts in
loading order, named in the legend above the board). Presets redraw the board with new values.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, NamedTuple

from xti.config import placeholder_stem
from xti.errors import XTIError
from xti.paths import check_output_dir
from xti.ui.common import PipelineCache, guarded, ok
from xti.ui.mix import (
    PRESET_HELP,
    PRESETS,
    PROMPT,
    generate,
    generate_commands,
    level_groups,
    mix_of,
    parse_layer_prompts,
    parse_size,
    preset_assignment,
    save_mix,
)
from xti.ui.paths import Defaults, embedding_entries, entry_text, model_path
from xti.ui.train import parse_seeds


def _letters(concepts: list[str]) -> list[tuple[str, str]]:
    """Dropdown choices: ``·`` for the prompt, then ``A``, ``B``, … for the concepts."""
    return [("·", PROMPT)] + [(string.ascii_uppercase[i % 26], c) for i, c in enumerate(concepts)]


def _legend(concepts: list[str]) -> str:
    """The board's legend, one line."""
    names = [f"**{letter}** = `{value}`" for letter, value in _letters(concepts)[1:]]
    return "· = the prompt's text · " + " · ".join(names)


def _number(value: Any, what: str, minimum: float) -> float:
    """A number field's value, at least `minimum` (one line otherwise)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise XTIError(f"{what}: give a number") from None
    if number < minimum:
        raise XTIError(f"{what}: must be >= {minimum:g}")
    return number


class _Loader(NamedTuple):
    """The Mix tab's top: model, files, Load, status, the states and the preset row."""

    model: Any
    files: Any
    load: Any
    status: Any
    loaded: Any
    board: Any
    values: Any
    preset: Any
    apply: Any


class _Generation(NamedTuple):
    """The Mix tab's generation fields, Generate button and results."""

    prompt: Any
    negative: Any
    layer_prompts: Any
    seeds: Any
    count: Any
    steps: Any
    guidance: Any
    size: Any
    go: Any
    gallery: Any
    command: Any

    def fields(self) -> list[Any]:
        """The fields `_settings` reads, in its argument order."""
        return [
            self.prompt,
            self.negative,
            self.layer_prompts,
            self.seeds,
            self.count,
            self.steps,
            self.guidance,
            self.size,
        ]


class _Saving(NamedTuple):
    """The Mix tab's save row."""

    mix_name: Any
    out_dir: Any
    save: Any


def build(gr: Any, defaults: Defaults, cache: PipelineCache) -> None:
    """Lay out the Mix tab inside the current `gr.Blocks`."""
    demo = "demo-model" in defaults.model
    top = _loader(gr, defaults)

    @gr.render(inputs=top.board)
    def draw(b: dict) -> None:
        """Draw the layer board from the board state."""
        _draw_board(gr, b, top.values)

    gen = _generation(gr, demo)
    saving = _saving(gr)
    _wire(gr, cache, top, gen, saving)


def _loader(gr: Any, defaults: Defaults) -> _Loader:
    """The model and files row, the status line, the states and the preset row."""
    with gr.Row():
        model = gr.Dropdown(
            [defaults.model, "builtin:tiny-sd1", "builtin:tiny-sdxl"],
            value=defaults.model,
            label="model",
            allow_custom_value=True,
            elem_id="mix-model",
            scale=1,
        )
        files = gr.Textbox(
            defaults.style,
            label="embedding files (one per line, FILE or <token>=FILE; their order is A, B, …)",
            lines=2,
            elem_id="mix-files",
            scale=3,
        )
        load = gr.Button("Load", elem_id="mix-load", scale=0, min_width=100)
    status = gr.HTML(elem_id="mix-status")
    loaded = gr.State({})
    board = gr.State({"layers": [], "version": 0})
    values = gr.State({})
    with gr.Row():
        preset = gr.Dropdown(
            list(PRESETS),
            value="shape/colour",
            label="preset",
            info=PRESET_HELP,
            elem_id="mix-preset",
            scale=3,
        )
        apply = gr.Button("Apply preset", elem_id="mix-apply", scale=0, min_width=140)
    return _Loader(model, files, load, status, loaded, board, values, preset, apply)


def _draw_board(gr: Any, b: dict, values: Any) -> None:
    """The board's legend and one radio per layer, grouped by resolution (inside `gr.render`)."""
    if not b.get("layers"):
        gr.Markdown("Load a model and embedding files: the board shows the model's layers.")
        return
    gr.Markdown(_legend(b["concepts"]), elem_id="mix-legend")
    choices = _letters(b["concepts"])
    with gr.Row(elem_classes=["xti-board"], equal_height=True):
        for label, names in b["groups"]:
            with gr.Column(scale=len(names), min_width=64 * len(names), variant="panel"):
                gr.Markdown(f"**{label}**", elem_classes=["xti-level"])
                with gr.Row():
                    for name in names:
                        dd = gr.Radio(
                            choices,
                            value=b["values"].get(name, PROMPT),
                            label=name,
                            interactive=True,
                            min_width=56,
                            key=f"layer-{name}-{b['version']}",
                            elem_id=f"layer-{name}",
                            elem_classes=["xti-layer"],
                        )
                        dd.change(
                            lambda v, vals, n=name: {**vals, n: v},
                            [dd, values],
                            values,
                            show_progress="hidden",
                        )


def _generation(gr: Any, demo: bool) -> _Generation:
    """The prompt and settings fields, the Generate button, the gallery and the command."""
    with gr.Row():
        prompt = gr.Textbox(
            "a <striped-cross> on a black background" if demo else "",
            label="prompt",
            elem_id="mix-prompt",
            scale=3,
        )
        negative = gr.Textbox("", label="negative prompt", elem_id="mix-negative", scale=2)
    layer_prompts = gr.Textbox(
        "",
        label="per-layer prompts (LAYERS=PROMPT, one per line, e.g. mid=a green lizard)",
        lines=2,
        elem_id="mix-layer-prompts",
    )
    with gr.Row():
        seeds = gr.Textbox("0", label="seeds", elem_id="mix-seeds")
        count = gr.Number(4, label="images per seed", precision=0, elem_id="mix-count")
        steps = gr.Number(12 if demo else 30, label="steps", precision=0, elem_id="mix-steps")
        guidance = gr.Number(4.0 if demo else 7.5, label="guidance", elem_id="mix-guidance")
        size = gr.Textbox("", label="size (empty: the model's)", elem_id="mix-size")
    go = gr.Button("Generate", variant="primary", elem_id="mix-generate")
    gallery = gr.Gallery(
        label="one grid per seed (as xti generate --grid writes it)",
        columns=4,
        height=280,
        object_fit="contain",
        preview=False,
        fit_columns=False,
        format="png",
        elem_id="mix-gallery",
        elem_classes=["xti-pixels"],
    )
    command = gr.Textbox(
        label="the same images from a shell", lines=2, interactive=False, elem_id="mix-command"
    )
    return _Generation(
        prompt, negative, layer_prompts, seeds, count, steps, guidance, size, go, gallery, command
    )


def _saving(gr: Any) -> _Saving:
    """The placeholder, folder and Save row."""
    with gr.Row():
        mix_name = gr.Textbox("<mix>", label="placeholder of the saved mix", elem_id="mix-name")
        out_dir = gr.Textbox("outputs/mix", label="save into folder", elem_id="mix-out")
        save = gr.Button("Save the mix as an xti file", elem_id="mix-save")
    return _Saving(mix_name, out_dir, save)


def _wire(gr: Any, cache: PipelineCache, top: _Loader, gen: _Generation, saving: _Saving) -> None:
    """Connect Load, Apply preset, Generate and Save to their handlers."""
    on_load, on_preset = _board_handlers(gr, cache)
    on_generate = _generate_handler(gr, cache)
    on_save = _save_handler(cache)
    top.load.click(on_load, [top.model, top.files], [top.status, top.loaded, top.board, top.values])
    top.apply.click(
        on_preset, [top.loaded, top.board, top.preset], [top.status, top.board, top.values]
    )
    gen.go.click(
        on_generate, [top.loaded, top.values, *gen.fields()], [top.status, gen.gallery, gen.command]
    )
    saving.save.click(
        on_save,
        [top.loaded, top.values, gen.prompt, saving.mix_name, saving.out_dir],
        [top.status],
    )


def _board_handlers(gr: Any, cache: PipelineCache) -> tuple[Any, Any]:
    """The Load and Apply preset handlers (status, loaded, board, values)."""
    loading = gr.Progress()

    @guarded(4)
    def on_load(model_text: str, files_text: str, progress: Any = loading) -> tuple:
        name = model_path(model_text)
        entries = embedding_entries(files_text, "embedding files")
        progress(0.1, desc="loading the model")
        with cache.adapter(name, entries) as adapter:
            concepts = list(adapter.concepts)
            scheme = adapter.scheme
            sample = getattr(adapter.pipe.unet.config, "sample_size", None)
            groups = level_groups(scheme, sample if isinstance(sample, int) else None)
            start = preset_assignment(scheme, concepts, "clear")
        b = {
            "layers": scheme.names,
            "groups": groups,
            "concepts": concepts,
            "values": start,
            "version": 1,
        }
        info = {"model": name, "files": entries, "concepts": concepts, "scheme": scheme}
        text = f"loaded {', '.join(concepts)} on {name} ({len(scheme)} layers)"
        return ok(text), info, b, dict(start)

    @guarded(3)
    def on_preset(info: dict, b: dict, which: str) -> tuple:
        if not b.get("layers"):
            raise XTIError("load a model and embedding files first")
        new = preset_assignment(info["scheme"], info["concepts"], which)
        b = {**b, "values": new, "version": b["version"] + 1}
        return ok(f"preset {which}"), b, dict(new)

    return on_load, on_preset


def _settings(
    text: str, neg: str, per_layer: str, seed_text: str, n: Any, k: Any, g: Any, size_text: str
) -> dict:
    """The generation settings from the fields (one line on a bad one)."""
    width, height = parse_size(size_text)
    return {
        "prompt": text.strip() or None,
        "negative_prompt": neg.strip() or None,
        "layer_prompts": parse_layer_prompts(per_layer),
        "seeds": parse_seeds(seed_text),
        "count": int(_number(n, "images per seed", 1)),
        "steps": int(_number(k, "steps", 1)),
        "guidance": _number(g, "guidance", 0),
        "width": width,
        "height": height,
        "size": size_text.strip(),
    }


def _generate_handler(gr: Any, cache: PipelineCache) -> Any:
    """The Generate handler (status, gallery, command)."""
    denoising = gr.Progress()

    @guarded(3)
    def on_generate(
        info: dict,
        vals: dict,
        text: str,
        neg: str,
        per_layer: str,
        seed_text: str,
        n: Any,
        k: Any,
        g: Any,
        size_text: str,
        progress: Any = denoising,
    ) -> tuple:
        if not info:
            raise XTIError("load a model and embedding files first")
        s = _settings(text, neg, per_layer, seed_text, n, k, g, size_text)
        with cache.adapter(info["model"], info["files"]) as adapter:
            mix = mix_of(adapter.scheme, vals, info["concepts"])
            items = generate(
                adapter,
                **{k: s[k] for k in ("prompt", "negative_prompt", "layer_prompts", "seeds")},
                **{k: s[k] for k in ("count", "steps", "guidance", "width", "height")},
                mix=mix,
                progress=lambda done, total: progress(done / total, desc="denoising"),
            )
        cmd = generate_commands(
            model=info["model"],
            files=[entry_text(e) for e in info["files"]],
            mix=mix,
            **{k: s[k] for k in ("prompt", "negative_prompt", "layer_prompts", "seeds")},
            **{k: s[k] for k in ("count", "steps", "guidance", "size")},
        )
        mixed = ", ".join(f"{c} in {sel}" for c, sel in mix.items()) or "no mix"
        return ok(f"generated {len(items)} grid(s): {mixed}"), items, cmd

    return on_generate


def _save_handler(cache: PipelineCache) -> Any:
    """The Save handler (status)."""

    @guarded(1)
    def on_save(info: dict, vals: dict, text: str, name: str, folder: str) -> str:
        if not info:
            raise XTIError("load a model and embedding files first")
        target = check_output_dir(folder.strip() or ".", "save into folder")
        path = Path(target) / f"{placeholder_stem(name)}.xti.safetensors"
        with cache.adapter(info["model"], info["files"]) as adapter:
            written = save_mix(
                adapter,
                vals,
                text.strip() or None,
                path,
                placeholder=name.strip(),
                model=info["model"],
            )
        return ok(f"wrote {written} (placeholder {name.strip()})")

    return on_save
