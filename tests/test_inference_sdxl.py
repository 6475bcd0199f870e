"""Inference in stock SDXL pipelines (DESIGN §5, §7), what only SDXL has: pooled embeds from the
POOL slot, zero negatives without a negative prompt, clip_skip for the prompts only (as the stock
``encode_prompt``), validation samples during SDXL training, and ``xti generate`` / ``xti inspect``
on an SDXL model.

The promises SD and SDXL share (bit identity with the stock pipeline and stock TI in both encoders,
per-layer routing, mixing, per-layer prompts, unload, cross-family and mismatched files, plain-TI
export) are checked for both in test_inference_contract.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from xti.cli import main
from xti.config import load_config
from xti.export import build_metadata, save_embedding_file
from xti.inference import XTIAdapter, load_xti
from xti.layers import layer_scheme
from xti.training import train

DL, DG = 32, 48  # widths of the tiny SDXL's two text encoders
STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def new_pipe(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe(tiny_sdxl):
    return new_pipe(tiny_sdxl)


@pytest.fixture(scope="module")
def layers(pipe) -> list[str]:
    return layer_scheme(pipe.unet).names


def seeded(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_vectors(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write_sdxl_file(
    path: Path,
    layers: list[str],
    vec_l: torch.Tensor,
    vec_g: torch.Tensor,
    placeholder: str,
    pool: torch.Tensor | None = None,
) -> Path:
    """An SDXL xti file whose layers all hold ``vec_l`` / ``vec_g`` (and ``pool`` as POOL)."""
    vectors = {}
    for name in layers:
        vectors[f"clip_l.{name}"] = vec_l
        vectors[f"clip_g.{name}"] = vec_g
    if pool is not None:
        vectors["clip_g.POOL"] = pool
    meta = build_metadata(
        layers=layers,
        granularity="block",
        placeholder=placeholder,
        initializer="box",
        n_vectors=vec_l.shape[0],
        family="sdxl",
        base_model="tiny-sdxl",
        text_dims={"clip_l": DL, "clip_g": DG},
        steps=0,
        kde_weight=0.0,
        extra={"xti.pooled": "slot" if pool is not None else "mean"},
    )
    return save_embedding_file(path, vectors, meta)


def stock_ti(folder: Path, tokens: list[str], vecs_l: list, vecs_g: list):
    """A fresh stock pipeline with plain textual inversion loaded into BOTH encoders."""
    stock = new_pipe(folder)
    for token, vl, vg in zip(tokens, vecs_l, vecs_g, strict=True):
        stock.load_textual_inversion(
            vl.clone(), token=token, text_encoder=stock.text_encoder, tokenizer=stock.tokenizer
        )
        stock.load_textual_inversion(
            vg.clone(), token=token, text_encoder=stock.text_encoder_2, tokenizer=stock.tokenizer_2
        )
    return stock


# ----------------------------------------------------------------------------- bit identity


def test_no_negative_prompt_gives_zero_negatives_as_stock(pipe):
    """``force_zeros_for_empty_prompt``: without a negative prompt the negatives are zeros and
    need no encoding (the prompts once per encoder)."""
    prompts = ["a photo of a cat", "a red cube"]
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=2
    )
    with XTIAdapter(pipe) as xti:
        encoded = xti.encode(prompts, num_images_per_prompt=2)
    assert encoded.num_sequences == 2
    assert not encoded.negative_prompt_embeds.any() and not neg.any()
    assert not encoded.negative_pooled_prompt_embeds.any() and not neg_pooled.any()
    assert torch.equal(encoded.contexts[0], torch.cat([neg, pos]))
    assert torch.equal(encoded.pooled_prompt_embeds, pooled[::2])


def test_pooled_embeds_come_from_the_pool_slot(tiny_sdxl, pipe, layers, tmp_path):
    vec_l, vec_g = random_vectors(0, 1, DL), random_vectors(1, 1, DG)
    pool = random_vectors(2, 1, DG)
    path = write_sdxl_file(tmp_path / "a.xti.safetensors", layers, vec_l, vec_g, "<a>", pool)
    with load_xti(pipe, path) as xti:
        enc = xti.encode("a photo of <a>", negative_prompt="blurry")
    layer_ref = stock_ti(tiny_sdxl, ["<a>"], [vec_l], [vec_g])
    pool_ref = stock_ti(tiny_sdxl, ["<a>"], [vec_l], [pool])
    pos, neg, _, neg_pooled = layer_ref.encode_prompt(
        "a photo of <a>", device="cpu", negative_prompt="blurry"
    )
    _, _, pooled, _ = pool_ref.encode_prompt("a photo of <a>", device="cpu")
    assert torch.equal(enc.prompt_embeds, pos)
    assert torch.equal(enc.negative_prompt_embeds, neg)
    assert torch.equal(enc.pooled_prompt_embeds, pooled)
    assert torch.equal(enc.negative_pooled_prompt_embeds, neg_pooled)
    assert enc.contexts.shape == (len(layers), 2, 77, DL + DG)


def test_clip_skip_matches_stock_encode_prompt_on_both_sides(pipe):
    prompts = ["a photo of a cat", "a red cube"]
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", negative_prompt="blurry", clip_skip=1
    )
    with XTIAdapter(pipe) as xti:
        enc = xti.encode(prompts, negative_prompt="blurry", clip_skip=1)
    # as stock: clip_skip for the prompts, the penultimate layer for the negatives
    assert torch.equal(enc.prompt_embeds, pos) and torch.equal(enc.negative_prompt_embeds, neg)
    assert torch.equal(enc.pooled_prompt_embeds, pooled)
    assert torch.equal(enc.negative_pooled_prompt_embeds, neg_pooled)
    assert torch.equal(enc.contexts[3], torch.cat([neg, pos]))


# ----------------------------------------------------------------------------- training


def test_sdxl_training_writes_validation_grids_without_changing_losses(tiny_sdxl, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")

    def cfg(out: Path, *extra: str):
        return load_config(None, [
            f"model.path={tiny_sdxl}", f"data.dir={data}", f"output_dir={out}",
            "concept.placeholder=<thing>", "concept.initializer=thing", "train.resolution=32",
            "train.batch_size=2", "train.max_steps=4", "train.lr=0.01",
            "train.lr_warmup_steps=0", "kde.weight=0.001", "tracking.report_to=none", *extra,
        ])  # fmt: skip

    plain = train(cfg(tmp_path / "plain"), progress=False)
    validated = train(
        cfg(
            tmp_path / "val",
            "validation.every=2",
            "validation.num_inference_steps=2",
            "validation.seeds=[0]",
            "validation.prompts=[a photo of <thing>]",
        ),
        progress=False,
    )
    grids = sorted((tmp_path / "val" / "validation").glob("*.png"))
    assert [g.name.rsplit("-", 1)[-1] for g in grids] == ["step000002.png", "step000004.png"]
    for g in grids:
        with Image.open(g) as img:
            assert img.size[0] >= 32 and img.size[1] >= 32
    assert validated.losses == plain.losses
    for enc in ("clip_l", "clip_g"):
        assert torch.equal(validated.all_vectors[enc], plain.all_vectors[enc])


def test_a_transformer_granularity_file_from_train_py_generates_through_load_xti_and_the_cli(
    tiny_sdxl, pipe, tmp_path
):
    """An SDXL run with ``xti.granularity=transformer`` (one layer per transformer block) gives a
    file that `load_xti` and ``xti generate`` use without being told its scheme, and the images
    are those of an adapter built with that scheme explicitly."""
    import subprocess
    import sys

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "run"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, str(root / "train.py"), "--config", str(root / "configs/tiny.yaml"),
         f"model.path={tiny_sdxl}", f"data.dir={data}", f"output_dir={out}",
         "xti.granularity=transformer", "concept.placeholder=<tf>", "name=tf", "train.max_steps=2",
         "train.batch_size=1", "train.resolution=32", "validation.every=0",
         "tracking.report_to=none", "--no-progress"],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    file = out / "tf.xti.safetensors"
    transformer_names = layer_scheme(pipe.unet, "transformer").names
    assert len(transformer_names) > len(layer_scheme(pipe.unet, "block").names)

    prompt, kwargs = "a photo of <tf>", dict(STEPS, guidance_scale=4.0)
    with load_xti(pipe, file) as xti:
        assert xti.layer_names == transformer_names
        auto = xti(prompt, generator=seeded(3), **kwargs).images
    with XTIAdapter(pipe, granularity="transformer") as xti:
        xti.load(file)
        told = xti(prompt, generator=seeded(3), **kwargs).images
    np.testing.assert_array_equal(auto, told)

    gen = tmp_path / "gen"
    code = main(["generate", "--model", str(tiny_sdxl), "-e", str(file), "--prompt", prompt,
                 "--steps", "2", "--size", "32", "--guidance", "4", "--seed", "3",
                 "--out-dir", str(gen), "--name", "tf", "--no-progress"])  # fmt: skip
    assert code == 0
    with Image.open(gen / "tf-3-00.png") as img:
        cli = np.asarray(img.convert("RGB")).astype(np.float32) / 255
    assert np.abs(cli - auto[0]).max() <= 1 / 255 + 1e-6  # the PNG is the image, 8-bit


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_and_inspect_an_sdxl_file(tiny_sdxl, pipe, layers, tmp_path, capsys):
    cat, dog = pipe.tokenizer.convert_tokens_to_ids(["cat</w>", "dog</w>"])
    row_l = pipe.text_encoder.get_input_embeddings().weight[cat].detach().clone()[None]
    row_g = pipe.text_encoder_2.get_input_embeddings().weight[dog].detach().clone()[None]
    path = write_sdxl_file(tmp_path / "c.xti.safetensors", layers, row_l, row_g, "<c>", row_g)
    assert main(["inspect", str(path), "--model", str(tiny_sdxl)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["shapes"]["clip_g.POOL"] == [1, DG]
    nearest = info["nearest_tokens"]
    assert nearest["clip_l.MID"] == [["cat</w>"]] and nearest["clip_g.MID"] == [["dog</w>"]]
    assert nearest["clip_g.POOL"] == [["dog</w>"]]

    out = tmp_path / "images"
    args = [
        "generate", "--model", str(tiny_sdxl), "-e", str(path), "--prompt", "a photo of <c>",
        "--layer-prompt", "MID=a green lizard", "--steps", "2", "--size", "32", "--count", "2",
        "--out-dir", str(out), "--no-progress", "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["xti-0-00.png", "xti-0-01.png"]
    with Image.open(out / "xti-0-00.png") as img:
        assert img.size == (32, 32)
