"""A run's typed events: what the callbacks hear, the events log, and the UI reading grids from it."""

from __future__ import annotations

from pathlib import Path

from xti import runs
from xti.callbacks import (
    CheckpointSaved,
    EventLog,
    RunFinished,
    TrainCallback,
    ValidationImagesSaved,
    read_events,
)
from xti.config import load_config
from xti.training import train
from xti.ui.train import TrainJob

REPO = Path(__file__).parents[1]


class Recorder(TrainCallback):
    def __init__(self) -> None:
        self.events: list = []

    def on_checkpoint_saved(self, event: CheckpointSaved) -> None:
        assert (event.path / runs.STATE_FILE).is_file()  # complete on disk when told
        self.events.append(event)

    def on_validation_images_saved(self, event: ValidationImagesSaved) -> None:
        assert event.path.is_file()  # complete on disk when told
        self.events.append(event)

    def on_run_finished(self, event: RunFinished) -> None:
        self.events.append(event)


def test_callbacks_hear_checkpoints_grids_and_the_end(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        None,
        [
            f"model.path={tiny_model}",
            f"data.dir={REPO / 'data' / 'tiny-concept'}",
            f"output_dir={out}",
            "concept.placeholder=<box>",
            "concept.initializer=box",
            "train.resolution=32",
            "train.batch_size=1",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "validation.every=2",
            "validation.seeds=[0]",
            "validation.prompts=[a <box>]",
            "validation.num_inference_steps=1",
            "tracking.report_to=none",
        ],
    )
    recorder = Recorder()
    result = train(cfg, progress=False, callbacks=[recorder])
    kinds = [(type(e).__name__, getattr(e, "step", None)) for e in recorder.events]
    assert kinds == [
        ("ValidationImagesSaved", 2),
        ("CheckpointSaved", 2),
        ("ValidationImagesSaved", 4),
        ("CheckpointSaved", 4),
        ("RunFinished", None),
    ]
    grids = [e.path for e in recorder.events if isinstance(e, ValidationImagesSaved)]
    assert grids[-1] == result.samples_file
    checkpoints = [e.path for e in recorder.events if isinstance(e, CheckpointSaved)]
    assert checkpoints[-1].name == "step-000004" and checkpoints[-1].is_dir()
    end = recorder.events[-1]
    assert end.steps == 4 and end.output_file == result.output_file
    assert end.summary_file == out / "summary.json" and end.summary_file.is_file()
    # the events log (the trainer always keeps one) holds the same events
    assert read_events(out) == recorder.events


def test_the_ui_takes_the_newest_grid_of_its_own_run_from_the_events(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.on_validation_images_saved(ValidationImagesSaved(5, tmp_path / "earlier-run.png"))
    job = TrainJob()
    job.output_dir = tmp_path
    job.concepts = [("c", tmp_path)]
    job.earlier_events = {tmp_path: len(read_events(tmp_path))}
    assert job._newest_grid() is None  # an earlier run's grid is not this run's
    log.on_checkpoint_saved(CheckpointSaved(2, tmp_path / "checkpoints" / "step-000002"))
    log.on_validation_images_saved(ValidationImagesSaved(2, tmp_path / "a.png"))
    log.on_validation_images_saved(ValidationImagesSaved(4, tmp_path / "b.png"))
    with (tmp_path / "logs" / "events.jsonl").open("a") as fh:
        fh.write('{"event": "validation_images_saved", "st')  # a line being written
    assert job._newest_grid() == tmp_path / "b.png"
