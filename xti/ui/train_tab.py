"""The Train tab: the form, the image check, Start / Stop, and the live view of the run.

Wiring only; the work is `xti.ui.train`. A `gr.Timer` polls the running job once a second for its
loss curve (``logs/metrics.jsonl``), newest validation grid, progress bar with the time left, and
the last lines it printed; the timer stops when the run ends.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, NamedTuple

from xti.ui.common import error, guarded, ok
from xti.ui.paths import REPO_ROOT, Defaults, shown
from xti.ui.train import (
    CONFIG_FIELDS,
    FORM_FIELDS,
    GRANULARITIES,
    Progress,
    TrainForm,
    TrainJob,
    check_images,
    command_line,
)
from xti.ui.train import form_from_config as _from_config


def _configs() -> list[str]:
    """The config files of the checkout, as the fields show them."""
    return [shown(p) for p in sorted((REPO_ROOT / "configs").glob("*.yaml"))]


def _form(values: tuple[Any, ...]) -> TrainForm:
    """A `TrainForm` from the fields' values (in `FORM_FIELDS` order)."""
    return TrainForm(**dict(zip(FORM_FIELDS, values, strict=True)))


def _progress_html(snap: Progress) -> str:
    """A progress bar with the step count and the time left."""
    if snap.max_steps <= 0:
        return ""
    left = f" · about {snap.seconds_left:.0f} s left" if snap.seconds_left is not None else ""
    return (
        f'<div class="xti-progress"><progress id="xti-train-bar" value="{snap.step}" '
        f'max="{snap.max_steps}"></progress> <span>step {snap.step} / {snap.max_steps}'
        f"{html.escape(left)}</span></div>"
    )


def _loss_frame(rows: list[dict[str, Any]]) -> Any:
    """The loss curve's data: ``step``, ``value``, ``series`` (loss and its smoothed line; with
    several concepts, each concept's smoothed loss under its name)."""
    import pandas as pd

    if any("concept" in r for r in rows):
        data = [
            {"step": r["step"], "value": r["loss_smoothed"], "series": r["concept"]}
            for r in rows
            if isinstance(r.get("loss_smoothed"), (int, float))
        ]
    else:
        data = [
            {"step": r["step"], "value": r[key], "series": key}
            for key in ("loss", "loss_smoothed")
            for r in rows
            if isinstance(r.get(key), (int, float))
        ]
    frame = pd.DataFrame(data, columns=["step", "value", "series"])
    # typed: the plot reads the column types (a number axis, not categories)
    return frame.astype({"step": "int64", "value": "float64", "series": "str"})


class _Controls(NamedTuple):
    """Start / Stop and the run's status, progress bar and command line."""

    start: Any
    stop: Any
    status: Any
    progress: Any
    command: Any


class _LiveView(NamedTuple):
    """The right column: image check thumbnails, loss curve, validation grid, output."""

    gallery: Any
    loss: Any
    grid: Any
    log: Any


def build(gr: Any, defaults: Defaults, job: TrainJob) -> None:
    """Lay out the Train tab inside the current `gr.Blocks`."""
    start = _from_config(defaults.config)
    with gr.Row():
        with gr.Column(scale=3):
            form, check = _source_fields(gr, defaults, start)
            form.update(_training_fields(gr, start))
            form.update(_output_fields(gr, defaults, start))
            controls = _run_controls(gr)
        with gr.Column(scale=2):
            view = _live_view(gr)
    timer = gr.Timer(1.0, active=False)
    _wire(gr, job, form, check, controls, view, timer)


