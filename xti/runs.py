"""What makes a run trustworthy on disk: its identity, its output folder, its checkpoints, its stop.

This module owns:

* **Run identity.** Every run has a random ``run_id`` (kept when it is resumed) and a fingerprint
  (`run_fingerprint`): placeholder, n_vectors, granularity, model family, a digest of the model's
  weights and its text-encoder vocabulary size, the training scheduler's settings (prediction type,
  noise schedule), seed, effective batch, lr and schedule, and what else shapes the objective
  (``kde.*``, ``train.snr_gamma``, ``train.noise_offset``). Each
  checkpoint carries both; `compare_fingerprints` refuses a resume whose fingerprint differs,
  naming the fields (``train.resume_force=true`` accepts it and logs the difference).
* **The output folder.** `check_output_folder` (before anything loads) refuses a folder that is a
  file, cannot be created, is in use by another run, or holds another run's results (unless
  ``train.overwrite=true`` or this run is resumed there). `OutputLock` holds ``.xti.lock``
  (``flock``: released when the process ends, even on ``kill -9``); `write_owner` records the run
  in ``xti-run.json``; `remove_stale_tmp` deletes temporary files of killed writes.
* **Checkpoints without pickle.** ``checkpoints/step-NNNNNN/`` holds ``vectors.safetensors``,
  ``optimizer.safetensors`` (AdamW state tensors) and ``xti_state.json`` (step, run id,
  fingerprint, config, scheduler position, optimizer hyper-parameters, grad-scaler state). Nothing
  else in the folder is ever read. Random state is not saved: every draw of a step is a function of
  ``(seed, micro-step)`` (`xti.step.step_generator`). A checkpoint is written into
  ``step-NNNNNN.tmp/`` and renamed, so it is complete or absent. `latest_checkpoint` and
  `prune_checkpoints` only consider checkpoints of one run, ordered by step number.
* **Stop signals.** `StopSignals` turns SIGINT and SIGTERM into `RunInterrupted` at the next step
  boundary (so a checkpoint can be written from consistent state); a second signal stops at once
  (a repeated SIGTERM does not: a scheduler and a launcher both deliver it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xti.errors import XTIError
from xti.families import named
from xti.paths import atomic_tmp_pattern, check_output_dir

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("xti")

CHECKPOINT_FORMAT = 1
CHECKPOINTS = "checkpoints"
STATE_FILE = "xti_state.json"
VECTORS_FILE = "vectors.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OWNER_FILE = "xti-run.json"
LOCK_FILE = ".xti.lock"

DECAYING_SCHEDULES = frozenset({"linear", "cosine", "cosine_with_restarts", "polynomial"})
"""Schedules whose lr at a step depends on ``train.max_steps`` (part of the fingerprint then)."""

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_TMP = re.compile(r"^step-\d+\.tmp$")
_ATOMIC_TMP = atomic_tmp_pattern()

_LABELS = {"batch": "effective batch (train.batch_size × gradient_accumulation_steps × processes)"}


def new_run_id() -> str:
    """A new random run id (32 hex digits)."""
    return uuid.uuid4().hex


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- identity


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes()


def model_identity(bundle: Any) -> dict[str, Any]:
    """The base model's part of the fingerprint: family, a weight digest, vocabulary sizes.

    The digest covers every text encoder's token-embedding table (a fixed sample of ≤ 4,096 rows)
    and the UNet's first and last convolutions, so two models of the same shape differ. Call it
    before the models are cast to a lower precision.
    """
    h = hashlib.blake2b(digest_size=12)
    vocab: dict[str, int] = {}
    for part in bundle.text_encoders:
        name, table = part.name, part.text_encoder.get_input_embeddings().weight
        vocab[name] = int(table.shape[0])
        h.update(f"{name}:{tuple(table.shape)}".encode())
        h.update(_tensor_bytes(table[:: max(1, table.shape[0] // 4096)]))
    for part in ("conv_in", "conv_out"):
        module = getattr(bundle.unet, part, None)
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor):
            h.update(f"{part}:{tuple(weight.shape)}".encode())
            h.update(_tensor_bytes(weight))
    return {
        "model.family": bundle.family.name,
        "model.weights": h.hexdigest(),
        "model.vocab_size": vocab,
        **scheduler_identity(bundle.noise_scheduler),
    }


SCHEDULER_KEYS = (
    "prediction_type",
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "rescale_betas_zero_snr",
)
"""Training-scheduler settings that change the objective (the target and the noise levels)."""


def scheduler_identity(scheduler: Any) -> dict[str, Any]:
    """The training scheduler's part of the fingerprint: ``scheduler.<key>`` for `SCHEDULER_KEYS`
    (and a digest of ``trained_betas`` when the config lists them)."""
    config = scheduler.config
    out = {f"scheduler.{key}": config.get(key) for key in SCHEDULER_KEYS}
    betas = config.get("trained_betas")
    if betas is not None:
        digest = hashlib.blake2b(json.dumps(list(betas)).encode(), digest_size=8).hexdigest()
        out["scheduler.trained_betas"] = digest
    return out


def effective_lr(train_cfg: Any, world: int) -> float:
    """``train.lr``, times batch size, accumulation and processes when ``train.scale_lr``."""
    tc = train_cfg
    return tc.lr * (tc.batch_size * tc.gradient_accumulation_steps * world if tc.scale_lr else 1)


def run_fingerprint(cfg: Any, identity: dict[str, Any], *, world: int) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run (a flat, JSON-ready dict)."""
    tc = cfg.train
    fp: dict[str, Any] = {
        "concept.placeholder": cfg.concept.placeholder,
        "concept.n_vectors": cfg.concept.n_vectors,
        "xti.granularity": cfg.xti.granularity,
        **identity,
        "train.seed": tc.seed,
        "batch": tc.batch_size * tc.gradient_accumulation_steps * world,
        "train.lr": effective_lr(tc, world),
        "train.lr_scheduler": tc.lr_scheduler,
        "train.lr_warmup_steps": tc.lr_warmup_steps,
        "train.snr_gamma": tc.snr_gamma,
        "train.noise_offset": tc.noise_offset,
        **{f"kde.{key}": value for key, value in cfg.kde.model_dump().items()},
    }
    # Settings added with the regulariser choice (issue 21) enter only when they differ from their
    # defaults, so that checkpoints written before them still match a run with the same config.
    for key, default in (("bandwidth_scale", 1.0), ("layer_weights", {})):
        if getattr(cfg.kde, key) == default:
            fp.pop(f"kde.{key}")
    if cfg.regularizer.kind != "kde":
        reg = cfg.regularizer.model_dump()
        fp["regularizer.kind"] = reg["kind"]
        if reg["kind"] in ("norm", "init_pull"):
            fp.update({f"regularizer.{reg['kind']}.{k}": v for k, v in reg[reg["kind"]].items()})
    if named(identity["model.family"]).has_pool_slot:
        fp["xti.pooled"] = cfg.xti.pooled
    if tc.lr_scheduler in DECAYING_SCHEDULES:
        fp["train.max_steps"] = tc.max_steps
    fp.update(data_fingerprint(cfg.data))
    return json.loads(json.dumps(fp))  # exactly what a checkpoint will hold


