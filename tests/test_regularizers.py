"""The regularisers behind `regularizer.kind` (issue 21): each term's gradient against a float64
brute force, the shared relative step, the KDE path bit-identical to before, the per-layer weights,
the config section, and default runs that do not freeze."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from tests.test_kde import brute_kde
from tests.test_training import make_cfg
from xti.config import load_config
from xti.embeddings import layer_variants
from xti.errors import XTIError
from xti.kde import KDERegularizer
from xti.regularizers import (
    InitPullTerm,
    KDETerm,
    NormTerm,
    add_relative_gradient,
    describe,
    regularizer_terms,
    variant_weights,
)
from xti.training import train

D = 12


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = torch.randn(40, D, generator=g)
    vectors = vocab[torch.randint(0, 40, (5, 2), generator=g)] + 0.7 * torch.randn(
        5, 2, D, generator=g
    )
    return vocab, vectors


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    leaf = x.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(leaf), leaf)
    return g


def test_kde_term_gradient_matches_float64_brute_force_plain_and_layer_weighted():
    vocab, vectors = _data()
    kde = KDERegularizer(vocab, bandwidth=0.9)
    w = torch.tensor([0.0, 1.0, 3.0, 0.5, 2.0])
    for weights in (None, w):
        got = _grad(KDETerm(kde, weights), vectors)

        def brute(e, weights=weights):
            k = brute_kde(e, vocab.double(), 0.9)  # [5, 2]
            if weights is None:
                return k.mean()
            ww = weights.double()[:, None].expand_as(k)
            return (k * ww).sum() / ww.sum()

        want = _grad(brute, vectors.double())
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7)
    # zero weight: those vector sets get no pull at all
    assert torch.equal(_grad(KDETerm(kde, w), vectors)[0], torch.zeros(2, D))


def test_norm_term_gradient_matches_float64_brute_force_and_finite_differences():
    _, vectors = _data(1)
    target = 2.5
    got = _grad(NormTerm(target), vectors).double()

    def brute(e):
        norms = torch.sqrt((e * e).sum(-1))
        return (((norms - target) / target) ** 2).mean()

    e64 = vectors.double()
    torch.testing.assert_close(got, _grad(brute, e64), rtol=1e-5, atol=1e-8)
    # one coordinate by central differences of the float64 formula
    eps = 1e-6
    plus, minus = e64.clone(), e64.clone()
    plus[2, 1, 3] += eps
    minus[2, 1, 3] -= eps
    fd = (brute(plus) - brute(minus)) / (2 * eps)
    assert float(got[2, 1, 3]) == pytest.approx(float(fd), rel=1e-4)
    # on the target norm it pulls nothing; a long vector is pulled inward (radially)
    on_target = vectors / vectors.norm(dim=-1, keepdim=True) * target
    assert float(_grad(NormTerm(target), on_target).abs().max()) < 1e-6
    long = vectors / vectors.norm(dim=-1, keepdim=True) * 3 * target
    g = _grad(NormTerm(target), long)
    cos = torch.nn.functional.cosine_similarity(g.reshape(-1, D), long.reshape(-1, D), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-5)


def test_init_pull_gradient_matches_float64_brute_force():
    vocab, vectors = _data(2)
    init = vocab[:2]  # [n, d], broadcast over the 5 vector sets
    got = _grad(InitPullTerm(init), vectors).double()

    def brute(e):
        i64 = init.double()
        scale = (i64 * i64).sum(-1).mean()
        return ((e - i64) ** 2).sum(-1).mean() / scale

    torch.testing.assert_close(got, _grad(brute, vectors.double()), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["kde", "norm", "init_pull"])
def test_every_regulariser_joins_at_lambda_times_the_diffusion_gradient_norm(kind):
    vocab, vectors = _data(3)
    terms = {
        "kde": KDETerm(KDERegularizer(vocab, bandwidth=0.9)),
        "norm": NormTerm(1.0),
        "init_pull": InitPullTerm(vocab[:2]),
    }
    p = torch.nn.Parameter(vectors.clone())
    g_d = torch.randn_like(vectors)
    p.grad = g_d.clone()
    lam = 0.2
    stats = add_relative_gradient({"text": p}, {"text": terms[kind]}, lam)["text"]
    g_r = _grad(terms[kind], vectors)
    want = g_d.double() + lam * g_d.double().norm() / g_r.double().norm() * g_r.double()
    torch.testing.assert_close(p.grad.double(), want, rtol=1e-5, atol=1e-6)
    assert stats.grad_diffusion == pytest.approx(float(g_d.norm()), rel=1e-6)
    assert stats.effective_weight == pytest.approx(lam * float(g_d.norm() / g_r.norm()), rel=1e-5)


def test_the_kde_term_is_bit_identical_to_the_step_of_before():
    vocab, vectors = _data(4)
    kde = KDERegularizer(vocab)
    old, new = torch.nn.Parameter(vectors.clone()), torch.nn.Parameter(vectors.clone())
    g_d = torch.randn_like(vectors)
    old.grad, new.grad = g_d.clone(), g_d.clone()
    # the step of before, written out: K = mean kde, its gradient scaled to 0.01 ||g_d|| / ||g_K||
    leaf = old.detach().requires_grad_(True)
    (g_k,) = torch.autograd.grad(kde(leaf).mean(), leaf)
    old.grad.add_(g_k * (0.01 * float(g_d.float().norm()) / float(g_k.norm())))
    b = add_relative_gradient({"t": new}, {"t": KDETerm(kde)}, 0.01)["t"]
    assert torch.equal(old.grad, new.grad)
    assert b.effective_weight == 0.01 * float(g_d.norm()) / float(g_k.norm())


def test_layer_weights_average_over_the_layers_of_each_vector_set(tiny_model):
    from xti.layers import layer_scheme
    from xti.models import load_model

    scheme = layer_scheme(load_model(make_cfg(tiny_model, tiny_model).model).unet, "block")
    coarse = set(scheme.group("coarse"))
    block = variant_weights({"coarse": 0.0, "OUT11": 4.0}, scheme.select, layer_variants(16, "block"), 16, scheme.names)  # fmt: skip
    want = [0.0 if i in coarse else 1.0 for i in range(16)]
    want[scheme.index("OUT11")] = 4.0
    assert block.tolist() == want
    shared = variant_weights({"coarse": 0.0}, scheme.select, layer_variants(16, "shared"), 1, scheme.names)  # fmt: skip
    assert shared.tolist() == pytest.approx([(16 - len(coarse)) / 16])
    assert variant_weights({}, scheme.select, layer_variants(16, "block"), 16, scheme.names) is None
    with pytest.raises(XTIError, match="kde.layer_weights"):
        variant_weights({"all": 0.0}, scheme.select, layer_variants(16, "block"), 16, scheme.names)


def test_config_section_old_kde_keys_keep_their_meaning_and_bad_values_are_refused():
    cfg = load_config(None, ["kde.weight=0.05", "kde.bandwidth=0.3"])
    assert cfg.regularizer.kind == "kde" and cfg.kde.weight == 0.05
    assert describe(cfg.model_dump()) == "kde, kde.weight = 0.05"
    reg = regularizer_terms(cfg, {}, {}, None)
    assert reg.kind == "kde" and reg.weight == 0.05
    cfg = load_config(None, ["regularizer.kind=norm", "regularizer.norm.weight=0.3"])
    init = torch.full((1, 4), 2.0)  # norm 4
    reg = regularizer_terms(cfg, {}, {"text": init}, None)
    assert reg.weight == 0.3 and reg.terms["text"].target == pytest.approx(4.0)
    assert regularizer_terms(load_config(None, ["regularizer.kind=none"]), {}, {}, None).terms == {}
    for bad in ("regularizer.kind=l2", "kde.bandwidth_scale=0", "kde.layer_weights={fine: -1}",
                "regularizer.init_pull.weight=.inf", "regularizer.norm.target=mean"):  # fmt: skip
        with pytest.raises(XTIError):
            load_config(None, [bad])


def _frozen(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "looks frozen" in r.getMessage()]


def test_default_regulariser_does_not_freeze_the_demo_or_a_tiny_sd1_with_49k_tokens(
    tiny_model, tmp_path, caplog
):
    caplog.set_level(logging.WARNING, logger="xti")
    # the demo's shipped config, 20 steps (the check comes after the 20-step warm-up)
    demo = load_config(
        "configs/demo.yaml",
        ["train.max_steps=20", f"output_dir={tmp_path / 'demo'}", "validation.every=0",
         "validation.mix_with=null", "train.batch_size=4"],
    )  # fmt: skip
    train(demo, progress=False)
    assert not _frozen(caplog)
    # the tiny SD1 (49,408-token table) with the default reference: the whole vocabulary
    cfg = make_cfg(tiny_model, tmp_path / "tiny", "train.max_steps=10")
    assert (
        cfg.kde == load_config(None, []).kde
        and cfg.regularizer == load_config(None, []).regularizer
    )
    result = train(cfg, progress=False)
    assert not _frozen(caplog)
    assert result is not None and math.isfinite(result.losses[-1][1])
    # the model card names the regulariser and its settings
    card = (tmp_path / "tiny" / "README.md").read_text()
    assert "| regulariser | kde, kde.weight = 0.01 |" in card


def test_fingerprint_keeps_old_checkpoints_and_sees_a_changed_regulariser():
    from xti.runs import run_fingerprint

    ident = {"model.family": "sd1"}
    default = run_fingerprint(load_config(None, []), ident, world=1)
    assert not [k for k in default if k.startswith("regularizer")]
    assert "kde.bandwidth_scale" not in default and "kde.layer_weights" not in default
    other = run_fingerprint(
        load_config(None, ["regularizer.kind=norm", "kde.bandwidth_scale=0.5"]), ident, world=1
    )
    assert other["regularizer.kind"] == "norm" and other["regularizer.norm.weight"] == 0.1
    assert other["kde.bandwidth_scale"] == 0.5


def test_a_norm_run_trains_names_itself_and_writes_no_kde_weight(tiny_model, tmp_path):
    from xti.export import load_embedding_file

    cfg = make_cfg(tiny_model, tmp_path, "regularizer.kind=norm", "train.max_steps=3")
    result = train(cfg, progress=False)
    card = (tmp_path / "README.md").read_text()
    assert (
        "| regulariser | norm, regularizer.norm.weight = 0.1 (target: the initializer norm) |"
        in card
    )
    assert load_embedding_file(result.output_file).metadata["xti.kde_weight"] == "0.0"
