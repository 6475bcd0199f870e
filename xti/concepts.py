"""Several concepts in one run (``concepts:``): one process, one frozen UNet and text encoder(s).

This module owns the several-concept run: how a `concepts:` config becomes one run per concept
(`concept_configs`), how their steps interleave (`train_concepts`), and the run's index file
(``concepts.json``).

The rule (deterministic per ``(train.seed, step)``):

* Concept *k* is trained exactly as the one-concept run of `concept_configs`\\ ``[k]`` would be: its
  own folder ``<output_dir>/<name>/`` (embedding file, ``summary.json``, model card, validation
  grids, checkpoints, logs), its own images (``data``, the other ``data.*`` settings shared), the
  same ``train.*``, ``kde.*``, ``xti.*`` and the same seed. Its batch of a step is the one its
  one-concept run draws from ``(train.seed, step)`` (`xti.step.sample_batch`).
* Every optimizer step of the run takes one step of every concept, in list order: the step's
  batches are the concepts' batches, ``train.batch_size`` images of each; each goes through the
  shared frozen models with that concept's token embedding installed, and each concept has its
  own AdamW, schedule, gradient clipping and KDE/regulariser term (the Trainer's step, per
  concept). The batches are not concatenated into one UNet call, so that a concept's gradient,
  and therefore its vectors, are bit-identical to its one-concept run's (``tests/test_concepts.py``).
* What is shared: the model (loaded, frozen, cast and moved once), the process and its start-up.
  What is per concept: everything that is written, resume (``train.resume=latest`` resumes each
  concept from its own folder, even from different steps), the non-finite guard (a diverged
  concept stops; the others go on and export; the run then reports it and fails), SIGINT/SIGTERM
  (every concept saves a checkpoint at its step boundary and its vectors).

``concepts.json`` in ``output_dir`` lists each concept's folder, file, summary and state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xti import runs
from xti.callbacks import TrainCallback
from xti.checks import resume_checkpoint
from xti.config import ConceptConfig, ConceptEntry, Config
from xti.errors import XTIError
from xti.models import ModelBundle, load_model
from xti.paths import atomic_write_bytes
from xti.training import Trainer, TrainResult

logger = logging.getLogger("xti")

INDEX_FILE = "concepts.json"


def concept_configs(cfg: Config) -> list[Config]:
    """One one-concept config per entry of ``cfg.concepts`` (in order)."""
    if not cfg.concepts:
        raise XTIError("concepts: the config lists no concepts (use concept: for one)")
    resume = cfg.train.resume
    if resume and resume not in ("latest", "auto"):
        raise XTIError(
            f"train.resume={resume}: with concepts:, each concept resumes from its own folder; "
            "use train.resume=latest"
        )
    return [_one(cfg, entry) for entry in cfg.concepts]


def _one(cfg: Config, entry: ConceptEntry) -> Config:
    name = entry.concept_name
    concept = ConceptConfig(
        placeholder=entry.placeholder,
        initializer=entry.initializer,
        n_vectors=entry.n_vectors,
        init_from=entry.init_from,
    )
    prompts = [p for p in cfg.validation.prompts if entry.placeholder in p]
    return cfg.model_copy(
        update={
            "name": name,
            "output_dir": str(Path(cfg.output_dir).expanduser() / name),
            "concept": concept,
            "data": cfg.data.model_copy(update={"dir": entry.data, "dataset": None}),
            "validation": cfg.validation.model_copy(update={"prompts": prompts}),
            "concepts": None,
        }
    )


def precheck(configs: Sequence[Config]) -> None:
    """What can be checked of every concept before the first one claims its folder: its output
    folder (and resume checkpoint), its image folder, its start file."""
    for k, sub in enumerate(configs):
        out = Path(sub.output_dir)
        resume_from = resume_checkpoint(sub, out)
        runs.check_output_folder(
            out,
            resumed_run=resume_from.run_id if resume_from else None,
            overwrite=sub.train.overwrite,
        )
        if not Path(str(sub.data.dir)).expanduser().is_dir():
            raise XTIError(f"concepts[{k}].data: {sub.data.dir} is not a folder of images")
        start = sub.concept.init_from
        if start and not Path(start).expanduser().is_file():
            raise XTIError(f"concepts[{k}].init_from: {start} not found")


@dataclass
class ConceptsResult:
    """What a `train_concepts` call did: each concept's `TrainResult` (by name, in order), the
    concepts that diverged (name: error), the run's wall time."""

    results: dict[str, TrainResult] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    index_file: Path | None = None


