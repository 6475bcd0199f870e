"""What the demo-model benches (`bench/quality.py`, `bench/kde.py`) share on the command line: the
sampling, work-folder, layer and thread options, and the start of a run (cwd, threads, concept
names). Everything else they share lives in `xti.quality`."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from xti import quality as Q

REPO = Path(__file__).resolve().parents[1]


def add_common_arguments(ap: argparse.ArgumentParser, work_dir: str) -> None:
    """--seeds, --work-dir, --reuse, --mix-layers, --threads, --smoke and key=value overrides."""
    ap.add_argument("--seeds", type=int, default=8, help="images per prompt")
    ap.add_argument("--work-dir", default=work_dir)
    ap.add_argument("--reuse", action="store_true", help="reuse snapshots already in --work-dir")
    ap.add_argument(
        "--mix-layers", default=Q.DEMO_SHAPE_LAYERS, help="layers that take the object when mixing"
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="the smallest budget through the same code (seconds; CI runs it): "
        "2 steps, 1 seed, one concept, XTI only, a temporary work folder",
    )
    ap.add_argument(
        "overrides",
        nargs="*",
        help="key=value overrides for every training config (e.g. train.lr=0.02)",
    )


def smoke(args: argparse.Namespace, **values: object) -> None:
    """Under --smoke, replace the options in `values` (and use one thread, a fresh work folder)."""
    if not args.smoke:
        return
    for key, value in values.items():
        setattr(args, key, value)
    args.threads, args.reuse = 1, False
    args.work_dir = tempfile.mkdtemp(prefix="xti-bench-smoke-")


def start(ap: argparse.ArgumentParser, args: argparse.Namespace, concepts: list[str]) -> None:
    """Run from the repository root with the asked threads; refuse unknown concept names."""
    os.chdir(REPO)
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in concepts:
        if name not in Q.DEMO_CONFIGS:
            ap.error(f"unknown concept {name!r}; demo concepts: {', '.join(Q.DEMO_CONFIGS)}")
