"""Dashboards: tracker setup, scalars, images and tables, the model card, and reading runs back; and
what a training run reports (`step_logs`: the scalars of a step; `run_timing`: the timing fields of
``summary.json``; `warn_if_frozen`: the warning about a run that does not move).

Training talks to trackers only through Accelerate (`accelerator.init_trackers`, `accelerator.log`)
and through the helpers here for what Accelerate has no generic call for: images (captioned grids)
and tables (nearest vocabulary tokens per layer). wandb honours ``WANDB_MODE`` and runs offline when no
API key is configured; tensorboard writes event files under ``<output_dir>/logs``.

`read_wandb_offline_run` parses an offline ``run-*.wandb`` file (LevelDB-log framing of protobuf
records) so tests and users can check what a run logged without a wandb server.

`JsonlTracker` (``tracking.report_to=jsonl``) appends every logged dict as one JSON line to
``<output_dir>/logs/metrics.jsonl`` while the run goes: the web UI (`xti.ui`) draws its live loss
curve from it, and `read_metrics` reads it back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from accelerate.tracking import GeneralTracker
from PIL import Image

from xti.errors import XTIError
from xti.families import named
from xti.regularizers import describe as describe_regularizer

if TYPE_CHECKING:
    from xti.config import Config
    from xti.kde import KDERegularizer, KDEStats
    from xti.latent_cache import LatentReport

logger = logging.getLogger("xti")


def setup_tracking(report_to: str) -> str | JsonlTracker | None:
    """Accelerate's ``log_with`` for a ``tracking.report_to`` value; wandb goes offline without a
    key; ``jsonl`` is a `JsonlTracker` instance (Accelerate takes custom trackers as objects)."""
    if report_to == "none":
        return None
    if report_to == "jsonl":
        return JsonlTracker()
    if report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise XTIError("tracking.report_to=wandb needs wandb: pip install wandb") from None
        if (
            not os.environ.get("WANDB_API_KEY")
            and "WANDB_MODE" not in os.environ
            and not _wandb_logged_in()
        ):
            os.environ["WANDB_MODE"] = "offline"  # never block a run on a login prompt
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise XTIError(
                "tracking.report_to=tensorboard needs tensorboard: pip install tensorboard"
            ) from None
    return report_to


METRICS_FILE = "metrics.jsonl"
"""File name of the `JsonlTracker` log, in ``<output_dir>/logs``."""


class JsonlTracker(GeneralTracker):
    """An Accelerate tracker that appends each ``accelerator.log(values, step)`` as one JSON line
    (``{"step": N, ...values}``) to ``<output_dir>/logs/metrics.jsonl``, flushed line by line so
    another process can follow a run live.

    The folder comes from ``logging_dir`` or, when None, from ``output_dir`` in the run config
    that `store_init_configuration` receives (training passes the whole flattened config). A new
    run (``train.resume`` unset) starts the file afresh; a resumed run appends, and `read_metrics`
    keeps the last line of each step. Non-finite numbers are written as null.
    """

    name = "jsonl"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, logging_dir: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        self.path: Path | None = Path(logging_dir) / METRICS_FILE if logging_dir else None
        self._append = True

    @property
    def tracker(self) -> Path | None:
        """The file written (Accelerate's handle on the tracker's backend)."""
        return self.path

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """Take the folder from the run config when none was given; start the file afresh for a
        new run, append for a resumed one."""
        if self.path is None and values.get("output_dir"):
            self.path = Path(str(values["output_dir"])) / "logs" / METRICS_FILE
        self._append = bool(values.get("train.resume"))
        if self.path is not None and not self._append:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Append ``{"step": step, **values}`` as one line (numbers and strings only)."""
        if self.path is None:
            raise XTIError("tracking.report_to=jsonl: no output_dir to write metrics.jsonl into")
        row: dict[str, Any] = {"step": step}
        for key, value in values.items():
            clean = _json_scalar(value)
            if clean is not _SKIP:
                row[key] = clean
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


_SKIP = object()


