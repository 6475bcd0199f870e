"""The Train tab's work: the form as a config, the image check, and the training subprocess.

The form becomes ``key=value`` overrides on a base config file (configs/demo.yaml by default), so
the page can show the equivalent ``python train.py --config … k=v …`` command, and `TrainJob` runs
exactly that (as ``python -m xti train``) in a subprocess: the page stays responsive and a crash
in training cannot take the server down. Stop sends SIGINT, the same clean stop as Ctrl-C (the
step finishes, a checkpoint and ``<name>.interrupted.xti.safetensors`` are saved). Progress comes
from the files the run writes: ``logs/metrics.jsonl`` (``tracking.report_to=jsonl``, one line per
step) and the run's events (``logs/events.jsonl``, `xti.callbacks`: each validation grid saved).

A base config that lists several concepts (``concepts:``, `xti.concepts`) trains them all: the
form's placeholder, initializer and image folder then show its first concept and are not sent
(each concept keeps its own), and the progress reads every concept's folder (the run's step is
the slowest concept's; the loss curve has a line per concept; the grid is the newest of any).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xti.callbacks import ValidationImagesSaved, read_events
from xti.config import placeholder_stem
from xti.errors import XTIError
from xti.ui.paths import REPO_ROOT, existing_dir, existing_file, model_path, shown

GRANULARITIES = ("block", "transformer", "shared")
LOG_LINES = 400


@dataclass
class TrainForm:
    """The Train tab's fields (text as typed; numbers as Gradio gives them)."""

    config: str
    model: str
    images: str
    placeholder: str
    initializer: str
    granularity: str = "block"
    steps: float = 300
    lr: float = 0.01
    batch: float = 8
    kde_weight: float = 0.01
    prompts: str = ""
    validate_every: float = 100
    seeds: str = "0 1 2 3"
    checkpoint_every: float = 0
    output_dir: str = "outputs/ui"
    single_file_config: str = ""
    resume: bool = False
    overwrite: bool = False


def form_from_config(path: str) -> dict[str, Any]:
    """The form's values as a config file sets them (`TrainForm` field names, `CONFIG_FIELDS`);
    a several-concept config's first concept fills the concept fields."""
    from xti.config import load_config

    cfg = load_config(str(existing_file(path, "base config")), [])
    values = {
        f.name: f.from_config(functools.reduce(getattr, f.key.split("."), cfg))
        for f in FORM
        if f.from_config is not None and f.key is not None
    }
    if cfg.concepts:
        first = cfg.concepts[0]
        values.update(
            placeholder=first.placeholder, initializer=first.initializer, images=_locate(first.data)
        )
    return values


CONCEPT_KEYS = frozenset({"name", "concept.placeholder", "concept.initializer", "data.dir"})
"""The form's keys that a several-concept base config keeps per concept (not sent)."""


def base_concepts(config: str) -> list[Any]:
    """The base config's ``concepts:`` (`xti.config.ConceptEntry`), empty for a one-concept config
    or a file that does not load (the form's check reports that)."""
    from xti.config import load_config

    try:
        return list(load_config(config.strip(), []).concepts or [])
    except XTIError:
        return []


def _locate(path: str) -> str:
    """A relative path of a config as it works from here: the checkout's copy when the working
    folder has none (the shipped configs name ``data/…`` relative to the checkout)."""
    if not path or Path(path).is_absolute() or Path(path).exists():
        return path
    in_checkout = REPO_ROOT / path
    return shown(in_checkout) if in_checkout.exists() else path


def _value(v: Any) -> str:
    """A value as an override types it: plain when YAML reads it back unchanged, else JSON."""
    if isinstance(v, str):
        try:
            if yaml.safe_load(v) == v and v.strip() == v:
                return v
        except yaml.YAMLError:
            pass
    return json.dumps(v)


def _int(value: Any, what: str, minimum: int) -> int:
    """A whole number from a number field, at least `minimum`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise XTIError(f"{what}: give a number") from None
    if number != int(number) or number < minimum:
        raise XTIError(f"{what}: give a whole number >= {minimum}, got {value}")
    return int(number)


def _float(value: Any, what: str) -> float:
    """A number from a number field."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise XTIError(f"{what}: give a number") from None


