"""A real one-node Slurm cluster on this host, for tests: nothing installed, everything in a folder.

`slurm_cluster_skip_reason()` says in one line why no cluster can start here (not root, or Debian's
``slurm-wlm`` / ``munge`` packages missing: ``apt-get install -y slurm-wlm munge``), else None.
`start_slurm_cluster(root)` is a context manager that writes a munge key and a slurm.conf under
``root`` (free ports, its own munge socket, state, spool, logs and pid files, so several clusters
can run side by side and none touches /etc), starts ``munged``, ``slurmctld`` and ``slurmd`` as
root in the foreground of child processes, waits for ``sinfo`` to show the node idle and yields a
`SlurmCluster`; on exit it cancels the cluster's jobs, waits for them to end and stops the daemons.
tests/conftest.py wraps it as the session fixture ``slurm_cluster``.

Calling the clients: ``cluster.run("sbatch", "--parsable", script)`` (or ``subprocess.run([...],
env=cluster.env)``: ``env`` is ``os.environ`` plus ``SLURM_CONF``), ``cluster.sbatch(script, ...)``
for the job id, ``cluster.wait(job_id)`` for the final state of a job or of every task of an array.
Jobs run as root with the submitter's environment (``--export=ALL``), in the folder they were
submitted from unless ``--chdir`` says otherwise. There is no accounting database (slurmdbd), so
``sacct`` has nothing to show: finished jobs stay visible to ``scontrol show job`` for
``MIN_JOB_AGE`` seconds (what `job_states` reads), and every finished job (each array task, each
requeued run) appends a line to ``cluster.jobcomp`` (``jobcomp/filetxt``: JobId=… JobState=…).

The node offers ``cpus`` CPUs (default 4 on any machine: ``SlurmdParameters=config_overrides``
lets a 2-core host run a 2-task job beside another one) and no GPUs (no gres): templates that ask
for GPUs are rendered without them for CPU tests.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
MIN_JOB_AGE = 600  # seconds a finished job stays in `scontrol show job`
FINAL_STATES = frozenset(
    ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL")
    + ("DEADLINE", "PREEMPTED")
)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def slurm_cluster_skip_reason() -> str | None:
    """One line saying why a local Slurm cluster cannot start here, or None when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a local Slurm cluster needs root (munged, slurmctld and slurmd run as root)"
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return (f"Slurm/munge not installed ({', '.join(missing)} missing): "
                "apt-get install -y slurm-wlm munge")  # fmt: skip
    return None


