"""What a training run tells the outside while it goes: typed events and the callbacks that receive
them.

`xti.training.train` takes a list of `TrainCallback`\\ s; on the main process, after the files an
event names are complete on disk, the trainer calls each callback's method for it:

* `TrainCallback.on_checkpoint_saved` with a `CheckpointSaved` (step, checkpoint folder),
* `TrainCallback.on_validation_images_saved` with a `ValidationImagesSaved` (step, grid PNG),
* `TrainCallback.on_run_finished` with a `RunFinished` (steps, exported file or None when stopped
  early, last validation grid, summary file).

`EventLog` writes the same events as JSON lines to ``<output_dir>/logs/events.jsonl`` so that a
process that started the run in a subprocess (the web UI) follows it without guessing file names;
`read_events` reads them back. The trainer always keeps an `EventLog`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EVENTS_FILE = Path("logs") / "events.jsonl"
"""Where `EventLog` writes, relative to the run's output folder."""


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint of the run is complete on disk."""

    step: int
    path: Path


@dataclass(frozen=True)
class ValidationImagesSaved:
    """A validation grid (PNG: a column per seed, a row per prompt) is complete on disk."""

    step: int
    path: Path


@dataclass(frozen=True)
class RunFinished:
    """The run ended without an error: at `train.max_steps` (`output_file` is the exported
    embedding) or at a requested stop step (`output_file` is None)."""

    steps: int
    output_file: Path | None
    samples_file: Path | None
    summary_file: Path | None


Event = CheckpointSaved | ValidationImagesSaved | RunFinished

_KINDS: dict[str, type] = {
    "checkpoint_saved": CheckpointSaved,
    "validation_images_saved": ValidationImagesSaved,
    "run_finished": RunFinished,
}
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


class TrainCallback:
    """Receives a run's events (main process only); override the methods you need."""

    def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
        """A checkpoint folder was written."""

    def on_validation_images_saved(self, event: ValidationImagesSaved) -> None:
        """A validation grid was written."""

    def on_run_finished(self, event: RunFinished) -> None:
        """The run ended (its summary and model card are written)."""


def dispatch(callbacks: list[TrainCallback], event: Event) -> None:
    """Call each callback's method for `event`, in order."""
    method = f"on_{_KIND_OF[type(event)]}"
    for callback in callbacks:
        getattr(callback, method)(event)


def event_record(event: Event) -> dict[str, Any]:
    """The JSON object of an event: ``{"event": kind, ...fields}`` (paths as strings)."""
    fields = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(event).items()
    }
    return {"event": _KIND_OF[type(event)], **fields}


class EventLog(TrainCallback):
    """Appends every event as one JSON line to ``<output_dir>/logs/events.jsonl``."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        self.path = Path(output_dir) / EVENTS_FILE

    def _write(self, event: Event) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event_record(event)) + "\n")
            fh.flush()

    on_checkpoint_saved = _write
    on_validation_images_saved = _write
    on_run_finished = _write


def read_events(output_dir: str | os.PathLike[str]) -> list[Event]:
    """The events an `EventLog` wrote into `output_dir` (a half-written last line is skipped)."""
    path = Path(output_dir) / EVENTS_FILE
    if not path.is_file():
        return []
    out: list[Event] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            cls = _KINDS[record.pop("event")]
        except (json.JSONDecodeError, KeyError, AttributeError):
            continue
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs = {
            k: (Path(v) if v is not None and "Path" in str(hints.get(k)) else v)
            for k, v in record.items()
            if k in hints
        }
        out.append(cls(**kwargs))
    return out