def _source_fields(gr: Any, defaults: Defaults, start: dict[str, Any]) -> tuple[dict, Any]:
    """The config, model and image folder rows: their fields (by form name) and Check images."""
    with gr.Row():
        config = gr.Dropdown(
            _configs(),
            value=defaults.config,
            label="base config",
            allow_custom_value=True,
            elem_id="train-config",
        )
        model = gr.Dropdown(
            [defaults.model, "builtin:tiny-sd1", "builtin:tiny-sdxl"],
            value=defaults.model,
            label="model (folder, single file, builtin)",
            allow_custom_value=True,
            elem_id="train-model",
        )
        single = gr.Textbox(
            start["single_file_config"],
            label="single-file config folder",
            elem_id="train-single-config",
        )
    with gr.Row():
        images = gr.Textbox(start["images"], label="image folder", elem_id="train-images", scale=3)
        check = gr.Button("Check images", elem_id="train-check", scale=1)
    fields = {"config": config, "model": model, "single_file_config": single, "images": images}
    return fields, check


def _training_fields(gr: Any, start: dict[str, Any]) -> dict[str, Any]:
    """The concept, schedule and validation rows' fields (by form name)."""
    with gr.Row():
        placeholder = gr.Textbox(
            start["placeholder"], label="placeholder", elem_id="train-placeholder"
        )
        initializer = gr.Textbox(
            start["initializer"], label="initializer", elem_id="train-initializer"
        )
        granularity = gr.Dropdown(
            list(GRANULARITIES),
            value=start["granularity"],
            label="granularity",
            elem_id="train-granularity",
        )
    with gr.Row():
        steps = gr.Number(start["steps"], label="steps", precision=0, elem_id="train-steps")
        lr = gr.Number(start["lr"], label="lr", elem_id="train-lr")
        batch = gr.Number(start["batch"], label="batch", precision=0, elem_id="train-batch")
        kde = gr.Number(start["kde_weight"], label="KDE weight", elem_id="train-kde")
    with gr.Row():
        prompts = gr.Textbox(
            start["prompts"],
            label="validation prompts (one per line)",
            lines=3,
            elem_id="train-prompts",
            scale=3,
        )
        with gr.Column(scale=1):
            every = gr.Number(
                start["validate_every"],
                label="validate every N steps",
                precision=0,
                elem_id="train-every",
            )
            seeds = gr.Textbox(start["seeds"], label="validation seeds", elem_id="train-seeds")
    return {
        "placeholder": placeholder,
        "initializer": initializer,
        "granularity": granularity,
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "kde_weight": kde,
        "prompts": prompts,
        "validate_every": every,
        "seeds": seeds,
    }


def _output_fields(gr: Any, defaults: Defaults, start: dict[str, Any]) -> dict[str, Any]:
    """The output folder, checkpoint, resume and overwrite row's fields (by form name)."""
    with gr.Row():
        output_dir = gr.Textbox(
            defaults.output_dir,
            label="output folder (the run's)",
            elem_id="train-output",
            scale=3,
        )
        ckpt = gr.Number(
            start["checkpoint_every"],
            label="checkpoint every N steps",
            precision=0,
            elem_id="train-ckpt",
        )
        resume = gr.Checkbox(False, label="resume from the run's folder", elem_id="train-resume")
        overwrite = gr.Checkbox(False, label="overwrite another run", elem_id="train-overwrite")
    return {
        "output_dir": output_dir,
        "checkpoint_every": ckpt,
        "resume": resume,
        "overwrite": overwrite,
    }


def _run_controls(gr: Any) -> _Controls:
    """The Start / Stop row, the status line, the progress bar and the command line."""
    with gr.Row():
        start_btn = gr.Button("Start", variant="primary", elem_id="train-start")
        stop_btn = gr.Button("Stop (saves the vectors)", variant="stop", elem_id="train-stop")
    status = gr.HTML(elem_id="train-status")
    progress = gr.HTML(elem_id="train-progress")
    command = gr.Textbox(
        label="the same run from a shell",
        interactive=False,
        lines=2,
        elem_id="train-command",
    )
    return _Controls(start_btn, stop_btn, status, progress, command)


