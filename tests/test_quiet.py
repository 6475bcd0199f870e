"""A quiet console: transformers' torchvision fallback notices never reach an xti user's terminal,
and nothing else is silenced (`xti.quiet`)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from xti import quiet

REPO = Path(__file__).parents[1]
NOTICE = "requires torchvision (not installed); falling back to"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, XTI_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def test_train_and_generate_print_no_torchvision_notice_that_plain_diffusers_does(tmp_path):
    # Without xti, importing the SD pipeline prints the notice in this environment: the check below
    # is not vacuous. (If this fails, transformers stopped emitting it and xti.quiet can go.)
    plain = _run(["-c", "from diffusers import StableDiffusionPipeline"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert plain.stderr.count(NOTICE) == 2, plain.stderr  # CLIPImageProcessor, SiglipImageProcessor

    out = tmp_path / "run"
    train = _run(
        ["train.py", "--config", "configs/tiny.yaml", f"output_dir={out}", "train.max_steps=1",
         "train.checkpoint_every=0", "--no-progress"],
        tmp_path,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-2000:]
    assert NOTICE not in train.stderr and "torchvision" not in train.stdout + train.stderr
    file = out / "tiny-concept.xti.safetensors"
    generate = _run(
        ["-m", "xti", "generate", "--model", "builtin:tiny-sd1", "-e", str(file),
         "--prompt", "a <striped-box>", "--steps", "1", "--size", "32", "--no-progress",
         "--device", "cpu", "--out-dir", str(tmp_path / "images")],
        tmp_path,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr[-2000:]
    assert len(list((tmp_path / "images").glob("*.png"))) == 1
    assert "torchvision" not in generate.stdout + generate.stderr, generate.stderr


def test_the_filter_drops_exactly_the_fallback_notice():
    logger = logging.getLogger("transformers.utils.import_utils")
    assert any(isinstance(f, quiet.TorchvisionFallbackFilter) for f in logger.filters)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logger.addHandler(handler)
    try:
        logger.warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
            "`CLIPImageProcessorPil` for backward compatibility."
        )
        logger.warning("`Foo` requires torchvision; install it")  # another torchvision message
        logger.warning("something else entirely")
    finally:
        logger.removeHandler(handler)
    assert seen == ["`Foo` requires torchvision; install it", "something else entirely"]
    quiet.install()  # idempotent
    assert sum(isinstance(f, quiet.TorchvisionFallbackFilter) for f in logger.filters) == 1
