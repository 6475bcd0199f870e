"""Many concepts from one manifest (``xti batch``): the manifest, the runs, the results table.

A manifest names a base config, overrides for every concept and one row per concept (a name and its
own dotted overrides), as YAML or CSV (`load_manifest`). `run_batch` trains the rows one after another
in this process, reusing the loaded model while the next row asks for the same one (`ModelCache`);
`run_workers` splits the rows over worker processes (one per GPU); `write_slurm` writes (and
`submit_slurm` submits) a Slurm job array with one task per unfinished row. Every concept gets its own
folder ``OUT/<name>`` and resumes there (``train.resume=auto``); what a row's state is comes from
that folder (a finished concept has its ``summary.json`` and exported file) and from a small record
of failures in ``OUT/.xti-batch/``, so every invocation, worker and array task agrees on it
(`gather`). `write_table` writes ``results.csv`` and ``results.md``. One bad row (a bad value, a
missing folder, a crash in training) becomes one line of the table; the other rows go on.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xti.config import Config, load_config
from xti.errors import XTIError
from xti.parsing import parse_assignments
from xti.paths import atomic_write_bytes, file_name_problem

logger = logging.getLogger("xti")

RESERVED_KEYS = {
    "name": "the row's name is the concept's name",
    "output_dir": "each concept is written to OUT/<name>",
    "train.resume": "xti batch always resumes (train.resume=auto)",
}
"""Keys `xti batch` sets itself and a manifest may not."""

STATE_DIR = ".xti-batch"
"""Under OUT: one JSON record per failed or stopped row, and the table's lock."""

TABLE_COLUMNS = ("name", "status", "steps", "final_loss", "seconds", "grid", "file", "error")
"""The columns of ``results.csv`` and ``results.md``."""


# --------------------------------------------------------------------------------------------------
# The manifest
# --------------------------------------------------------------------------------------------------


class ManifestFile(BaseModel):
    """A YAML manifest as written: the base config, overrides for all, one row per concept."""

    model_config = ConfigDict(extra="forbid")

    base: str | None = Field(
        None, description="The config every concept starts from (relative to the manifest)."
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Dotted config keys and values applied to every concept."
    )
    concepts: list[dict[str, Any]] = Field(
        min_length=1, description="One row per concept: its name and its own dotted overrides."
    )


@dataclass(frozen=True)
class BatchRow:
    """One concept of the manifest: its index (0-based, the Slurm array index), name, overrides."""

    index: int
    name: str
    overrides: tuple[str, ...]  # "key=value", values as YAML text (what `load_config` parses)


@dataclass(frozen=True)
class BatchPlan:
    """A validated manifest: the base config, overrides for all rows, the rows."""

    manifest: Path
    base: Path | None
    overrides: tuple[str, ...]
    rows: tuple[BatchRow, ...]


def config_key_problem(key: str) -> str | None:
    """Why a dotted key is not a leaf key of `Config` (None when it is one)."""
    model: type[BaseModel] = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        found = model.model_fields.get(part) if part else None
        if found is None:
            return f"'{key}' is not a config key (`xti config` lists them)"
        ann = found.annotation
        is_section = isinstance(ann, type) and issubclass(ann, BaseModel)
        if is_section and i == len(parts) - 1:
            return f"'{key}' is a section: give one of its keys, e.g. {key}.{next(iter(ann.model_fields))}"
        if not is_section and i < len(parts) - 1:
            return f"'{key}': '{'.'.join(parts[: i + 1])}' is not a section"
        if is_section:
            model = ann
    return None


def _check_key(key: str, where: str) -> None:
    problem = config_key_problem(key)
    if problem is None and key in RESERVED_KEYS:
        problem = f"'{key}' is set by xti batch ({RESERVED_KEYS[key]})"
    if problem is not None:
        raise XTIError(f"{where}: {problem}")


def _yaml_value(value: Any) -> str:
    """A YAML value as override text that `load_config` parses back to the same value."""
    return json.dumps(value, ensure_ascii=False, default=str)  # YAML dates become text


