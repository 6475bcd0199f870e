"""The prepared GPU check: one command, one table, for the few minutes a GPU is lent to us.

    python bench/gpu_check.py OUT_DIR                 # on a CUDA machine: under 8 minutes on one H100
    python bench/gpu_check.py OUT_DIR --smoke         # the same code on CPU with the tiny models (CI)
    python bench/gpu_check.py OUT_DIR --families sd15 --precisions bf16 --steps 5   # a shorter run

For SD1.5- and SDXL-shaped models with random weights (built in memory from the reference configs,
directly on the GPU: nothing is downloaded or written to disk) at their native sizes (512 px and
1024 px), with each family's shipped config (`configs/sd15.yaml`: batch 4; `configs/sdxl.yaml`:
batch 1 x 4 accumulation, gradient checkpointing), it runs the real `xti.training.train()`:

- XTI (``xti.granularity=block``) and TI mode (``shared``), in bf16 and in fp16 (the GradScaler path),
  both with the relative KDE on (``kde.weight`` 0.01 over the whole vocabulary): median seconds
  per optimizer step (``summary.json``) and peak GPU memory allocated during the run (weights
  included). A one-step warm-up run per family and precision first fills the latent cache and the
  CUDA kernels' caches, so the timed runs read cached latents, as a user's second run does;
- a reference plain-TI step written the way diffusers' textual-inversion examples train: the
  whole token-embedding table trainable under AdamW, the VAE encoding the batch every step;
- the demo run (``python train.py``, `configs/demo.yaml`) as a user starts it, wall time included.

Every row is appended to ``OUT_DIR/gpu_check.md`` (a markdown table) and ``OUT_DIR/gpu_check.json``
as soon as it is measured, so a run cut short still leaves what it measured; a row that fails
records its one-line error instead of stopping the check. ``--budget-s`` skips the rows still
waiting once that many seconds have passed. Without CUDA (and without ``--smoke``) it stops at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FAMILIES = {"sd15": "configs/sd15.yaml", "sdxl": "configs/sdxl.yaml"}
SMOKE = {"sd15": "builtin:tiny-sd1", "sdxl": "builtin:tiny-sdxl"}
MODES = {"block": "XTI", "shared": "TI"}
COLUMNS = ["model", "run", "precision", "batch x accum", "px", "s/step", "peak GiB", "notes"]


@dataclasses.dataclass
class Row:
    """One line of the table."""

    model: str
    run: str
    precision: str
    batch: str = ""
    px: int | str = ""
    seconds: float | None = None
    peak_gib: float | None = None
    notes: str = ""

    def cells(self) -> list[str]:
        s = "—" if self.seconds is None else f"{self.seconds:.3f}"
        peak = "—" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        return [self.model, self.run, self.precision, self.batch, str(self.px), s, peak, self.notes]


class Report:
    """The table, rewritten to OUT_DIR after every row."""

    def __init__(self, out: Path, header: str) -> None:
        self.out, self.header, self.rows = out, header, []

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(" | ".join(row.cells()), flush=True)
        lines = [self.header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(r.cells()) + " |" for r in self.rows]
        (self.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
        data = {"header": self.header, "rows": [dataclasses.asdict(r) for r in self.rows]}
        (self.out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _error(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"failed: {type(err).__name__}: {text[0] if text else ''}"[:160]


def build_bundle(family: str, device: torch.device, smoke: bool) -> Any:
    """A `ModelBundle` with random weights: full-size on the GPU, or the tiny builtin for --smoke."""
    from xti import builtin as B
    from xti.config import ModelConfig
    from xti.families import detect
    from xti.models import ModelBundle, load_model, training_scheduler

    if smoke:
        return load_model(ModelConfig(path=SMOKE[family]))
    with torch.device(device):  # random init on the GPU: seconds instead of minutes
        te = B.build_text_encoder(B.CLIP_L_TEXT_CONFIG, 0)
        if family == "sd15":
            unet, vae_cfg, te2 = B.build_unet(B.SD15_UNET_CONFIG, 1), B.SD_VAE_CONFIG, None
        else:
            unet = B.build_unet(B.SDXL_UNET_CONFIG, 1)
            vae_cfg = dict(B.SD_VAE_CONFIG, scaling_factor=0.13025, sample_size=1024)
            te2 = B.build_text_encoder_with_projection(B.OPENCLIP_BIGG_TEXT_CONFIG, 3)
        vae = B.build_vae(vae_cfg, 2)
    scheduler = training_scheduler(dict(B.SD1_SCHEDULER_CONFIG))
    return ModelBundle(
        tokenizer=B.build_clip_tokenizer(),
        text_encoder=te,
        unet=unet,
        vae=vae,
        noise_scheduler=scheduler,
        family=detect(unet, te),
        prediction_type="epsilon",
        source=f"random {family}",
        tokenizer_2=B.build_clip_tokenizer() if te2 is not None else None,
        text_encoder_2=te2,
    )


def fresh_tokenizers(bundle: Any) -> Any:
    """The same models with tokenizers that have not yet gained a run's placeholder tokens."""
    from xti.tokenizer import build_clip_tokenizer

    second = build_clip_tokenizer() if bundle.tokenizer_2 is not None else None
    return dataclasses.replace(bundle, tokenizer=build_clip_tokenizer(), tokenizer_2=second)


