"""Acceptance of the shipped demo model (data/demo-model): it loads offline with stock diffusers and
draws what the prompt asks for, measured with xti.demo.procedural (dominant hue, shape mask, background
brightness) over several seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xti.demo import procedural as P

REPO = Path(__file__).parents[1]
DEMO_MODEL = REPO / "data" / "demo-model"

SEEDS = tuple(range(8))
STEPS = 12
GUIDANCE = 4.0

# (shape, colour, background): prompts whose colour, shape and background must all come out right in
# most seeds (at least 5 of 8, each image judged on all three at once). These are among the pairs
# the model draws best; the model card (data/demo-model/README.md) has the table for all 36
# named colour/shape pairs: colour and background are right almost everywhere, shapes beyond
# circles, squares and triangles are not learned yet.
PROMPTS = (
    ("circle", "yellow", "black"),
    ("circle", "blue", "gray"),
    ("square", "purple", "white"),
    ("triangle", "green", "black"),
)


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(str(DEMO_MODEL))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seeds: tuple[int, ...] = SEEDS) -> np.ndarray:
    out = pipe(
        [prompt] * len(seeds),
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    return (np.clip(out, 0.0, 1.0) * 255).round().astype(np.uint8)


def test_folder_is_a_standard_small_pipeline():
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2**20
    index = json.loads((DEMO_MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    sched = json.loads((DEMO_MODEL / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    assert sched["rescale_betas_zero_snr"] is True
    assert sched["timestep_spacing"] == "trailing"
    assert (DEMO_MODEL / "README.md").is_file()
    assert not list(DEMO_MODEL.rglob("*.bin")) and not list(DEMO_MODEL.rglob("*.pt"))


def test_components_have_the_sd1_layout(pipe):
    from xti.layers import layer_scheme

    scheme = layer_scheme(pipe.unet)
    assert scheme.names == [
        "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
        "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
    ]  # fmt: skip
    cfg = pipe.text_encoder.config
    assert (cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        49408,
        49406,
        49407,
        49407,
    )
    assert cfg.max_position_embeddings == 77
    assert len(pipe.tokenizer) == 49408
    assert pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert pipe.unet.config.cross_attention_dim == cfg.hidden_size
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.sample_size == 16


@pytest.mark.parametrize(("shape", "colour", "background"), PROMPTS)
def test_prompt_controls_colour_shape_and_background(pipe, shape, colour, background):
    prompt = P.caption_for(shape, colour, background)
    images = generate(pipe, prompt)
    assert images.shape == (len(SEEDS), 32, 32, 3)
    measured = [P.measure(img) for img in images]
    label = P.Label(shape, colour, background)
    hits = sum(m.matches(label, ("shape", "colour", "background")) for m in measured)
    colour_hits = sum(m.colour == colour for m in measured)
    background_hits = sum(m.background == background for m in measured)
    detail = [(m.shape, m.colour, m.background) for m in measured]
    assert hits >= 5, (prompt, hits, detail)  # most seeds: 5 of 8 right in all three at once
    assert colour_hits >= 7 and background_hits >= 7, (prompt, detail)


def test_background_brightness_follows_the_prompt(pipe):
    """Same seeds, same object: the background is as bright as the prompt says, whatever the seed
    (the zero-terminal-SNR schedule; with SD's default schedule the seed decided)."""
    brightness = {}
    for background in ("white", "gray", "black"):
        images = generate(pipe, P.caption_for("circle", "orange", background), SEEDS[:4])
        brightness[background] = np.array([P.measure(img).brightness for img in images])
    assert (brightness["white"] > brightness["gray"] + 0.15).all(), brightness
    assert (brightness["gray"] > brightness["black"] + 0.15).all(), brightness
    assert brightness["white"].min() > 0.75 and brightness["black"].max() < 0.25, brightness
