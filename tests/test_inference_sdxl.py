"""Inference in stock SDXL pipelines (DESIGN §5, §7): bit identity with the stock pipeline and
stock textual inversion in both encoders, pooled embeds from the POOL slot, style mixing and
per-layer prompts routed per layer, cross-family errors, plain-TI export, and validation samples
during SDXL training, and ``xti generate`` / ``xti inspect`` on an SDXL model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from xti.cli import main
from xti.config import load_config
from xti.demo.builders import build_tiny_sdxl
from xti.errors import XTIError
from xti.export import build_metadata, save_embedding_file
from xti.inference import XTIAdapter, export_ti, load_xti
from xti.layers import layer_scheme
from xti.training import train

DL, DG = 32, 48  # widths of the tiny SDXL's two text encoders
STEPS = dict(num_inference_steps=2, height=32, width=32, output_type="np")


def new_pipe(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-inference") / "tiny-sdxl", seed=0)


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


@contextlib.contextmanager
def captured(pipe, scheme):
    """Record the context each layer's cross-attention reads (input of ``attn2.to_k``) and the
    pooled ``text_embeds`` the UNet gets, in the first UNet call."""
    seen: dict[int, torch.Tensor] = {}
    added: list[torch.Tensor] = []
    modules = dict(pipe.unet.named_modules())
    hooks = []
    for i, layer in enumerate(scheme.layers):
        for path in layer.cross_attention_paths:

            def hook(_m, args, i=i):
                seen.setdefault(i, args[0].detach().clone())

            hooks.append(modules[f"{path}.to_k"].register_forward_pre_hook(hook))

    def unet_hook(_m, _a, kw):
        if not added:
            added.append(kw["added_cond_kwargs"]["text_embeds"].detach().clone())

    hooks.append(pipe.unet.register_forward_pre_hook(unet_hook, with_kwargs=True))
    try:
        yield seen, added
    finally:
        for h in hooks:
            h.remove()


def stock_embeds(pipe, prompts, negative, n):
    """The stock SDXL encode_prompt in the UNet batch layout: contexts and pooled embeds."""
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=n, negative_prompt=negative
    )
    return torch.cat([neg, pos]), torch.cat([neg_pooled, pooled])


# ----------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_prompt_without_placeholders_generates_like_stock(tiny_sdxl, pipe, negative):
    prompts = ["a photo of a cat", "a red cube"]
    args = dict(negative_prompt=negative, num_images_per_prompt=2, **STEPS)
    expected = pipe(prompts, generator=seeded(), **args).images
    with XTIAdapter(pipe) as xti:
        encoded = xti.encode(prompts, negative_prompt=negative, num_images_per_prompt=2)
        # prompts and negative once per encoder; zero negatives (stock) need no encoding
        assert encoded.num_sequences == (2 if negative is None else 3)
        if negative is None:
            assert not encoded.negative_prompt_embeds.any()
            assert not encoded.negative_pooled_prompt_embeds.any()
        ours = xti(prompts, generator=seeded(), **args).images
    assert ours.shape == (4, 32, 32, 3)
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(expected))
    # unloaded: the stock call is unchanged
    again = pipe(prompts, generator=seeded(), **args).images
    assert torch.equal(torch.from_numpy(again), torch.from_numpy(expected))


@pytest.mark.parametrize("pooled", ["slot", "mean"])
@pytest.mark.parametrize("negative", [None, "blurry <a>"])
def test_equal_layers_generate_like_stock_ti_in_both_encoders(
    tiny_sdxl, pipe, layers, tmp_path, pooled, negative
):
    vec_l, vec_g = random_vectors(0, 2, DL), random_vectors(1, 2, DG)
    pool = vec_g if pooled == "slot" else None
    path = write_sdxl_file(tmp_path / "a.xti.safetensors", layers, vec_l, vec_g, "<a>", pool)
    prompts = ["a <a> on a table", "<a>"]
    args = dict(negative_prompt=negative, num_images_per_prompt=2, **STEPS)
    with load_xti(pipe, path) as xti:
        assert (xti.concepts["<a>"].pool is not None) == (pooled == "slot")
        ours = xti(prompts, generator=seeded(), **args).images
    stock = stock_ti(tiny_sdxl, ["<a>"], [vec_l], [vec_g])
    expected = stock(prompts, generator=seeded(), **args).images
    assert ours.shape == (4, 32, 32, 3)
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(expected))


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


def test_clip_skip_and_no_guidance_match_stock_encode_prompt(pipe):
    prompts = ["a photo of a cat", "a red cube"]
    pos, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompts, device="cpu", negative_prompt="blurry", clip_skip=1
    )
    with XTIAdapter(pipe) as xti:
        enc = xti.encode(prompts, negative_prompt="blurry", clip_skip=1)
        plain = xti.encode(prompts, do_classifier_free_guidance=False)
    # as stock: clip_skip for the prompts, the penultimate layer for the negatives
    assert torch.equal(enc.prompt_embeds, pos) and torch.equal(enc.negative_prompt_embeds, neg)
    assert torch.equal(enc.pooled_prompt_embeds, pooled)
    assert torch.equal(enc.negative_pooled_prompt_embeds, neg_pooled)
    assert torch.equal(enc.contexts[3], torch.cat([neg, pos]))
    pos0, _, pooled0, _ = pipe.encode_prompt(
        prompts, device="cpu", do_classifier_free_guidance=False
    )
    assert torch.equal(plain.prompt_embeds, pos0) and torch.equal(
        plain.pooled_prompt_embeds, pooled0
    )
    assert plain.negative_pooled_prompt_embeds is None and plain.contexts.shape[1] == 2


# ----------------------------------------------------------------------------- routing


def test_mixing_routes_concepts_by_layer_with_cfg_negative_and_repeats(
    tiny_sdxl, pipe, layers, tmp_path
):
    va_l, va_g = random_vectors(3, 1, DL), random_vectors(4, 1, DG)
    vb_l, vb_g = random_vectors(5, 1, DL), random_vectors(6, 1, DG)
    file_a = write_sdxl_file(tmp_path / "a.xti.safetensors", layers, va_l, va_g, "<a>", va_g)
    file_b = write_sdxl_file(tmp_path / "b.xti.safetensors", layers, vb_l, vb_g, "<b>", vb_g)
    stock = stock_ti(tiny_sdxl, ["<a>", "<b>"], [va_l, vb_l], [va_g, vb_g])
    prompts = ["a photo of <a>", "<a> on a table"]
    negative = ["blurry", "blurry"]
    expect_a, pooled_a = stock_embeds(stock, prompts, negative, 2)
    expect_b, _ = stock_embeds(stock, [p.replace("<a>", "<b>") for p in prompts], negative, 2)
    assert not torch.equal(expect_a, expect_b)

    scheme = layer_scheme(pipe.unet)
    coarse = set(scheme.select("coarse"))
    assert 0 < len(coarse) < len(layers)
    with load_xti(pipe, [file_a, file_b]) as xti, captured(pipe, scheme) as (seen, added):
        out = xti(
            prompts,
            negative_prompt="blurry",
            mix={"<a>": "coarse", "<b>": "fine"},
            num_images_per_prompt=2,
            guidance_scale=5.0,
            generator=seeded(),
            **STEPS,
        )
    assert out.images.shape[0] == 4
    assert len(seen) == len(layers)
    for i in range(len(layers)):
        expected = expect_a if i in coarse else expect_b
        assert seen[i].shape == (8, 77, DL + DG)  # [negatives x2, prompts x2] for 2 prompts
        assert torch.equal(seen[i], expected), layers[i]
    # pooled: the prompt as written (<a>) at <a>'s POOL vectors
    assert torch.equal(added[0], pooled_a)


def test_per_layer_prompts_route_both_encoders(tiny_sdxl, pipe):
    cube, cube_pooled = stock_embeds(pipe, "a red cube", None, 1)
    lizard, _ = stock_embeds(pipe, "a green lizard", None, 1)
    scheme = layer_scheme(pipe.unet)
    mid = scheme.index("MID")
    with XTIAdapter(pipe) as xti, captured(pipe, scheme) as (seen, added):
        xti("a red cube", layer_prompts={"mid": "a green lizard"}, generator=seeded(), **STEPS)
    for i in range(len(scheme)):
        assert torch.equal(seen[i], lizard if i == mid else cube), scheme.names[i]
    assert torch.equal(added[0], cube_pooled)  # pooled: the prompt, not the layer prompts


# ----------------------------------------------------------------------------- files


def test_cross_family_files_fail_with_one_line_naming_both(tiny_model, pipe, layers, tmp_path):
    sd1 = StableDiffusionPipeline.from_pretrained(tiny_model)
    sd1_layers = layer_scheme(sd1.unet).names
    meta = build_metadata(
        layers=sd1_layers, granularity="block", placeholder="<s>", initializer="box",
        n_vectors=1, family="sd1", base_model="tiny", text_dims={"text": 32}, steps=0,
        kde_weight=0.0,
    )  # fmt: skip
    sd1_file = save_embedding_file(
        tmp_path / "s.xti.safetensors", {n: torch.zeros(1, 32) for n in sd1_layers}, meta
    )
    sdxl_file = write_sdxl_file(
        tmp_path / "x.xti.safetensors", layers, torch.zeros(1, DL), torch.zeros(1, DG), "<x>"
    )
    with XTIAdapter(pipe) as xti, pytest.raises(XTIError) as err:
        xti.load(sd1_file)
    msg = str(err.value)
    assert "\n" not in msg and "SD 1.x/2.x file" in msg and "SDXL pipeline" in msg
    assert "s.xti.safetensors" in msg
    with XTIAdapter(sd1) as xti, pytest.raises(XTIError) as err:
        xti.load(sdxl_file)
    msg = str(err.value)
    assert "\n" not in msg and "SDXL file" in msg and "SD 1.x/2.x" in msg


def test_ti_export_loads_into_the_stock_sdxl_pipeline(tiny_sdxl, pipe, layers, tmp_path):
    vec_l, vec_g = random_vectors(7, 2, DL), random_vectors(8, 2, DG)
    path = write_sdxl_file(tmp_path / "c.xti.safetensors", layers, vec_l, vec_g, "<c>", vec_g)
    ti = load_file(export_ti(path, layer="MID"))
    assert set(ti) == {"clip_l", "clip_g"}
    assert torch.equal(ti["clip_l"], vec_l) and torch.equal(ti["clip_g"], vec_g)
    stock = stock_ti(tiny_sdxl, ["<c>"], [ti["clip_l"]], [ti["clip_g"]])
    args = dict(negative_prompt="blurry", **STEPS)
    expected = stock("a <c> in the snow", generator=seeded(), **args).images
    with load_xti(pipe, path) as xti:
        ours = xti("a <c> in the snow", generator=seeded(), **args).images
    assert torch.equal(torch.from_numpy(ours), torch.from_numpy(expected))


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
