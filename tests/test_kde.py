"""Tests for xti.kde: values and gradients against a float64 brute force, the nearest-neighbour
bandwidth, reference rows, the relative gradient weighting, nearest."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from xti.kde import (
    KDERegularizer,
    bandwidth_sample_rows,
    nearest_neighbour_bandwidth,
    reference_row_ids,
    vocabulary_matrix,
    vocabulary_row_ids,
)
from xti.regularizers.base import add_relative_gradient
from xti.regularizers.kde import KDETerm

N, D = 5000, 32


def _terms(kdes: dict[str, KDERegularizer]) -> dict[str, KDETerm]:
    """The shipped KDE term (mean kde over an encoder's vectors) of each encoder."""
    return {k: KDETerm(v) for k, v in kdes.items()}


@pytest.fixture(scope="module")
def vocab() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # An offset and uneven scales, like real token embeddings (not centred, not isotropic).
    return torch.randn(N, D, generator=g) * torch.linspace(0.5, 1.5, D) + 0.3


def brute_kde(e: torch.Tensor, vocab: torch.Tensor, h: float) -> torch.Tensor:
    """Float64 reference: explicit broadcast over ||e - v_j||^2 and torch.logsumexp."""
    e64 = e.to(torch.float64)
    v64 = vocab.to(torch.float64)
    d2 = ((e64.unsqueeze(-2) - v64) ** 2).sum(-1)  # [..., N]
    return -torch.logsumexp(-d2 / (2 * h * h), dim=-1) + math.log(v64.shape[0])


def sample_vectors(vocab: torch.Tensor, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab.shape[0], shape, generator=g)
    # Near the vocabulary (so many kernels contribute) plus a few far away.
    e = vocab[rows] + 0.5 * torch.randn(*shape, vocab.shape[1], generator=g)
    e.view(-1, vocab.shape[1])[:2] += 4.0
    return e


@pytest.mark.parametrize("chunk_size", [8192, 777, 5000, 1])
def test_value_and_grad_match_float64(vocab: torch.Tensor, chunk_size: int) -> None:
    if chunk_size == 1:  # the extreme chunked case on a smaller vocabulary, to stay fast
        vocab = vocab[:300]
    kde = KDERegularizer(vocab, chunk_size=chunk_size)
    h = kde.bandwidth
    e = sample_vectors(vocab, (3, 4), seed=1)

    e32 = e.clone().requires_grad_(True)
    out = kde(e32)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    weights = torch.linspace(0.1, 1.0, 12).reshape(3, 4)
    (out * weights).sum().backward()

    e64 = e.to(torch.float64).requires_grad_(True)
    ref = brute_kde(e64, vocab, h)
    (ref * weights.double()).sum().backward()

    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(e32.grad.double(), e64.grad, rtol=1e-4, atol=1e-4)


def test_explicit_bandwidth_and_gradcheck_shape(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab[:200], bandwidth=0.9, chunk_size=64)
    assert kde.bandwidth == 0.9
    e = sample_vectors(vocab[:200], (5,), seed=2).double().requires_grad_(True)

    # d kde / d e = (e - sum_j p_j v_j) / h^2 with p = softmax(-||e - v_j||^2 / 2h^2)
    out = kde(e)
    out.sum().backward()
    v = vocab[:200].double()
    d2 = ((e.detach().unsqueeze(1) - v) ** 2).sum(-1)
    p = torch.softmax(-d2 / (2 * 0.81), dim=1)
    analytic = (e.detach() - p @ v) / 0.81
    torch.testing.assert_close(e.grad, analytic, rtol=1e-4, atol=1e-4)


def test_single_vector_gives_scalar(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab)
    out = kde(vocab[7] + 0.1)
    assert out.shape == () and out.dtype == torch.float32


def numpy_nn_median(rows: np.ndarray) -> float:
    """Independent reference: every row's distance to its nearest other row, numpy's median."""
    d = np.sqrt(((rows[:, None, :] - rows[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return float(np.median(d.min(axis=1)))


def test_nearest_neighbour_bandwidth_matches_numpy(vocab: torch.Tensor) -> None:
    small = vocab[:301]  # odd and even counts: numpy's median averages the two middle values
    for rows in (small, small[:300]):
        expected = numpy_nn_median(rows.double().numpy())
        assert nearest_neighbour_bandwidth(rows, chunk_size=64) == pytest.approx(expected, rel=1e-5)
        assert KDERegularizer(rows).bandwidth == pytest.approx(expected, rel=1e-5)
    # Above the sample size, the sampled rows' nearest neighbours are searched among ALL rows.
    picked = bandwidth_sample_rows(N, 500)
    assert len(picked) == 500 and torch.equal(picked, bandwidth_sample_rows(N, 500))
    assert torch.equal(bandwidth_sample_rows(300, 500), torch.arange(300))
    full = vocab.double().numpy()
    d = np.sqrt(((full[picked.numpy(), None, :] - full[None, :, :]) ** 2).sum(-1))
    d[np.arange(500), picked.numpy()] = np.inf
    expected = float(np.median(d.min(axis=1)))
    got = nearest_neighbour_bandwidth(vocab, sample=500, chunk_size=777)
    assert got == pytest.approx(expected, rel=1e-5)
    # Scale-equivariant: h follows the table's scale, unlike Scott's rule whose h is about the
    # per-dimension std and ignores how far apart neighbours are.
    assert nearest_neighbour_bandwidth(small * 3) == pytest.approx(
        3 * numpy_nn_median(small.double().numpy()), rel=1e-5
    )


def test_bad_inputs_are_refused(vocab: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        nearest_neighbour_bandwidth(vocab[:1])
    with pytest.raises(ValueError):
        KDERegularizer(vocab, bandwidth=0.0)
    with pytest.raises(ValueError):
        KDERegularizer(torch.ones(10, 4))  # identical rows: the nearest-neighbour distance is 0
    kde = KDERegularizer(vocab)
    with pytest.raises(ValueError):
        kde(torch.zeros(3, D + 1))
    with pytest.raises(ValueError):
        kde.nearest(torch.zeros(D), k=0)


@pytest.fixture(scope="module")
def clip_tokenizer():
    from xti.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer()


def test_reference_rows_are_the_vocabulary_or_the_listed_words(clip_tokenizer) -> None:
    tok = copy.deepcopy(clip_tokenizer)
    tok.add_tokens(["<new-thing>"])  # added tokens (placeholders) are never reference rows
    rows = reference_row_ids(tok, "vocabulary", 49408)
    assert len(rows) == 49406 and 49406 not in rows and 49407 not in rows and rows[-1] == 49405
    words = ["red", "circle", "a photo"]
    expected = sorted(
        {t for w in words for t in clip_tokenizer(w, add_special_tokens=False).input_ids}
    )
    assert reference_row_ids(tok, words, 49408).tolist() == expected
    assert expected == sorted({736, 7117, 320, 1125})  # red, circle, a, photo
    table = torch.randn(49408, 8, generator=torch.Generator().manual_seed(0))
    kde = KDERegularizer.from_reference(table, tok, words)
    assert kde.n == 4 and torch.equal(kde.row_ids, torch.tensor(expected))
    assert kde.reference_norm == pytest.approx(float(table[expected].norm(dim=1).mean()), rel=1e-6)
    _, idx = kde.nearest(table[[7117]] + 0.01)
    assert idx.item() == 7117
    for bad in (["<new-thing>"], ["red"], [""], "everything"):
        with pytest.raises(ValueError):
            reference_row_ids(tok, bad, 49408)


def test_relative_weighting_adds_lambda_times_the_diffusion_norm_along_dk(
    vocab: torch.Tensor,
) -> None:
    rows = vocab[:400]
    kdes = {"a": KDERegularizer(rows, chunk_size=128), "b": KDERegularizer(rows[:, :16] * 2)}
    g = torch.Generator().manual_seed(7)
    params = {
        "a": (rows[:6].reshape(3, 2, D) + 0.3 * torch.randn(3, 2, D, generator=g)).requires_grad_(
            True
        ),
        "b": (rows[:4, :16] * 2 + torch.randn(4, 16, generator=g)).requires_grad_(True),
    }
    diffusion = {k: torch.randn(p.shape, generator=g) for k, p in params.items()}
    for k, p in params.items():
        p.grad = diffusion[k].clone()
    lam = 0.25
    stats = add_relative_gradient(params, _terms(kdes), lam)
    for k, p in params.items():
        # Independent: float64 brute-force K = mean kde over all of this encoder's vectors.
        e = p.detach().double().requires_grad_(True)
        ref_rows = rows if k == "a" else rows[:, :16] * 2
        brute_kde(e, ref_rows, kdes[k].bandwidth).mean().backward()
        added = (p.grad - diffusion[k]).double()
        assert added.norm().item() == pytest.approx(lam * diffusion[k].norm().item(), rel=1e-5)
        cos = torch.nn.functional.cosine_similarity(added.flatten(), e.grad.flatten(), dim=0)
        assert cos.item() == pytest.approx(1.0, abs=1e-6)
        assert stats[k].grad_diffusion == pytest.approx(diffusion[k].norm().item(), rel=1e-6)
        assert stats[k].grad_kde == pytest.approx(e.grad.norm().item(), rel=1e-4)
        assert stats[k].effective_weight == pytest.approx(
            lam * stats[k].grad_diffusion / stats[k].grad_kde, rel=1e-6
        )
    # λ = 0 leaves the gradient untouched; a non-finite diffusion gradient gets nothing added.
    for k, p in params.items():
        p.grad = diffusion[k].clone()
    add_relative_gradient(params, _terms(kdes), 0.0)
    assert all(torch.equal(p.grad, diffusion[k]) for k, p in params.items())
    params["a"].grad[0, 0, 0] = float("inf")
    before = params["a"].grad.clone()
    assert add_relative_gradient({"a": params["a"]}, _terms(kdes), 1.0)["a"].effective_weight == 0.0
    assert torch.equal(params["a"].grad, before)


def test_nearest_returns_the_equal_row(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab, chunk_size=1000)
    rows = torch.tensor([0, 17, 999, 1000, 4999])
    dist, idx = kde.nearest(vocab[rows])
    assert idx.shape == (5, 1) and dist.shape == (5, 1)
    assert idx.dtype == torch.long and dist.dtype == torch.float32
    assert torch.equal(idx[:, 0], rows)
    assert torch.all(dist < 1e-3)


def test_nearest_k_sorted_and_matches_brute_force(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab, chunk_size=333)
    e = sample_vectors(vocab, (2, 3), seed=3)
    dist, idx = kde.nearest(e, k=4)
    assert dist.shape == (2, 3, 4) and idx.shape == (2, 3, 4)
    full = ((e.double().unsqueeze(-2) - vocab.double()) ** 2).sum(-1).sqrt()
    ref_dist, ref_idx = full.topk(4, dim=-1, largest=False)
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)
    assert torch.all(dist[..., 1:] >= dist[..., :-1])


def test_excluded_ids_are_skipped_and_mapped_back(vocab: torch.Tensor) -> None:
    table = vocab[:1000].clone()
    excluded = [0, 5, 6, 999, 500]
    vm = vocabulary_matrix(table, excluded)
    assert vm.shape == (995, D) and vm.dtype == torch.float32
    ids = vocabulary_row_ids(1000, excluded)
    assert torch.equal(vm, table[ids])
    assert not set(excluded) & set(ids.tolist())

    kde = KDERegularizer.from_embedding(table, excluded, chunk_size=128)
    assert kde.n == 995
    # A vector equal to a kept row maps back to its id in the original table.
    dist, idx = kde.nearest(table[[7, 501, 998]])
    assert idx[:, 0].tolist() == [7, 501, 998]
    # A vector equal to an excluded row never returns that row.
    _, idx = kde.nearest(table[[5, 999]], k=3)
    assert not set(idx.flatten().tolist()) & set(excluded)
    # KDE values use only the kept rows.
    e = table[[5, 20]] + 0.05
    torch.testing.assert_close(
        kde(e).double(), brute_kde(e, table[ids], kde.bandwidth), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError):
        vocabulary_matrix(table, [1000])


def test_bf16_input_gives_fp32_output_and_grad(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab, chunk_size=2048)
    e = sample_vectors(vocab, (6,), seed=4).to(torch.bfloat16).requires_grad_(True)
    out = kde(e)
    assert out.dtype == torch.float32
    out.mean().backward()
    assert e.grad is not None and e.grad.dtype == torch.bfloat16
    ref = brute_kde(e.detach(), vocab, kde.bandwidth)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


def test_autocast_does_not_lower_precision(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab)
    e = sample_vectors(vocab, (4,), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = kde(e)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), brute_kde(e, vocab, kde.bandwidth), rtol=1e-5, atol=1e-4
    )


def test_vocab_never_modified_and_no_parameters(vocab: torch.Tensor) -> None:
    original = vocab.clone()
    table = vocab.clone().requires_grad_(False)
    kde = KDERegularizer(table, chunk_size=999)
    assert list(kde.parameters()) == []
    assert kde.state_dict() == {}
    e = sample_vectors(vocab, (8,), seed=6).requires_grad_(True)
    kde(e).sum().backward()
    kde.nearest(e)
    assert torch.equal(table, original)
    assert table.grad is None
    assert kde.vocab.data_ptr() != table.data_ptr()


def test_empty_batch(vocab: torch.Tensor) -> None:
    kde = KDERegularizer(vocab, chunk_size=1000)
    assert kde(torch.zeros(0, D)).shape == (0,)
    dist, idx = kde.nearest(torch.zeros(0, D), k=2)
    assert dist.shape == (0, 2) and idx.shape == (0, 2)
