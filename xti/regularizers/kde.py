"""The KDE regulariser as a term (`xti.kde` computes the density; DESIGN §4).

``R = mean over vectors of kde(e)`` — or, with ``kde.layer_weights``, the mean weighted per vector set
by the mean weight of the layers that read it (`variant_weights`), so that e.g. the fine layers,
where colour edits live, can be held closer to the vocabulary than the coarse ones. With no layer
weights the term is exactly the plain mean (the runs of before bit-identical).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from xti.errors import XTIError
from xti.kde import KDERegularizer


class KDETerm:
    """``R = mean kde(e)`` over one encoder's vectors, optionally weighted per vector set."""

    def __init__(self, kde: KDERegularizer, weights: torch.Tensor | None = None) -> None:
        self.kde = kde
        self.weights = weights

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        values = self.kde(vectors)  # [V, n]
        if self.weights is None:
            return values.mean()
        w = self.weights.to(values.device, values.dtype).reshape(-1, *([1] * (values.ndim - 1)))
        w = w.expand_as(values)
        return (values * w).sum() / w.sum()


def variant_weights(
    layer_weights: Mapping[str, float],
    select,
    variant_of_layer: torch.Tensor,
    num_variants: int,
    layer_names: Sequence[str],
) -> torch.Tensor | None:
    """Per vector set, the mean of the weights of the layers that read it: each layer's weight is
    the last `layer_weights` entry whose selection (`xti.layers.LayerScheme.select`) holds it, else
    1. None when no weights are given (the plain mean)."""
    if not layer_weights:
        return None
    per_layer = torch.ones(len(layer_names), dtype=torch.float64)
    for spec, w in layer_weights.items():
        per_layer[select(spec)] = float(w)
    out = torch.zeros(num_variants, dtype=torch.float64)
    count = torch.zeros(num_variants, dtype=torch.float64)
    out.index_add_(0, variant_of_layer.cpu(), per_layer)
    count.index_add_(0, variant_of_layer.cpu(), torch.ones_like(per_layer))
    weights = out / count.clamp_min(1)
    if not float(weights.sum()) > 0:
        raise XTIError("kde.layer_weights: every layer has weight 0; give some layer a weight > 0")
    return weights.float()
