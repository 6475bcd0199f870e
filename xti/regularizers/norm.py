"""The norm regulariser: each vector's length pulled toward a target norm.

``R = mean over vectors of ((‖e‖ − t) / t)²``, with t the mean norm of the initializer's vectors
(``regularizer.norm.target: initializer``) or of the reference words' rows (``reference``). It
answers "norm inflation" (learned vectors several times longer than any word, which then drown the
other words of a prompt) and leaves the direction free.
"""

from __future__ import annotations

import math

import torch


class NormTerm:
    """``R = mean ((‖e‖ − t) / t)²`` over one encoder's vectors."""

    def __init__(self, target: float) -> None:
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"the target norm must be a positive finite number, got {target}")
        self.target = float(target)

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        norms = vectors.float().norm(dim=-1)
        return ((norms - self.target) / self.target).square().mean()
