"""Slurm, for real: a one-node cluster started on this host (tests/slurm_cluster.py) runs jobs."""

from __future__ import annotations


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
