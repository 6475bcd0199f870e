"""Slurm, for real: a one-node cluster started on this host (tests/slurm_cluster.py) runs jobs."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from slurm_cluster import FINAL_STATES

from xti import runs
from xti.config import load_config
from xti.training import train

# run alone, after the parallel part of the suite (README's test line): they time signals
pytestmark = pytest.mark.cluster

REPO = Path(__file__).parents[1]


def test_local_cluster_runs_a_two_task_job(slurm_cluster, tmp_path):
    script = tmp_path / "hello.sbatch"
    script.write_text("#!/bin/bash\nsrun bash -c 'echo task $SLURM_PROCID of $SLURM_NTASKS'\n")
    job = slurm_cluster.sbatch(
        script, "--ntasks=2", f"--output={tmp_path}/out-%j.txt", cwd=tmp_path
    )
    assert slurm_cluster.wait(job, timeout=60) == {job: "COMPLETED"}
    lines = sorted((tmp_path / f"out-{job}.txt").read_text().splitlines())
    assert lines == ["task 0 of 2", "task 1 of 2"]
    assert f"JobId={job} " in slurm_cluster.jobcomp.read_text()


def test_a_repeated_sigterm_is_the_same_stop_and_a_sigint_still_stops_at_once():
    """Slurm signals every process of a step and torchrun forwards the same SIGTERM to its workers:
    the second copy must not turn the stop at the step boundary into a stop mid-step."""
    with runs.StopSignals() as stop:
        stop.enter_step()
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # no RunInterrupted mid-step
        stop.leave_step()
        with pytest.raises(runs.RunInterrupted) as err:
            stop.check()
        assert err.value.signum == signal.SIGTERM and stop.at_boundary
    with runs.StopSignals() as stop:
        stop.enter_step()
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(runs.RunInterrupted) as err:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C after the scheduler's SIGTERM: at once
        assert not stop.at_boundary


# ----------------------------------------------------------------------------- the sbatch templates

TEMPLATES = REPO / "slurm"
MAX_STEPS = 20  # room after the stop at step 2 or 3 on a fast machine


def render(template: str, dest: Path, **options: str | None) -> Path:
    """``slurm/<template>`` with some ``#SBATCH --key=value`` lines changed (``None`` drops one):
    what this GPU-less one-node cluster needs instead of a GPU cluster's values. The body is the
    template's own, so a test of the rendered script tests the template."""
    lines, seen = [], set()
    for line in (TEMPLATES / template).read_text().splitlines():
        m = re.match(r"#SBATCH --([\w-]+)=", line)
        key = m.group(1).replace("-", "_") if m else None
        if key in options:
            seen.add(key)
            if options[key] is None:
                continue
            line = f"#SBATCH --{m.group(1)}={options[key]}"
        lines.append(line)
    assert seen == set(options), f"{template} has no #SBATCH line for {set(options) - seen}"
    dest.write_text("\n".join(lines) + "\n")
    return dest


def job_env(**extra: str) -> dict[str, str]:
    """What a job needs here: this venv first on PATH, gloo on CPU, one thread, this test's cache."""
    venv_bin = str(Path(sys.executable).parent)
    return {
        "PATH": f"{venv_bin}:{os.environ['PATH']}",
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "XTI_DIR": str(REPO),
        "XTI_LATENT_CACHE": os.environ["XTI_LATENT_CACHE"],
        **extra,
    }