def data_fingerprint(data: Any) -> dict[str, Any]:
    """The bucket and mask settings (`xti.buckets`, `xti.masks`), when on: they decide which
    latents and loss weights a step draws. Off, nothing (fingerprints from before are unchanged)."""
    fp: dict[str, Any] = {}
    if data.buckets:
        fp.update(
            {f"data.{k}": getattr(data, k) for k in ("buckets", "bucket_step", "bucket_max_aspect")}
        )
    if data.masks:
        fp.update({"data.masks": True, "data.mask_floor": data.mask_floor})
    return fp


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``"field: saved → current"`` for every field that differs (missing counts as differing)."""
    out = []
    for key in list(dict.fromkeys([*saved, *current])):
        a, b = saved.get(key, "(none)"), current.get(key, "(none)")
        if a != b:
            out.append(f"{_LABELS.get(key, key)}: {a} → {b}")
    return out


def compare_fingerprints(ckpt: Checkpoint, current: dict[str, Any], *, force: bool) -> None:
    """Refuse to resume `ckpt` into a run with another fingerprint (log it when `force`)."""
    diffs = fingerprint_differences(ckpt.fingerprint, current)
    if not diffs:
        return
    listed = "; ".join(diffs)
    if force:
        logger.warning("train.resume_force: resuming %s despite: %s", ckpt.path, listed)
        return
    raise XTIError(
        f"train.resume: checkpoint {ckpt.path} belongs to another run configuration ({listed}); "
        "use the settings it was trained with, start a new run, or set train.resume_force=true "
        "to continue it with the new settings"
    )


# ----------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A complete checkpoint folder and its parsed ``xti_state.json``."""

    path: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def run_id(self) -> str:
        return str(self.state["run_id"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self.state["fingerprint"])


def _read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise XTIError(
            f"{file}: checkpoint state is unreadable ({_one_line(err)}); resume from an earlier "
            "checkpoint with train.resume=<its folder>, or delete this one"
        ) from None
    if not isinstance(state, dict):
        raise XTIError(f"{file}: checkpoint state is not a JSON object; delete this checkpoint")
    return state


def _is_current_format(state: dict[str, Any]) -> bool:
    return state.get("format") == CHECKPOINT_FORMAT


_STATE_KEYS = {
    "step": int,
    "run_id": str,
    "fingerprint": dict,
    "shape": dict,
    "scheduler": dict,
    "optimizer": dict,
}


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and check a checkpoint folder (state JSON and that its tensor files exist).

    Raises:
        XTIError: one line naming the folder or file: not a folder, no or corrupt state, an older
            format (which held pickles: never loaded), a missing tensor file.
    """
    p = Path(path)
    if not p.is_dir():
        raise XTIError(f"train.resume: {p} is not a checkpoint folder")
    if not (p / STATE_FILE).is_file():
        raise XTIError(f"train.resume: {p} is not a complete xti checkpoint (no {STATE_FILE})")
    state = _read_state(p)
    if not _is_current_format(state):
        raise XTIError(
            f"train.resume: {p} is not an xti checkpoint of format {CHECKPOINT_FORMAT} (older xti "
            "versions saved pickles, which this version never loads); start a new run"
        )
    for key, kind in _STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise XTIError(f"{p / STATE_FILE}: field {key!r} is missing or not a {kind.__name__}")
    for name in (VECTORS_FILE, OPTIMIZER_FILE):
        if not (p / name).is_file():
            raise XTIError(
                f"train.resume: checkpoint {p} lacks {name}; resume from an earlier checkpoint "
                "with train.resume=<its folder>, or delete this one"
            )
    return Checkpoint(p, state)


def checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of the complete-looking ``step-N`` folders in `folder`, by step."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def run_checkpoints(folder: Path, run_id: str) -> list[Checkpoint]:
    """The checkpoints of run `run_id` in `folder` (``…/checkpoints``), ordered by step number.

    Checkpoints of other runs and of older xti versions are ignored; a checkpoint whose state
    cannot be read at all is an error (it cannot be told apart).
    """
    out = []
    for _, p in checkpoint_folders(folder):
        state = _read_state(p)
        if _is_current_format(state) and state.get("run_id") == run_id:
            out.append(Checkpoint(p, state))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(folder: Path, run_id: str) -> Path | None:
    """The checkpoint of run `run_id` with the highest step in `folder`, or None."""
    mine = run_checkpoints(folder, run_id)
    return mine[-1].path if mine else None


def prune_checkpoints(folder: Path, run_id: str, keep: int | None) -> list[Path]:
    """Delete all but the `keep` highest-step checkpoints of run `run_id`; return those deleted."""
    if not keep:
        return []
    mine = run_checkpoints(folder, run_id)
    gone = [c.path for c in mine[: max(0, len(mine) - keep)]]
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


def _json_ready(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_json_ready(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def save_checkpoint(
    folder: Path,
    *,
    step: int,
    run_id: str,
    fingerprint: dict[str, Any],
    config: dict[str, Any],
    module: torch.nn.Module,
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any = None,
) -> Path:
    """Write ``folder/step-NNNNNN/`` (safetensors + JSON only), atomically by renaming a ``.tmp``
    folder. Call it on the main process only."""
    from safetensors.torch import save as st_save

    from xti.paths import atomic_write_bytes

    final = folder / f"step-{step:06d}"
    tmp = folder / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)

    vectors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    atomic_write_bytes(tmp / VECTORS_FILE, st_save(vectors, metadata={"xti.checkpoint": "1"}))

    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars[f"{index}.{key}"] = _json_ready(value)
    atomic_write_bytes(tmp / OPTIMIZER_FILE, st_save(tensors, metadata={"xti.checkpoint": "1"}))

    state = {
        "format": CHECKPOINT_FORMAT,
        "run_id": run_id,
        "step": int(step),
        "shape": {k: list(v.shape) for k, v in vectors.items()},
        "fingerprint": fingerprint,
        "config": config,
        "scheduler": {
            "last_epoch": int(lr_scheduler.last_epoch),
            "_step_count": int(getattr(lr_scheduler, "_step_count", 0)),
        },
        "optimizer": {
            "param_groups": _json_ready(opt["param_groups"]),
            "scalars": scalars,
        },
        "scaler": _json_ready(scaler.state_dict()) if scaler is not None else None,
        "written": _now(),
    }
    atomic_write_bytes(tmp / STATE_FILE, json.dumps(state, indent=1).encode())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # safetensors raises its own error types
        raise XTIError(
            f"{file}: not a valid safetensors file ({_one_line(err)}); resume from an earlier "
            "checkpoint with train.resume=<its folder>"
        ) from None


def load_checkpoint(
    ckpt: Checkpoint, *, module: torch.nn.Module, optimizer: Any, lr_scheduler: Any, scaler: Any
) -> int:
    """Load a checkpoint's vectors, AdamW state, scheduler position and grad-scaler state.

    Reads only ``vectors.safetensors``, ``optimizer.safetensors`` and ``xti_state.json``. The
    optimizer's hyper-parameters and the schedule's base lr stay those of the current config (equal
    unless the resume was forced); the lr is recomputed at the checkpoint's step. Returns the step.
    """
    vectors = _read_tensors(ckpt.path / VECTORS_FILE)
    own = module.state_dict()
    if {k: list(v.shape) for k, v in vectors.items()} != {k: list(v.shape) for k, v in own.items()}:
        raise XTIError(
            f"train.resume: checkpoint {ckpt.path} holds vectors of shape "
            f"{ {k: list(v.shape) for k, v in vectors.items()} }, this config makes "
            f"{ {k: list(v.shape) for k, v in own.items()} }"
        )
    for key, t in vectors.items():
        if not torch.isfinite(t).all():
            raise XTIError(f"{ckpt.path / VECTORS_FILE}: {key} holds non-finite values")
    with torch.no_grad():
        for key, param in module.named_parameters():
            param.copy_(vectors[key].to(device=param.device, dtype=param.dtype))

    saved = _read_tensors(ckpt.path / OPTIMIZER_FILE)
    sd = optimizer.state_dict()
    params = [i for group in sd["param_groups"] for i in group["params"]]
    flat = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, Any]] = {}
    entries = list(saved.items()) + list(ckpt.state["optimizer"].get("scalars", {}).items())
    for key, value in entries:
        index, _, name = key.partition(".")
        if not index.isdigit() or int(index) not in params or not name:
            raise XTIError(f"{ckpt.path / OPTIMIZER_FILE}: unexpected entry {key!r}")
        state.setdefault(int(index), {})[name] = value
    for index, entries_ in state.items():
        param = flat[params.index(index)]
        for name in ("exp_avg", "exp_avg_sq"):
            t = entries_.get(name)
            if isinstance(t, torch.Tensor) and t.shape != param.shape:
                raise XTIError(
                    f"{ckpt.path / OPTIMIZER_FILE}: {index}.{name} has shape {list(t.shape)}, "
                    f"the vectors {list(param.shape)}"
                )
    sd["state"] = state
    optimizer.load_state_dict(sd)

    sched = ckpt.state["scheduler"]
    lr_scheduler.last_epoch = int(sched["last_epoch"])
    lr_scheduler._step_count = int(sched["_step_count"])
    lambdas = getattr(lr_scheduler, "lr_lambdas", None)
    if lambdas is None:
        raise XTIError(f"train.lr_scheduler: {type(lr_scheduler).__name__} cannot be resumed")
    lrs = [
        base * fn(lr_scheduler.last_epoch)
        for fn, base in zip(lambdas, lr_scheduler.base_lrs, strict=True)
    ]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    lr_scheduler._last_lr = list(lrs)

    scaler_state = ckpt.state.get("scaler")
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    return ckpt.step


# ----------------------------------------------------------------------------- output folder


def read_owner(out: Path) -> dict[str, Any] | None:
    """The run recorded in ``out/xti-run.json`` ({} when unreadable, None when absent)."""
    file = out / OWNER_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def write_owner(out: Path, info: dict[str, Any]) -> None:
    """Record this run as the owner of `out` (atomically)."""
    from xti.paths import atomic_write_bytes

    atomic_write_bytes(out / OWNER_FILE, json.dumps(info, indent=1).encode())


def result_files(out: Path) -> list[str]:
    """What in `out` is a run's result: embedding files, summary, checkpoints, snapshots."""
    if not out.is_dir():
        return []
    found = sorted(p.name for p in out.glob("*.xti.safetensors") if p.is_file())
    if (out / "summary.json").is_file():
        found.append("summary.json")
    for sub in (CHECKPOINTS, "snapshots"):
        folder = out / sub
        if folder.is_dir() and any(not n.name.endswith(".tmp") for n in folder.iterdir()):
            found.append(f"{sub}/")
    return found


def check_output_folder(out: Path, *, resumed_run: str | None, overwrite: bool) -> None:
    """Fail fast when `out` cannot be this run's folder (nothing is created).

    `out` must be a folder or creatable, not locked by a running xti, and hold no other run's
    results, unless `overwrite` or it is the folder of `resumed_run`.
    """
    check_output_dir(out, "output_dir")
    probe_lock(out)
    results = result_files(out)
    if not results:
        return
    owner = read_owner(out)
    if resumed_run is not None and owner and owner.get("run_id") == resumed_run:
        return
    shown = ", ".join(results[:4]) + (", ..." if len(results) > 4 else "")
    if overwrite:
        logger.warning(
            "train.overwrite: replacing the results of another run in %s (%s)", out, shown
        )
        return
    raise XTIError(
        f"output_dir {out} holds another run's results ({shown}); choose another output_dir, "
        "continue that run with train.resume=latest, or set train.overwrite=true to replace them"
    )


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or not info:
        return "another xti run"
    return f"xti run {info.get('run_id', '?')[:8]} (pid {info.get('pid')} on {info.get('host')}, since {info.get('started')})"


def _in_use(folder: Path, fd: int) -> XTIError:
    return XTIError(
        f"output_dir {folder} is in use by {_holder(fd)}; wait for it to end, or choose another "
        "output_dir"
    )


def probe_lock(folder: Path) -> None:
    """Fail when another process holds `folder`'s lock (nothing is created)."""
    path = folder / LOCK_FILE
    if fcntl is None or not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _in_use(folder, fd) from None
            return
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class OutputLock:
    """An exclusive lock on an output folder (``.xti.lock``), held until `release`.

    ``flock`` locks die with their process, so a killed run never leaves a stale lock; the file
    holds the holder's run id, pid, host and start time for the message a second run prints.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, info: dict[str, Any]) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                exc = _in_use(self.folder, fd) if err.errno != errno.ENOLCK else None
                os.close(fd)
                if exc is None:
                    logger.warning("%s: file locking is not supported here; not locked", self.path)
                    return
                raise exc from None
            # A previous holder may have removed the file between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def lock_info(run_id: str) -> dict[str, Any]:
    """Who holds a lock: run id, pid, host, start time."""
    return {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "started": _now()}


def remove_stale_tmp(out: Path) -> list[Path]:
    """Delete temporary files and checkpoint folders left by killed writes in `out`.

    Only xti's own temporary names are touched (``.<name>.<12 hex>.tmp`` files of atomic writes in
    the folder, ``snapshots/``, ``validation/``; ``checkpoints/step-N.tmp/`` folders). Call it
    while holding the folder's lock.
    """
    removed = []
    for sub in (out, out / "snapshots", out / "validation", out / CHECKPOINTS):
        if not sub.is_dir():
            continue
        for p in sub.iterdir():
            if p.is_file() and _ATOMIC_TMP.match(p.name):
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
            elif sub.name == CHECKPOINTS and p.is_dir() and _STEP_TMP.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    if removed:
        logger.info("removed %d temporary file(s) of interrupted writes in %s", len(removed), out)
    return removed


# ----------------------------------------------------------------------------- signals


class RunInterrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT or SIGTERM) at a step boundary."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        """The conventional exit status: 128 + signal number (130 SIGINT, 143 SIGTERM)."""
        return 128 + self.signum


class StopSignals:
    """Turn SIGINT and SIGTERM into `RunInterrupted` at a step boundary while installed.

    Between `enter_step` and `leave_step` a first signal is only recorded, and `check` raises it
    after the step; outside a step it raises at once (unless `defer_always`, used with several
    processes, where `check` agrees on the stop across ranks so that all stop at the same step). A
    second signal raises at once, except a repeated SIGTERM (schedulers and launchers deliver the
    same SIGTERM more than once; SIGKILL after their grace period is their escalation). Handlers
    are installed only in the main thread, and the previous ones are restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, *, defer_always: bool = False) -> None:
        self.defer_always = defer_always
        self.requested: int | None = None
        self.in_step = False
        self.at_boundary = False  # set when `check` stopped the run (state is between steps)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        first = self.requested is None
        if first:
            self.requested = signum
        elif signum == self.requested == signal.SIGTERM:
            # The same request again, not an escalation: Slurm signals every process of a job
            # step and a launcher in the step (torchrun, accelerate) forwards it to its workers.
            return
        if first and (self.in_step or self.defer_always):
            logger.warning(
                "%s received: stopping after this step (%s to stop at once)",
                signal.Signals(signum).name,
                "SIGINT" if signum == signal.SIGTERM else "send it again",
            )
            return
        raise RunInterrupted(signum)

    def enter_step(self) -> None:
        self.in_step = True

    def leave_step(self) -> None:
        self.in_step = False

    def check(self, accelerator: Any = None) -> None:
        """Raise `RunInterrupted` when a stop was requested (on any process)."""
        signum = self.requested or 0
        if accelerator is not None and accelerator.num_processes > 1:
            flag = torch.tensor([signum], device=accelerator.device)
            signum = int(accelerator.gather(flag).max())
        if signum:
            self.requested = signum
            self.at_boundary = True
            raise RunInterrupted(signum)


# ----------------------------------------------------------------------------- finiteness


def non_finite(vectors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that hold NaN or inf."""
    return [k for k, v in vectors.items() if not bool(torch.isfinite(v.detach()).all())]


def check_finite_step(
    step: int,
    loss: float,
    vectors: dict[str, torch.Tensor],
    *,
    last_finite: tuple[int, float] | None,
    last_checkpoint: Path | None,
) -> None:
    """Stop the run (one line) when the loss or the vectors after a step are not finite."""
    bad = [] if math.isfinite(loss) else [f"loss {loss}"]
    bad += [f"{k} vectors" for k in non_finite(vectors)]
    if not bad:
        return
    before = (
        f"last finite loss {last_finite[1]:.6g} at step {last_finite[0]}"
        if last_finite
        else "no finite loss before"
    )
    saved = f"last good checkpoint {last_checkpoint}" if last_checkpoint else "no checkpoint saved"
    raise XTIError(
        f"step {step}: non-finite values ({', '.join(bad)}): the run diverged and was stopped; "
        f"{before}; {saved}; nothing was exported. Lower train.lr, keep train.max_grad_norm set, "
        "or check the model"
    )


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] if text else type(err).__name__
