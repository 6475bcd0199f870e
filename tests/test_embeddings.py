"""Placeholder tokens, trainable vectors and per-layer text encoding against stock transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from xti.embeddings import (
    ConceptVectors,
    add_placeholder_tokens,
    encode_per_layer,
    initializer_vectors,
    install_token_embedding,
    layer_variants,
    tokenize,
    variant_ids,
)
from xti.errors import XTIError
from xti.families import SD1, EncoderPart
from xti.tokenizer import build_clip_tokenizer


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )  # fmt: skip
    return CLIPTextModel(cfg).eval().requires_grad_(False)


def test_placeholder_tokens_are_new_and_consecutive():
    tok = build_clip_tokenizer()
    pt = add_placeholder_tokens(tok, "<toy>", 3)
    assert pt.tokens == ("<toy>", "<toy>_1", "<toy>_2")
    assert pt.first_id == 49408
    ids = tokenize(tok, [pt.expand("a photo of <toy>")])[0]
    assert ids[:7].tolist() == [49406, 320, 1125, 539, 49408, 49409, 49410]
    with pytest.raises(XTIError, match="already in the tokenizer vocabulary"):
        add_placeholder_tokens(build_clip_tokenizer(), "cat", 1)  # "cat</w>" is a real token
    with pytest.raises(XTIError, match="already in the tokenizer vocabulary"):
        add_placeholder_tokens(tok, "<toy>", 1)


def test_initializer_maps_tokens_to_vectors(text_encoder):
    tok = build_clip_tokenizer()
    emb = text_encoder.get_input_embeddings()
    w = emb.weight
    teddy, bear = tok("teddy bear", add_special_tokens=False).input_ids
    one = initializer_vectors(tok, emb, "teddy bear", 1)
    torch.testing.assert_close(one[0], (w[teddy] + w[bear]) / 2)
    two = initializer_vectors(tok, emb, "teddy bear", 2)
    assert torch.equal(two, torch.stack([w[teddy], w[bear]]))
    three = initializer_vectors(tok, emb, "teddy bear", 3)
    assert torch.equal(three, torch.stack([w[teddy], w[bear], w[teddy]]))
    with pytest.raises(XTIError, match="initializer"):
        initializer_vectors(tok, emb, "   ", 1)


def test_variant_ids_shift_only_placeholder_ids():
    ids = torch.tensor([[49406, 320, 49408, 49409, 49407]])
    v = variant_ids(ids, first_id=49408, n_vectors=2, num_variants=3)
    assert v.shape == (3, 1, 5)
    assert v[:, 0, 2].tolist() == [49408, 49410, 49412]
    assert v[:, 0, 3].tolist() == [49409, 49411, 49413]
    assert (v[:, :, [0, 1, 4]] == ids[:, [0, 1, 4]]).all()


def stock_encode(
    text_encoder, ids: torch.Tensor, first_id: int, vectors: torch.Tensor
) -> torch.Tensor:
    """Reference: classic TI with transformers — a resized copy of the table with the rows set."""
    ref = copy.deepcopy(text_encoder)
    ref.resize_token_embeddings(first_id + vectors.shape[0], mean_resizing=False)
    with torch.no_grad():
        ref.get_input_embeddings().weight[first_id:] = vectors
        return ref(ids)[0]


def test_per_layer_contexts_equal_stock_textual_inversion_per_layer(text_encoder):
    tok = build_clip_tokenizer()
    pt = add_placeholder_tokens(tok, "<toy>", 2)
    ids = tokenize(tok, [pt.expand("a photo of <toy>"), pt.expand("<toy> on a table")])
    layers = 5
    g = torch.Generator().manual_seed(0)
    concept = ConceptVectors(torch.randn(2, 32, generator=g), layers)
    with torch.no_grad():
        concept.vectors.add_(0.1 * torch.randn(concept.vectors.shape, generator=g))
    calls = []
    hook = text_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    handle = install_token_embedding(text_encoder, pt.first_id, concept)
    try:
        with torch.no_grad():
            contexts, pooled = encode_per_layer(
                SD1,
                [EncoderPart("text", tok, text_encoder)],
                {"text": ids},
                {"text": pt},
                layer_variants(layers, "block"),
                layers,
            )
    finally:
        handle.remove()
        hook.remove()
    assert calls == [torch.Size([layers * 2, 77])], "one text-encoder call for all layers"
    assert pooled is None
    assert contexts.shape == (layers, 2, 77, 32)
    for i in range(layers):
        expected = stock_encode(text_encoder, ids, pt.first_id, concept.vectors[i].detach())
        torch.testing.assert_close(contexts[i], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(contexts[0], contexts[1])
    assert text_encoder.get_input_embeddings().__class__.__name__ == "Embedding"


def test_shared_layers_encode_each_batch_row_once_with_stock_values_and_gradients(text_encoder):
    """TI mode (``shared``): B rows, not L·B, in one call; every layer's context is the stock TI
    context, and the gradient is the sum over the layers' (last bits may differ from L·B rows)."""
    tok = build_clip_tokenizer()
    pt = add_placeholder_tokens(tok, "<toy>", 2)
    prompts = ["a photo of <toy>", "<toy> on a table", "a photo of <toy>"]  # items 0, 2 equal
    ids = tokenize(tok, [pt.expand(p) for p in prompts])
    layers = 5
    g = torch.Generator().manual_seed(1)
    concept = ConceptVectors(torch.randn(2, 32, generator=g), 1)
    weights = torch.randn(layers, 3, 77, 32, generator=g)
    calls = []
    hook = text_encoder.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    handle = install_token_embedding(text_encoder, pt.first_id, concept)
    try:
        contexts, _ = encode_per_layer(
            SD1,
            [EncoderPart("text", tok, text_encoder)],
            {"text": ids},
            {"text": pt},
            layer_variants(layers, "shared"),
            1,
        )
        (contexts * weights).sum().backward()
    finally:
        handle.remove()
        hook.remove()
    assert calls == [torch.Size([3, 77])], "one call on the B batch rows (equal items kept)"
    assert contexts.shape == (layers, 3, 77, 32)
    expected = stock_encode(text_encoder, ids, pt.first_id, concept.vectors[0].detach())
    for i in range(layers):
        torch.testing.assert_close(contexts[i], expected, rtol=1e-5, atol=1e-5)

    ref = copy.deepcopy(text_encoder)
    ref.resize_token_embeddings(pt.first_id + 2, mean_resizing=False)
    table = ref.get_input_embeddings().weight
    with torch.no_grad():
        table[pt.first_id :] = concept.vectors[0].detach()
    table.requires_grad_(True)
    (ref(ids)[0] * weights.sum(0)).sum().backward()
    torch.testing.assert_close(concept.vectors.grad[0], table.grad[pt.first_id :])


def test_only_vectors_get_gradients_and_vocabulary_is_untouched(text_encoder):
    tok = build_clip_tokenizer()
    pt = add_placeholder_tokens(tok, "<toy>", 1)
    ids = tokenize(tok, [pt.expand("a <toy>")])
    concept = ConceptVectors(torch.randn(1, 32), 4)
    table_before = text_encoder.get_input_embeddings().weight.clone()
    handle = install_token_embedding(text_encoder, pt.first_id, concept)
    try:
        contexts, _ = encode_per_layer(
            SD1,
            [EncoderPart("text", tok, text_encoder)],
            {"text": ids},
            {"text": pt},
            layer_variants(4, "shared"),
            1,
        )
        assert torch.equal(contexts[0], contexts[3])
        contexts.sum().backward()
    finally:
        handle.remove()
    assert [n for n, p in concept.named_parameters()] == ["vectors"]
    assert concept.vectors.grad is not None and concept.vectors.grad[0].abs().sum() > 0
    assert concept.vectors.grad[1:].abs().sum() == 0  # shared mode reads variant 0 only
    assert torch.equal(text_encoder.get_input_embeddings().weight, table_before)
    assert all(p.grad is None for p in text_encoder.parameters())