def run_config(family: str, args: argparse.Namespace, overrides: list[str]) -> Any:
    """The family's shipped config with the check's overrides (tiny sizes under --smoke)."""
    from xti.config import load_config

    common = [
        "data.dir=data/tiny-concept",
        "concept.placeholder=<gpu-check>",
        "concept.initializer=object",
        "train.checkpoint_every=0",
        "train.snapshot_every=0",
        "validation.every=0",
        "tracking.report_to=none",
        "train.overwrite=true",
        "train.lr_warmup_steps=0",  # a 10-step run inside a 25-step warm-up looks frozen
    ]
    if args.smoke:
        common += [f"model.path={SMOKE[family]}", "train.resolution=32", "train.batch_size=2"]
        common += ["train.gradient_accumulation_steps=1", "train.gradient_checkpointing=false"]
    return load_config(REPO / FAMILIES[family], [*common, *overrides])


def time_train(bundle: Any, family: str, mode: str, precision: str, steps: int, args, out) -> Row:
    """One `train()` run: median s/step from its summary, peak memory around it."""
    from xti.training import train

    cfg = run_config(
        family,
        args,
        [
            f"xti.granularity={mode}",
            f"train.mixed_precision={precision}",
            f"train.max_steps={steps}",
            f"output_dir={out / 'runs' / f'{family}-{precision}-{mode}-{steps}'}",
        ],
    )
    tc = cfg.train
    row = Row(family, f"xti {MODES[mode]}", precision, f"{tc.batch_size}x{tc.gradient_accumulation_steps}", tc.resolution)  # fmt: skip
    device = torch.device(args.device)
    _reset_peak(device)
    try:
        train(cfg, bundle=fresh_tokenizers(bundle), progress=False)
    except BaseException as err:  # noqa: BLE001 - a failed row is reported, not fatal
        if isinstance(err, KeyboardInterrupt):
            raise
        row.notes = _error(err)
        return row
    summary = json.loads((Path(cfg.output_dir) / "summary.json").read_text())
    row.seconds = summary["median_step_seconds"]
    row.peak_gib = _peak(device)
    row.notes = f"{summary['steps_timed']} steps, latents {summary['latent_cache']}, KDE λ {cfg.kde.weight:g}"
    return row


def _pixels(resolution: int, batch: int, device: torch.device) -> torch.Tensor:
    """The concept images as a [-1, 1] batch at `resolution` (PIL + numpy, no torchvision)."""
    import numpy as np
    from PIL import Image

    files = sorted((REPO / "data" / "tiny-concept").glob("*.png"))
    arrays = []
    for i in range(batch):
        img = Image.open(files[i % len(files)]).convert("RGB").resize((resolution, resolution))
        arrays.append(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).to(device)


def _reference_context(bundle: Any, ids: list[torch.Tensor], resolution: int, batch: int):
    """Text conditioning as diffusers' examples compute it (SD: last hidden state; SDXL: both
    encoders' penultimate hidden states, pooled text embeds and size/crop time ids)."""
    if bundle.text_encoder_2 is None:
        return bundle.text_encoder(ids[0])[0], None
    out1 = bundle.text_encoder(ids[0], output_hidden_states=True)
    out2 = bundle.text_encoder_2(ids[1], output_hidden_states=True)
    context = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch)
    added = {"text_embeds": out2.text_embeds, "time_ids": time_ids.to(context.device)}
    return context, added


