"""Several machines, for real: the stock ``accelerate launch`` started once per "machine"
(``--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1``, gloo on CPU) forms one group
of two; a SIGTERM to one machine stops both at the same step, the folder's run resumes, and the
vectors equal one process with the global batch. A launcher that forms no group stops in one line.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from safetensors.torch import load_file

from xti.config import load_config
from xti.distributed import accelerate_num_processes, check_world_size, requested_world
from xti.errors import XTIError
from xti.training import train

# run alone, after the parallel part of the suite (README's test line): they time signals
pytestmark = pytest.mark.cluster

REPO = Path(__file__).parents[1]
TINY = REPO / "configs" / "tiny.yaml"
ACCELERATE = Path(sys.executable).with_name("accelerate")
MAX_STEPS = 12


def overrides(model: Path, out: Path, batch: int, *extra: str) -> list[str]:
    return [
        "name=box",
        f"model.path={model}",
        f"data.dir={REPO / 'data' / 'tiny-concept'}",
        f"output_dir={out}",
        "concept.placeholder=<box>",
        "concept.initializer=box",
        "train.resolution=32",
        f"train.batch_size={batch}",
        f"train.max_steps={MAX_STEPS}",
        "train.lr=0.01",
        "train.seed=5",
        "train.checkpoint_every=1",
        "kde.weight=0.5",
        "tracking.report_to=none",
        *extra,
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_machine(rank: int, port: int, args: list[str], log: Path) -> subprocess.Popen:
    """One "machine": the real launcher, one gloo process of a world of two."""
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [str(ACCELERATE), "launch", "--multi_gpu", "--num_machines", "2", "--num_processes", "2",
           "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1",
           str(REPO / "train.py"), "--no-progress", "--config", str(TINY), *args]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 300) -> list[str]:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            hung = logs[procs.index(proc)].read_text()[-3000:]
            raise AssertionError(f"a machine hung: {hung}") from None
    return [log.read_text() for log in logs]


def worker_of(launcher: subprocess.Popen) -> psutil.Process:
    """The training process the launcher (accelerate -> torchrun agent) started."""
    for _ in range(600):
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                argv = child.cmdline()
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue  # a short-lived helper of the launcher that already ended
            if any(a.endswith("train.py") for a in argv) and "launch" not in argv:
                return child
        time.sleep(0.05)
    raise AssertionError("no training process under the launcher")


@pytest.mark.slow
def test_two_machines_stop_together_resume_and_equal_one_process(tiny_model, tmp_path):
    shared, own = tmp_path / "shared", tmp_path / "machine1-own"
    logs = [tmp_path / "m0.log", tmp_path / "m1.log"]
    # Run 1: machine 1 is given a folder of its own: rank 1 must write nothing there. SIGTERM
    # reaches machine 1's process only, after the first checkpoint; both ranks must stop there.
    port = free_port()
    m0 = launch_machine(0, port, overrides(tiny_model, shared, 1), logs[0])
    m1 = launch_machine(1, port, overrides(tiny_model, own, 1), logs[1])
    worker1 = worker_of(m1)
    first = shared / "checkpoints" / "step-000001"
    while not first.is_dir() and m0.poll() is None:
        time.sleep(0.02)
    worker1.send_signal(signal.SIGTERM)
    out0, out1 = wait_all([m0, m1], logs)
    assert "interrupted (SIGTERM)" in out1, out1[-3000:]
    stopped = [ln for ln in out0.splitlines() if ln.startswith("interrupted at step ")]
    assert stopped, out0[-3000:]  # rank 0 got no signal: it stopped because rank 1 did
    step = int(stopped[0].split()[3].rstrip(";"))
    assert 1 <= step < MAX_STEPS, stopped
    assert (shared / "checkpoints" / f"step-{step:06d}").is_dir()
    assert (shared / "box.interrupted.xti.safetensors").is_file()
    assert not (shared / "summary.json").exists()
    assert not own.exists(), sorted(p.name for p in own.rglob("*"))  # rank 1 wrote nothing

    # Run 2: both machines continue the folder's run (train.resume=auto) to the end.
    port = free_port()
    args = overrides(tiny_model, shared, 1, "train.resume=auto")
    procs = [launch_machine(r, port, args, logs[r]) for r in (0, 1)]
    texts = wait_all(procs, logs)
    assert [p.returncode for p in procs] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    summary = json.loads((shared / "summary.json").read_text())
    assert summary["world_size"] == 2  # a launcher that fell back to one process fails here
    assert summary["ranks_in_sync"] is True
    assert summary["steps"] == MAX_STEPS

    single = train(load_config(TINY, overrides(tiny_model, tmp_path / "one", 2)), progress=False)
    two = load_file(str(shared / "box.xti.safetensors"))
    one = load_file(str(single.output_file))
    assert two.keys() == one.keys()
    for k in one:
        # same global batches, gradients averaged across the machines: equal up to summation order
        assert (two[k] - one[k]).abs().max() < 1e-5, k


def test_requested_world_reads_the_launchers_traces():
    assert requested_world({"WORLD_SIZE": "4"}, []).processes == 4
    assert requested_world({"OMPI_COMM_WORLD_SIZE": "2"}, []).source == "OMPI_COMM_WORLD_SIZE=2"
    assert requested_world({"WORLD_SIZE": "1"}, []) is None
    launcher = ["/v/bin/python3", "/v/bin/accelerate", "launch", "--cpu"]
    assert accelerate_num_processes([*launcher, "--num_processes", "2", "train.py"]) == 2
    assert accelerate_num_processes([*launcher, "--num_processes=3", "train.py"]) == 3
    assert accelerate_num_processes(["/v/bin/accelerate-launch", "--num_processes", "2"]) == 2
    # the training script's own arguments and other programs do not count
    assert accelerate_num_processes([*launcher, "train.py", "--num_processes", "2"]) is None
    assert accelerate_num_processes([*launcher, "-m", "xti", "--num_processes", "2"]) is None
    assert accelerate_num_processes(["/usr/bin/python3", "x.py", "--num_processes", "2"]) is None
    assert accelerate_num_processes(["/v/bin/accelerate", "env", "--num_processes", "2"]) is None
    # one process asked for, or a group formed: nothing to say
    check_world_size(1, {}, [*launcher, "--num_processes", "1", "train.py"])
    check_world_size(2, {"WORLD_SIZE": "2"}, [])
    with pytest.raises(XTIError, match=r"asked for 2 processes \(WORLD_SIZE=2\).*world size 1"):
        check_world_size(1, {"WORLD_SIZE": "2"}, [])


@pytest.mark.slow
def test_launchers_that_form_no_group_stop_in_one_line(tiny_model, tmp_path):
    """The issue's two CPU launches: `--cpu --num_processes 2` (one process) and `--multi_gpu`
    without ACCELERATE_USE_CPU (two processes, each alone): they say so in one line, nothing is
    written, and no process blames the other for holding the folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]  # fmt: skip
    runs = {"cpu": ["--cpu", *common], "multi_gpu": ["--multi_gpu", *common]}
    procs = {}
    for name, flags in runs.items():
        cmd = [str(ACCELERATE), "launch", *flags, "--main_process_port", str(free_port()),
               str(REPO / "train.py"), "--no-progress", "--config", str(TINY),
               f"model.path={tiny_model}", f"output_dir={tmp_path / name}"]  # fmt: skip
        procs[name] = subprocess.Popen(cmd, env=env, cwd=REPO, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    for name, proc in procs.items():
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode != 0, text[-2000:]
        errors = [ln for ln in text.splitlines() if ln.startswith("error: ")]
        wanted = "error: the launcher asked for 2 processes"
        assert errors and all(e.startswith(wanted) for e in errors), text[-3000:]
        assert "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2" in errors[0]
        assert "in use" not in text
        assert not (tmp_path / name).exists()
