"""The Inspect tab: an embedding file's metadata, norms, layer similarities, nearest tokens, and
a layer sweep (what each layer carries).

Wiring only; the work is `xti.ui.inspection` and `xti.sweep`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from xti.config import placeholder_stem
from xti.errors import XTIError
from xti.export import load_embedding_file
from xti.sweep import SWEEP_KINDS, run_sweep
from xti.ui.common import PipelineCache, guarded, ok
from xti.ui.inspection import (
    default_prompt,
    describe,
    nearest_rows,
    norm_chart,
    similarity,
    sweep_command,
)
from xti.ui.paths import Defaults, existing_file, model_path
from xti.ui.train import parse_seeds


def _whole(value: Any, what: str, minimum: int) -> int:
    """A whole number >= `minimum` from a number field (one line otherwise)."""
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        raise XTIError(f"{what}: give a whole number") from None
    if number < minimum:
        raise XTIError(f"{what}: must be >= {minimum}")
    return number


def _number(value: Any, what: str) -> float:
    """A number >= 0 from a number field (one line otherwise)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise XTIError(f"{what}: give a number") from None
    if not number >= 0:
        raise XTIError(f"{what}: must be >= 0")
    return number


class _Report(NamedTuple):
    """The file row, the status line and what Inspect shows."""

    file: Any
    model: Any
    top_k: Any
    run: Any
    status: Any
    norms: Any
    heat: Any
    tokens: Any
    meta: Any


class _Sweep(NamedTuple):
    """The layer sweep's fields, Run sweep button and results."""

    prompt: Any
    kind: Any
    window: Any
    neutral: Any
    seeds: Any
    steps: Any
    guidance: Any
    go: Any
    grid: Any
    command: Any


def build(gr: Any, defaults: Defaults, cache: PipelineCache) -> None:
    """Lay out the Inspect tab inside the current `gr.Blocks`."""
    demo = "demo-model" in defaults.model
    report = _report(gr, defaults)
    sweep = _sweep(gr, demo)
    _wire(gr, cache, report, sweep)


def _report(gr: Any, defaults: Defaults) -> _Report:
    """The file and model row, the status line, the plots, nearest tokens and metadata."""
    with gr.Row():
        file = gr.Textbox(defaults.style, label="embedding file", elem_id="inspect-file", scale=3)
        model = gr.Dropdown(
            [defaults.model, "builtin:tiny-sd1", "builtin:tiny-sdxl"],
            value=defaults.model,
            label="model (for nearest tokens and the sweep)",
            allow_custom_value=True,
            elem_id="inspect-model",
            scale=2,
        )
        top_k = gr.Number(3, label="nearest tokens", precision=0, elem_id="inspect-topk", scale=0)
        run = gr.Button("Inspect", variant="primary", elem_id="inspect-run", scale=0)
    status = gr.HTML(elem_id="inspect-status")
    with gr.Row():
        norms = gr.Image(
            label="vector norms",
            show_label=False,
            format="png",
            interactive=False,
            elem_id="inspect-norms",
        )
        heat = gr.Image(
            label="cosine similarity between layers",
            show_label=False,
            format="png",
            interactive=False,
            elem_id="inspect-heat",
        )
    with gr.Row():
        tokens = gr.Dataframe(
            headers=["layer", "nearest tokens (per vector)"],
            label="nearest vocabulary tokens",
            elem_id="inspect-tokens",
            interactive=False,
            wrap=True,
        )
        meta = gr.JSON(label="metadata", elem_id="inspect-meta")
    return _Report(file, model, top_k, run, status, norms, heat, tokens, meta)


def _sweep(gr: Any, demo: bool) -> _Sweep:
    """The layer sweep section: its heading, fields, Run sweep, the grid and the command."""
    gr.Markdown(
        "### Layer sweep\nEach row injects the concept into some layers only; the other layers "
        "see the prompt with the placeholder replaced by the neutral word (empty: the file's "
        "initializer). The first row has no layer, the last all of them."
    )
    with gr.Row():
        prompt = gr.Textbox(
            "", label="prompt (with the placeholder)", elem_id="sweep-prompt", scale=3
        )
        kind = gr.Dropdown(list(SWEEP_KINDS), value="growing", label="rows", elem_id="sweep-kind")
        window = gr.Number(1, label="window (sliding)", precision=0, elem_id="sweep-window")
        neutral = gr.Textbox("", label="neutral word", elem_id="sweep-neutral")
    with gr.Row():
        seeds = gr.Textbox("0 1", label="seeds (columns)", elem_id="sweep-seeds")
        steps = gr.Number(12 if demo else 30, label="steps", precision=0, elem_id="sweep-steps")
        guidance = gr.Number(4.0 if demo else 7.5, label="guidance", elem_id="sweep-guidance")
        go = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
    grid = gr.Image(
        label="layer sweep",
        format="png",
        interactive=False,
        elem_id="sweep-grid",
        elem_classes=["xti-pixels"],
    )
    command = gr.Textbox(
        label="the same sweep as one PNG, from a shell", interactive=False, elem_id="sweep-command"
    )
    return _Sweep(prompt, kind, window, neutral, seeds, steps, guidance, go, grid, command)


