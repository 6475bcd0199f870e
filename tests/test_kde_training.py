"""The KDE term inside the training loop (DESIGN §4): the gradient that reaches the optimizer, the
word reference, and the frozen-run warning."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from tests.test_kde import brute_kde, numpy_nn_median
from tests.test_training import make_cfg
from xti.embeddings import initializer_vectors
from xti.models import load_model
from xti.training import train

WORDS = ["red", "box", "circle", "photo", "blue", "cat", "dog"]


def first_step_gradient(cfg) -> torch.Tensor:
    """The gradient the optimizer sees at step 1 (a global optimizer pre-step hook)."""
    seen: list[torch.Tensor] = []

    def hook(opt, args, kwargs):
        if not seen:
            seen.append(opt.param_groups[0]["params"][0].grad.detach().clone())

    handle = register_optimizer_step_pre_hook(hook)
    try:
        train(cfg, progress=False)
    finally:
        handle.remove()
    return seen[0]


def test_the_optimizer_sees_the_diffusion_gradient_plus_lambda_times_its_norm_along_dk(
    tiny_model, tmp_path
):
    lam = 0.3
    common = ("train.max_steps=1", "train.max_grad_norm=null", f"kde.reference={WORDS}")
    g_d = first_step_gradient(make_cfg(tiny_model, tmp_path / "off", *common, "kde.weight=0"))
    g = first_step_gradient(make_cfg(tiny_model, tmp_path / "on", *common, f"kde.weight={lam}"))

    # Independent reference: R = the words' token rows, h = their median nearest-neighbour
    # distance (numpy), K = mean float64 kde over the initial vectors of all 16 layers.
    bundle = load_model(make_cfg(tiny_model, tmp_path).model)
    table = bundle.text_encoder.get_input_embeddings().weight.detach()
    ids = sorted(
        {t for w in WORDS for t in bundle.tokenizer(w, add_special_tokens=False).input_ids}
    )
    rows = table[ids].double()
    h = numpy_nn_median(rows.numpy())
    init = initializer_vectors(
        bundle.tokenizer, bundle.text_encoder.get_input_embeddings(), "box", 1
    )
    v0 = init.expand(16, 1, init.shape[-1]).double().clone().requires_grad_(True)
    brute_kde(v0, rows, h).mean().backward()

    added = (g - g_d).double()
    assert added.norm().item() == pytest.approx(lam * g_d.norm().item(), rel=1e-4)
    cos = torch.nn.functional.cosine_similarity(added.flatten(), v0.grad.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_frozen_run_warning_fires_for_a_tiny_lr_only(tiny_model, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="xti")
    train(
        make_cfg(tiny_model, tmp_path / "frozen", "train.lr=1e-7", "train.max_steps=3"),
        progress=False,
    )
    frozen = [r.getMessage() for r in caplog.records if "looks frozen" in r.getMessage()]
    assert len(frozen) == 1 and "train.lr" in frozen[0] and "kde.weight" in frozen[0]
    caplog.clear()
    train(
        make_cfg(tiny_model, tmp_path / "moving", "train.max_steps=3", "kde.weight=0.5"),
        progress=False,
    )
    assert not [r for r in caplog.records if "looks frozen" in r.getMessage()]


def test_word_reference_outside_the_vocabulary_is_one_line(tiny_model, tmp_path):
    from xti.errors import XTIError

    with pytest.raises(XTIError, match="kde.reference"):
        train(
            make_cfg(tiny_model, tmp_path, "kde.reference=[red]", "kde.weight=0.1"), progress=False
        )