def train_args(model: Path, out: Path, batch: int = 1) -> list[str]:
    return [
        "--config", str(REPO / "configs" / "tiny.yaml"), "name=box", f"model.path={model}",
        f"data.dir={REPO / 'data' / 'tiny-concept'}", f"output_dir={out}",
        "concept.placeholder=<box>", "concept.initializer=box", "train.resolution=32",
        f"train.batch_size={batch}", f"train.max_steps={MAX_STEPS}", "train.lr=0.01",
        "train.seed=5", "train.checkpoint_every=1", "kde.weight=0.5", "tracking.report_to=none",
    ]  # fmt: skip


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def wait_for(path: Path, cluster, job: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        states = set(cluster.job_states(job).values())
        assert time.monotonic() < deadline and not states & FINAL_STATES, (job, states)
        time.sleep(0.1)


def release_when_requeued(cluster, job: str, timeout: float = 120) -> None:
    """A requeued job may start again only 2 minutes later (Slurm 22.05 sets its EligibleTime to
    the requeue + 121 s: Reason=BeginTime): once it is back in the queue, let it start now."""
    deadline = time.monotonic() + timeout
    while True:
        line = cluster.run("scontrol", "-o", "show", "job", job).stdout
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        if int(fields.get("Restarts", "0")) >= 1 and fields.get("JobState") != "COMPLETING":
            break
        assert time.monotonic() < deadline, line
        time.sleep(0.2)
    if fields["JobState"] == "PENDING":
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


@pytest.mark.parametrize("template", ["one-node.sbatch", "multi-node.sbatch", "array.sbatch"])
def test_every_template_is_preemptible_and_resumes(template):
    """Without a cluster too: each template parses, asks for the early signal it traps, a requeue
    and an appended log, and continues its run (train.resume=auto)."""
    text = (TEMPLATES / template).read_text()
    assert subprocess.run(["bash", "-n", str(TEMPLATES / template)]).returncode == 0
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert sbatch["signal"].startswith("B:USR1@") and "trap " in text and " USR1" in text
    assert "requeue" in sbatch and sbatch["open-mode"] == "append"
    assert '"$@"' in text and "train.resume=auto" in text


@pytest.mark.slow
def test_preempted_jobs_continue_bit_identically_with_no_file_lost_or_doubled(
    slurm_cluster, tiny_model, tmp_path
):
    """Three 2-process jobs from the templates: one runs straight through; one (one-node.sbatch,
    accelerate launch) is requeued from outside (`scontrol requeue`: SIGTERM to every process,
    then requeued); one (multi-node.sbatch, 2 tasks x torchrun, c10d) gets the early USR1 of its
    time limit and requeues itself. Both continue with train.resume=auto."""
    cpu = {"gres": None, "cpus_per_task": None, "time": None}
    logs = tmp_path / "logs"
    logs.mkdir()
    one_node = render("one-node.sbatch", tmp_path / "one-node.sbatch", **cpu,
                      output=f"{logs}/%x-%j.out")  # fmt: skip
    multi = render("multi-node.sbatch", tmp_path / "multi-node.sbatch", **cpu, nodes="1",
                   ntasks_per_node="2", output=f"{logs}/%x-%j.out")  # fmt: skip
    outs = {name: tmp_path / name for name in ("straight", "requeued", "signalled")}
    submit = slurm_cluster.sbatch
    jobs = {
        "straight": submit(one_node, script_args=train_args(tiny_model, outs["straight"]), cwd=tmp_path,
                           env=job_env(XTI_PROCESSES="2")),
        "requeued": submit(one_node, script_args=train_args(tiny_model, outs["requeued"]), cwd=tmp_path,
                           env=job_env(XTI_PROCESSES="2")),
        "signalled": submit(multi, script_args=train_args(tiny_model, outs["signalled"]), cwd=tmp_path,
                            env=job_env(XTI_PROCESSES_PER_NODE="1")),
    }  # fmt: skip

    wait_for(outs["requeued"] / "checkpoints" / "step-000002", slurm_cluster, jobs["requeued"])
    slurm_cluster.run("scontrol", "requeue", jobs["requeued"])
    wait_for(outs["signalled"] / "checkpoints" / "step-000002", slurm_cluster, jobs["signalled"])
    slurm_cluster.run(
        "scancel", "--batch", "--signal=USR1", jobs["signalled"]
    )  # = --signal=B:USR1@T
    for name in ("requeued", "signalled"):
        release_when_requeued(slurm_cluster, jobs[name])
    for job in jobs.values():
        log = next(logs.glob(f"*-{job}.out"))
        assert slurm_cluster.wait(job, timeout=240) == {job: "COMPLETED"}, log.read_text()[-3000:]

    straight = load_file(str(outs["straight"] / "box.xti.safetensors"))
    for name in ("requeued", "signalled"):
        text = next(logs.glob(f"*-{jobs[name]}.out")).read_text()
        assert "start 0," in text and "start 1," in text, text[-3000:]  # ran twice
        stopped = re.findall(r"interrupted at step (\d+);", text)
        assert len(stopped) == 1 and 2 <= int(stopped[0]) < MAX_STEPS, text[-3000:]
        vectors = load_file(str(outs[name] / "box.xti.safetensors"))
        assert vectors.keys() == straight.keys()
        for k in straight:
            assert torch.equal(vectors[k], straight[k]), (name, k)
        # every file of the straight run, once; beside them only the vectors saved at the stop
        extra = set(listing(outs[name])) - set(listing(outs["straight"]))
        assert extra == {"box.interrupted.xti.safetensors"}, (name, extra)
        assert set(listing(outs["straight"])) <= set(listing(outs[name]))
        summary = json.loads((outs[name] / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == MAX_STEPS
        owner = json.loads((outs[name] / "xti-run.json").read_text())
        assert owner["status"] == "finished" and owner["resumed_from"], owner


@pytest.mark.slow
def test_array_template_trains_one_concept_per_task_as_a_local_run_would(
    slurm_cluster, tiny_model, tmp_path
):
    """slurm/array.sbatch: task i trains line i+1 of the list (shell quoting kept) with the shared
    arguments; each result equals the same run made here."""
    concepts = {
        "mug": 'concept.placeholder="<mug>" concept.initializer="red box"',
        "lamp": "concept.placeholder='<lamp>' concept.initializer=circle train.seed=7",
    }
    listed = tmp_path / "concepts.txt"
    listed.write_text(
        "".join(f"name={n} output_dir={tmp_path / n} {o}\n" for n, o in concepts.items())
    )
    config = REPO / "configs" / "tiny.yaml"
    common = [f"model.path={tiny_model}", f"data.dir={REPO / 'data' / 'tiny-concept'}",
              "train.resolution=32", "train.batch_size=1", "train.max_steps=2", "train.lr=0.01",
              "kde.weight=0", "tracking.report_to=none"]  # fmt: skip
    script = render("array.sbatch", tmp_path / "array.sbatch", gres=None, cpus_per_task=None,
                    time=None, output=f"{tmp_path}/%x-%A_%a.out")  # fmt: skip
    job = slurm_cluster.sbatch(
        script, script_args=[listed, "--config", config, *common], cwd=tmp_path, env=job_env()
    )
    states = slurm_cluster.wait(job, timeout=180)
    logs = "".join(p.read_text() for p in tmp_path.glob("xti-array-*.out"))
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}, logs[-3000:]

    for name, opts in concepts.items():
        here = [*common, f"name={name}", f"output_dir={tmp_path / name}-here", *shlex.split(opts)]
        local = train(load_config(config, here), progress=False)
        got = load_file(str(tmp_path / name / f"{name}.xti.safetensors"))
        want = load_file(str(local.output_file))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name
