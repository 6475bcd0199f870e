"""SDXL: layer names, per-layer routing with text_time conditioning, pooled EOS, training, export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xti.attention import per_layer_processors
from xti.builtin import (
    SDXL_UNET_CONFIG,
    build_meta_unet,
    build_tiny_sdxl,
    build_tiny_sdxl_components,
)
from xti.config import load_config
from xti.embeddings import (
    ConceptVectors,
    add_placeholder_tokens,
    encode_per_layer,
    install_token_embedding,
    layer_variants,
    tokenize,
)
from xti.export import load_embedding_file
from xti.families import SDXL, EncoderPart
from xti.layers import layer_scheme
from xti.models import load_model
from xti.training import train

BLOCKS = [
    "IN04",
    "IN05",
    "IN07",
    "IN08",
    "MID",
    "OUT00",
    "OUT01",
    "OUT02",
    "OUT03",
    "OUT04",
    "OUT05",
]
DEPTH = [2, 2, 10, 10, 10, 10, 10, 10, 2, 2, 2]  # transformer blocks per Transformer2DModel in SDXL


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def sdxl_images(tmp_path_factory) -> Path:
    """Four 48x32 (w x h) images: centre-cropping to 32 px moves the crop 8 px from the left."""
    folder = tmp_path_factory.mktemp("sdxl-data")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_sdxl_names_in_forward_order_at_both_granularities():
    unet = build_meta_unet(SDXL_UNET_CONFIG)
    assert layer_scheme(unet).names == BLOCKS
    transformer = layer_scheme(unet, "transformer").names
    assert transformer == [f"{b}.{k}" for b, n in zip(BLOCKS, DEPTH, strict=True) for k in range(n)]
    assert len(transformer) == 70 and "IN07.3" in transformer
    scheme = layer_scheme(unet)
    names = scheme.names
    assert [names[i] for i in scheme.group("coarse")] == [
        "IN07",
        "IN08",
        "MID",
        "OUT00",
        "OUT01",
        "OUT02",
    ]
    assert [names[i] for i in scheme.group("fine")] == ["IN04", "IN05", "OUT03", "OUT04", "OUT05"]


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([3, 700][:batch])
    ctx = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    pooled_dim = (
        unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    )
    added = {
        "text_embeds": torch.randn(batch, pooled_dim, generator=g),
        "time_ids": torch.tensor([[32.0, 48.0, 0.0, 8.0, 32.0, 32.0]]).repeat(batch, 1),
    }
    return x, t, ctx, added


@pytest.mark.parametrize("granularity", ["block", "transformer"])
def test_equal_contexts_are_stock_and_distinct_contexts_are_routed(granularity):
    unet = build_tiny_sdxl_components()["unet"]
    scheme = layer_scheme(unet, granularity)
    assert len(scheme) == (11 if granularity == "block" else 17)
    x, t, ctx, added = unet_inputs(unet)
    with torch.no_grad():
        stock = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        with per_layer_processors(unet, scheme):
            same = ctx.unsqueeze(0).expand(len(scheme), -1, -1, -1)
            ours = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                        cross_attention_kwargs={"xti_contexts": same}).sample  # fmt: skip
            assert torch.equal(stock, ours)

            contexts = torch.randn(
                len(scheme), *ctx.shape, generator=torch.Generator().manual_seed(1)
            )
            seen, hooks = {}, []
            modules = dict(unet.named_modules())
            for path in scheme.processor_layer_index():
                hooks.append(
                    modules[path].to_k.register_forward_hook(
                        lambda m, a, o, p=path: seen.__setitem__(p, a[0])
                    )
                )
            unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added,
                 cross_attention_kwargs={"xti_contexts": contexts})  # fmt: skip
            for h in hooks:
                h.remove()
    index = scheme.processor_layer_index()
    assert len(seen) == len(index)
    for path, used in seen.items():
        assert torch.equal(used, contexts[index[path]]), path
        assert sum(torch.equal(used, c) for c in contexts) == 1


def test_pooled_output_is_read_at_the_true_eos_position_with_added_tokens():
    parts = build_tiny_sdxl_components()
    te1, te2 = parts["text_encoder"], copy.deepcopy(parts["text_encoder_2"])
    # as in the published SDXL config: transformers then pools at the argmax of the ids
    for m in (te2, te2.text_model):
        m.config.eos_token_id = 2
        m.eos_token_id = 2
    tok1, tok2 = parts["tokenizer"], parts["tokenizer_2"]
    assert tok2.eos_token_id == 49407  # the EOS the pooled output is read at
    pt1, pt2 = add_placeholder_tokens(tok1, "<x>", 2), add_placeholder_tokens(tok2, "<x>", 2)
    prompts = ["a <x> on a table", "<x>"]
    ids1 = tokenize(tok1, [pt1.expand(p) for p in prompts])
    ids2 = tokenize(tok2, [pt2.expand(p) for p in prompts])
    layers = 3
    c1 = ConceptVectors(torch.randn(2, 32), layers)
    c2 = ConceptVectors(torch.randn(2, 48), layers + 1)
    h1 = install_token_embedding(te1, pt1.first_id, c1)
    h2 = install_token_embedding(te2, pt2.first_id, c2)
    with torch.no_grad():
        contexts, pooled = encode_per_layer(
            SDXL,
            [EncoderPart("clip_l", tok1, te1), EncoderPart("clip_g", tok2, te2)],
            {"clip_l": ids1, "clip_g": ids2},
            {"clip_l": pt1, "clip_g": pt2},
            layer_variants(layers, "block"),
            layers,
            "slot",
        )
        # reference: the POOL variant (index 3) of every placeholder token, EOS found by a loop
        pool_ids = ids2 + (ids2 >= pt2.first_id) * (layers * 2)
        out = te2(pool_ids)
        eos = [row.tolist().index(49407) for row in ids2]
        expected = te2.text_projection(out.last_hidden_state[torch.arange(2), torch.tensor(eos)])
        wrong = out.text_embeds  # transformers' argmax pooling lands on an added token
    h1.remove()
    h2.remove()
    assert contexts.shape == (layers, 2, 77, 80)
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, wrong)


def test_shared_mode_encodes_b_rows_per_vector_set_with_the_values_of_all_rows():
    """TI mode on SDXL: clip_l on B rows, clip_g on 2·B (the set and POOL), not L·B and (L+1)·B;
    the contexts and pooled embeds are those of every layer encoded with the same vectors (on CPU a
    row's states do not depend on the batch it is encoded in)."""
    parts = build_tiny_sdxl_components()
    te1, te2 = parts["text_encoder"], parts["text_encoder_2"]
    tok1, tok2 = parts["tokenizer"], parts["tokenizer_2"]
    pt1, pt2 = add_placeholder_tokens(tok1, "<x>", 1), add_placeholder_tokens(tok2, "<x>", 1)
    prompts = ["a <x> on a table", "<x>"]
    ids = {
        "clip_l": tokenize(tok1, [pt1.expand(p) for p in prompts]),
        "clip_g": tokenize(tok2, [pt2.expand(p) for p in prompts]),
    }
    layers = 3
    g = torch.Generator().manual_seed(2)
    v1, v2, pool = (torch.randn(1, d, generator=g) for d in (32, 48, 48))
    enc = [EncoderPart("clip_l", tok1, te1), EncoderPart("clip_g", tok2, te2)]
    tokens = {"clip_l": pt1, "clip_g": pt2}

    def run(granularity: str, sets: int) -> tuple[list, torch.Tensor, torch.Tensor]:
        c1 = ConceptVectors(v1, sets)
        c2 = ConceptVectors(v2, sets + 1)
        with torch.no_grad():
            c2.vectors[sets] = pool
        calls = []
        hooks = [m.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0])) for m in (te1, te2)]  # fmt: skip
        handles = [install_token_embedding(te1, pt1.first_id, c1), install_token_embedding(te2, pt2.first_id, c2)]  # fmt: skip
        try:
            with torch.no_grad():
                contexts, pooled = encode_per_layer(
                    SDXL, enc, ids, tokens, layer_variants(layers, granularity), sets, "slot"
                )
        finally:
            for h in hooks + handles:
                h.remove()
        return calls, contexts, pooled

    calls, contexts, pooled = run("shared", 1)
    all_calls, all_contexts, all_pooled = run("block", layers)
    assert calls == [2, 4] and all_calls == [2 * layers, 2 * (layers + 1)]
    assert torch.equal(contexts, all_contexts) and torch.equal(pooled, all_pooled)


