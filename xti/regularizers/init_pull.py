"""The pull toward the initializer: ``R = mean over vectors of ‖e − e₀‖² / mean ‖e₀‖²``.

e₀ is the initializer word's vector (broadcast over the layers' vector sets), as Cross
Initialization's regulariser; with the relative weighting its gradient is a constant fraction λ of
the diffusion gradient pointing home, so the vectors stop where the two balance.
"""

from __future__ import annotations

import torch


class InitPullTerm:
    """``R = mean ‖e − e₀‖² / mean ‖e₀‖²`` over one encoder's vectors; `init` is ``[n, d]``."""

    def __init__(self, init: torch.Tensor) -> None:
        self.init = init.detach().float().clone()
        self.scale = float(self.init.norm(dim=-1).square().mean()) or 1.0

    def __call__(self, vectors: torch.Tensor) -> torch.Tensor:
        diff = vectors.float() - self.init.to(vectors.device)
        return diff.square().sum(dim=-1).mean() / self.scale