def _live_view(gr: Any) -> _LiveView:
    """The right column: thumbnails, loss curve, latest validation grid and the run's output."""
    gallery = gr.Gallery(
        label="images and captions",
        columns=6,
        height=220,
        elem_id="train-gallery",
        format="png",
    )
    loss = gr.LinePlot(
        x="step",
        y="value",
        color="series",
        color_map={"loss": "#1f77b4", "loss_smoothed": "#ff7f0e"},
        colors_in_legend=[],  # a legend below the plot is cut off in this column
        label="loss (blue) and its moving average (orange)",
        elem_id="train-loss",
        height=300,
    )
    grid = gr.Image(
        label="latest validation grid",
        format="png",
        interactive=False,
        elem_id="train-grid",
        elem_classes=["xti-pixels"],
    )
    log = gr.Textbox(label="output", lines=6, max_lines=6, interactive=False, elem_id="train-log")
    return _LiveView(gallery, loss, grid, log)


def _wire(
    gr: Any,
    job: TrainJob,
    form: dict[str, Any],
    check: Any,
    controls: _Controls,
    view: _LiveView,
    timer: Any,
) -> None:
    """Connect the form, Check images, Start, Stop and the timer to their handlers."""
    on_check, on_change, on_config = _form_handlers()
    on_start, on_stop, on_tick = _run_handlers(gr, job)
    form_inputs = [form[name] for name in FORM_FIELDS]
    from_config = [form[name] for name in CONFIG_FIELDS]
    status = controls.status
    check.click(on_check, [form["images"], form["placeholder"]], [status, view.gallery])
    for comp in form_inputs:
        comp.change(on_change, form_inputs, controls.command, show_progress="hidden")
    form["config"].change(on_config, form["config"], [status, *from_config])
    controls.start.click(
        on_start, form_inputs, [status, controls.command, timer, view.loss, view.grid]
    )
    controls.stop.click(on_stop, None, status)
    timer.tick(
        on_tick,
        None,
        [status, controls.progress, view.loss, view.grid, view.log, timer],
        show_progress="hidden",
    )


def _form_handlers() -> tuple[Any, Any, Any]:
    """The Check images, form change and base config handlers."""

    @guarded(2)
    def on_check(folder: str, ph: str) -> tuple:
        found = check_images(folder, ph)
        return ok(found.message), found.thumbnails

    def on_change(*values: Any) -> str:
        try:
            return command_line(_form(values))
        except Exception as err:
            return f"(fix the form: {err})"

    @guarded(1 + len(CONFIG_FIELDS))
    def on_config(path: str) -> tuple:
        values = _from_config(path)
        return (ok(f"fields set from {path}"), *[values[k] for k in CONFIG_FIELDS])

    return on_check, on_change, on_config


def _run_handlers(gr: Any, job: TrainJob) -> tuple[Any, Any, Any]:
    """The Start, Stop and timer handlers, sharing what the page shows already."""
    state: dict[str, Any] = {"grid": None, "rows": -1}  # what the page shows already

    @guarded(5)
    def on_start(*values: Any) -> tuple:
        form = _form(values)
        found = check_images(form.images, form.placeholder)
        cmd = job.start(form)
        state.update(grid=None, rows=-1)
        # None clears the plot (an empty frame would leave it without lines afterwards)
        return ok(f"started ({found.message})"), cmd, gr.Timer(active=True), None, None

    @guarded(1)
    def on_stop() -> str:
        return ok(job.stop())

    @guarded(6)
    def on_tick() -> tuple:
        snap = job.progress()
        line = error(snap.state) if snap.failed else ok(snap.state)
        plot = gr.skip()
        if snap.metrics and len(snap.metrics) != state["rows"]:
            state["rows"] = len(snap.metrics)
            plot = _loss_frame(snap.metrics)
        picture = gr.skip()
        if snap.grid is not None and (snap.grid, snap.grid.stat().st_mtime) != state["grid"]:
            state["grid"] = (snap.grid, snap.grid.stat().st_mtime)
            picture = _load(snap.grid)
        timer_update = gr.skip() if snap.running else gr.Timer(active=False)
        return line, _progress_html(snap), plot, picture, snap.log, timer_update

    return on_start, on_stop, on_tick


def _load(path: Path) -> Any:
    """A PNG the run wrote, read into memory (the page gets a copy, never the file)."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")
