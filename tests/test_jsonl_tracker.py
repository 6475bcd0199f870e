"""`tracking.report_to=jsonl`: the `JsonlTracker` appends each ``accelerator.log`` as one JSON
line to ``<output_dir>/logs/metrics.jsonl`` (what the web UI's live loss curve reads), and
`read_metrics` reads it back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from xti.config import load_config
from xti.errors import XTIError
from xti.tracking import METRICS_FILE, JsonlTracker, read_metrics, setup_tracking


def test_lines_hold_numbers_and_strings(tmp_path: Path) -> None:
    tracker = JsonlTracker(tmp_path)
    tracker.log(
        {
            "loss": 0.5,
            "lr": torch.tensor(1e-3),
            "grad_norm": np.float32(2.5),
            "steps": 3,
            "kde": float("nan"),
            "note": "warm-up",
            "table": [1, 2],  # not a scalar: left out
        },
        step=7,
    )
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert len(lines) == 1
    row = json.loads(lines[0])  # strict JSON: NaN became null
    assert row == {
        "step": 7,
        "loss": 0.5,
        "lr": pytest.approx(1e-3),
        "grad_norm": 2.5,
        "steps": 3,
        "kde": None,
        "note": "warm-up",
    }


def test_folder_from_run_config_new_run_starts_afresh_resume_appends(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = out / "logs" / METRICS_FILE
    path.parent.mkdir(parents=True)
    path.write_text('{"step": 99, "loss": 9.0}\n')  # an earlier run's
    first = JsonlTracker()
    first.store_init_configuration({"output_dir": str(out), "train.resume": None})
    assert first.tracker == path and path.read_text() == ""
    for step in (1, 2, 3):
        first.log({"loss": 1.0 / step}, step=step)
    resumed = JsonlTracker()
    resumed.store_init_configuration({"output_dir": str(out), "train.resume": "latest"})
    resumed.log({"loss": 0.25}, step=3)  # the resumed run repeats step 3
    resumed.log({"loss": 0.2}, step=4)
    with path.open("a") as fh:
        fh.write('{"step": 5, "lo')  # a line being written right now
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 0.25, 0.2]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_without_a_folder_it_says_so(tmp_path: Path) -> None:
    with pytest.raises(XTIError, match="no output_dir"):
        JsonlTracker().log({"loss": 1.0}, step=1)


def test_accelerate_logs_into_it(tmp_path: Path) -> None:
    from accelerate import Accelerator

    cfg = load_config(None, [f"output_dir={tmp_path}", "tracking.report_to=jsonl"])
    assert cfg.tracking.report_to == "jsonl"
    log_with = setup_tracking(cfg.tracking.report_to)
    assert isinstance(log_with, JsonlTracker)
    accelerator = Accelerator(log_with=log_with)
    try:
        # as training calls it: the flattened config, wandb keyword arguments for wandb only
        accelerator.init_trackers(
            "xti", config={"output_dir": str(tmp_path)}, init_kwargs={"wandb": {"name": "x"}}
        )
        for step in range(1, 4):
            accelerator.log({"loss": math.exp(-step), "lr": 0.01}, step=step)
        assert [t.name for t in accelerator.trackers] == ["jsonl"]
        accelerator.end_training()
    finally:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    rows = read_metrics(tmp_path / "logs" / METRICS_FILE)
    assert [(r["step"], r["loss"]) for r in rows] == [(s, math.exp(-s)) for s in (1, 2, 3)]


def test_report_to_rejects_other_words() -> None:
    with pytest.raises(XTIError, match="report_to"):
        load_config(None, ["tracking.report_to=csv"])