def reference_ti(bundle: Any, family: str, precision: str, steps: int, args) -> Row:
    """A plain-TI step the way diffusers' textual-inversion examples train it: every token row of
    every text encoder trainable (AdamW over the whole table, rows other than the placeholder's put
    back after each step), the VAE encoding the batch every step, autocast for the frozen parts."""
    cfg = run_config(family, args, [f"train.mixed_precision={precision}"])
    tc, device = cfg.train, torch.device(args.device)
    batch, res = tc.batch_size, tc.resolution
    row = Row(family, "diffusers-style TI (reference)", precision, f"{batch}x1", res)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    encoders = [e for e in (bundle.text_encoder, bundle.text_encoder_2) if e is not None]
    tokenizers = [t for t in (bundle.tokenizer, bundle.tokenizer_2) if t is not None]
    unet, vae, scheduler = bundle.unet, bundle.vae, bundle.noise_scheduler
    vae_dtype = torch.float32 if family == "sdxl" else dtype  # the SDXL VAE overflows in fp16
    before = {m: next(m.parameters()).dtype for m in (unet, vae, *encoders)}  # restored after
    unet.to(device, dtype).requires_grad_(False)
    vae.to(device, vae_dtype).requires_grad_(False)
    tables, saved = [], []
    for te in encoders:
        te.to(device, torch.float32).requires_grad_(False)
        table = te.get_input_embeddings().weight
        saved.append(table.detach().clone())
        table.requires_grad_(True)
        tables.append(table)
    try:
        token = tokenizers[0].convert_tokens_to_ids("object</w>")
        ids = [
            t(["a photo of a object"] * batch, padding="max_length", max_length=77, return_tensors="pt")
            .input_ids.to(device)
            for t in tokenizers
        ]  # fmt: skip
        pixels = _pixels(res, batch, device)
        opt = torch.optim.AdamW(tables, lr=5e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        keep = torch.ones(tables[0].shape[0], dtype=torch.bool, device=device)
        keep[token] = False
        times = []
        _reset_peak(device)
        for _ in range(steps + 1):  # the first step warms up
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype):
                latents = vae.encode(pixels.to(vae_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                steps_t = torch.randint(0, 1000, (batch,), device=device)
                noisy = scheduler.add_noise(latents, noise, steps_t).to(dtype)
                context, added = _reference_context(bundle, ids, res, batch)
                pred = unet(noisy, steps_t, context.to(dtype), added_cond_kwargs=added).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for table, original in zip(tables, saved, strict=True):
                    table[keep] = original[keep]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t)
        row.seconds = statistics.median(times[1:])
        row.peak_gib = _peak(device)
        row.notes = f"{steps} steps, VAE every step, whole table trainable"
    except Exception as err:  # noqa: BLE001 - a failed row is reported, not fatal
        row.notes = _error(err)
    finally:
        with torch.no_grad():
            for table, original in zip(tables, saved, strict=True):
                table.requires_grad_(False)
                table.copy_(original)
        for module, module_dtype in before.items():
            module.to(dtype=module_dtype)
    return row


def demo_run(args: argparse.Namespace, out: Path) -> Row:
    """``python train.py`` as a user runs it (the embedded demo), timed from launch to exit."""
    target = out / "demo"
    cmd = [sys.executable, "train.py", f"output_dir={target}", "train.overwrite=true"]
    if args.smoke:
        cmd += ["train.max_steps=2", "validation.every=0", "--no-progress"]
    row = Row("demo model", "python train.py (configs/demo.yaml)", "config", "", "")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        row.notes = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:140]
        return row
    summary = json.loads((target / "summary.json").read_text())
    row.seconds = summary["median_step_seconds"]
    row.precision = str(summary.get("mixed_precision", ""))
    row.notes = f"wall {wall:.1f} s for {summary.get('steps', '?')} steps, launch to exit"
    return row


def header(device: torch.device) -> str:
    import diffusers
    import transformers

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        where = f"{name}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads) — smoke run"
    return (
        f"bench/gpu_check.py on {where}; torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, transformers {transformers.__version__}, python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("out_dir", help="folder for gpu_check.md, gpu_check.json and the runs")
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU, seconds (CI)")
    ap.add_argument("--families", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    ap.add_argument("--precisions", default="bf16,fp16", help="comma-separated: bf16, fp16")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run")
    ap.add_argument("--budget-s", type=float, default=450, help="skip rows after this many seconds")
    ap.add_argument("--no-demo", action="store_true", help="skip the demo run")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench/gpu_check.py: no CUDA device here (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or add --smoke for the CPU smoke run")  # fmt: skip
        return 2
    families = [f for f in args.families.split(",") if f]
    precisions = [p for p in args.precisions.split(",") if p]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"--families: unknown {f!r} (sd15, sdxl)")
    for p in precisions:
        if p not in ("bf16", "fp16"):
            ap.error(f"--precisions: unknown {p!r} (bf16, fp16)")
    args.device = "cpu" if args.smoke else "cuda"
    steps = 2 if args.smoke else args.steps
    os.chdir(REPO)
    if args.smoke:
        torch.set_num_threads(1)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("XTI_LATENT_CACHE", str(out / "latent-cache"))
    device = torch.device(args.device)
    report = Report(out, header(device))
    print(report.header, flush=True)
    t0 = time.perf_counter()

    def over_budget(row: Row) -> bool:
        if time.perf_counter() - t0 <= args.budget_s:
            return False
        row.notes = f"skipped: past --budget-s {args.budget_s:g}"
        report.add(row)
        return True

    for family in families:
        if over_budget(Row(family, "all runs", "")):
            continue
        t = time.perf_counter()
        bundle = build_bundle(family, device, args.smoke)
        print(f"built {family} in {time.perf_counter() - t:.1f} s", flush=True)
        for precision in precisions:
            if not args.smoke:  # warm-up, not reported (the smoke run's 2 steps need no cache)
                time_train(bundle, family, "block", precision, 1, args, out)
            for mode in MODES:
                if not over_budget(Row(family, f"xti {MODES[mode]}", precision)):
                    report.add(time_train(bundle, family, mode, precision, steps, args, out))
            if not over_budget(Row(family, "diffusers-style TI (reference)", precision)):
                report.add(reference_ti(bundle, family, precision, steps, args))
        del bundle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.no_demo and not over_budget(Row("demo model", "python train.py", "")):
        report.add(demo_run(args, out))
    print(f"total {time.perf_counter() - t0:.0f} s; table in {out / 'gpu_check.md'}")
    failed = [r for r in report.rows if r.notes.startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