def cfg(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model.path={model}", f"data.dir={data}", f"output_dir={out}", "concept.placeholder=<thing>",
        "concept.initializer=thing", "train.resolution=32", "train.batch_size=6", "train.max_steps=4",
        "train.lr=0.01", "train.lr_warmup_steps=0", "kde.weight=0.001", "tracking.report_to=none", *extra,
    ])  # fmt: skip


def test_sdxl_training_exports_both_encoders_and_time_ids_per_sample(
    tiny_sdxl, sdxl_images, tmp_path
):
    bundle = load_model(cfg(tiny_sdxl, sdxl_images, tmp_path).model)
    assert bundle.family.name == "sdxl"
    seen = []
    bundle.unet.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]), with_kwargs=True
    )
    # batch 6 > 4 images: sampling with replacement never yields a short batch
    result = train(cfg(tiny_sdxl, sdxl_images, tmp_path), bundle=bundle, progress=False)
    assert result.trainable_shapes == [(11, 1, 32), (12, 1, 48)]
    time_ids = seen[0]["time_ids"]
    assert time_ids.shape == (6, 6)
    assert time_ids[0].tolist() == [32.0, 48.0, 0.0, 8.0, 32.0, 32.0]  # (h, w), (top, left), target
    assert seen[0]["text_embeds"].shape == (6, 48)

    ef = load_embedding_file(result.output_file)
    expected = {f"{e}.{b}" for e in ("clip_l", "clip_g") for b in BLOCKS} | {"clip_g.POOL"}
    assert set(ef.vectors) == expected
    assert ef.layers == BLOCKS
    assert json.loads(ef.metadata["xti.text_dims"]) == {"clip_l": 32, "clip_g": 48}
    assert ef.metadata["xti.family"] == "sdxl" and ef.metadata["xti.pooled"] == "slot"
    assert ef.metadata["xti.granularity"] == "block"
    for i, b in enumerate(BLOCKS):
        assert torch.equal(ef.vectors[f"clip_l.{b}"], result.all_vectors["clip_l"][i])
        assert torch.equal(ef.vectors[f"clip_g.{b}"], result.all_vectors["clip_g"][i])
    assert torch.equal(ef.vectors["clip_g.POOL"], result.all_vectors["clip_g"][11])
    assert not torch.equal(result.all_vectors["clip_g"][0], result.all_vectors["clip_g"][1])