def train_concepts(
    cfg: Config,
    *,
    bundle: ModelBundle | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    callbacks: Sequence[TrainCallback] = (),
) -> ConceptsResult:
    """Train every concept of ``cfg.concepts`` in this process against one loaded model (see the
    module docstring for the rule). Arguments as `xti.training.train`'s; the callbacks hear every
    concept's events (each event's paths lie in that concept's folder).

    Raises:
        XTIError: bad input (before anything is written).
        RunInterrupted: SIGINT/SIGTERM, after every concept saved its state.
    """
    t0 = time.perf_counter()
    configs = concept_configs(cfg)
    precheck(configs)
    if bundle is None:
        bundle = load_model(cfg.model)
    out = ConceptsResult()
    with contextlib.ExitStack() as stack:
        trainers = []
        for sub in configs:
            trainer = stack.enter_context(
                Trainer(
                    sub,
                    bundle=bundle,
                    progress=progress,
                    stop_at_step=stop_at_step,
                    callbacks=callbacks,
                )
            )
            trainer.setup()
            trainer.remove_training_hooks()  # installed around this concept's own steps
            trainers.append(trainer)
        stop = stack.enter_context(runs.StopSignals(defer_always=trainers[0].world > 1))
        out.failed = run_together(trainers, stop)
        for trainer in trainers:
            if trainer.name not in out.failed:
                out.results[trainer.name] = trainer.finish()
        out.seconds = time.perf_counter() - t0
        if trainers[0].is_main:
            out.index_file = write_index(Path(cfg.output_dir).expanduser(), trainers, out)
    return out


def run_together(trainers: Sequence[Trainer], stop: runs.StopSignals) -> dict[str, str]:
    """Step every concept once per round until each reached its end step; returns the concepts
    that diverged (their error). On SIGINT/SIGTERM every concept saves its state, then the
    interrupt goes on."""
    failed: dict[str, str] = {}
    with contextlib.ExitStack() as bars:
        for trainer in trainers:
            bars.enter_context(contextlib.closing(trainer.open_progress()))
        try:
            while True:
                active = [t for t in trainers if t.name not in failed and t.step < t.end_step]
                if not active:
                    return failed
                stop.enter_step()
                for trainer in active:
                    error = _step(trainer)
                    if error is not None:
                        failed[trainer.name] = error
                stop.leave_step()
                stop.check(trainers[0].accelerator)
        except KeyboardInterrupt:
            for trainer in trainers:
                trainer.bar.close()
                if trainer.name not in failed:
                    trainer.save_interrupted()
            raise


def _step(trainer: Trainer) -> str | None:
    """One step of one concept with its token embedding and processors installed; its error
    message when it diverged (non-finite loss or vectors)."""
    trainer.install_training_hooks()
    try:
        trainer.step_once()
    except XTIError as err:
        logger.error("concept %s stopped: %s", trainer.name, err)
        return str(err)
    finally:
        trainer.remove_training_hooks()
    return None


def write_index(folder: Path, trainers: Sequence[Trainer], result: ConceptsResult) -> Path:
    """``concepts.json``: per concept its folder, placeholder, file, summary and state."""
    rows: list[dict[str, Any]] = []
    for trainer in trainers:
        res = result.results.get(trainer.name)
        summary = trainer.out / "summary.json"
        rows.append(
            {
                "name": trainer.name,
                "placeholder": trainer.cfg.concept.placeholder,
                "folder": str(trainer.out),
                "output_file": str(res.output_file) if res and res.output_file else None,
                "summary_file": str(summary) if res and summary.is_file() else None,
                "steps": trainer.step,
                "final_loss": trainer.losses[-1][1] if trainer.losses else None,
                "state": "diverged"
                if trainer.name in result.failed
                else ("finished" if res and res.output_file else "stopped"),
                "error": result.failed.get(trainer.name),
            }
        )
    index = {"concepts": rows, "seconds": round(result.seconds, 2)}
    path = folder / INDEX_FILE
    atomic_write_bytes(path, json.dumps(index, indent=1).encode())
    return path


def read_index(folder: Path) -> list[dict[str, Any]]:
    """The concepts of a several-concept run's ``concepts.json`` (empty when there is none)."""
    path = folder / INDEX_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("concepts", []))
    except (OSError, ValueError, AttributeError):
        return []
