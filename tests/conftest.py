"""Shared test setup: offline hubs, quiet logs, few threads, the tiny models built once, and an empty
latent disk cache per test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses (train.py, torchrun) too

import torch  # noqa: E402

# One intra-op thread: the tiny test models gain nothing from two, a second thread competing with
# any other load on a 2-core machine made steps 50-100x slower, and exactness tests (resume, DDP,
# bit-identity) must not depend on how a busy machine splits a reduction between threads.
torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).parents[1]
TINY_CONCEPT = REPO / "data" / "tiny-concept"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD1-layout diffusers folder (16 layers), built once per test session."""
    from xti.builtin import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("model") / "tiny-sd1", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL diffusers folder (11 layers, two text encoders 32 and 48 wide, both configured
    with the true eos id 49407), built once per test session."""
    from xti.builtin import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("model-sdxl") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session", autouse=True)
def _session_latent_cache(tmp_path_factory):
    """Module- and session-scoped fixtures (set up before any test's own cache) use this one:
    never the user's ``$XTI_CACHE/latents``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XTI_LATENT_CACHE", str(tmp_path_factory.mktemp("latents-session")))
        yield


@pytest.fixture(autouse=True)
def _own_latent_cache(tmp_path_factory, monkeypatch):
    """Every test (and the processes it starts) gets its own empty latent disk cache: no test reads
    latents another test, or the user's runs, left behind."""
    monkeypatch.setenv("XTI_LATENT_CACHE", str(tmp_path_factory.mktemp("latents")))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real one-node Slurm cluster on this host (tests/slurm_cluster.py), started once per session;
    skips with one line when not root or Slurm/munge are not installed."""
    from slurm_cluster import slurm_cluster_skip_reason, start_slurm_cluster

    reason = slurm_cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    with start_slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
