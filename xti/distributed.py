"""How many processes a run was launched as, against how many it got.

A launcher that cannot form a process group does not fail: each process it started trains alone.
On a CPU machine ``accelerate launch --cpu --num_processes 2 train.py`` starts one process, and
``accelerate launch --multi_gpu --num_processes 2 train.py`` (without ``ACCELERATE_USE_CPU=1``)
starts two that each train alone and then fight over the output folder. `check_world_size` turns
that into one line naming the request, the world the run got and the invocation that works.

What asked for more than one process: ``WORLD_SIZE`` (torchrun and ``accelerate launch
--multi_gpu``), the MPI launchers' ``PMI_SIZE`` / ``OMPI_COMM_WORLD_SIZE`` / ``MV2_COMM_WORLD_SIZE``,
or the ``--num_processes N`` of the ``accelerate launch`` command that started this process (its
simple launcher sets no variable that carries N; Linux's ``/proc`` shows the parent's command line).
The tested launch recipes (one node, several machines, Slurm) are in README *Scaling out*.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from xti.errors import XTIError

WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_INVOCATION = (
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes {n} train.py ... "
    "(or ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {n} train.py ...)"
)


@dataclass(frozen=True)
class WorldRequest:
    """A launcher's request for several processes: how many, and what said so."""

    processes: int
    source: str  # e.g. "WORLD_SIZE=2" or "accelerate launch --num_processes 2"


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def accelerate_num_processes(argv: Sequence[str]) -> int | None:
    """The ``--num_processes`` of an ``accelerate launch`` / ``accelerate-launch`` command line,
    read up to the training script (None when ``argv`` is not one or does not say)."""
    names = [Path(a).name for a in argv[:3]]
    if "accelerate-launch" not in names and not (
        "accelerate" in names and "launch" in argv[: names.index("accelerate") + 2]
    ):
        return None
    for i, arg in enumerate(argv):
        if arg.endswith(".py") or (i and argv[i - 1] in ("-m", "--module")):
            return None  # the training script: what follows is its own arguments
        if arg.startswith("--num_processes="):
            return _int(arg.split("=", 1)[1])
        if arg == "--num_processes" and i + 1 < len(argv):
            return _int(argv[i + 1])
    return None


def parent_command_line() -> list[str]:
    """The command line of this process's parent ([] where ``/proc`` cannot tell)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def requested_world(environ: Mapping[str, str], parent_argv: Sequence[str]) -> WorldRequest | None:
    """What the launcher asked for, when that is more than one process (else None)."""
    for name in WORLD_SIZE_VARS:
        n = _int(environ.get(name))
        if n is not None and n > 1:
            return WorldRequest(n, f"{name}={n}")
    n = accelerate_num_processes(parent_argv)
    if n is not None and n > 1:
        return WorldRequest(n, f"accelerate launch --num_processes {n}")
    return None


def check_world_size(
    world: int,
    environ: Mapping[str, str] | None = None,
    parent_argv: Sequence[str] | None = None,
) -> None:
    """Stop (one line) when the run got one process but its launcher asked for more."""
    if world > 1:
        return
    environ = os.environ if environ is None else environ
    parent_argv = parent_command_line() if parent_argv is None else parent_argv
    request = requested_world(environ, parent_argv)
    if request is None:
        return
    raise XTIError(
        f"the launcher asked for {request.processes} processes ({request.source}) but this one "
        "trains alone (world size 1: no process group formed); on CPUs launch "
        + CPU_INVOCATION.format(n=request.processes)
        + "; on GPUs check that torch sees them (torch.cuda.device_count())"
    )