def _wire(gr: Any, cache: PipelineCache, report: _Report, sweep: _Sweep) -> None:
    """Connect Inspect and Run sweep to their handlers."""
    on_inspect = _inspect_handler()
    on_sweep = _sweep_handler(gr, cache)
    r, s = report, sweep
    r.run.click(
        on_inspect,
        [r.file, r.model, r.top_k, s.prompt],
        [r.status, r.norms, r.heat, r.tokens, r.meta, s.prompt],
    )
    s.go.click(
        on_sweep,
        [r.file, r.model, s.prompt, s.kind, s.window, s.neutral, s.seeds, s.steps, s.guidance],
        [r.status, s.grid, s.command],
    )


def _inspect_handler() -> Any:
    """The Inspect handler (status, norms, heat map, tokens, metadata, sweep prompt)."""

    @guarded(6)
    def on_inspect(path: str, model_text: str, k: Any, prompt_text: str) -> tuple:
        checked = str(existing_file(path, "embedding file"))
        ef = load_embedding_file(checked)
        name = model_path(model_text) if str(model_text or "").strip() else None
        info = describe(checked, name, _whole(k, "nearest tokens", 1))
        placeholder = ef.metadata.get("xti.placeholder", "")
        suggestion = prompt_text or (default_prompt(placeholder, name or "") if placeholder else "")
        listed = {key: v for key, v in info.items() if key != "nearest_tokens"}
        text = f"{placeholder or 'kohya file'}: {len(ef.layers)} layers x {ef.n_vectors} vector(s)"
        return ok(text), norm_chart(ef), similarity(ef), nearest_rows(info), listed, suggestion

    return on_inspect


def _sweep_settings(which: str, width: Any, word: str, n: Any, g: Any) -> dict[str, Any]:
    """The sweep's settings from the fields (one line on a bad one)."""
    return {
        "kind": which,
        "window": _whole(width, "window", 1),
        "neutral": word.strip() or None,
        "steps": _whole(n, "steps", 1),
        "guidance": _number(g, "guidance"),
    }


def _sweep_handler(gr: Any, cache: PipelineCache) -> Any:
    """The Run sweep handler (status, grid, command)."""
    sweeping = gr.Progress()

    @guarded(3)
    def on_sweep(
        path: str,
        model_text: str,
        text: str,
        which: str,
        width: Any,
        word: str,
        seed_text: str,
        n: Any,
        g: Any,
        progress: Any = sweeping,
    ) -> tuple:
        checked = str(existing_file(path, "embedding file"))
        name = model_path(model_text)
        ef = load_embedding_file(checked)
        placeholder = ef.metadata.get("xti.placeholder")
        if not placeholder:
            raise XTIError(f"{checked} names no placeholder (a kohya file): use xti sweep")
        seeds = parse_seeds(seed_text)
        settings = _sweep_settings(which, width, word, n, g)
        with cache.adapter(name, [(None, checked)]) as adapter:
            result = run_sweep(
                adapter,
                placeholder,
                text.strip(),
                kind=which,
                seeds=seeds,
                window=settings["window"],
                neutral=settings["neutral"],
                num_inference_steps=settings["steps"],
                guidance_scale=settings["guidance"],
                progress=lambda done, total: progress(done / total, desc="sweeping"),
            )
        cmd = sweep_command(
            file=checked,
            model=name,
            prompt=text.strip(),
            seeds=seeds,
            out=f"outputs/sweep/{placeholder_stem(placeholder)}-{which}.png",
            **settings,
        )
        rows = len(result.rows)
        return (
            ok(f"{rows} rows x {len(seeds)} seeds; neutral: {result.neutral_prompt!r}"),
            (result.grid()),
            cmd,
        )

    return on_sweep
