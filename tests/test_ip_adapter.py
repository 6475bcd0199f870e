"""xti beside diffusers' IP-Adapter: the wrapped IP-Adapter processors keep their image tokens and
their own call arguments (``ip_adapter_masks``), so a concept whose layers are all equal gives the
stock TI + IP-Adapter image, and masks act as they do without xti.

The IP-Adapter is diffusers' own, loaded with ``pipe.load_ip_adapter`` from a local folder holding
random weights in the layout it expects and a tiny CLIP image encoder built from a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.image_processor import IPAdapterMaskProcessor
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from tests.test_inference import STEPS, new_pipe, random_vectors, seeded, write_file
from xti.inference import load_xti
from xti.layers import layer_scheme

D = 32  # width of the tiny text encoder = the UNet's cross-attention width
IMAGE_EMBED_DIM = 24
IP_TOKENS = 4  # what diffusers' plain IP-Adapter image projection makes


def ip_adapter_state(unet: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random IP-Adapter weights keyed as the published files (``image_proj.*``, and
    ``ip_adapter.<k>.to_{k,v}_ip.weight`` with k = 1, 3, 5, ... over the cross-attention modules
    in ``unet.attn_processors`` order, as diffusers' loader counts them)."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "image_proj.proj.weight": torch.randn(IP_TOKENS * D, IMAGE_EMBED_DIM, generator=g) * 0.3,
        "image_proj.proj.bias": torch.randn(IP_TOKENS * D, generator=g) * 0.1,
        "image_proj.norm.weight": torch.ones(D),
        "image_proj.norm.bias": torch.zeros(D),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attn = unet.get_submodule(name.removesuffix(".processor"))
        shape = (attn.to_k.out_features, attn.to_k.in_features)
        for which in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{key_id}.{which}.weight"] = torch.randn(*shape, generator=g) * 0.5
        key_id += 2
    return state


@pytest.fixture(scope="module")
def ip_folder(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ip-adapter")
    unet = new_pipe(tiny_model).unet
    save_file(ip_adapter_state(unet, seed=3), str(folder / "ip_adapter.safetensors"))
    torch.manual_seed(4)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
            projection_dim=IMAGE_EMBED_DIM,
        )
    )
    encoder.save_pretrained(folder / "image_encoder")
    return folder


def with_ip_adapter(tiny_model: Path, ip_folder: Path) -> StableDiffusionPipeline:
    pipe = new_pipe(tiny_model)
    pipe.load_ip_adapter(
        str(ip_folder),
        subfolder="",
        weight_name="ip_adapter.safetensors",
        image_encoder_folder="image_encoder",
    )
    return pipe


def picture(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


def left_half_mask() -> list[torch.Tensor]:
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:, :16] = 255
    return [IPAdapterMaskProcessor().preprocess([Image.fromarray(mask)], height=32, width=32)]


@pytest.fixture(scope="module")
def equal_file(tiny_model, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    layers = layer_scheme(new_pipe(tiny_model).unet).names
    vec = random_vectors(9, 1, D)
    path = tmp_path_factory.mktemp("ip-concept") / "e.xti.safetensors"
    return write_file(path, {n: vec for n in layers}, "<e>"), vec


def run(pipe, prompt_or_xti, **kwargs) -> np.ndarray:
    args = dict(negative_prompt="ugly", ip_adapter_image=picture(5), **STEPS)
    return prompt_or_xti("a <e>", generator=seeded(), **args, **kwargs).images


def test_equal_layers_with_ip_adapter_give_the_stock_ti_ip_adapter_image(
    tiny_model, ip_folder, equal_file
):
    path, vec = equal_file
    stock = with_ip_adapter(tiny_model, ip_folder)
    stock.load_textual_inversion(vec[0].clone(), token="<e>")
    expected = run(stock, stock)
    stock.set_ip_adapter_scale(0.0)
    without_image = run(stock, stock)
    assert not (expected == without_image).all(), "the IP-Adapter must change this image"

    ours_pipe = with_ip_adapter(tiny_model, ip_folder)
    with load_xti(ours_pipe, path) as xti:
        ours = run(ours_pipe, xti)
    assert (ours == expected).all()
    # diffusers' set_ip_adapter_scale finds IP-Adapter processors by type: set it before xti wraps them
    ours_pipe.set_ip_adapter_scale(0.0)
    with load_xti(ours_pipe, path) as xti:
        assert (run(ours_pipe, xti) == without_image).all()


def test_ip_adapter_masks_act_as_without_xti(tiny_model, ip_folder, equal_file):
    path, vec = equal_file
    masked = {"cross_attention_kwargs": {"ip_adapter_masks": left_half_mask()}}
    stock = with_ip_adapter(tiny_model, ip_folder)
    stock.load_textual_inversion(vec[0].clone(), token="<e>")
    stock_plain, stock_masked = run(stock, stock), run(stock, stock, **masked)
    assert not (stock_plain == stock_masked).all(), "the mask must change this image"

    ours_pipe = with_ip_adapter(tiny_model, ip_folder)
    with load_xti(ours_pipe, path) as xti:
        ours_plain, ours_masked = run(ours_pipe, xti), run(ours_pipe, xti, **masked)
    assert (ours_plain == stock_plain).all()
    assert (ours_masked == stock_masked).all()


def test_ip_adapter_loaded_after_xti_is_wrapped_on_the_next_call(tiny_model, ip_folder, equal_file):
    """diffusers' loader replaces every processor; the adapter wraps the new ones when it runs."""
    path, vec = equal_file
    stock = with_ip_adapter(tiny_model, ip_folder)
    stock.load_textual_inversion(vec[0].clone(), token="<e>")
    ours_pipe = new_pipe(tiny_model)
    with load_xti(ours_pipe, path) as xti:
        ours_pipe.load_ip_adapter(
            str(ip_folder),
            subfolder="",
            weight_name="ip_adapter.safetensors",
            image_encoder_folder="image_encoder",
        )
        ours = run(ours_pipe, xti)
    assert (ours == run(stock, stock)).all()
