"""The Train tab's work: the form as a config, the image check, and the training subprocess.

The form becomes ``key=value`` overrides on a base config file (configs/demo.yaml by default), so
the page can show the equivalent ``python train.py --config … k=v …`` command, and `TrainJob` runs
exactly that (as ``python -m xti train``) in a subprocess: the page stays responsive and a crash
in training cannot take the server down. Stop sends SIGINT, the same clean stop as Ctrl-C (the
step finishes, a checkpoint and ``<name>.interrupted.xti.safetensors`` are saved). Progress comes
from the files the run writes: ``logs/metrics.jsonl`` (``tracking.report_to=jsonl``, one line per
step) and the run's events (``logs/events.jsonl``, `xti.callbacks`: each validation grid saved).
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
    """The form's values as a config file sets them (`TrainForm` field names, `CONFIG_FIELDS`)."""
    from xti.config import load_config

    cfg = load_config(str(existing_file(path, "base config")), [])
    return {
        f.name: f.from_config(functools.reduce(getattr, f.key.split("."), cfg))
        for f in FORM
        if f.from_config is not None and f.key is not None
    }


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
    items: list[tuple[str, Any]] = [("name", placeholder_stem(form.placeholder))]
    for f in FORM:
        if f.key is not None and f.to_config is not None:
            value = f.to_config(getattr(form, f.name))
            if value is not None:
                items.append((f.key, value))
    items.append(("tracking.report_to", "jsonl"))
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
        self.earlier_events = 0  # events of earlier runs in the same output folder

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
        self.started, self.stop_requested = time.time(), False
        self.earlier_events = len(read_events(self.output_dir))
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
        from xti.tracking import METRICS_FILE, read_metrics

        if self.proc is None or self.output_dir is None:
            return Progress(False, "no run yet")
        rows = read_metrics(self.output_dir / "logs" / METRICS_FILE)
        step = max((r["step"] for r in rows), default=0)
        snap = Progress(
            self.running,
            "",
            step=step,
            max_steps=self.max_steps,
            metrics=rows,
            grid=self._newest_grid(),
            log="\n".join(self.printed()),
        )
        snap.seconds_left = _seconds_left(rows, self.max_steps) if snap.running else None
        snap.state, snap.failed = self._state(step)
        return snap

    def _newest_grid(self) -> Path | None:
        """The newest validation grid this run wrote (None before the first), from its events."""
        assert self.output_dir is not None
        events = read_events(self.output_dir)[self.earlier_events :]
        grids = [e.path for e in events if isinstance(e, ValidationImagesSaved)]
        return grids[-1] if grids else None

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
            saved = self.output_dir / f"{self.name}.interrupted.xti.safetensors"  # type: ignore[operator]
            where = f": vectors saved to {saved}" if saved.is_file() else ""
            return f"stopped at step {step}{where}", False
        errors = [line[len("error: ") :] for line in lines if line.startswith("error: ")]
        last = errors[-1] if errors else (lines[-1] if lines else f"exit status {code}")
        return f"training failed: {last[:300]}", True


def _seconds_left(rows: list[dict[str, Any]], max_steps: int) -> float | None:
    """Median step time of the last 20 logged steps times the steps left."""
    times = sorted(r["step_time"] for r in rows[-20:] if isinstance(r.get("step_time"), float))
    if not times or not rows:
        return None
    return times[len(times) // 2] * max(0, max_steps - rows[-1]["step"])