def _row(index: int, cells: dict[str, Any], where: str, *, typed: bool) -> BatchRow:
    """One manifest row: a valid name and known keys, else a one-line error naming the row."""
    name = cells.get("name")
    if isinstance(name, int | float) and not isinstance(name, bool):
        name = str(name)  # YAML reads `name: 2024` as a number
    label = f"{where}: concepts row {index + 1}"
    if not isinstance(name, str) or not name.strip():
        raise XTIError(f"{label}: needs a name (a plain file name, e.g. mug)")
    name = name.strip()
    problem = file_name_problem(name)
    if problem:
        raise XTIError(f"{label} ({name}): name {problem}")
    overrides = []
    for key, value in cells.items():
        if key == "name" or (not typed and value == ""):  # an empty CSV cell sets nothing
            continue
        _check_key(str(key), f"{label} ({name})")
        if typed and isinstance(value, dict):
            raise XTIError(f"{label} ({name}): {key}: give one value, not a mapping")
        overrides.append(f"{key}={_yaml_value(value) if typed else value}")
    return BatchRow(index, name, tuple(overrides))


def _plan(
    manifest: Path, base: str | None, overrides: list[str], rows: list[BatchRow]
) -> BatchPlan:
    seen: dict[str, int] = {}
    for row in rows:
        if row.name in seen:
            raise XTIError(
                f"{manifest}: concepts rows {seen[row.name] + 1} and {row.index + 1} share the "
                f"name {row.name!r}: each concept needs its own name (its folder)"
            )
        seen[row.name] = row.index
    base_path = None
    if base is not None:
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = manifest.parent / base_path
        if not base_path.is_file():
            raise XTIError(f"{manifest}: base config {base_path} does not exist")
    return BatchPlan(manifest, base_path, tuple(overrides), tuple(rows))


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise XTIError(f"{path}: cannot be read as UTF-8 text ({err})") from None


def _read_yaml(path: Path) -> tuple[str | None, list[str], list[BatchRow]]:
    try:
        data = yaml.safe_load(_text(path))
    except yaml.YAMLError as err:
        raise XTIError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise XTIError(f"{path}: the top level must be a mapping with base, overrides, concepts")
    try:
        parsed = ManifestFile.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "<top>"
        msg = "unknown key (a manifest has base, overrides, concepts)"
        if first["type"] != "extra_forbidden":
            msg = first["msg"]
        raise XTIError(f"{path}: {loc}: {msg}") from None
    overrides = []
    for key, value in parsed.overrides.items():
        _check_key(key, f"{path}: overrides")
        overrides.append(f"{key}={_yaml_value(value)}")
    rows = [_row(i, r, str(path), typed=True) for i, r in enumerate(parsed.concepts)]
    return parsed.base, overrides, rows


def _read_csv(path: Path) -> tuple[str | None, list[str], list[BatchRow]]:
    """CSV: leading ``# base: PATH`` and ``# override: KEY=VALUE`` lines, then a header row
    (``name`` and dotted keys) and one row per concept. Cells are YAML values; empty cells set
    nothing."""
    lines = _text(path).splitlines()
    base, overrides = None, []
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        key, sep, value = lines.pop(0).lstrip("#").strip().partition(":")
        if not key.strip():
            continue
        if not sep or key.strip() not in ("base", "override"):
            raise XTIError(
                f"{path}: a comment line before the header is '# base: PATH' or "
                f"'# override: KEY=VALUE', got {key.strip()!r}"
            )
        if key.strip() == "base":
            base = value.strip()
        else:
            item = parse_assignments([value.strip()], f"{path}: # override", split_last=False)
            for k, v in item.items():
                _check_key(k, f"{path}: # override")
                overrides.append(f"{k}={v}")
    reader = csv.DictReader(io.StringIO("\n".join(lines)), skipinitialspace=True)
    if not reader.fieldnames or "name" not in reader.fieldnames:
        raise XTIError(f"{path}: the header row must name the columns, one of them 'name'")
    rows = []
    for i, record in enumerate(reader):
        if None in record or any(v is None for v in record.values()):
            raise XTIError(f"{path}: concepts row {i + 1}: not as many cells as header columns")
        cells = {k.strip(): v.strip() for k, v in record.items()}
        rows.append(_row(i, cells, str(path), typed=False))
    if not rows:
        raise XTIError(f"{path}: no concept rows under the header")
    return base, overrides, rows


