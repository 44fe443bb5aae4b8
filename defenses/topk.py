"""topk: the example plug-in. Keep the k largest-|x| coordinates of each vector, zero the rest,
then optionally add N(0, sigma^2) to every coordinate.

It is registered twice on purpose, to show both routes: `@register_defense` (when the module
is imported) and the entry point `topk = "invbench.defenses.topk:TopK"` in pyproject.toml
(how a separate package would add it). `invbench.defenses` does not import this module itself.
"""
from __future__ import annotations

import math

import torch

from .base import Defense, DefenseError
from .registry import register_defense


@register_defense
class TopK(Defense):
    """Top-k sparsification per vector (k largest |x| kept), plus optional Gaussian noise sigma."""

    name = "topk"
    param_types = {"k": int, "sigma": float}
    # The mask passes gradient only through the k kept coordinates, which steers a gradient
    # attack badly (measured: projection fell from EM 1.0 to 0.0 on the quick protocol);
    # attacks take a straight-through gradient instead.
    differentiable = False

    def __init__(self, *, k: int = 64, sigma: float = 0.0) -> None:
        super().__init__(k=k, sigma=sigma)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise DefenseError(f"topk: --k must be an integer >= 1, got {k!r}")
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise DefenseError(f"topk: --sigma must be a finite number >= 0, got {sigma!r}")
        self.k, self.sigma = k, float(sigma)
        self.params = {"k": self.k, "sigma": self.sigma}

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        k = min(self.k, hidden.shape[-1])
        keep = hidden.abs().topk(k, dim=-1).indices
        mask = torch.zeros_like(hidden, dtype=torch.bool).scatter_(-1, keep, True)
        return torch.where(mask, hidden, torch.zeros_like(hidden))

    @property
    def noise_std(self) -> float:
        return self.sigma
