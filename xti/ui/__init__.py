"""The web UI, ``xti ui`` (Gradio; install with ``pip install -e ".[ui]"``).

Three tabs on one local page, working on the demo model by default:

* **Train** (`xti.ui.train_tab`, `xti.ui.train`): the form becomes a config, a subprocess runs
  the same training as ``train.py``; live loss curve, validation grid, progress, Stop = Ctrl-C.
* **Mix** (`xti.ui.mix_tab`, `xti.ui.mix`): a layer board assigns each layer a concept or the
  prompt; generation is ``xti generate``'s, pixel for pixel; a mix saves as one xti file.
* **Inspect** (`xti.ui.inspect_tab`, `xti.ui.inspection`): metadata, norms, layer similarities,
  nearest tokens, and a layer sweep (`xti.sweep`).

Shared pieces: `xti.ui.common` (one-line errors, the pipeline cache), `xti.ui.paths` (defaults,
path checks), `xti.ui.plots` (charts drawn with Pillow), `xti.ui.app` (the page and the server).
"""

from __future__ import annotations

from typing import Any

from xti.errors import XTIError


def launch(
    host: str = "127.0.0.1", port: int | None = 7860, model: str | None = None, block: bool = True
) -> Any:
    """Start the web UI (see `xti.ui.app.serve`); a missing Gradio is one line."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise XTIError('xti ui needs Gradio: pip install -e ".[ui]"') from None
    from xti.ui.app import serve

    return serve(host=host, port=port, model=model, block=block)
