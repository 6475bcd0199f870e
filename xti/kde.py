"""KDE regulariser on the learned embeddings (DESIGN §4).

This module owns the vocabulary density term: the reference rows R (the frozen vocabulary without
special and added tokens, or the token rows of listed words), the bandwidth (the median
nearest-neighbour distance within R), the negative log kernel density of learned vectors under R,
the relative weighting of its gradient against the diffusion gradient, and nearest-token look-ups.

    kde(e) = -logsumexp_j(-||e - r_j||^2 / (2 h^2)) + log N,        K = mean over vectors of kde(e)

At each optimizer step the gradient ``g_K = dK/d(vectors)`` is added to the complete diffusion
gradient ``g_d`` rescaled to ``λ · ||g_d|| / ||g_K||`` (`xti.regularizers.base.add_relative_gradient`), so λ is the
pull towards the vocabulary relative to the diffusion gradient, whatever the model.

Everything is computed in fp32 (autocast is switched off inside) from
``||e||^2 - 2 e.r + ||r||^2`` with ``||r||^2`` cached. R is centred on its mean first: distances do
not change, but the cancellation error of that formula shrinks. When R has more rows than
``chunk_size`` it is processed in chunks whose log-sum-exps are merged exactly; with autograd on,
each chunk is checkpointed so that only one ``[M, chunk]`` block is alive at a time, in the backward
pass too. Gradients are plain autograd, never hand-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "KDEStats",
    "KDERegularizer",
    "nearest_neighbour_bandwidth",
    "reference_row_ids",
    "vocabulary_matrix",
    "vocabulary_row_ids",
]

# Extra candidates taken from the fast (matmul) distances before the exact re-ranking in `nearest`.
_RERANK_MARGIN = 8


BANDWIDTH_SAMPLE = 4096
"""At most this many rows of R get their nearest-neighbour distance measured for the bandwidth."""


def bandwidth_sample_rows(n: int, sample: int = BANDWIDTH_SAMPLE) -> torch.Tensor:
    """The rows of an ``n``-row reference whose nearest-neighbour distances set the bandwidth:
    all of them when ``n <= sample``, else ``sample`` rows drawn without replacement by a fixed
    generator (seed 0), in ascending order, so the bandwidth never depends on the run's seed."""
    if n <= sample:
        return torch.arange(n)
    g = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=g)[:sample].sort().values


@torch.no_grad()
def nearest_neighbour_bandwidth(
    rows: torch.Tensor, sample: int = BANDWIDTH_SAMPLE, chunk_size: int = 8192
) -> float:
    """The median over sampled rows of R of the Euclidean distance to their nearest *other* row.

    The median is numpy's (the mean of the two middle values for an even count). Distances are the
    matmul expansion in fp32 on centred rows, each sampled row against all of R in chunks.
    """
    if rows.ndim != 2:
        raise ValueError(
            f"reference rows must be a 2-D [N, d] tensor, got shape {tuple(rows.shape)}"
        )
    n = rows.shape[0]
    if n < 2:
        raise ValueError(
            f"the nearest-neighbour bandwidth needs at least 2 reference rows, got {n}"
        )
    key = (_digest(rows), int(sample))
    if key not in _BANDWIDTHS:
        _BANDWIDTHS[key] = _nn_median(rows, sample, chunk_size)
    return _BANDWIDTHS[key]


_BANDWIDTHS: dict[tuple[str, int], float] = {}
"""Bandwidths already measured in this process, by reference content: a test session or a sweep
trains many runs on one table, and the search costs ~2-3 s per run for a 49,408-row table on a CPU."""


def _digest(rows: torch.Tensor) -> str:
    data = rows.detach().float().contiguous().cpu().numpy().tobytes()
    return hashlib.sha1(data + str(tuple(rows.shape)).encode()).hexdigest()


def _nn_median(rows: torch.Tensor, sample: int, chunk_size: int) -> float:
    with _no_autocast(rows.device):
        r = rows.detach().float()
        r = r - r.mean(dim=0)
        r_sq = r.square().sum(dim=1)
        picked = bandwidth_sample_rows(rows.shape[0], sample).to(r.device)
        q = r[picked]
        best = torch.full((len(picked),), float("inf"), device=r.device)
        for start in range(0, rows.shape[0], chunk_size):
            # ||q||^2 is constant per row: add it after the minimum, one pass less over the block.
            part = torch.addmm(
                r_sq[start : start + chunk_size].unsqueeze(0),
                q,
                r[start : start + chunk_size].t(),
                alpha=-2.0,
            )
            own = ((picked >= start) & (picked < start + chunk_size)).nonzero().flatten()
            part[own, picked[own] - start] = float("inf")  # a row is not its own neighbour
            best = torch.minimum(best, part.min(dim=1).values)
        d2 = (best + r_sq[picked]).clamp_min(0.0)
        return float(torch.quantile(d2.sqrt().cpu().double(), 0.5))