def parse_seeds(text: str, what: str = "seeds") -> list[int]:
    """Whole numbers separated by spaces or commas; at least one."""
    items = [s for s in re.split(r"[\s,]+", str(text or "").strip()) if s]
    try:
        seeds = [int(s) for s in items]
    except ValueError:
        raise XTIError(f"{what}: give whole numbers separated by spaces, e.g. 0 1 2") from None
    if not seeds:
        raise XTIError(f"{what}: give at least one seed")
    return seeds


def _lines(text: str) -> list[str]:
    return [line.strip() for line in str(text or "").splitlines() if line.strip()]


@dataclass(frozen=True)
class FormField:
    """One Train-tab field and the config key it stands for: `FORM` is the one form↔config
    mapping (the overrides, the fields a base config fills, the handlers' field order)."""

    name: str  # the `TrainForm` attribute
    key: str | None  # the config key it sets (None: the base config file itself)
    to_config: Callable[[Any], Any] | None = None  # field -> override value (None: no override)
    from_config: Callable[[Any], Any] | None = None  # config value -> field (None: not filled)


def _text(value: Any) -> str:
    return str(value or "").strip()


def _same(value: Any) -> Any:
    return value


FORM: tuple[FormField, ...] = (
    FormField("config", None),
    FormField("model", "model.path", _text, _locate),
    FormField("images", "data.dir", _text, lambda v: _locate(v or "")),
    FormField("placeholder", "concept.placeholder", _text, _same),
    FormField("initializer", "concept.initializer", _text, _same),
    FormField("granularity", "xti.granularity", _same, _same),
    FormField("steps", "train.max_steps", lambda v: _int(v, "steps", 1), _same),
    FormField("lr", "train.lr", lambda v: _float(v, "lr"), _same),
    FormField("batch", "train.batch_size", lambda v: _int(v, "batch", 1), _same),
    FormField("kde_weight", "kde.weight", lambda v: _float(v, "KDE weight"), _same),
    FormField("prompts", "validation.prompts", _lines, "\n".join),
    FormField("validate_every", "validation.every", lambda v: _int(v, "validate every", 0), _same),
    FormField(
        "seeds",
        "validation.seeds",
        lambda v: parse_seeds(v, "validation seeds"),
        lambda seeds: " ".join(str(s) for s in seeds),
    ),
    FormField(
        "checkpoint_every",
        "train.checkpoint_every",
        lambda v: _int(v, "checkpoint every", 0),
        _same,
    ),
    FormField("output_dir", "output_dir", _text),
    FormField("single_file_config", "model.single_file_config", lambda v: _text(v) or None, _text),
    FormField("resume", "train.resume", lambda v: "latest" if v else None),
    FormField("overwrite", "train.overwrite", lambda v: True if v else None),
)
"""The Train tab's fields in the order the handlers receive them, each with its config key."""

FORM_FIELDS = [f.name for f in FORM]
"""`TrainForm`'s fields in the order the handlers receive them."""

CONFIG_FIELDS = [f.name for f in FORM if f.from_config is not None]
"""The fields a base config fills in (`form_from_config`)."""


def overrides(form: TrainForm) -> list[str]:
    """The form as ``key=value`` overrides of the base config (the run's name from the
    placeholder; metrics always go to jsonl, which the live loss curve reads)."""
    several = bool(base_concepts(form.config))
    items: list[tuple[str, Any]] = [("name", placeholder_stem(form.placeholder))]
    for f in FORM:
        if several and f.key in CONCEPT_KEYS:
            continue
        if f.key is not None and f.to_config is not None:
            value = f.to_config(getattr(form, f.name))
            if value is not None:
                items.append((f.key, value))
    items.append(("tracking.report_to", "jsonl"))
    if several:
        items = [(k, v) for k, v in items if k not in CONCEPT_KEYS]
    return [f"{key}={_value(value)}" for key, value in items]


