"""Launch to first step, twice on the same images: the second run reads its latents from the disk
cache instead of running the VAE.

    python bench/first_step.py                      # SD1.5-shaped random weights, 512 px, fp32
    python bench/first_step.py --model builtin:tiny-sd1 --config configs/tiny.yaml --resolution 32
    python bench/first_step.py --smoke              # the line above (CI)

With the default model it first builds an SD1.5-shaped diffusers folder with random weights from the
reference configs (`xti.builtin`; ~4 GB in ``$XTI_CACHE/bench/sd15-random``, a minute or two, once).
Then it runs ``python train.py --config configs/sd15.yaml ... train.max_steps=1`` twice, one after
the other, with an empty latent cache of its own (``XTI_LATENT_CACHE`` in a temporary folder), and
prints for each run: wall time from launch to the first step (``summary.json``'s
``launch_to_first_step_seconds``: process start, imports included), the setup inside `train()`,
the latent time and cache status, and the step time. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).parents[1]


def build_sd15_random(folder: Path) -> Path:
    """An SD1.5-shaped ``StableDiffusionPipeline`` folder with random weights (built once)."""
    if (folder / "model_index.json").is_file():
        return folder
    import torch
    from diffusers import DDPMScheduler

    from xti.builtin import (
        CLIP_L_TEXT_CONFIG,
        SD1_SCHEDULER_CONFIG,
        SD15_UNET_CONFIG,
        SD_VAE_CONFIG,
        _model_index,
        build_text_encoder,
        build_unet,
        build_vae,
    )
    from xti.tokenizer import save_clip_tokenizer

    t = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_clip_tokenizer(tmp / "tokenizer")
    torch.manual_seed(0)
    build_text_encoder(CLIP_L_TEXT_CONFIG, 0).save_pretrained(str(tmp / "text_encoder"))
    build_vae(SD_VAE_CONFIG, 2).save_pretrained(str(tmp / "vae"))
    build_unet(SD15_UNET_CONFIG, 1).save_pretrained(str(tmp / "unet"))
    sched = {k: v for k, v in SD1_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    DDPMScheduler.from_config(sched).save_pretrained(str(tmp / "scheduler"))
    (tmp / "model_index.json").write_text(json.dumps(_model_index(), indent=2) + "\n")
    os.replace(tmp, folder)
    print(f"built {folder} in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", help="model.path (default: the SD1.5-shaped random-weight folder)")
    ap.add_argument("--config", default="configs/sd15.yaml")
    ap.add_argument("--data", default="data/tiny-concept")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument(
        "--smoke", action="store_true", help="builtin:tiny-sd1 at 32 px with configs/tiny.yaml (CI)"
    )
    args = ap.parse_args()
    if args.smoke:
        args.model, args.config, args.resolution = "builtin:tiny-sd1", "configs/tiny.yaml", 32

    from xti.paths import cache_dir

    model = args.model or str(build_sd15_random(cache_dir() / "bench" / "sd15-random"))
    work = Path(tempfile.mkdtemp(prefix="xti-first-step-"))
    env = dict(os.environ, XTI_LATENT_CACHE=str(work / "latents"), PYTHONPATH=str(REPO))
    rows = []
    for i in range(args.runs):
        out = work / f"run{i}"
        cmd = [sys.executable, "train.py", "--config", args.config, f"model.path={model}",
               f"data.dir={args.data}", "concept.placeholder=<box>", "concept.initializer=box",
               f"train.resolution={args.resolution}", "train.batch_size=1", "train.max_steps=1",
               "train.mixed_precision=no", "train.checkpoint_every=0", "train.snapshot_every=0",
               "validation.every=0", "tracking.report_to=none", f"output_dir={out}", "--no-progress"]  # fmt: skip
        if i == 0:
            print("$ " + " ".join(cmd[1:]), flush=True)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"run {i} failed:\n{proc.stderr[-3000:]}")
        s = json.loads((out / "summary.json").read_text())
        rows.append((i + 1, s, wall))
    print(f"{'run':>3} {'launch->1st step s':>18} {'setup s':>8} {'latents s':>9} {'cache':>8} "
          f"{'encoded':>8} {'step s':>7} {'process s':>9}")  # fmt: skip
    for n, s, wall in rows:
        print(f"{n:>3} {s['launch_to_first_step_seconds']:>18.1f} {s['setup_seconds']:>8.1f} "
              f"{s['latent_seconds']:>9.1f} {s['latent_cache']:>8} "
              f"{s['latents_encoded']:>3}/{s['latents_total']:<4} {s['median_step_seconds']:>7.2f} "
              f"{wall:>9.1f}")  # fmt: skip
    if len(rows) >= 2:
        gain = (
            rows[0][1]["launch_to_first_step_seconds"] - rows[1][1]["launch_to_first_step_seconds"]
        )
        print(f"second run reaches its first step {gain:.1f} s sooner")
    print(f"(outputs and latent cache in {work})")


if __name__ == "__main__":
    main()