def vocabulary_row_ids(num_rows: int, exclude_ids: Iterable[int]) -> torch.Tensor:
    """Row indices (int64, ascending) of a ``num_rows``-row table, minus ``exclude_ids``."""
    excluded = {int(i) for i in exclude_ids}
    bad = sorted(i for i in excluded if not 0 <= i < num_rows)
    if bad:
        raise ValueError(
            f"excluded token ids {bad} are outside the embedding table of {num_rows} rows"
        )
    keep = torch.ones(num_rows, dtype=torch.bool)
    if excluded:
        keep[torch.tensor(sorted(excluded), dtype=torch.long)] = False
    return torch.nonzero(keep, as_tuple=False).flatten()


def vocabulary_matrix(embedding_weight: torch.Tensor, exclude_ids: Iterable[int]) -> torch.Tensor:
    """A detached fp32 copy ``[N, d]`` of the embedding table without the rows in ``exclude_ids``.

    Row ``i`` of the result is row ``vocabulary_row_ids(len(table), exclude_ids)[i]`` of the table.
    """
    if embedding_weight.ndim != 2:
        raise ValueError(
            "embedding weight must be 2-D [num_tokens, d], "
            f"got shape {tuple(embedding_weight.shape)}"
        )
    with torch.no_grad():
        ids = vocabulary_row_ids(embedding_weight.shape[0], exclude_ids)
        # index_select always allocates, so the result never aliases the embedding table.
        rows = embedding_weight.detach().index_select(0, ids.to(embedding_weight.device))
        return rows.to(torch.float32).contiguous()


def reference_row_ids(tokenizer, reference: str | Sequence[str], num_rows: int) -> torch.Tensor:
    """Rows of a ``num_rows``-row token table that form the KDE reference R (ascending, unique).

    ``"vocabulary"``: every row except the tokenizer's special and added tokens (the placeholder
    tokens among them). A list of words or phrases: the rows of the tokens they tokenize to.
    """
    if isinstance(reference, str):
        if reference != "vocabulary":
            raise ValueError(
                f"kde.reference must be 'vocabulary' or a list of words, got {reference!r}"
            )
        added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
        excluded = {int(i) for i in (*tokenizer.all_special_ids, *added.values())}
        return vocabulary_row_ids(num_rows, {i for i in excluded if 0 <= i < num_rows})
    ids: set[int] = set()
    special = set(tokenizer.all_special_ids)
    for phrase in reference:
        toks = [int(t) for t in tokenizer(phrase, add_special_tokens=False).input_ids]
        outside = [t for t in toks if t in special or not 0 <= t < num_rows]
        if not toks or outside:
            raise ValueError(
                f"kde.reference: {phrase!r} does not tokenize to rows of the vocabulary "
                "(list ordinary words the model was trained on)"
            )
        ids.update(toks)
    if len(ids) < 2:
        raise ValueError(
            f"kde.reference: {list(reference)} gives {len(ids)} token row(s); the bandwidth needs "
            "at least 2 (list more words)"
        )
    return torch.tensor(sorted(ids), dtype=torch.long)


@contextlib.contextmanager
def _no_autocast(device: torch.device) -> Iterator[None]:
    try:
        ctx: contextlib.AbstractContextManager[object] = torch.autocast(
            device_type=device.type, enabled=False
        )
    except (RuntimeError, ValueError):  # a device type autocast does not know: nothing to undo
        ctx = contextlib.nullcontext()
    with ctx:
        yield


def _squared_distances(
    e: torch.Tensor, e_sq: torch.Tensor, vocab: torch.Tensor, vocab_sq: torch.Tensor
) -> torch.Tensor:
    """``[M, n]`` squared distances via the matmul expansion, clamped at 0."""
    d2 = torch.addmm(vocab_sq.unsqueeze(0), e, vocab.t(), beta=1.0, alpha=-2.0)
    return (d2 + e_sq).clamp_min(0.0)


def _chunk_logsumexp(
    e: torch.Tensor, e_sq: torch.Tensor, vocab: torch.Tensor, vocab_sq: torch.Tensor, scale: float
) -> torch.Tensor:
    """``[M]`` logsumexp over this vocabulary chunk of ``-scale * ||e - v||^2``."""
    return torch.logsumexp(_squared_distances(e, e_sq, vocab, vocab_sq) * (-scale), dim=1)