def load_manifest(
    path: str | os.PathLike[str], *, base: str | None = None, sets: Sequence[str] = ()
) -> BatchPlan:
    """Read and validate a manifest (``.yaml``/``.yml`` or ``.csv``).

    Args:
        path: the manifest.
        base: a base config that replaces the manifest's (relative to the working folder).
        sets: ``KEY=VALUE`` overrides for every row, applied after the manifest's.

    Raises:
        XTIError: one line naming the manifest (and the row) and the problem.
    """
    manifest = Path(path)
    if not manifest.is_file():
        raise XTIError(f"manifest {manifest} does not exist")
    reader = _read_csv if manifest.suffix.lower() == ".csv" else _read_yaml
    manifest_base, overrides, rows = reader(manifest)
    for key, value in parse_assignments(sets, "--set", split_last=False).items():
        _check_key(key, "--set")
        overrides.append(f"{key}={value}")
    plan = _plan(manifest, manifest_base, overrides, rows)
    if base is not None:
        if not Path(base).is_file():
            raise XTIError(f"--base: config file {base} does not exist")
        plan = dataclasses.replace(plan, base=Path(base))
    return plan


def row_config(plan: BatchPlan, row: BatchRow, out: Path) -> Config:
    """The row's run config: base, the overrides for all, the row's, and what xti batch sets."""
    own = [
        f"name={_yaml_value(row.name)}",
        f"output_dir={_yaml_value(str(out / row.name))}",
        "train.resume=auto",
    ]
    try:
        return load_config(plan.base, [*plan.overrides, *row.overrides, *own])
    except XTIError as err:
        raise XTIError(f"{plan.manifest} row {row.index + 1} ({row.name}): {err}") from None


# --------------------------------------------------------------------------------------------------
# What each row's state is (from the files)
# --------------------------------------------------------------------------------------------------


@dataclass
class RowResult:
    """One line of the results table."""

    name: str
    status: str  # done, failed, stopped, running, pending
    steps: int | None = None
    final_loss: float | None = None
    seconds: float | None = None
    grid: str | None = None
    file: str | None = None
    error: str | None = None

    def cells(self) -> list[str]:
        """The table's cells, in `TABLE_COLUMNS` order."""
        loss = f"{self.final_loss:.6g}" if self.final_loss is not None else ""
        secs = f"{self.seconds:.1f}" if self.seconds is not None else ""
        steps = "" if self.steps is None else str(self.steps)
        return [self.name, self.status, steps, loss, secs, self.grid or "", self.file or ""] + [
            self.error or ""
        ]