def _json_scalar(value: Any) -> Any:
    """A logged value as JSON: numbers (tensors and numpy scalars too; non-finite as None) and
    strings; anything else is left out (returns `_SKIP`)."""
    import math

    if isinstance(value, (bool, str)) or value is None:
        return value
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return _SKIP


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a `JsonlTracker` file in step order, one per step (a later line of the same
    step, from a resumed run, wins). A missing file is no rows; a line cut off by a write in
    progress, or not JSON, is skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError):
        return []
    by_step: dict[int, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def _wandb_logged_in() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class Smoother:
    """Exponential moving average with bias correction (the "smoothed loss" curve)."""

    def __init__(self, beta: float = 0.9) -> None:
        self.beta = beta
        self.value = 0.0
        self.count = 0

    def update(self, x: float) -> float:
        self.count += 1
        self.value = self.beta * self.value + (1 - self.beta) * x
        return self.value / (1 - self.beta**self.count)


def log_images(accelerator, key: str, grid: Image.Image, caption: str, step: int) -> None:
    """Log a captioned image to every active tracker at ``step`` (main process only)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Image(grid, caption=caption)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.writer.add_image(key, np.asarray(grid), step, dataformats="HWC")
            tracker.writer.add_text(f"{key}/caption", caption, step)


def log_table(accelerator, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
    """Log a small table (wandb Table; tensorboard markdown text)."""
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb

            tracker.log({key: wandb.Table(columns=columns, data=rows)}, step=step)
        elif tracker.name == "tensorboard":
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            tracker.writer.add_text(key, "\n".join(lines), step)


def _kde_reference(kde: dict[str, Any]) -> str:
    ref = kde.get("reference", "vocabulary")
    return ref if isinstance(ref, str) else f"{len(ref)} words"


def write_model_card(
    folder: Path,
    *,
    name: str,
    embedding_file: Path,
    config: dict[str, Any],
    family: str,
    base_model: str,
    layers: list[str],
    steps: int,
    final_loss: float | None,
    grid: Path | None,
    timing: dict[str, Any] | None = None,
    init_from: dict[str, str] | None = None,
) -> Path:
    """Write ``README.md`` into the output folder: base model, settings, timing, samples, and how
    to generate with the file in a diffusers pipeline.

    `timing` holds ``summary.json``'s timing fields (`TIMING_KEYS`); `init_from` the start file
    (`xti.init_from.InitSource.as_dict`) when the run began from one.

    A ``README.md`` that xti did not write (no `MODEL_CARD_MARKER` first line) is never replaced:
    the card then goes to ``MODEL_CARD.md`` with a warning. Returns the path written.
    """
    from xti.paths import atomic_write_bytes

    c = config
    rel = os.path.relpath(embedding_file, folder)
    lines = [
        MODEL_CARD_MARKER,
        f"# {name} — XTI embedding",
        "",
        f"Extended Textual Inversion (P+) concept `{c['concept']['placeholder']}` trained with xti on "
        f"`{base_model}` ({family}): {len(layers)} layers × {c['concept']['n_vectors']} vector(s), "
        f"granularity `{c['xti']['granularity']}`.",
        "",
        "| setting | value |",
        "|---|---|",
        f"| file | `{rel}` |",
        f"| steps | {steps} |",
        f"| final loss | {final_loss:.4f} |" if final_loss is not None else "| final loss | - |",
        f"| batch size × accumulation | {c['train']['batch_size']} × {c['train']['gradient_accumulation_steps']} |",
        f"| learning rate | {c['train']['lr']} ({c['train']['lr_scheduler']}) |",
        f"| resolution | {c['train']['resolution']} |",
        f"| initializer | `{c['concept']['initializer']}` |",
        *_init_from_rows(init_from),
        f"| KDE weight (relative) | {c['kde']['weight']} (reference: {_kde_reference(c['kde'])}) |",
        f"| regulariser | {describe_regularizer(c)} |",
        f"| layers | {', '.join(layers)} |",
        *_timing_rows(timing),
        "",
    ]
    if grid is not None:
        lines += ["## Samples", "", f"![validation samples]({os.path.relpath(grid, folder)})", ""]
    lines += _usage_section(c, name=name, rel=rel, family=family, base_model=base_model)
    path = folder / "README.md"
    if path.exists() and not _written_by_xti(path):
        logger.warning("%s was not written by xti: the model card goes to MODEL_CARD.md", path)
        path = folder / "MODEL_CARD.md"
    atomic_write_bytes(path, "\n".join(lines).encode())
    return path


def _init_from_rows(init_from: dict[str, str] | None) -> list[str]:
    """The model card's row for the start file (`concept.init_from`), when there is one."""
    if not init_from:
        return []
    return [
        f"| started from | `{init_from['path']}` ({init_from['layout']} file, sha256 "
        f"`{init_from['sha256']}`; a new run, fresh optimizer) |"
    ]


def _usage_section(
    c: dict[str, Any], *, name: str, rel: str, family: str, base_model: str
) -> list[str]:
    """The card's "Use it" section: generating with the file in a stock pipeline (runnable)."""
    placeholder = c["concept"]["placeholder"]
    prompt = (
        f"a painting in the style of {placeholder}"
        if c["data"].get("template") == "style"
        else f"a photo of {placeholder}"
    )
    pipeline = named(family).pipeline_class
    res = c["train"]["resolution"]
    load_lines = _pipeline_source(base_model, pipeline)
    return [
        "## Use it",
        "",
        f"Generate with the file in a stock diffusers `{pipeline}` (run this in this folder):",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        *load_lines[:-1],
        "from xti.inference import load_xti",
        "",
        load_lines[-1],
        f"xti = load_xti(pipe, {json.dumps(rel)})",
        "image = xti(",
        f"    {json.dumps(prompt)},",
        f"    num_inference_steps=30, height={res}, width={res},",
        "    generator=torch.Generator().manual_seed(0),",
        ").images[0]",
        f"image.save({json.dumps(name + '-sample.png')})",
        "xti.unload()  # the pipeline is as it was",
        "```",
        "",
        'On a GPU add `torch_dtype=torch.float16` to the loading call and `pipe.to("cuda")`;',
        "`xti generate` does the same from the command line. The xti README shows style mixing,",
        "per-layer prompts and `xti export --format ti` for tools without per-layer support.",
        "",
        "Read the file's layers and metadata (its keys are the layer names, kohya sd-scripts' XTI",
        "layout):",
        "",
        "```python",
        "from xti.export import load_embedding_file",
        f"ef = load_embedding_file({json.dumps(rel)})",
        "print(ef.layers, ef.metadata['xti.placeholder'])",
        "```",
        "",
    ]


def _pipeline_source(base_model: str, pipeline: str) -> list[str]:
    """The imports it needs, then the line that loads `base_model` into `pipeline` as ``pipe``
    (a builtin model, a single file, or a folder / hub id)."""
    if base_model.startswith("builtin:"):
        return [
            "from xti.builtin import resolve_builtin",
            f"pipe = {pipeline}.from_pretrained(resolve_builtin({json.dumps(base_model)}))",
        ]
    if base_model.lower().endswith((".safetensors", ".ckpt")):
        return [f"pipe = {pipeline}.from_single_file({json.dumps(base_model)})"]
    return [f"pipe = {pipeline}.from_pretrained({json.dumps(base_model)})"]


def _seconds(value: Any) -> str:
    return f"{value:.3g} s" if isinstance(value, (int, float)) else "-"


def _timing_rows(timing: dict[str, Any] | None) -> list[str]:
    """Model-card rows: setup time, latent caching (hit or not), median step time."""
    if not timing:
        return []
    setup = _seconds(timing.get("setup_seconds"))
    if timing.get("launch_to_first_step_seconds") is not None:
        setup += f" ({_seconds(timing['launch_to_first_step_seconds'])} from launch)"
    status = timing.get("latent_cache")
    how = {
        "hit": "disk cache hit",
        "miss": "disk cache miss",
        "partial": "disk cache partly hit",
        "off": "disk cache off",
    }.get(status, str(status))
    latents = (
        f"{_seconds(timing.get('latent_seconds'))}, {how} "
        f"({timing.get('latents_encoded')} of {timing.get('latents_total')} encoded by the VAE)"
    )
    step = _seconds(timing.get("median_step_seconds"))
    if timing.get("steps_timed"):
        step += f" over {timing['steps_timed']} steps"
    step += f", mixed precision {timing.get('mixed_precision', '-')} on {timing.get('device', '-')}"
    return [
        f"| setup (start to first step) | {setup} |",
        f"| VAE latents | {latents} |",
        f"| median step time | {step} |",
    ]


MODEL_CARD_MARKER = "<!-- xti model card: rewritten by each run into this folder -->"


def _written_by_xti(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            return fh.read(len(MODEL_CARD_MARKER)).decode("utf-8", "replace") == MODEL_CARD_MARKER
    except OSError:
        return False


# ----------------------------------------------------------------------------- reading runs back


@dataclass
class WandbRun:
    """What an offline wandb run file holds: history rows, summary, config and media files."""

    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    media: list[Path] = field(default_factory=list)


_BLOCK = 32 * 1024
_HEADER = 7  # ":W&B", magic 0xBEE1, version byte
_RECORD_HEADER = 7  # crc32, length (2 bytes), type


def _wandb_records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise XTIError(f"{path} is not a wandb run file")
    records, pending, pos = [], b"", _HEADER
    while pos + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _RECORD_HEADER:
            pos += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if length == 0 and kind == 0:
            pos += left_in_block
            continue
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == 1:  # full
            records.append(chunk)
        elif kind == 2:  # first
            pending = chunk
        elif kind == 3:  # middle
            pending += chunk
        elif kind == 4:  # last
            records.append(pending + chunk)
            pending = b""
    return records


def _put(row: dict[str, Any], path: list[str], value: Any) -> None:
    """Set a (possibly nested: media objects are logged as nested keys) history value."""
    for part in path[:-1]:
        row = row.setdefault(part, {})
    row[path[-1]] = value


def read_wandb_offline_run(run_dir: str | Path) -> WandbRun:
    """Parse an offline run folder (``wandb/offline-run-*``) into history, summary, config, media."""
    from wandb.proto import wandb_internal_pb2

    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if not files:
        raise XTIError(f"{run_dir} holds no run-*.wandb file")
    run = WandbRun()
    for raw in _wandb_records(files[0]):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(raw)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            row: dict[str, Any] = {}
            for item in rec.history.item:
                _put(
                    row,
                    [item.key] if item.key else list(item.nested_key),
                    json.loads(item.value_json),
                )
            run.history.append(row)
        elif kind == "summary":
            for item in rec.summary.update:
                run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "config":
            for item in rec.config.update:
                run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    run.media = (
        sorted((run_dir / "files" / "media").rglob("*.*"))
        if (run_dir / "files" / "media").is_dir()
        else []
    )
    return run


# ----------------------------------------------------------------------------- a run's reports


FROZEN_CHECK_AT = 0.1
"""Fraction of `train.max_steps` after which a run that has not moved is called frozen."""


FROZEN_THRESHOLD = 0.01
"""A run is frozen when its vectors moved less than this fraction of their initial norm."""


def frozen_check_at(max_steps: int, warmup_steps: int) -> int:
    """The step at which `warn_if_frozen` looks: after `FROZEN_CHECK_AT` of the run, and not
    before the learning-rate warm-up is over (a run still warming up has barely moved by design)."""
    return min(max_steps, max(1, math.ceil(FROZEN_CHECK_AT * max_steps), warmup_steps))


def warn_if_frozen(cfg: Config, moved: float, step: int) -> bool:
    """Warn (once, by the caller) when the vectors moved less than `FROZEN_THRESHOLD` of their
    initial norm; True when it warned."""
    if moved >= FROZEN_THRESHOLD:
        return False
    logger.warning(
        "the run looks frozen: after %d of %d steps the vectors moved %.3g%% of their initial norm "
        "(under %g%%). Raise train.lr (now %g) or lower the regulariser's weight (now %s); check "
        "train.lr_warmup_steps (now %d) too.",
        step, cfg.train.max_steps, 100 * moved, 100 * FROZEN_THRESHOLD, cfg.train.lr,
        describe_regularizer(cfg.model_dump()), cfg.train.lr_warmup_steps,
    )  # fmt: skip
    return True


def per_encoder(values: dict[str, Any]) -> Any:
    """``summary.json``'s shape of a per-encoder value: the value itself for a model with one text
    encoder, ``{encoder: value}`` for several."""
    return next(iter(values.values())) if len(values) == 1 else values


TIMING_KEYS = (
    "setup_seconds",
    "launch_to_first_step_seconds",
    "latent_seconds",
    "latent_cache",
    "latents_encoded",
    "latents_total",
    "median_step_seconds",
    "steps_timed",
    "mixed_precision",
    "device",
)
"""The timing fields of ``summary.json`` (and the model card), see `run_timing`."""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def process_age() -> float | None:
    """Seconds since this process started (None where psutil cannot tell)."""
    try:
        import psutil  # a dependency of accelerate

        return time.time() - psutil.Process().create_time()
    except Exception:
        return None


def run_timing(
    setup_seconds: float | None,
    latents: LatentReport,
    step_seconds: list[float],
    process_age: float | None = None,
) -> dict[str, Any]:
    """The timing fields of ``summary.json``: ``setup_seconds`` (from `train()` to the first step
    of this process), ``launch_to_first_step_seconds`` (from the process start, interpreter and
    imports included), ``latent_seconds`` and ``latent_cache`` (hit, miss, partial or off) with
    ``latents_encoded`` of ``latents_total`` going through the VAE, and ``median_step_seconds``
    over the ``steps_timed`` optimizer steps this process ran (validation and checkpoints not
    included). `process_age` is the process's age when `train()` was called. (The summary adds
    ``mixed_precision`` and ``device``, which the times depend on.)"""
    launch = None
    if setup_seconds is not None and process_age is not None:
        launch = round(process_age + setup_seconds, 2)
    return {
        "setup_seconds": round(setup_seconds, 2) if setup_seconds is not None else None,
        "launch_to_first_step_seconds": launch,
        "latent_seconds": round(latents.seconds, 2),
        "latent_cache": latents.status,
        "latents_encoded": latents.encoded,
        "latents_total": latents.total,
        "median_step_seconds": round(median(step_seconds), 4) if step_seconds else None,
        "steps_timed": len(step_seconds),
    }


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: CUDA allocated on GPUs, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def flat_config(cfg: Config) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
        else:
            flat[prefix[:-1]] = (
                node if isinstance(node, (int, float, str, bool)) or node is None else str(node)
            )

    walk("", cfg.model_dump(mode="json"))
    return flat


def step_logs(
    loss: float,
    parts: dict[str, Any],
    lr: float,
    grad_norm: torch.Tensor,
    vectors: dict[str, torch.Tensor],
    variant_of_layer: torch.Tensor,
    layer_names: list[str],
    *,
    kdes: dict[str, KDERegularizer] | None = None,
    kde_stats: dict[str, KDEStats] | None = None,
    moved: float | None = None,
) -> dict[str, float]:
    """Scalars of one step: loss parts, lr, gradient norm (after the KDE and clipping), the KDE
    figures (K, ``grad_norm/diffusion``, ``grad_norm/kde``, ``kde/effective_weight``, summed over
    encoders; present when the KDE was applied this step), ``vectors/moved`` (``||V - V0|| /
    ||V0||``), and per layer the mean vector norm and KDE value (``norm/<layer>``, ``kde/<layer>``;
    ``norm/<encoder>/<layer>`` when there are two encoders)."""
    logs: dict[str, float] = {
        "loss": loss,
        "mse": float(parts["mse"]),
        "lr": float(lr),
        "grad_norm": float(grad_norm),
    }
    if moved is not None:
        logs["vectors/moved"] = moved
    if kde_stats:
        logs["grad_norm/diffusion"] = math.sqrt(
            sum(x.grad_diffusion**2 for x in kde_stats.values())
        )
        logs["grad_norm/kde"] = math.sqrt(sum(x.grad_kde**2 for x in kde_stats.values()))
        logs["kde/effective_weight"] = max(x.effective_weight for x in kde_stats.values())
    kdes = kdes or {}
    kde_total = 0.0
    for enc, tensor in vectors.items():
        prefix = f"{enc}/" if len(vectors) > 1 else ""
        norms = tensor.detach().float().norm(dim=-1).mean(-1)  # [V]
        kde_v = None
        if enc in kdes:
            with torch.no_grad():
                kde_v = kdes[enc](tensor.detach())  # [V, n]
            kde_total += float(kde_v.mean())
        for i, name in enumerate(layer_names):
            v = int(variant_of_layer[i])
            logs[f"norm/{prefix}{name}"] = float(norms[v])
            if kde_v is not None:
                logs[f"kde/{prefix}{name}"] = float(kde_v[v].mean())
    if kdes:
        logs["kde"] = kde_total
    return logs


def nearest_vocabulary_tokens(
    kde, vectors: torch.Tensor, variant_of_layer: torch.Tensor, layer_names: list[str], tokenizer
) -> dict[str, list[str]]:
    if kde is None:
        return {}
    with torch.no_grad():
        _, idx = kde.nearest(vectors.detach().float().reshape(-1, vectors.shape[-1]), k=1)
    idx = idx.reshape(vectors.shape[0], vectors.shape[1], -1)[..., 0]
    out = {}
    for i, name in enumerate(layer_names):
        out[name] = tokenizer.convert_ids_to_tokens(idx[int(variant_of_layer[i])].tolist())
    return out