def test_sdxl_transformer_granularity_mean_pooling_and_resume(tiny_sdxl, sdxl_images, tmp_path):
    common = ("xti.granularity=transformer", "xti.pooled=mean", "train.checkpoint_every=2")
    straight = train(cfg(tiny_sdxl, sdxl_images, tmp_path / "a", *common), progress=False)
    assert straight.trainable_shapes == [(17, 1, 32), (17, 1, 48)]
    train(cfg(tiny_sdxl, sdxl_images, tmp_path / "b", *common), progress=False, stop_at_step=2)
    resumed = train(
        cfg(tiny_sdxl, sdxl_images, tmp_path / "b", *common, "train.resume=latest"), progress=False
    )
    assert resumed.losses == straight.losses[2:]
    for enc in ("clip_l", "clip_g"):
        assert torch.equal(resumed.all_vectors[enc], straight.all_vectors[enc])
    ef = load_embedding_file(straight.output_file)
    assert "clip_g.POOL" not in ef.vectors and len(ef.layers) == 17 and ef.layers[1] == "IN05.0"


def test_sdxl_bf16_keeps_vectors_fp32(tiny_sdxl, sdxl_images, tmp_path):
    config = cfg(
        tiny_sdxl, sdxl_images, tmp_path, "train.mixed_precision=bf16", "train.max_steps=2"
    )
    bundle = load_model(config.model)
    dtypes = []
    bundle.unet.conv_in.register_forward_hook(lambda m, a, o: dtypes.append(o.dtype))
    result = train(config, bundle=bundle, progress=False)
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(v.dtype == torch.float32 for v in result.all_vectors.values())
    assert all(np.isfinite(loss) for _, loss in result.losses)
