"""Built-in defences: none and gaussian."""
from __future__ import annotations

import torch

from .base import Defense, DefenseError
from .registry import register_defense


@register_defense
class NoDefense(Defense):
    """Identity: the leaked hidden states go out as they are."""

    name = "none"
    param_types = {}


@register_defense
class Gaussian(Defense):
    """Elementwise N(0, sigma^2) noise. Hidden states have unbounded sensitivity, so there is
    no formal guarantee."""

    name = "gaussian"
    param_types = {"sigma": float}

    def __init__(self, *, sigma: float = 0.01) -> None:
        super().__init__(sigma=sigma)
        if not (float(sigma) >= 0 and torch.isfinite(torch.tensor(float(sigma)))):
            raise DefenseError(f"gaussian: --sigma must be a finite number >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.params = {"sigma": self.sigma}

    @property
    def noise_std(self) -> float:
        return self.sigma

    def guarantee(self, tokens: int | None = None) -> dict:
        return {"epsilon": None, "delta": None, "kind": None, "neighbouring": None, "reason": "unbounded sensitivity"}
