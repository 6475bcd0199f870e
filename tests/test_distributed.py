"""Two-process DDP on CPU (gloo): ranks stay in sync and equal one process with the global batch;
rank 0 writes the checkpoints, every rank reads one on resume, and the resume is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from xti.config import load_config
from xti.training import train

REPO = Path(__file__).parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def overrides(model: Path, out: Path, batch: int) -> list[str]:
    return [
        "name=box",
        f"model.path={model}",
        f"data.dir={REPO / 'data' / 'tiny-concept'}",
        f"output_dir={out}",
        "concept.placeholder=<box>",
        "concept.initializer=box",
        "train.resolution=32",
        f"train.batch_size={batch}",
        "train.max_steps=3",
        "train.lr=0.01",
        "train.seed=5",
        "train.checkpoint_every=2",
        "kde.weight=0.5",
        "tracking.report_to=none",
    ]


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_global_batch(tiny_model, tmp_path):
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def launch(*args: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "train.py"), "--no-progress", "--config", str(TINY), *args]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(*overrides(tiny_model, tmp_path / "ddp", 1))
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True

    single = train(load_config(TINY, overrides(tiny_model, tmp_path / "one", 2)), progress=False)
    ddp = load_file(str(tmp_path / "ddp" / "box.xti.safetensors"))
    one = load_file(str(single.output_file))
    assert ddp.keys() == one.keys()
    for k in one:
        # same global batch, gradients averaged across ranks: equal up to summation order
        assert (ddp[k] - one[k]).abs().max() < 1e-5, k
    assert summary["final_loss"] == pytest.approx(single.losses[-1][1], rel=1e-4)

    # both ranks resume rank 0's checkpoint (safetensors + JSON) and end bit-identical
    step2 = tmp_path / "ddp" / "checkpoints" / "step-000002"
    assert sorted(p.name for p in step2.iterdir()) == [
        "optimizer.safetensors", "vectors.safetensors", "xti_state.json"]  # fmt: skip
    launch(*overrides(tiny_model, tmp_path / "resumed", 1), f"train.resume={step2}")
    resumed = load_file(str(tmp_path / "resumed" / "box.xti.safetensors"))
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["ranks_in_sync"] is True
    for k in ddp:
        assert torch.equal(resumed[k], ddp[k]), k
