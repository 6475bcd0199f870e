"""What every tab shares: one-line messages, error guards for event handlers, the pipeline cache.

Handlers never let an exception reach Gradio: `guarded` turns an `XTIError` (or any other
exception: its type and first line, with the traceback in the server log only) into one line in
the tab's status field and leaves the tab's other outputs as they were, so the page keeps working.
"""

from __future__ import annotations

import functools
import html
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from xti.errors import XTIError

logger = logging.getLogger("xti.ui")


def one_line(err: BaseException) -> str:
    """An exception as one readable line (`XTIError`s as they are, others with their type)."""
    text = (str(err).strip().splitlines() or [""])[0]
    if isinstance(err, XTIError):
        return text or "error"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def ok(text: str) -> str:
    """A status line that reports success (HTML-escaped: paths and prompts hold ``<…>``)."""
    return f'<div class="xti-status xti-ok">{html.escape(text)}</div>'


def error(text: str) -> str:
    """A status line that reports an error."""
    return f'<div class="xti-status xti-error">error: {html.escape(text)}</div>'


def guarded(outputs: int) -> Callable[[Callable[..., tuple]], Callable[..., tuple]]:
    """Decorate a handler whose first output is a status line: on any exception it returns the
    error line there and ``gr.skip()`` for its other `outputs` - 1 outputs (a handler with one
    output returns the line alone)."""

    def wrap(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> tuple:
            import gradio as gr

            try:
                return fn(*args, **kwargs)
            except Exception as err:  # a handler must never show a traceback
                if not isinstance(err, XTIError):
                    logger.exception("%s failed", fn.__name__)
                line = error(one_line(err))
                return line if outputs == 1 else (line, *[gr.skip()] * (outputs - 1))

        return run

    return wrap


class PipelineCache:
    """The last loaded pipeline, shared by the Mix and Inspect tabs, behind a lock: one
    generation at a time, and an `XTIAdapter` is only ever put on an idle pipeline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.model: str | None = None
        self.pipe: Any = None

    def _get(self, model: str) -> Any:
        """The pipeline of `model`, loading it (and dropping the previous one) when needed."""
        from xti.pipelines import load_pipeline

        if self.model != model:
            self.pipe, self.model = None, None
            pipe = load_pipeline(model)
            pipe.set_progress_bar_config(disable=True)
            self.pipe, self.model = pipe, model
        return self.pipe

    @contextmanager
    def adapter(self, model: str, entries: Sequence[tuple[str | None, str]]) -> Iterator[Any]:
        """An `XTIAdapter` on `model`'s pipeline with the ``(placeholder or None, file)`` entries
        loaded (None: the file's own placeholder), unloaded again afterwards."""
        from xti.inference import XTIAdapter

        with self.lock:
            adapter = XTIAdapter(self._get(model))
            try:
                for placeholder, path in entries:
                    adapter.load(str(path), placeholder)
                yield adapter
            finally:
                adapter.unload()
