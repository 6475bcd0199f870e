"""The web app: three tabs (Train, Mix, Inspect) in one ``gr.Blocks``, and serving it.

`build_app` lays the tabs out around one `TrainJob` (the training subprocess) and one
`PipelineCache` (the loaded pipeline Mix and Inspect share). `serve` binds to 127.0.0.1 unless
told otherwise, with no ``allowed_paths``: Gradio then serves its own assets and the pictures the
handlers return (copied into its cache), and no other file. Fonts are the system's, so a page
opened without internet loads nothing from outside.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Any

from xti.errors import XTIError
from xti.ui.common import PipelineCache, one_line
from xti.ui.paths import Defaults
from xti.ui.train import TrainJob

logger = logging.getLogger("xti.ui")

CSS = """
.xti-status { padding: 4px 8px; border-radius: 4px; }
.xti-ok { background: #eef6ee; color: #1d4d1d; }
.xti-error { background: #fbeaea; color: #8a1c1c; font-weight: 600; }
.xti-pixels img { image-rendering: pixelated; }
#train-gallery img { image-rendering: pixelated; }
.xti-progress progress { width: 60%; height: 14px; vertical-align: middle; }
.xti-board .xti-level { text-align: center; }
.xti-layer .wrap { flex-direction: column; gap: 4px; }
.xti-layer label { min-width: 0; padding: 2px 6px; }
"""

INTRO = (
    "# xti — Extended Textual Inversion\n"
    "**Train** a concept, **Mix** concepts layer by layer, **Inspect** what each layer carries. "
    "Every tab shows the equivalent command line."
)


def build_app(
    defaults: Defaults | None = None,
    job: TrainJob | None = None,
    cache: PipelineCache | None = None,
) -> Any:
    """The ``gr.Blocks`` of the app (not started)."""
    import gradio as gr

    from xti.ui import inspect_tab, mix_tab, train_tab

    defaults = defaults or Defaults.find()
    job = job or TrainJob()
    cache = cache or PipelineCache()
    with gr.Blocks(title="xti", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        with gr.Tabs():
            with gr.Tab("Train", elem_id="tab-train"):
                train_tab.build(gr, defaults, job)
            with gr.Tab("Mix", elem_id="tab-mix"):
                mix_tab.build(gr, defaults, cache)
            with gr.Tab("Inspect", elem_id="tab-inspect"):
                inspect_tab.build(gr, defaults, cache)
    app.xti_job = job  # for the server's shutdown and for tests
    return app


def theme() -> Any:
    """Gradio's default look with system fonts (nothing fetched from font servers)."""
    import gradio as gr

    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "monospace"],
    )


def serve(
    host: str = "127.0.0.1", port: int | None = 7860, model: str | None = None, block: bool = True
) -> Any:
    """Build and start the app; blocks until Ctrl-C unless `block` is false (then returns the
    app). A training run still going when the server stops is stopped cleanly (vectors saved)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(Defaults.find(model))
    atexit.register(app.xti_job.shutdown)
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s: anyone who can reach this address can use the app", host)
    app.queue()
    try:
        app.launch(
            server_name=host,
            server_port=port or None,
            prevent_thread_lock=not block,
            ssr_mode=False,
            show_error=False,
            theme=theme(),
            css=CSS,
            footer_links=["gradio", "settings"],
        )
    except OSError as err:  # port taken, address not available: one line
        raise XTIError(f"cannot serve on {host}:{port}: {one_line(err)}") from None
    return app