class KDERegularizer(torch.nn.Module):
    """Negative log kernel density of vectors under frozen reference rows R (Gaussian kernel).

    ``vocab`` is R, ``[N, d]`` (see `vocabulary_matrix`); it is read, never modified. ``bandwidth``
    None means the median nearest-neighbour distance within R (`nearest_neighbour_bandwidth`);
    ``reference_norm`` is the mean L2 norm of R's rows. ``row_ids`` maps
    vocabulary rows back to rows of the original embedding table (what `nearest` returns); by
    default it is the identity. The module has no parameters and its buffers are non-persistent,
    so it never appears in a state dict. Use `from_embedding` to build it from a text encoder's
    token embedding table and the special-token ids to leave out.
    """

    vocab: torch.Tensor
    vocab_sq: torch.Tensor
    center: torch.Tensor
    row_ids: torch.Tensor

    def __init__(
        self,
        vocab: torch.Tensor,
        bandwidth: float | None = None,
        chunk_size: int = 8192,
        *,
        row_ids: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if vocab.ndim != 2 or vocab.shape[0] < 1 or vocab.shape[1] < 1:
            raise ValueError(
                f"vocabulary must be a non-empty [N, d] tensor, got {tuple(vocab.shape)}"
            )
        if not vocab.is_floating_point():
            raise ValueError(f"vocabulary must be floating point, got {vocab.dtype}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        n = vocab.shape[0]
        h = (
            nearest_neighbour_bandwidth(vocab, chunk_size=chunk_size)
            if bandwidth is None
            else float(bandwidth)
        )
        if not (math.isfinite(h) and h > 0.0):
            raise ValueError(f"KDE bandwidth must be a positive finite number, got {h}")
        if row_ids is None:
            row_ids = torch.arange(n, dtype=torch.long, device=vocab.device)
        else:
            row_ids = row_ids.detach().to(device=vocab.device, dtype=torch.long).flatten().clone()
            if row_ids.numel() != n:
                raise ValueError(f"row_ids has {row_ids.numel()} entries for {n} vocabulary rows")

        with torch.no_grad():
            v = vocab.detach().to(torch.float32)
            center = v.mean(dim=0)
            centred = v - center  # always a new tensor: the caller's vocab is never aliased
            self.register_buffer("center", center, persistent=False)
            self.register_buffer("vocab", centred.contiguous(), persistent=False)
            self.register_buffer("vocab_sq", centred.square().sum(dim=1), persistent=False)
            self.register_buffer("row_ids", row_ids, persistent=False)
            self.reference_norm: float = float(v.norm(dim=1).mean())
        self.bandwidth: float = h
        self.num_vocab: int = n
        self.dim: int = vocab.shape[1]
        self.chunk_size: int = int(chunk_size)
        self.log_n: float = math.log(n)

    @classmethod
    def from_embedding(
        cls,
        embedding_weight: torch.Tensor,
        exclude_ids: Iterable[int],
        bandwidth: float | None = None,
        chunk_size: int = 8192,
    ) -> KDERegularizer:
        """Build from a token embedding table, leaving out ``exclude_ids`` (special tokens)."""
        exclude = list(exclude_ids)
        vocab = vocabulary_matrix(embedding_weight, exclude)
        ids = vocabulary_row_ids(embedding_weight.shape[0], exclude)
        return cls(vocab, bandwidth=bandwidth, chunk_size=chunk_size, row_ids=ids)

    @classmethod
    def from_reference(
        cls,
        embedding_weight: torch.Tensor,
        tokenizer,
        reference: str | Sequence[str] = "vocabulary",
        bandwidth: float | None = None,
        chunk_size: int = 8192,
    ) -> KDERegularizer:
        """Build R from a token table and a ``kde.reference`` (`reference_row_ids`)."""
        ids = reference_row_ids(tokenizer, reference, embedding_weight.shape[0])
        with torch.no_grad():
            rows = embedding_weight.detach().index_select(0, ids.to(embedding_weight.device))
        return cls(rows.float(), bandwidth=bandwidth, chunk_size=chunk_size, row_ids=ids)

    @property
    def n(self) -> int:
        """Number of vocabulary rows N."""
        return self.num_vocab

    def extra_repr(self) -> str:
        return (
            f"num_vocab={self.num_vocab}, dim={self.dim}, bandwidth={self.bandwidth:.6g}, "
            f"chunk_size={self.chunk_size}"
        )

    # ------------------------------------------------------------------ helpers
    def _prepare(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
        if vectors.shape[-1:] != (self.dim,):
            raise ValueError(
                f"vectors must have last dimension {self.dim}, got shape {tuple(vectors.shape)}"
            )
        lead = vectors.shape[:-1]
        e = vectors.reshape(-1, self.dim).to(device=self.vocab.device, dtype=torch.float32)
        return e - self.center.float(), lead

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        vocab = self.vocab.float()
        vocab_sq = self.vocab_sq.float()
        for start in range(0, self.num_vocab, self.chunk_size):
            stop = start + self.chunk_size
            yield vocab[start:stop], vocab_sq[start:stop], start

    # ------------------------------------------------------------------ API
    def forward(self, vectors: torch.Tensor) -> torch.Tensor:
        """``kde`` value for every vector: ``[..., d]`` (any float dtype) -> ``[...]`` fp32."""
        with _no_autocast(self.vocab.device):
            e, lead = self._prepare(vectors)
            e_sq = e.square().sum(dim=1, keepdim=True)
            scale = 0.5 / (self.bandwidth * self.bandwidth)
            if self.num_vocab <= self.chunk_size:
                lse = _chunk_logsumexp(e, e_sq, self.vocab.float(), self.vocab_sq.float(), scale)
            else:
                use_ckpt = torch.is_grad_enabled() and e.requires_grad
                parts = []
                for v, v_sq, _ in self._chunks():
                    if use_ckpt:
                        part = checkpoint(
                            _chunk_logsumexp,
                            e,
                            e_sq,
                            v,
                            v_sq,
                            scale,
                            use_reentrant=False,
                            preserve_rng_state=False,
                        )
                    else:
                        part = _chunk_logsumexp(e, e_sq, v, v_sq, scale)
                    parts.append(part)
                lse = torch.logsumexp(torch.stack(parts, dim=1), dim=1)
            return (self.log_n - lse).reshape(lead)

    @torch.no_grad()
    def nearest(self, vectors: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest vocabulary rows of each vector (Euclidean), closest first.

        Returns ``(distances, indices)``, both ``[..., k]``: fp32 distances (not squared) and int64
        row indices into the ORIGINAL embedding table (excluded ids mapped back). Candidates come
        from the fast matmul distances and are re-ranked with exact ``||e - v||`` values.
        """
        if not 1 <= k <= self.num_vocab:
            raise ValueError(f"k must be in [1, {self.num_vocab}], got {k}")
        with _no_autocast(self.vocab.device):
            e, lead = self._prepare(vectors.detach())
            m = e.shape[0]
            dev = e.device
            if m == 0:
                empty = torch.empty(*lead, k, device=dev)
                return empty, empty.to(torch.long)
            n_cand = min(self.num_vocab, k + _RERANK_MARGIN)
            e_sq = e.square().sum(dim=1, keepdim=True)
            cand_d2: list[torch.Tensor] = []
            cand_idx: list[torch.Tensor] = []
            for v, v_sq, start in self._chunks():
                d2 = _squared_distances(e, e_sq, v, v_sq)
                vals, idx = d2.topk(min(n_cand, v.shape[0]), dim=1, largest=False)
                cand_d2.append(vals)
                cand_idx.append(idx + start)
            d2_all = torch.cat(cand_d2, dim=1)
            idx_all = torch.cat(cand_idx, dim=1)
            _, pos = d2_all.topk(n_cand, dim=1, largest=False)
            cand = idx_all.gather(1, pos)  # [M, n_cand] rows of self.vocab
            diff = e.unsqueeze(1) - self.vocab.float()[cand]  # [M, n_cand, d]
            exact = diff.square().sum(dim=2)
            exact, order = exact.sort(dim=1, stable=True)
            rows = cand.gather(1, order)[:, :k]
            dist = exact[:, :k].sqrt()
            ids = self.row_ids[rows]
            return dist.reshape(*lead, k), ids.reshape(*lead, k)


@dataclass
class KDEStats:
    """One encoder's KDE figures at an optimizer step (detached floats).

    ``value`` is K, ``grad_diffusion`` and ``grad_kde`` the norms ``||g_d||`` and ``||g_K||``, and
    ``effective_weight`` the factor ``λ·||g_d||/||g_K||`` that multiplied ``g_K`` (0 when nothing
    was added).
    """

    value: float
    grad_diffusion: float
    grad_kde: float
    effective_weight: float
