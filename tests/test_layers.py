"""Layer scheme: names and order from real UNet configs (meta device), groups and selections."""

from __future__ import annotations

import pytest

from xti.builtin import SD15_UNET_CONFIG, SD21_UNET_CONFIG, build_meta_unet
from xti.errors import XTIError
from xti.layers import layer_scheme

SD1_NAMES = [
    "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID",
    "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
]  # fmt: skip
SD1_MODULES = (
    [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)]
    + ["mid_block.attentions.0"]
    + [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)]
)


@pytest.fixture(scope="module")
def sd15_unet():
    return build_meta_unet(SD15_UNET_CONFIG)


@pytest.mark.parametrize("config", [SD15_UNET_CONFIG, SD21_UNET_CONFIG], ids=["sd15", "sd21"])
def test_sd1_and_sd2_shapes_give_the_16_design_names_in_order(config):
    unet = build_meta_unet(config)
    scheme = layer_scheme(unet)
    assert scheme.names == SD1_NAMES
    assert [layer.module_path for layer in scheme.layers] == SD1_MODULES
    # every cross-attention module of the UNet is driven by exactly one layer
    attn2 = sorted(n for n, m in unet.named_modules() if n.endswith("attn2"))
    assert sorted(scheme.processor_layer_index()) == attn2
    assert len(attn2) == 16


def test_order_is_forward_order_not_module_registration_order(sd15_unet):
    registered = [n.rsplit(".processor", 1)[0] for n in sd15_unet.attn_processors if "attn2" in n]
    scheme = layer_scheme(sd15_unet)
    forward = [p for layer in scheme.layers for p in layer.cross_attention_paths]
    # diffusers registers mid after up; our scheme must not follow that
    assert registered.index("mid_block.attentions.0.transformer_blocks.0.attn2") == 15
    assert forward.index("mid_block.attentions.0.transformer_blocks.0.attn2") == 6


def test_groups_on_sd15(sd15_unet):
    scheme = layer_scheme(sd15_unet)
    names = scheme.names

    def group(g):
        return [names[i] for i in scheme.group(g)]

    assert group("coarse") == ["IN07", "IN08", "MID", "OUT03", "OUT04", "OUT05"]
    assert group("fine") == [
        "IN01",
        "IN02",
        "IN04",
        "IN05",
        "OUT06",
        "OUT07",
        "OUT08",
        "OUT09",
        "OUT10",
        "OUT11",
    ]
    assert group("down") == names[:6]
    assert group("mid") == ["MID"]
    assert group("up") == names[7:]
    assert group("all") == names


def test_select_names_groups_and_ranges(sd15_unet):
    scheme = layer_scheme(sd15_unet)
    assert scheme.select("MID") == [6]
    assert scheme.select("IN07-OUT04") == [4, 5, 6, 7, 8]
    assert scheme.select("0-2, OUT11") == [0, 1, 2, 15]
    assert scheme.select(["mid", "IN01"]) == [0, 6]
    with pytest.raises(XTIError, match="unknown layer 'IN03'"):
        scheme.select("IN03")
    with pytest.raises(XTIError, match="reversed"):
        scheme.select("OUT04-IN07")
    with pytest.raises(XTIError, match="out of range"):
        scheme.select("0-16")


def test_transformer_granularity_names_each_block(sd15_unet):
    scheme = layer_scheme(sd15_unet, "transformer")
    assert scheme.names == [f"{n}.0" for n in SD1_NAMES]


def test_naming_rule_follows_layers_per_block():
    """With 1 resnet per down block (layers_per_block=1) the LDM indices shift: p = 2."""
    cfg = dict(SD15_UNET_CONFIG, layers_per_block=1)
    scheme = layer_scheme(build_meta_unet(cfg))
    assert scheme.names == [
        "IN01",
        "IN03",
        "IN05",
        "MID",
        "OUT02",
        "OUT03",
        "OUT04",
        "OUT05",
        "OUT06",
        "OUT07",
    ]
