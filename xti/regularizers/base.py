"""The interface every regulariser shares and the step that joins its gradient (DESIGN §4).

A *term* is a callable ``term(vectors) -> R``: one text encoder's vectors ``[V, n, d]`` (a leaf
that requires grad) to a scalar fp32 tensor, built from plain autograd operations. Its value is
logged; its gradient ``g_R`` joins the diffusion gradient ``g_d`` rescaled to ``λ · ‖g_d‖ / ‖g_R‖``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch

from xti.kde import KDEStats


class Term(Protocol):
    """One encoder's regulariser: vectors ``[V, n, d]`` -> scalar fp32 tensor."""

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor: ...


def add_relative_gradient(
    vectors: Mapping[str, torch.Tensor], terms: Mapping[str, Term], weight: float
) -> dict[str, KDEStats]:
    """Add ``λ · (‖g_d‖ / ‖g_R‖) · g_R`` to each encoder's vector gradient, for every regulariser.

    Args:
        vectors: ``{encoder: leaf parameter}``; its ``.grad`` holds the complete diffusion gradient
            of the optimizer step (accumulated, synchronised, unscaled); None counts as zero.
        terms: the regulariser term of each encoder, same keys.
        weight: λ; with 0 the gradients are left untouched (R and the norms are still reported).

    Returns each encoder's `xti.kde.KDEStats` (``value`` = R, ``grad_kde`` = ‖g_R‖). A
    non-finite ‖g_d‖ (an overflowing fp16 step, which the scaler skips) adds nothing; ‖g_R‖ = 0
    (e.g. vectors on their target) adds nothing.
    """
    stats: dict[str, KDEStats] = {}
    for name, param in vectors.items():
        with torch.enable_grad():
            leaf = param.detach().requires_grad_(True)
            r = terms[name](leaf)
            (g_r,) = torch.autograd.grad(r, leaf)
        g_d = param.grad
        norm_d = float(g_d.detach().float().norm()) if g_d is not None else 0.0
        norm_r = float(g_r.norm())
        factor = 0.0
        if weight > 0 and norm_r > 0 and math.isfinite(norm_d):
            factor = weight * norm_d / norm_r
            if factor > 0:
                add = (g_r * factor).to(param.dtype)
                if g_d is None:
                    param.grad = add
                else:
                    g_d.add_(add)
        stats[name] = KDEStats(float(r.detach()), norm_d, norm_r, factor)
    return stats