def command_line(form: TrainForm) -> str:
    """The equivalent shell command (``python train.py --config FILE k=v …``)."""
    args = ["python", "train.py", "--config", form.config.strip(), *overrides(form)]
    return " ".join(shlex.quote(a) for a in args)


def checked_config(form: TrainForm) -> Any:
    """The run's `xti.config.Config` (every key checked, one line on a problem), after checking
    that the model, image folder and base config exist."""
    from xti.config import load_config

    existing_file(form.config, "base config")
    model_path(form.model)
    if not base_concepts(form.config):
        existing_dir(form.images, "image folder")
    return load_config(form.config.strip(), overrides(form))


@dataclass
class ImageCheck:
    """What `check_images` found: thumbnails with captions, and the verdict in one line."""

    thumbnails: list[tuple[Any, str]]
    message: str


def check_images(folder: str, placeholder: str, template: str = "object") -> ImageCheck:
    """Load a folder's images as training will (`xti.data.load_images`) and check that every
    caption names the placeholder; raises `XTIError` (one line) when training would refuse."""
    from xti.config import DataConfig
    from xti.data import check_captions, load_images

    path = existing_dir(folder, "image folder")
    records = load_images(DataConfig(dir=str(path)))
    check_captions(records, placeholder.strip())
    thumbs = []
    for rec in records:
        img = rec.image.copy()
        img.thumbnail((256, 256))
        caption = rec.caption if rec.caption is not None else f"(no caption: {template} templates)"
        thumbs.append((img, f"{Path(rec.source).name}: {caption}"))
    captioned = sum(r.caption is not None for r in records)
    message = f"{len(records)} images, {captioned} with captions"
    if captioned:
        message += f"; every caption contains {placeholder.strip()}"
    if captioned < len(records):
        message += f"; the others use the {template} templates"
    return ImageCheck(thumbs, message)


# ----------------------------------------------------------------------------- the subprocess


@dataclass
class Progress:
    """A snapshot of a run for the page."""

    running: bool
    state: str
    step: int = 0
    max_steps: int = 0
    seconds_left: float | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    grid: Path | None = None
    log: str = ""
    failed: bool = False


