"""XTI vs textual inversion on the demo model: reconstruction, editability, mixing, per step budget.

    python bench/quality.py                                   # 100, 250, 500 steps; 8 seeds
    python bench/quality.py --steps 50,100 --seeds 4 --work-dir /tmp/q --reuse

For each mode (`block` = XTI, `shared` = classic TI through the same code) it trains the demo object
concept (configs/demo.yaml, data/demo-concepts/striped-cross) and the demo style concept
(configs/demo-style.yaml, teal-dotted) for the largest budget, writing an embedding snapshot at every
budget. The schedule is constant after warm-up and every random draw of a step depends only on
(seed, step), so the snapshot at step k is exactly what a k-step run would export.

Each snapshot is then scored by `xti.quality` with the generator's labels (one image per seed, DDIM
12 steps, guidance 4, the demo model's settings):
  recon   "a <striped-cross> on a {white,gray,black} background": hit rates of shape (cross), colour
          (orange), background, all three at once, and the RMS pixel distance (0-1 scale) to the
          nearest training image on that background (the stripes only show in the distance);
  edit    "a {blue,red,green,purple} <striped-cross> on a white background": the asked colour, the
          cross shape kept;
  mix     "a <striped-cross> on a … background" with the cross in the layers that decide shape
          (--mix-layers, default IN04-OUT08: all but the 16x16 layers, see
          xti.quality.DEMO_SHAPE_LAYERS) and teal-dotted in the others: cross shape, teal colour, both.
A `text` row gives the plain words ("an orange striped cross …") for reference; the demo model never
saw a striped cross. A control row per mode mixes the style's initializer word ("dotted") instead of
its learned vectors into the other layers: teal there would mean the mixing colour is not the style's
doing (teal is the colour the model draws when none is named).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from functools import reduce
from pathlib import Path

import torch

from xti import quality as Q
from xti.config import load_config
from xti.inference import XTIAdapter, load_pipeline
from xti.training import train

REPO = Path(__file__).resolve().parents[1]
MODES = {"block": "XTI", "shared": "TI"}
COLUMNS = [
    ("recon shape", "reconstruction.shape"),
    ("recon colour", "reconstruction.colour"),
    ("recon bg", "reconstruction.background"),
    ("recon all", "reconstruction.all"),
    ("recon dist", "reconstruction.distance"),
    ("edit colour", "editability.colour"),
    ("edit shape", "editability.shape"),
    ("mix shape", "mixing.shape"),
    ("mix colour", "mixing.colour"),
    ("mix both", "mixing.all"),
]


def train_concept(
    config: Path, mode: str, budgets: list[int], work: Path, reuse: bool, extra: list[str]
) -> dict[int, Path]:
    """Train one concept in one mode up to max(budgets); the snapshot file of every budget."""
    every = reduce(math.gcd, budgets)
    top = max(budgets)
    cfg = load_config(
        config,
        [
            f"xti.granularity={mode}",
            f"train.max_steps={top}",
            f"train.snapshot_every={every}",
            f"output_dir={work / mode / config.stem}",
            "validation.every=0",
            "validation.mix_with=null",
            *extra,
        ],
    )
    out = Path(cfg.output_dir)
    files = {
        b: out / "snapshots" / f"{cfg.concept_name}-step{b:06d}.xti.safetensors" for b in budgets
    }
    if not (reuse and all(f.is_file() for f in files.values())):
        t0 = time.perf_counter()
        train(cfg, progress=True)
        print(
            f"  trained {cfg.concept_name} ({mode}, {top} steps) in {time.perf_counter() - t0:.0f} s"
        )
    return files


def fmt(key: str, value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if key.endswith("distance") else f"{100 * value:.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", default="100,250,500", help="comma-separated step budgets")
    ap.add_argument("--modes", default="block,shared", help="granularities to compare")
    ap.add_argument("--seeds", type=int, default=8, help="images per prompt")
    ap.add_argument("--work-dir", default="outputs/bench-quality")
    ap.add_argument("--reuse", action="store_true", help="reuse snapshots already in --work-dir")
    ap.add_argument(
        "--mix-layers", default=Q.DEMO_SHAPE_LAYERS, help="layers that take the object when mixing"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for both training configs (e.g. train.lr=0.02)",
    )
    args = ap.parse_args()
    os.chdir(REPO)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = sorted({int(s) for s in args.steps.split(",")})
    modes = args.modes.split(",")
    work = Path(args.work_dir)
    seeds = list(range(args.seeds))

    obj = Q.load_concept("data/demo-concepts/striped-cross")
    style = Q.load_concept("data/demo-concepts/teal-dotted")
    files = {}
    for mode in modes:
        for config, concept in (("demo", obj), ("demo-style", style)):
            files[mode, concept.subject] = train_concept(
                REPO / "configs" / f"{config}.yaml", mode, budgets, work, args.reuse, args.overrides
            )

    word = load_config(REPO / "configs" / "demo-style.yaml").concept.initializer
    pipe = load_pipeline("data/demo-model")
    pipe.set_progress_bar_config(disable=True)
    rows = []
    t0 = time.perf_counter()
    text = Q.Concept(obj.describe(), obj.images, obj.labels)
    with XTIAdapter(pipe) as xti:
        scores = Q.evaluate(Q.adapter_sampler(xti, seeds), Q.demo_probes(text))
    rows.append(("text", "—", scores))
    for mode in modes:
        for budget in budgets:
            with XTIAdapter(pipe) as xti:
                xti.load(files[mode, obj.subject][budget], obj.subject)
                xti.load(files[mode, style.subject][budget], style.subject)
                scores = Q.evaluate(
                    Q.adapter_sampler(xti, seeds),
                    Q.demo_probes(obj, style, shape_layers=args.mix_layers),
                )
            rows.append((MODES.get(mode, mode), str(budget), scores))
            print(f"  scored {rows[-1][0]} at {budget} steps", flush=True)
        with XTIAdapter(
            pipe
        ) as xti:  # control: the style's initializer word instead of its vectors
            xti.load(files[mode, obj.subject][budgets[-1]], obj.subject)
            control = Q.evaluate(
                Q.adapter_sampler(xti, seeds),
                Q.mixing_control_probes(obj, style, word, shape_layers=args.mix_layers),
            )
        control = {k.replace("control.", "mixing."): v for k, v in control.items()}
        rows.append((f"{MODES.get(mode, mode)}, '{word}' mixed in", str(budgets[-1]), control))
    print(
        f"scored {len(rows)} rows in {time.perf_counter() - t0:.0f} s ({len(seeds)} seeds per "
        f"prompt; mixing: object in {args.mix_layers}, style in the rest)"
    )

    header = ["mode", "steps", *(c for c, _ in COLUMNS)]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for mode, steps, scores in rows:
        cells = [fmt(k, scores.get(k)) for _, k in COLUMNS]
        print("| " + " | ".join([mode, steps, *cells]) + " |")


if __name__ == "__main__":
    main()