@dataclass(frozen=True)
class SlurmCluster:
    """A running one-node cluster: where its files are and how to talk to it."""

    root: Path  # the folder holding everything (conf, key, state, spool, logs)
    conf: Path  # slurm.conf; clients find it through SLURM_CONF in `env`
    env: dict[str, str]  # os.environ (at start) plus SLURM_CONF: pass to subprocess.run
    node: str  # the node's name (this host's short name)
    cpus: int  # CPUs the node offers
    jobcomp: Path  # one line per finished job (jobcomp/filetxt)
    logs: Path  # slurmctld.log, slurmd.log, munged.log

    def run(
        self,
        *args: str | Path,
        timeout: float = 60,
        check: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client (``"sbatch", "--parsable", script``) with `self.env` plus ``env``;
        raises with its stderr when it fails and ``check``."""
        cmd = [_which(str(args[0])) or str(args[0]), *map(str, args[1:])]
        full_env = {**self.env, **(env or {})}
        proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(
        self,
        script: str | Path,
        *args: str | Path,
        cwd: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        script_args: Sequence[str | Path] = (),
    ) -> str:
        """Submit ``script`` with extra sbatch options ``args`` before it and ``script_args`` after
        it (the job runs in ``cwd`` and sees `self.env` plus ``env``); return the job id."""
        chdir = ["--chdir", str(cwd)] if cwd is not None else []
        cmd = ["sbatch", "--parsable", *chdir, *args, script, *script_args]
        out = self.run(*cmd, env=env).stdout.strip()
        return out.split(";")[0]

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job id (``123`` or ``123_4`` for array tasks): state} from `scontrol show job`."""
        proc = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        states: dict[str, str] = {}
        for line in proc.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            if "JobState" not in fields:
                continue
            key = fields.get("JobId", "?")
            if fields.get("ArrayTaskId") and fields.get("ArrayJobId"):
                key = f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[key] = fields["JobState"]
        return states

    def wait(self, job_id: str, timeout: float = 120, poll: float = 0.5) -> dict[str, str]:
        """Wait until the job (every task of an array) has ended; return its final states."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.job_states(job_id)
            if states and all(s in FINAL_STATES for s in states.values()):
                return states
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {states} after {timeout:.0f} s")
            time.sleep(poll)

    def wait_running(self, job_id: str, timeout: float = 60, poll: float = 0.2) -> None:
        """Wait until the job is RUNNING (raises if it ends first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = set(self.job_states(job_id).values())
            if "RUNNING" in states:
                return
            if states and states <= FINAL_STATES:
                raise RuntimeError(f"job {job_id} ended ({states}) before it was seen running")
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not running after {timeout:.0f} s")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _slurm_conf(root: Path, node: str, cpus: int, ports: list[int]) -> str:
    memory_mb = 4096
    return f"""\
ClusterName=xti{ports[0]}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
SwitchType=switch/none
JobRequeue=1
ReturnToService=2
KillWait=30
MinJobAge={MIN_JOB_AGE}
SchedulerParameters=sched_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip


def _wait_idle(cluster: SlurmCluster, procs: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{dead} exited at start; see {cluster.logs}")
        seen = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
        if seen == "idle":
            return
        time.sleep(0.2)
    raise TimeoutError(f"node not idle after {timeout:.0f} s (sinfo: {seen!r}); see {cluster.logs}")


def _stop(cluster: SlurmCluster, procs: list[subprocess.Popen]) -> None:
    """Cancel every job, let them end (the daemons must outlive their steps), stop the daemons."""
    if procs and all(p.poll() is None for p in procs):
        with contextlib.suppress(Exception):
            cluster.run("scancel", "--full", "--signal=KILL", "-u", "root", check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                squeue = cluster.run("squeue", "-h", "-o", "%i", check=False)
                if squeue.returncode == 0 and not squeue.stdout.strip():
                    break
                time.sleep(0.3)
    for proc in reversed(procs):  # slurmd, slurmctld, then munged
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@contextlib.contextmanager
def start_slurm_cluster(root: Path, cpus: int = 4, timeout: float = 30) -> Iterator[SlurmCluster]:
    """Start munged + slurmctld + slurmd (as root) with everything under ``root``; yield the cluster
    once its node is idle; on exit cancel its jobs and stop the daemons."""
    reason = slurm_cluster_skip_reason()
    if reason:
        raise RuntimeError(reason)
    root = Path(root).resolve()
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "munge", 0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(128))
    os.chmod(key, 0o600)
    node = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, node, cpus, _free_ports(2)))
    env = dict(os.environ, SLURM_CONF=str(conf))
    cluster = SlurmCluster(root, conf, env, node, cpus, root / "jobcomp.txt", root / "log")
    m = root / "munge"
    daemons = [
        [_which("munged"), "-F", "--force", f"--socket={m}/munge.socket", f"--key-file={key}",
         f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed",
         f"--log-file={root}/log/munged.log"],
        [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
        [_which("slurmd"), "-D", "-f", str(conf), "-N", node],
    ]  # fmt: skip
    procs: list[subprocess.Popen] = []
    try:
        for cmd in daemons:
            procs.append(_start(cmd, root / "log" / f"{Path(cmd[0]).name}.out", env))
            if cmd[0].endswith("munged"):
                _wait_for(m / "munge.socket", procs[-1], timeout)
        _wait_idle(cluster, procs, timeout)
        yield cluster
    finally:
        _stop(cluster, procs)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args[0]} did not create {path}")
        time.sleep(0.05)
