"""K concepts in one run (`concepts:`, `xti.concepts`) against K separate runs, same steps per concept.

    python bench/concepts.py                       # demo model (32 px) and SD1.5-shaped (128 px)
    python bench/concepts.py --models demo --k 4 --steps 30
    python bench/concepts.py --smoke               # builtin:tiny-sd1, K=2, 2 steps (CI)

Each arm is what a user runs, timed from launch to exit: ``python train.py --config FILE`` once with
a ``concepts:`` config of K concepts (one process, the model loaded once), and once per concept
with that concept's one-concept config (K processes, one after another). Both train the same K
concepts (the demo concepts in ``data/demo-concepts``) for the same steps at the same batch size,
validation, checkpoints and the latent disk cache off, so that each arm encodes its own latents.
Printed per model and arm: total wall time, wall time per concept-step (setup included), and the
median step time of one concept (``summary.json``), with the machine's load average (CPU figures
are only comparable on a quiet machine).

The SD1.5-shaped model is random weights built from the reference configs (`xti.builtin`; ~4 GB in
``$XTI_CACHE/bench/sd15-random``, once; see ``bench/first_step.py``), trained at a small resolution
(``--sd15-resolution``, default 128 px: 16x16 latents) with batch 1 so that it fits CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONCEPTS = ["striped-cross", "giant-dotted-diamond", "giant-striped-triangle", "teal-dotted"]
INITIALIZERS = {"striped-cross": "cross", "giant-dotted-diamond": "diamond",
                "giant-striped-triangle": "triangle", "teal-dotted": "dotted"}  # fmt: skip


@dataclass
class Setting:
    """One model of the bench: its base config, model path, resolution and batch."""

    label: str
    config: str
    model: str
    resolution: int
    batch: int


@dataclass
class Arm:
    """One arm's figures."""

    wall: float
    median_step: float  # one concept's median step time (summary.json), mean over concepts


def base_dict(s: Setting, steps: int) -> dict:
    """The base config without its concept, with the bench's settings."""
    cfg = yaml.safe_load((REPO / s.config).read_text())
    for key in ("name", "concept"):
        cfg.pop(key, None)
    cfg.setdefault("data", {}).pop("dir", None)
    cfg["data"]["latent_cache"] = False
    cfg["model"] = {**cfg.get("model", {}), "path": s.model}
    cfg["train"] = {**cfg.get("train", {}), "max_steps": steps, "resolution": s.resolution,
                    "batch_size": s.batch, "checkpoint_every": 0, "snapshot_every": 0,
                    "mixed_precision": "no"}  # fmt: skip
    cfg["validation"] = {"every": 0}
    cfg["tracking"] = {"report_to": "none"}
    return cfg


def entry(name: str) -> dict:
    return {"name": name, "placeholder": f"<{name}>", "initializer": INITIALIZERS[name],
            "data": str(REPO / "data" / "demo-concepts" / name)}  # fmt: skip


def run(config: dict, work: Path, label: str) -> float:
    """``python train.py --config`` of `config`, timed from launch to exit."""
    path = work / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "train.py", "--config", str(path), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{label} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return wall


def median_step(folders: list[Path]) -> float:
    steps = [json.loads((f / "summary.json").read_text())["median_step_seconds"] for f in folders]
    return sum(steps) / len(steps)


def bench(s: Setting, k: int, steps: int, work: Path) -> tuple[Arm, Arm]:
    names = CONCEPTS[:k]
    base = base_dict(s, steps)
    together = {**base, "output_dir": str(work / "one-run"), "concepts": [entry(n) for n in names]}
    wall = run(together, work, f"{s.label}-one-run")
    one = Arm(wall, median_step([work / "one-run" / n for n in names]))
    wall = 0.0
    for n in names:
        e = entry(n)
        single = {**base, "name": n, "output_dir": str(work / "separate" / n),
                  "data": {**base["data"], "dir": e["data"]},
                  "concept": {"placeholder": e["placeholder"], "initializer": e["initializer"]}}  # fmt: skip
        wall += run(single, work, f"{s.label}-{n}")
    sep = Arm(wall, median_step([work / "separate" / n for n in names]))
    return one, sep


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--models", default="demo,sd15", help="comma-separated: demo, sd15")
    ap.add_argument("--k", type=int, default=3, help=f"concepts (at most {len(CONCEPTS)})")
    ap.add_argument("--steps", type=int, default=20, help="steps per concept (demo model)")
    ap.add_argument("--sd15-steps", type=int, default=4, help="steps per concept (SD1.5-shaped)")
    ap.add_argument("--sd15-resolution", type=int, default=128)
    ap.add_argument(
        "--smoke", action="store_true", help="builtin:tiny-sd1 at 32 px, K=2, 2 steps (CI)"
    )
    args = ap.parse_args()
    if not 1 <= args.k <= len(CONCEPTS):
        ap.error(f"--k must be 1..{len(CONCEPTS)}")
    settings = []
    if args.smoke:
        args.k, args.steps = 2, 2
        settings = [Setting("tiny-sd1", "configs/tiny.yaml", "builtin:tiny-sd1", 32, 2)]
    for label in [] if args.smoke else args.models.split(","):
        if label == "demo":
            settings.append(Setting("demo", "configs/demo.yaml", "data/demo-model", 32, 8))
        elif label == "sd15":
            from first_step import build_sd15_random

            from xti.paths import cache_dir

            model = str(build_sd15_random(cache_dir() / "bench" / "sd15-random"))
            settings.append(Setting("sd15", "configs/sd15.yaml", model, args.sd15_resolution, 1))
        else:
            ap.error(f"unknown model {label!r} (demo, sd15)")
    print(f"load average before: {load()}", flush=True)
    print("| model | resolution | batch | K | steps each | arm | wall s | s per concept-step "
          "(wall) | median step s | load average after |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    ratios = []
    for s in settings:  # each model's rows as soon as they are measured
        steps = args.sd15_steps if s.label == "sd15" else args.steps
        with tempfile.TemporaryDirectory(prefix="xti-bench-concepts-") as tmp:
            one, sep = bench(s, args.k, steps, Path(tmp))
        for arm_name, arm in (("one run, K concepts", one), ("K separate runs", sep)):
            per = arm.wall / (args.k * steps)
            print(f"| {s.label} | {s.resolution} | {s.batch} | {args.k} | {steps} | {arm_name} | "
                  f"{arm.wall:.1f} | {per:.2f} | {arm.median_step:.3f} | {load()} |", flush=True)  # fmt: skip
        ratios.append(
            f"{s.label}: one run / separate runs wall-time ratio: {one.wall / sep.wall:.2f}"
        )
    print("\n".join(ratios))


def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
