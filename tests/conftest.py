"""Shared test setup: offline hubs, quiet logs, few threads, and the tiny model built once."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).parents[1]
TINY_CONCEPT = REPO / "data" / "tiny-concept"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny SD1-layout diffusers folder (16 layers), built once per test session."""
    from xti.builders import build_tiny_sd1

    return build_tiny_sd1(tmp_path_factory.mktemp("model") / "tiny-sd1", seed=0)
