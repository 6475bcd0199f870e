"""Per-layer attention processors: equal contexts are the stock call, distinct contexts are routed."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers import UNet2DConditionModel

from xti.attention import install_processors, per_layer_processors
from xti.errors import XTIError
from xti.layers import layer_scheme

D = 16


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=D,
        attention_head_dim=2,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:batch])
    ctx = torch.randn(batch, 7, D, generator=g)
    return x, t, ctx


def test_equal_contexts_are_bit_identical_to_the_stock_call(unet):
    scheme = layer_scheme(unet)
    assert len(scheme) == 16
    x, t, ctx = inputs()
    with torch.no_grad():
        stock = unet(x, t, encoder_hidden_states=ctx).sample
        with per_layer_processors(unet, scheme):
            contexts = ctx.unsqueeze(0).expand(len(scheme), -1, -1, -1)
            ours = unet(
                x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"xti_contexts": contexts}
            ).sample
    assert torch.equal(stock, ours)


def test_distinct_contexts_reach_their_own_layer_and_no_other(unet):
    scheme = layer_scheme(unet)
    x, t, ctx = inputs()
    g = torch.Generator().manual_seed(5)
    contexts = torch.randn(len(scheme), *ctx.shape, generator=g)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    modules = dict(unet.named_modules())
    for path in scheme.processor_layer_index():
        # to_k's input is the context the attention really used
        hooks.append(
            modules[path].to_k.register_forward_hook(
                lambda m, a, o, p=path: seen.__setitem__(p, a[0])
            )
        )
    try:
        with torch.no_grad(), per_layer_processors(unet, scheme):
            unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"xti_contexts": contexts})
    finally:
        for h in hooks:
            h.remove()
    index = scheme.processor_layer_index()
    assert len(seen) == 16
    for path, used in seen.items():
        i = index[path]
        assert torch.equal(used, contexts[i]), path
        assert all(not torch.equal(used, contexts[j]) for j in range(len(scheme)) if j != i)


def test_each_layer_context_gets_gradient_and_checkpointing_gives_the_same(unet):
    scheme = layer_scheme(unet)
    x, t, ctx = inputs()
    g = torch.Generator().manual_seed(7)
    base = torch.randn(len(scheme), *ctx.shape, generator=g)

    def grads(checkpointing: bool) -> torch.Tensor:
        model = tiny_unet()
        model.requires_grad_(False)
        if checkpointing:
            model.enable_gradient_checkpointing()
        contexts = base.clone().requires_grad_(True)
        # backward recomputes checkpointed blocks, so the processors must still be installed
        with per_layer_processors(model, scheme):
            out = model(
                x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"xti_contexts": contexts}
            ).sample
            out.square().mean().backward()
        return contexts.grad

    plain, ckpt = grads(False), grads(True)
    per_layer = plain.flatten(1).abs().sum(1)
    assert (per_layer > 0).all(), "every layer's context must influence the output"
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-7)


def test_install_and_remove_restore_the_exact_processors(unet):
    before = dict(unet.attn_processors)
    handle = install_processors(unet, layer_scheme(unet))
    with pytest.raises(XTIError, match="already installed"):
        install_processors(unet, layer_scheme(unet))
    handle.remove()
    after = unet.attn_processors
    assert before.keys() == after.keys()
    assert all(after[k] is before[k] for k in before)


def test_self_attention_accepts_the_key_without_warnings(unet, caplog):
    scheme = layer_scheme(unet)
    x, t, ctx = inputs()
    contexts = ctx.unsqueeze(0).expand(len(scheme), -1, -1, -1)
    with caplog.at_level(logging.WARNING), torch.no_grad(), per_layer_processors(unet, scheme):
        unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"xti_contexts": contexts})
    assert not [r for r in caplog.records if "cross_attention_kwargs" in r.getMessage()]
