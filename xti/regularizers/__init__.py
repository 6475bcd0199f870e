"""Regularisers of the learned vectors behind one config section (`regularizer.kind`), issue 21.

This package owns the choice of regulariser and the one step every regulariser shares. Each kind is
a small module whose `build` returns one *term* per text encoder: a callable from the encoder's
vectors ``[V, n, d]`` to a scalar ``R`` (fp32, differentiable). The step (`add_relative_gradient`,
the rule of DESIGN §4 for every kind) adds ``λ · (‖g_d‖ / ‖g_R‖) · g_R`` to the complete diffusion
gradient ``g_d``, so λ always means "the pull relative to the diffusion gradient":

- ``kde`` (`xti.regularizers.kde`): the KDE of DESIGN §4 under the reference rows R, settings in the
  ``kde`` section (``kde.weight`` is its λ), with ``kde.bandwidth_scale`` and ``kde.layer_weights``;
- ``norm`` (`xti.regularizers.norm`): pulls each vector's norm toward a target norm (the
  initializer's or the reference words' mean), ``regularizer.norm.*``;
- ``init_pull`` (`xti.regularizers.init_pull`): pulls the vectors toward the initializer's,
  ``regularizer.init_pull.*``;
- ``none``: nothing is added.

The trainer calls `add_relative_gradient` once per optimizer step per concept (`regularizer_terms`
builds the terms once per run).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from xti.regularizers.base import Term, add_relative_gradient
from xti.regularizers.init_pull import InitPullTerm
from xti.regularizers.kde import KDETerm, variant_weights
from xti.regularizers.norm import NormTerm

__all__ = [
    "KINDS",
    "InitPullTerm",
    "KDETerm",
    "NormTerm",
    "Regularization",
    "Term",
    "add_relative_gradient",
    "describe",
    "regularizer_terms",
    "variant_weights",
]

KINDS = ("kde", "norm", "init_pull", "none")
"""The values of `regularizer.kind`."""


@dataclass
class Regularization:
    """A run's regulariser: one term per text encoder and λ (0 or no terms: nothing is added)."""

    kind: str
    terms: dict[str, Term]
    weight: float


def regularizer_terms(
    cfg,
    kdes: Mapping[str, object],
    inits: Mapping[str, torch.Tensor],
    weights: torch.Tensor | None,
) -> Regularization:
    """The regulariser `cfg.regularizer.kind` over each encoder: `kdes` are the encoders' KDEs
    (`xti.kde.KDERegularizer`), `inits` their initializer vectors ``[n, d]``, `weights` the KDE's
    per-variant weights (`variant_weights`; None: a plain mean)."""
    kind = cfg.regularizer.kind
    if kind == "kde":
        terms: dict[str, Term] = {n: KDETerm(k, weights) for n, k in kdes.items()}
        return Regularization(kind, terms, cfg.kde.weight)
    if kind == "norm":
        nc = cfg.regularizer.norm
        terms = {}
        for n, init in inits.items():
            target = (
                float(init.float().norm(dim=-1).mean())
                if nc.target == "initializer"
                else float(kdes[n].reference_norm)
            )
            terms[n] = NormTerm(target)
        return Regularization(kind, terms, nc.weight)
    if kind == "init_pull":
        terms = {n: InitPullTerm(init) for n, init in inits.items()}
        return Regularization(kind, terms, cfg.regularizer.init_pull.weight)
    return Regularization("none", {}, 0.0)


def describe(c: Mapping) -> str:
    """The regulariser of a config dump ``c`` in a few words (model cards, bench tables)."""
    reg = c.get("regularizer") or {"kind": "kde"}
    kind = reg.get("kind", "kde")
    if kind == "kde":
        k = c["kde"]
        extra = ""
        if k.get("bandwidth_scale", 1.0) != 1.0:
            extra += f", bandwidth × {k['bandwidth_scale']}"
        if k.get("layer_weights"):
            extra += f", layer weights {k['layer_weights']}"
        return f"kde, kde.weight = {k['weight']}{extra}"
    if kind == "norm":
        n = reg["norm"]
        return f"norm, regularizer.norm.weight = {n['weight']} (target: the {n['target']} norm)"
    if kind == "init_pull":
        return f"init_pull, regularizer.init_pull.weight = {reg['init_pull']['weight']}"
    return "none"