class TrainJob:
    """One training subprocess at a time: start, stop (SIGINT), and progress from its files."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.lines: deque[str] = deque(maxlen=LOG_LINES)
        self._lines_lock = threading.Lock()
        self.output_dir: Path | None = None
        self.name = ""
        self.max_steps = 0
        self.started = 0.0
        self.stop_requested = False
        self.concepts: list[tuple[str, Path]] = []  # (name, folder) of each concept of the run
        self.earlier_events: dict[Path, int] = {}  # per folder, events of earlier runs in it

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, form: TrainForm) -> str:
        """Check the form and start ``python -m xti train`` with it; returns the command line."""
        if self.running:
            raise XTIError("a run is going: stop it first (one run at a time)")
        cfg = checked_config(form)
        argv = [sys.executable, "-m", "xti", "train", "--no-progress", "--config"]
        argv += [form.config.strip(), *overrides(form)]
        # unbuffered lines for the page; no loading progress bars in them
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        with self._lines_lock:
            self.lines.clear()
        self.output_dir = Path(cfg.output_dir).expanduser()
        self.name, self.max_steps = cfg.concept_name, cfg.train.max_steps
        self.concepts = concept_folders(cfg)
        self.started, self.stop_requested = time.time(), False
        self.earlier_events = {f: len(read_events(f)) for _, f in self.concepts}
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
            start_new_session=True,  # Ctrl-C in the server's terminal is the server's
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return command_line(form)

    def _read(self, proc: subprocess.Popen[str]) -> None:
        """Keep the last lines the subprocess prints."""
        assert proc.stdout is not None
        for line in proc.stdout:
            with self._lines_lock:
                self.lines.append(line.rstrip("\n"))

    def printed(self) -> list[str]:
        """The lines the run printed so far (the last `LOG_LINES`)."""
        with self._lines_lock:
            return list(self.lines)

    def stop(self) -> str:
        """Ask the run to stop after its current step (SIGINT, as Ctrl-C)."""
        if not self.running:
            return "no run is going"
        assert self.proc is not None
        self.stop_requested = True
        with contextlib.suppress(ProcessLookupError):  # it ended just now
            self.proc.send_signal(signal.SIGINT)
        return "stopping after this step: a checkpoint and the vectors are being saved"

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop a running run cleanly and wait for it (the server is closing)."""
        if self.running:
            self.stop()
            assert self.proc is not None
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def progress(self) -> Progress:
        """Where the run is: metrics so far, the newest validation grid, time left, its state."""
        if self.proc is None or self.output_dir is None:
            return Progress(False, "no run yet")
        per_concept = concept_metrics(self.concepts)
        rows = [r for _, concept_rows in per_concept for r in concept_rows]
        step = min(max((r["step"] for r in cr), default=0) for _, cr in per_concept)
        snap = Progress(
            self.running,
            "",
            step=step,
            max_steps=self.max_steps,
            metrics=rows,
            grid=self._newest_grid(),
            log="\n".join(self.printed()),
        )
        if snap.running:
            left = [_seconds_left(cr, self.max_steps) for _, cr in per_concept]
            snap.seconds_left = None if None in left else sum(x for x in left if x is not None)
        snap.state, snap.failed = self._state(step)
        return snap

    def _newest_grid(self) -> Path | None:
        """The newest validation grid this run wrote (None before the first), from its events."""
        grids = [
            e.path
            for _, folder in self.concepts
            for e in read_events(folder)[self.earlier_events.get(folder, 0) :]
            if isinstance(e, ValidationImagesSaved)
        ]
        newest = max(enumerate(grids), key=lambda ig: (_mtime(ig[1]), ig[0]), default=None)
        return newest[1] if newest else None

    def _state(self, step: int) -> tuple[str, bool]:
        """One line for the run's state, and whether it failed."""
        assert self.proc is not None
        code = self.proc.poll()
        if code is None:
            if self.stop_requested:
                return "stopping after this step…", False
            if step == 0:
                return "starting: loading the model and the images…", False
            return f"training: step {step} of {self.max_steps}", False
        lines = [line for line in self.printed() if line.strip()]
        if code == 0:
            wrote = [line for line in lines if line.startswith("wrote ")]
            return "; ".join(wrote) or "finished", False
        if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            saved = [f / f"{n}.interrupted.xti.safetensors" for n, f in self.concepts]
            saved = [str(f) for f in saved if f.is_file()]
            where = f": vectors saved to {', '.join(saved)}" if saved else ""
            return f"stopped at step {step}{where}", False
        errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
        last = errors[-1] if errors else (lines[-1] if lines else f"exit status {code}")
        return f"training failed: {last[:300]}", True


def concept_folders(cfg: Any) -> list[tuple[str, Path]]:
    """``(name, folder)`` of each concept a config trains: its output folder for one concept,
    ``<output_dir>/<name>`` for each of several (`xti.concepts`)."""
    out = Path(cfg.output_dir).expanduser()
    if not cfg.concepts:
        return [(cfg.concept_name, out)]
    return [(c.concept_name, out / c.concept_name) for c in cfg.concepts]


def concept_metrics(concepts: list[tuple[str, Path]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Each concept's metrics rows (``logs/metrics.jsonl``); with several concepts each row
    also names its ``concept``."""
    from xti.tracking import METRICS_FILE, read_metrics

    out = []
    for name, folder in concepts:
        rows = read_metrics(folder / "logs" / METRICS_FILE)
        if len(concepts) > 1:
            rows = [{**r, "concept": name} for r in rows]
        out.append((name, rows))
    return out


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _seconds_left(rows: list[dict[str, Any]], max_steps: int) -> float | None:
    """Median step time of the last 20 logged steps times the steps left."""
    times = sorted(r["step_time"] for r in rows[-20:] if isinstance(r.get("step_time"), float))
    if not times or not rows:
        return None
    return times[len(times) // 2] * max(0, max_steps - rows[-1]["step"])
