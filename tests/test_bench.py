"""Every script in bench/ keeps running: each one's ``--smoke`` mode (the smallest budget through
the same code) runs here, so a bench that no longer imports or breaks on the way turns CI red."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "common.py")

# What each smoke run must print: a table row with figures, not just "no crash".
NUMBER = r"\d+(\.\d+)?"
EXPECTED = {
    "concepts.py": rf"tiny-sd1: one run / separate runs wall-time ratio: {NUMBER}",
    "demo_model.py": rf"colour {NUMBER}%\s+shape {NUMBER}%\s+background {NUMBER}%",
    "first_step.py": rf"second run reaches its first step -?{NUMBER} s sooner",
    "gpu_check.py": rf"sdxl \| diffusers-style TI \(reference\) \| fp16 \| 2x1 \| 32 \| {NUMBER} \|",
    "kde.py": rf"\| striped-cross \| XTI \| 0\.1 \| 2 \| {NUMBER}% \|",
    "kde_modes.py": rf"\| demo, 22 words \(d 64\) \| 1 \| {NUMBER} \| {NUMBER} \| {NUMBER} \|",
    "quality.py": rf"\| striped-cross \| XTI \| 2 \| {NUMBER}% \|",
    "regularizers.py": rf"\| off \| XTI \| {NUMBER} ± {NUMBER} \({NUMBER}\) \|",
    "step.py": rf"xti / shared step-time ratio: {NUMBER}",
}


def _bench(
    name: str, *args: str, tmp_path: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), XTI_CACHE=str(tmp_path / "cache"))
    return subprocess.run(
        [sys.executable, f"bench/{name}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_every_bench_has_a_smoke_expectation():
    assert set(BENCHES) == set(EXPECTED), "a new bench needs --smoke and an entry in EXPECTED"


# Every bench's --help, in one process: one import of torch and diffusers instead of one per bench.
HELP_ALL = """
import contextlib, io, runpy, sys
sys.path.insert(0, "bench")
for name in sys.argv[1:]:
    sys.argv, out, code = [name, "--help"], io.StringIO(), "no exit"
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(f"bench/{name}", run_name="__main__")
    except SystemExit as e:
        code = e.code or 0
    print(f"{name}: exit {code}, mentions --smoke: {'--smoke' in out.getvalue()}")
"""


def test_bench_help(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), XTI_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-c", HELP_ALL, *BENCHES],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines == [f"{name}: exit 0, mentions --smoke: True" for name in BENCHES], proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("name", BENCHES)
def test_bench_smoke(name, tmp_path):
    out = tmp_path / "out"
    args = [str(out)] if name == "gpu_check.py" else []
    proc = _bench(name, *args, "--smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert re.search(EXPECTED[name], proc.stdout), proc.stdout[-3000:]
    if name == "gpu_check.py":
        _check_gpu_table((out / "gpu_check.md").read_text())


@pytest.mark.slow
def test_quality_masks_smoke(tmp_path):
    """``bench/quality.py --masks``: the cluttered concept with and without its masks."""
    proc = _bench("quality.py", "--masks", "--smoke", tmp_path=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    for loss in ("mask, floor 0", r"no mask \(floor 1\)"):
        assert re.search(rf"\| cluttered-cross \| {loss} \| 2 \| {NUMBER}% \|", proc.stdout)


def _check_gpu_table(table: str) -> None:
    """The GPU check's table (written to the folder given) has a measured row for each family,
    precision and run, and the demo run, with no failure."""
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| sd")]
    got = {(r[0].strip("| "), r[1], r[2]) for r in rows}
    runs = ("xti XTI", "xti TI", "diffusers-style TI (reference)")
    want = {(f, r, p) for f in ("sd15", "sdxl") for r in runs for p in ("bf16", "fp16")}
    assert got == want, table
    assert all(float(r[5]) > 0 for r in rows), table
    assert re.search(r"\| demo model \| python train.py .* wall \d+\.\d s for 2 steps", table), (
        table
    )
    assert "failed" not in table and "skipped" not in table


def test_gpu_check_without_cuda_stops_at_once_with_one_line(tmp_path):
    proc = _bench("gpu_check.py", str(tmp_path / "out"), tmp_path=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--smoke" in lines[0], proc.stdout
    assert not (tmp_path / "out").exists()
