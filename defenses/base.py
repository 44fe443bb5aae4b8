"""The interface every defence implements.

A defence transforms leaked hidden states before they leave the system. It is public
(Kerckhoffs): attacks may call `simulate` (the deterministic part, e.g. clipping or
quantisation) on their own candidate hidden states, and know `noise_std`.
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from invbench.errors import InvbenchError


class DefenseError(InvbenchError, ValueError):
    """Raised for invalid defence parameters; the CLI prints it as one line."""


class Defense:
    """Base class. Subclasses set `name`, validate parameters in `__init__` and override
    `simulate` and/or `noise`. `apply` = simulate, then add noise."""

    name: ClassVar[str] = "defense"
    #: Parameter names and their types, for `--param name=value` parsing and `invbench defenses`.
    param_types: ClassVar[dict[str, type]] = {}
    #: Whether `simulate` has a useful gradient; attacks use a straight-through estimate if not.
    differentiable: ClassVar[bool] = True

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.param_types)
        if unknown:
            allowed = ", ".join(sorted(self.param_types)) or "none"
            raise DefenseError(
                f"defence {self.name!r} got unknown parameter(s) {', '.join(sorted(unknown))}; allowed: {allowed}"
            )
        self.params = dict(params)

    # --- what an attacker may reproduce -------------------------------------------------
    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The deterministic part of the defence (identity by default). Works on any
        leading shape (..., d)."""
        return hidden

    @property
    def noise_std(self) -> float:
        """Standard deviation of the additive noise per coordinate (0 for deterministic defences)."""
        return 0.0

    # --- what the system does -----------------------------------------------------------
    def noise(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Additive noise; drawn on the generator's device so a seed gives the same draw."""
        if self.noise_std == 0:
            return torch.zeros(shape, dtype=dtype, device=generator.device)
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device) * self.noise_std

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Defended hidden states: simulate(H) + noise. Same generator state, same output."""
        noise = self.noise(hidden.shape, generator=generator, dtype=hidden.dtype)
        return self.simulate(hidden) + noise.to(hidden.device)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        """Privacy guarantee, as {"epsilon", "delta", "neighbouring", "reason"}; epsilon None
        when the defence has none. `tokens` (the prompt length T), when given, lets a defence
        with a guarantee add "epsilon_per_prompt" and "tokens"; overrides must accept it."""
        return {"epsilon": None, "delta": None, "neighbouring": None, "reason": "no formal guarantee"}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}
