"""The interface every defence implements.

A defence transforms leaked hidden states before they leave the system. It is public
(Kerckhoffs): attacks may call `simulate` (the deterministic part, e.g. clipping or
quantisation) on their own candidate hidden states, and know its `noise_law` (the distribution
of the additive noise, defenses/noise.py) and `noise_std` (that law's std per coordinate).

A defence declares its noise one of two ways: `noise_std` alone (the law is then Gaussian with
that sigma, what every defence meant before laws existed), or `noise_law` (then `noise_std` and
`noise` follow from the law).

Some defences need what the model knows (a snap to the nearest token needs the input embedding
table): they name it in `needs`, and whoever runs them (the runner, a test) hands it over with
`bind(name=tensor)` before `apply` (see RESOURCES and defenses/README.md).
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from invbench.errors import InvbenchError

from .noise import GaussianNoise, NoiseLaw


class DefenseError(InvbenchError, ValueError):
    """Raised for invalid defence parameters; the CLI prints it as one line."""


def positive_param(value: Any, what: str) -> float:
    """`value` as a finite float > 0, or a one-line DefenseError naming `what` (e.g. "dchi: --epsilon")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DefenseError(f"{what} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not (math.isfinite(number) and number > 0):
        raise DefenseError(f"{what} must be a finite number > 0, got {value!r}")
    return number


#: What a defence may name in `needs`, and what the runner hands it under that name with `bind`.
RESOURCES = {
    "embedding": "the model's input embedding table (V, d), every token of the vocabulary",
    "fisher": "the diagonal of the Fisher information (d,) of the model's next-token distribution with respect to "
              "the state at the leak point",
}

#: What a guarantee's epsilon means: pure DP, approximate DP, or metric DP (epsilon per unit of
#: distance between two inputs). A defence without a guarantee has kind None.
GUARANTEE_KINDS = ("epsilon-DP", "(epsilon, delta)-DP", "metric DP")


class Defense:
    """Base class. Subclasses set `name`, validate parameters in `__init__` and override
    `simulate` and declare their noise (`noise_std` for Gaussian noise, or `noise_law`).
    `apply` = simulate, then add noise."""

    name: ClassVar[str] = "defense"
    #: Parameter names and their types, for `--param name=value` parsing and `invbench defenses`.
    param_types: ClassVar[dict[str, type]] = {}
    #: Whether `simulate` has a useful gradient; attacks use a straight-through estimate if not.
    differentiable: ClassVar[bool] = True
    #: Where the mechanism comes from (paper, framework), for the board's entry pages; None: a defence of
    #: invbench's own. Not part of describe(): a reworded citation must not change any run's configuration.
    citation: ClassVar[str | None] = None

    #: Names (keys of RESOURCES) of the model tensors this defence needs before it can run; an instance may
    #: set its own (a dchi defence needs the embedding table only when it snaps).
    needs: tuple[str, ...] = ()
    #: Parameters that are the leaked states' width d: left out, the runner gives them the model's hidden size
    #: (and records it with the other parameters), so `--defense dchi --epsilon 500` needs no `--param dim=576`.
    hidden_size_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.param_types)
        if unknown:
            allowed = ", ".join(sorted(self.param_types)) or "none"
            raise DefenseError(
                f"defence {self.name!r} got unknown parameter(s) {', '.join(sorted(unknown))}; allowed: {allowed}"
            )
        self.params = dict(params)

    # --- what the model hands it ----------------------------------------------------------
    def bind(self, **tensors: torch.Tensor) -> None:
        """Receive the model tensors named in `needs` (e.g. `bind(embedding=E)`), before `apply`. This
        checks the names and keeps detached float32 CPU copies in `self.bound`; a subclass checks shapes
        and builds what it needs from them (calling this first). Binding is not part of `describe()`'s
        parameters: what a bound tensor adds to a record comes from the model, which the run records."""
        unknown = sorted(set(tensors) - set(self.needs))
        if unknown:
            wanted = ", ".join(self.needs) or "nothing"
            raise DefenseError(f"defence {self.name!r} was given {', '.join(unknown)} but needs {wanted}")
        bound = dict(getattr(self, "bound", {}))
        for key, value in tensors.items():
            if not isinstance(value, torch.Tensor) or not torch.is_floating_point(value) or not bool(torch.isfinite(value).all()):
                raise DefenseError(f"defence {self.name!r}: {key} must be a finite float tensor")
            bound[key] = value.detach().to(device="cpu", dtype=torch.float32)
        self.bound = bound

    def missing(self) -> list[str]:
        """The names in `needs` not bound yet."""
        return [key for key in self.needs if key not in getattr(self, "bound", {})]

    # --- what an attacker may reproduce -------------------------------------------------
    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        """The deterministic part of the defence (identity by default). Works on any
        leading shape (..., d)."""
        return hidden

    @property
    def noise_law(self) -> NoiseLaw | None:
        """The law of the additive noise (defenses/noise.py); None for a noise-free defence. By
        default Gaussian(noise_std) when noise_std > 0, so a defence that declares only noise_std
        keeps the behaviour it had before laws existed."""
        std = self.noise_std
        return GaussianNoise(sigma=std) if std > 0 else None

    @property
    def noise_std(self) -> float:
        """Standard deviation of the additive noise per coordinate (0 for deterministic defences).
        By default the declared law's `std()`; a law whose std depends on d (dchi) makes this raise
        unless the defence overrides it: use `noise_law.std(dim=d)` there."""
        if type(self).noise_law is not Defense.noise_law:  # the class declares a law
            law = self.noise_law
            return 0.0 if law is None else law.std()
        return 0.0

    # --- what the system does -----------------------------------------------------------
    def noise(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Additive noise: a draw of `noise_law` on the generator's device, so a seed gives the same
        draw (Gaussian: randn * noise_std, as before laws existed)."""
        law = self.noise_law
        if law is None:
            return torch.zeros(shape, dtype=dtype, device=generator.device)
        return law.sample(shape, generator=generator, dtype=dtype)

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """Defended hidden states: simulate(H) + noise. Same generator state, same output."""
        noise = self.noise(hidden.shape, generator=generator, dtype=hidden.dtype)
        return self.simulate(hidden) + noise.to(hidden.device)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        """Privacy guarantee, as {"epsilon", "delta", "kind", "neighbouring", "reason"}; epsilon
        None when the defence has none. "kind" is one of GUARANTEE_KINDS or None. `tokens` (the
        prompt length T), when given, lets a defence with a guarantee add "epsilon_per_prompt" and
        "tokens"; overrides must accept it."""
        return {"epsilon": None, "delta": None, "kind": None, "neighbouring": None, "reason": "no formal guarantee"}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}