def row_key(plan: BatchPlan, row: BatchRow, cfg: Config | None) -> str:
    """What a recorded failure was about: the resolved config but its folder (however ``--out`` was
    spelled), or the row's text when it had no config."""
    text = repr(row)
    if cfg is not None:
        text = json.dumps(cfg.model_dump(mode="json", exclude={"output_dir"}), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def _record_path(out: Path, name: str) -> Path:
    return out / STATE_DIR / f"{name}.json"


def write_record(out: Path, name: str, record: dict[str, Any]) -> None:
    """Record a failed or stopped row (``OUT/.xti-batch/<name>.json``)."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(_record_path(out, name), json.dumps(record, indent=1).encode())


def read_record(out: Path, name: str) -> dict[str, Any] | None:
    """The row's failure/stop record, if any."""
    try:
        data = json.loads(_record_path(out, name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: str | None, out: Path) -> str | None:
    if not path:
        return None
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(out.resolve()))
    return path


def finished(folder: Path, max_steps: int | None) -> dict[str, Any] | None:
    """The summary of a finished run in `folder`: ``summary.json`` names an exported file that is
    there and (when `max_steps` is given) at least that many steps. None otherwise."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    exported = summary.get("output_file") if isinstance(summary, dict) else None
    if not exported or not Path(exported).is_file():
        return None
    if max_steps is not None and int(summary.get("steps") or 0) < max_steps:
        return None
    return summary


def _in_use(folder: Path) -> bool:
    from xti.runs import probe_lock

    try:
        probe_lock(folder)
    except XTIError:
        return True
    return False


def row_state(plan: BatchPlan, row: BatchRow, out: Path) -> RowResult:
    """A row's state from the files alone: done, running, failed, stopped or pending."""
    try:
        cfg: Config | None = row_config(plan, row, out)
    except XTIError as err:
        return RowResult(row.name, "failed", error=str(err))
    folder = out / row.name
    summary = finished(folder, cfg.train.max_steps if cfg else None)
    if summary is not None:
        return RowResult(
            row.name,
            "done",
            steps=summary.get("steps"),
            final_loss=summary.get("final_loss"),
            seconds=summary.get("seconds"),
            grid=_relative(summary.get("samples_file"), out),
            file=_relative(summary.get("output_file"), out),
        )
    if _in_use(folder):
        return RowResult(row.name, "running")
    record = read_record(out, row.name)
    if record and record.get("key") == row_key(plan, row, cfg):
        return RowResult(
            row.name,
            str(record.get("status", "failed")),
            steps=record.get("steps"),
            seconds=record.get("seconds"),
            error=record.get("error"),
        )
    return RowResult(row.name, "pending")


def gather(plan: BatchPlan, out: Path) -> list[RowResult]:
    """Every row's state, in manifest order."""
    return [row_state(plan, row, out) for row in plan.rows]


# --------------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------------


def table_markdown(results: Sequence[RowResult]) -> str:
    """The results as a markdown table (``|`` in cells escaped)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in results:
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in r.cells()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table_csv(results: Sequence[RowResult]) -> str:
    """The results as CSV (a header row, one row per concept)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(r.cells() for r in results)
    return buf.getvalue()


@contextlib.contextmanager
def _table_lock(out: Path) -> Iterator[None]:
    """Serialise gathering and writing the table between processes (array tasks, workers)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    fd = os.open(out / STATE_DIR / "table.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # no locks on this filesystem: write unlocked
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_table(plan: BatchPlan, out: Path) -> list[RowResult]:
    """Gather every row's state and write ``results.csv`` and ``results.md`` (only when they
    change, so a run that did nothing touches nothing). Returns the rows."""
    with _table_lock(out):
        results = gather(plan, out)
        for name, text in (("results.csv", table_csv(results)), ("results.md", "")):
            text = text or table_markdown(results)
            path = out / name
            with contextlib.suppress(OSError):
                if path.read_text() == text:
                    continue
            atomic_write_bytes(path, text.encode())
    return results


def exit_status(results: Sequence[RowResult]) -> int:
    """0 when every row is done, 1 otherwise (failed, stopped, running or pending)."""
    return 0 if all(r.status == "done" for r in results) else 1


# --------------------------------------------------------------------------------------------------
# Running the rows
# --------------------------------------------------------------------------------------------------


class ModelCache:
    """The model the last row loaded, lent to the next row that names the same `model` settings.

    Each row gets the loaded models with fresh copies of the tokenizers as loaded (a run adds its
    placeholder tokens to the tokenizer it is given), so a row trains exactly as it would after its
    own load. The models are kept only while they are as loaded: a run in fp16/bf16 casts them in
    place, a crash may leave them anywhere, and the next row then loads the model again.
    """

    def __init__(self) -> None:
        self.key: str | None = None
        self.bundle: Any = None
        self.tokenizers: tuple[Any, Any] = (None, None)
        self.loads = 0

    def bundle_for(self, cfg: Config) -> Any:
        """The model `cfg.model` names, loaded now or lent from the previous row."""
        from xti.models import load_model

        key = json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True)
        if self.bundle is None or key != self.key:
            self.drop()
            bundle = load_model(cfg.model)
            self.loads += 1
            self.key, self.bundle = key, bundle
            self.tokenizers = (copy.deepcopy(bundle.tokenizer), copy.deepcopy(bundle.tokenizer_2))
        first, second = self.tokenizers
        return dataclasses.replace(
            self.bundle, tokenizer=copy.deepcopy(first), tokenizer_2=copy.deepcopy(second)
        )

    def after_run(self, *, clean: bool) -> None:
        """Keep the models for the next row only when the run ended cleanly and left them fp32."""
        import torch

        if self.bundle is None:
            return
        models = [self.bundle.unet, *(p.text_encoder for p in self.bundle.text_encoders)]
        if not clean or any(next(m.parameters()).dtype != torch.float32 for m in models):
            self.drop()

    def drop(self) -> None:
        """Forget the loaded model."""
        self.key, self.bundle, self.tokenizers = None, None, (None, None)


@dataclass
class BatchOptions:
    """What ``xti batch`` was asked to do, beyond the manifest."""

    manifest: Path
    out: Path
    base: str | None = None
    sets: list[str] = field(default_factory=list)
    retry_failed: bool = False
    progress: bool = False

    def cli_args(self) -> list[str]:
        """The same ``xti batch`` invocation's arguments (for workers and Slurm tasks), with
        absolute paths."""
        args = [str(self.manifest.resolve()), "--out", str(self.out.resolve())]
        if self.base is not None:
            args += ["--base", str(Path(self.base).resolve())]
        for item in self.sets:
            args += ["--set", item]
        if self.retry_failed:
            args.append("--retry-failed")
        if not self.progress:
            args.append("--no-progress")
        return args


Say = Callable[[str], None]
"""Where progress lines go (`print` by default)."""


def _train_row(cfg: Config, cache: ModelCache, *, progress: bool) -> None:
    """Train one row (in this process, with the cached model when it fits)."""
    from xti.training import train

    bundle = cache.bundle_for(cfg)
    try:
        train(cfg, bundle=bundle, progress=progress)
    except XTIError:
        cache.after_run(clean=True)  # input errors are found before anything is changed
        raise
    except BaseException:
        cache.after_run(clean=False)
        raise
    cache.after_run(clean=True)


def run_row(
    plan: BatchPlan, row: BatchRow, out: Path, cache: ModelCache, opts: BatchOptions
) -> RowResult:
    """Run one row unless it is done, running elsewhere, or failed before with the same config
    (and not `retry_failed`). A failure is recorded and returned, never raised; an interrupt
    (SIGINT/SIGTERM) is recorded as stopped and raised."""
    import time

    state = row_state(plan, row, out)
    if state.status in ("done", "running"):
        return state
    if state.status == "failed" and not opts.retry_failed:
        return state
    try:
        cfg = row_config(plan, row, out)
    except XTIError as err:  # the state says failed with this error already
        return RowResult(row.name, "failed", error=str(err))
    key = row_key(plan, row, cfg)
    t0 = time.perf_counter()
    try:
        _train_row(cfg, cache, progress=opts.progress)
    except KeyboardInterrupt:
        write_record(out, row.name, {"key": key, "status": "stopped", "error": "interrupted"})
        raise
    except Exception as err:  # noqa: BLE001 - one bad row becomes one line of the table
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not isinstance(err, XTIError):
            message = f"{type(err).__name__}: {message}"
            logger.exception("%s failed", row.name)
        seconds = round(time.perf_counter() - t0, 2)
        write_record(
            out, row.name, {"key": key, "status": "failed", "error": message, "seconds": seconds}
        )
    else:
        with contextlib.suppress(FileNotFoundError):
            _record_path(out, row.name).unlink()
    return row_state(plan, row, out)


def _describe(r: RowResult) -> str:
    if r.status == "done":
        loss = f", final loss {r.final_loss:.4f}" if r.final_loss is not None else ""
        return f"done ({r.steps} steps{loss}, {r.seconds or 0:.1f} s)"
    return f"{r.status}: {r.error}" if r.error else r.status


def run_batch(
    plan: BatchPlan,
    opts: BatchOptions,
    *,
    indices: Sequence[int] | None = None,
    say: Say = print,
) -> list[RowResult]:
    """Run the rows (all, or those `indices` name) one after another in this process, then write
    the table. Returns the results of the rows run."""
    rows = [plan.rows[i] for i in indices] if indices is not None else list(plan.rows)
    cache = ModelCache()
    results = []
    try:
        for n, row in enumerate(rows, 1):
            before = row_state(plan, row, opts.out)
            if before.status == "running":
                say(f"[{n}/{len(rows)}] {row.name}: running in another process, left to it")
            if before.status in ("done", "running") or (
                before.status == "failed" and not opts.retry_failed
            ):
                results.append(before)  # nothing to do: the table says it
                continue
            say(f"[{n}/{len(rows)}] {row.name}: training")
            result = run_row(plan, row, opts.out, cache, opts)
            say(f"[{n}/{len(rows)}] {row.name}: {_describe(result)}")
            results.append(result)
    finally:
        write_table(plan, opts.out)
    return results


def pending_indices(plan: BatchPlan, out: Path, *, retry_failed: bool = False) -> list[int]:
    """The rows that still need a run (not done, not running, not failed unless retried)."""
    todo = []
    for row in plan.rows:
        status = row_state(plan, row, out).status
        if status in ("pending", "stopped") or (status == "failed" and retry_failed):
            todo.append(row.index)
    return todo


def parse_index_list(text: str, count: int) -> list[int]:
    """``3`` or ``0,2,5`` (0-based manifest rows, as Slurm's array indices) → indices."""
    try:
        indices = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise XTIError(
            f"--only-index: expected row numbers such as 3 or 0,2,5, got {text!r}"
        ) from None
    bad = [i for i in indices if not 0 <= i < count]
    if not indices or bad:
        raise XTIError(f"--only-index: rows are numbered 0 to {count - 1}, got {text!r}")
    return indices


def worker_devices(workers: int | None, gpus: str | None) -> list[str | None]:
    """One entry per worker: the CUDA_VISIBLE_DEVICES value it gets (None: unchanged)."""
    if gpus is not None:
        devices = [g.strip() for g in gpus.split(",") if g.strip()]
        if not devices:
            raise XTIError(f"--gpus: expected GPU numbers such as 0,1, got {gpus!r}")
        return list(devices)
    if workers is None or workers < 1:
        raise XTIError("--workers must be >= 1")
    return [None] * workers


def run_workers(
    plan: BatchPlan, opts: BatchOptions, devices: Sequence[str | None], *, say: Say = print
) -> list[RowResult]:
    """Split the unfinished rows round-robin over one ``xti batch --only-index`` process per
    entry of `devices` (each with its CUDA_VISIBLE_DEVICES), wait for all, write the table."""
    todo = pending_indices(plan, opts.out, retry_failed=opts.retry_failed)
    shares = [todo[i :: len(devices)] for i in range(len(devices))]
    procs = []
    for device, share in zip(devices, shares, strict=True):
        if not share:
            continue
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = device
        cmd = [sys.executable, "-m", "xti", "batch", *opts.cli_args()]
        cmd += ["--only-index", ",".join(str(i) for i in share)]
        where = f"GPU {device}" if device is not None else f"worker {len(procs)}"
        say(f"{where}: rows {', '.join(plan.rows[i].name for i in share)}")
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        for proc in procs:
            proc.wait()
    finally:
        for proc in procs:  # on an interrupt: the workers got it too; wait for their checkpoints
            with contextlib.suppress(Exception):
                proc.wait(timeout=600)
    return write_table(plan, opts.out)


# --------------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------------


@dataclass
class SlurmScripts:
    """The job-array script, the script that writes the table after it, and their rows."""

    array: Path
    table: Path
    indices: list[int]


def _sbatch_header(lines: list[str], options: Sequence[str]) -> list[str]:
    return ["#!/bin/bash", *lines, *(f"#SBATCH {o}" for o in options)]


def write_slurm(
    plan: BatchPlan,
    opts: BatchOptions,
    *,
    sbatch_options: Sequence[str] = (),
    signal_seconds: int = 120,
) -> SlurmScripts:
    """Write ``OUT/slurm/array.sbatch`` (one array task per unfinished row, each running
    ``xti batch … --only-index $SLURM_ARRAY_TASK_ID``) and ``OUT/slurm/table.sbatch`` (run after
    the array: writes and prints the table)."""
    indices = pending_indices(plan, opts.out, retry_failed=opts.retry_failed)
    folder = opts.out.resolve() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    xti = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "xti", "batch", *opts.cli_args()])
    cwd = shlex.quote(os.getcwd())
    array = _sbatch_header(
        [f"# xti batch {shlex.quote(str(plan.manifest))}: one task per unfinished row "
         "(re-run `xti batch … --slurm` to submit what is left)"],
        [
            "--job-name=xti-batch",
            f"--array={','.join(str(i) for i in indices) or '0'}",
            f"--output={folder}/row-%a-%A.out",
            # SIGTERM to the task a while before its time limit: the run checkpoints and exits,
            # and a requeued task resumes it (train.resume=auto).
            f"--signal=B:TERM@{signal_seconds}",
            "--requeue",
            *sbatch_options,
        ],
    )  # fmt: skip
    array += [f"cd {cwd}", f'exec {xti} --only-index "$SLURM_ARRAY_TASK_ID"', ""]
    table = _sbatch_header(
        ["# xti batch: the results table, after every task of the array has ended"],
        ["--job-name=xti-batch-table", f"--output={folder}/table-%j.out", *sbatch_options],
    )
    table += [f"cd {cwd}", f"exec {xti} --table", ""]
    paths = SlurmScripts(folder / "array.sbatch", folder / "table.sbatch", indices)
    atomic_write_bytes(paths.array, "\n".join(array).encode())
    atomic_write_bytes(paths.table, "\n".join(table).encode())
    return paths


def _sbatch(args: list[str]) -> str:
    try:
        done = subprocess.run(["sbatch", "--parsable", *args], capture_output=True, text=True)
    except FileNotFoundError:
        raise XTIError("--slurm: sbatch is not on PATH (run on a Slurm login node)") from None
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise XTIError(f"sbatch {' '.join(args)} failed: {last}")
    return done.stdout.strip().split(";")[0]


def submit_slurm(scripts: SlurmScripts) -> tuple[str, str]:
    """Submit the array, then the table job to run after it (``afterany``). Returns their ids."""
    array_id = _sbatch([str(scripts.array)])
    table_id = _sbatch([f"--dependency=afterany:{array_id}", str(scripts.table)])
    return array_id, table_id
