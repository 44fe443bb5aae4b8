"""dp: clip each hidden-state vector to L2 norm <= C, then add N(0, (Z*C)^2) per coordinate.

The guarantee is that of one Gaussian mechanism per released vector. Neighbouring relation:
replace one hidden-state vector by any other of norm <= C, so the L2 sensitivity is 2C and
the mechanism is mu-GDP with mu = 2C / (Z*C) = 2/Z. A prompt of T vectors composes to
mu * sqrt(T). mu is turned into (epsilon, delta) with Opacus's analysis functions: the exact
GDP dual (`gdp.eps_from_mu`), falling back to RDP at q = 1 when that root search fails. The
subsampled-Gaussian approximations (GaussianAccountant) are never used: they are far off at q = 1.

With --epsilon/--delta instead of --noise-multiplier, Z is found by inverting the same exact
GDP dual: brentq on mu over Opacus's `gdp.delta_eps_mu(eps=E, mu=mu) = D`, then Z = 2/mu, so
the per-vector guarantee of the resulting defence is (E, D).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .base import Defense, DefenseError
from .dp_accounting import MAX_EPSILON, epsilon_from_mu, mu_from_epsilon
from .registry import register_defense

DEFAULT_DELTA = 1e-5
NEIGHBOURING = "replace-one: one hidden-state vector replaced by any other of norm <= C (L2 sensitivity 2C)"


# --- the defence -------------------------------------------------------------------------
def _positive_float(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise DefenseError(f"dp: {what} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise DefenseError(f"dp: {what} must be a finite number > 0, got {value!r}")
    return value


def clip_rows(hidden: torch.Tensor, clip: float, *, ord: float = 2) -> torch.Tensor:
    """Scale each vector (last dim) to L2 norm (or the `ord` norm: laplace clips in L1) <= clip;
    differentiable, any leading shape, any finite values (huge ones included). Non-finite input
    gives non-finite output."""
    work = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    tiny = torch.finfo(work.dtype).tiny
    norm = torch.linalg.vector_norm(work, ord=ord, dim=-1, keepdim=True)
    # A vector near the dtype's largest values has a norm that overflows to inf (which would clip it
    # to zero): there, take the norm of the vector scaled by its largest |coordinate| instead.
    absmax = work.abs().amax(dim=-1, keepdim=True)
    direction = work / absmax.clamp_min(tiny)
    unit = torch.linalg.vector_norm(direction, ord=ord, dim=-1, keepdim=True)
    norm = torch.where(torch.isfinite(norm), norm, absmax * unit)
    # clamp_min keeps the gradient finite at the zero vector (its scale is 1 anyway)
    scale = (clip / norm.clamp_min(tiny)).clamp(max=1.0)
    # A scale below the dtype's normal range (a huge vector, a small clip) is subnormal and has lost
    # precision: divide by the norm first there.
    clipped = torch.where(scale >= tiny, work * scale, work / norm.clamp_min(tiny) * clip)
    # Where even absmax * unit overflows (many coordinates near the largest value; more often in L1),
    # never form the norm: clip times the vector over absmax over its own norm.
    clipped = torch.where(torch.isfinite(norm), clipped, direction / unit.clamp_min(tiny) * clip)
    return clipped.to(hidden.dtype)


@register_defense
class DP(Defense):
    """Clip each vector to L2 norm <= clip, add N(0, (noise_multiplier*clip)^2); (epsilon, delta)
    per vector (replace-one, sensitivity 2*clip) and per prompt (composition over its tokens).
    Give noise_multiplier, or epsilon (and delta) to solve for it."""

    name = "dp"
    citation = ("the Gaussian mechanism on clipped vectors, as DP-Forward (Du et al., CCS 2023); sigma from the exact "
                "GDP conversion, the analytic Gaussian mechanism of Balle and Wang 2018")
    param_types = {"clip": float, "noise_multiplier": float, "epsilon": float, "delta": float}

    def __init__(
        self,
        *,
        clip: float | None = None,
        noise_multiplier: float | None = None,
        epsilon: float | None = None,
        delta: float | None = None,
    ) -> None:
        given = {k: v for k, v in dict(clip=clip, noise_multiplier=noise_multiplier, epsilon=epsilon, delta=delta).items()
                 if v is not None}
        super().__init__(**given)
        if clip is None:
            raise DefenseError("dp: --clip is required (the L2 norm bound of each hidden-state vector)")
        self.clip = _positive_float(clip, "--clip")
        if delta is None:
            delta = DEFAULT_DELTA
        self.delta = _positive_float(delta, "--delta")
        if not self.delta < 1:
            raise DefenseError(f"dp: --delta must be in (0, 1), got {delta!r}")

        if (noise_multiplier is None) == (epsilon is None):
            raise DefenseError("dp: give exactly one of --noise-multiplier or --epsilon")
        if noise_multiplier is not None:
            self.noise_multiplier = _positive_float(noise_multiplier, "--noise-multiplier")
        else:
            target = _positive_float(epsilon, "--epsilon")
            if target > MAX_EPSILON:
                raise DefenseError(f"dp: --epsilon must be <= {MAX_EPSILON:g}, got {epsilon!r}")
            try:
                mu = mu_from_epsilon(epsilon=target, delta=self.delta)
            except ValueError:
                raise DefenseError(f"dp: no noise level gives epsilon={target:g} at delta={self.delta:g}") from None
            self.noise_multiplier = 2.0 / mu  # per-vector mu = 2/Z
        self.params = {k: float(v) for k, v in given.items()}

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        return clip_rows(hidden, self.clip)

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    @property
    def mu(self) -> float:
        """GDP parameter of one released vector: sensitivity 2C over noise std Z*C."""
        return 2.0 / self.noise_multiplier

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        """(epsilon, delta) per released vector; with `tokens` = T also per prompt of T vectors
        (GDP composition: mu * sqrt(T))."""
        eps, method = epsilon_from_mu(mu=self.mu, delta=self.delta)
        out = {"epsilon": eps, "delta": self.delta, "kind": "(epsilon, delta)-DP", "neighbouring": NEIGHBOURING,
               "reason": _REASONS[method], "mu": self.mu}
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"dp: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            out["epsilon_per_prompt"], method_prompt = epsilon_from_mu(mu=self.mu * math.sqrt(tokens), delta=self.delta)
            out["reason_per_prompt"] = _REASONS[method_prompt]
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "derived": {"noise_multiplier": self.noise_multiplier, "noise_std": self.noise_std}}


_REASONS = {
    "gdp": "Gaussian mechanism, exact GDP conversion (opacus gdp.eps_from_mu)",
    "gdp-root": ("Gaussian mechanism, exact GDP conversion solved past Opacus's search range (epsilon <= 500) by "
                 "brentq on the dual's log delta(epsilon) (invbench.defenses.dp_accounting); an epsilon this large "
                 "bounds nothing in practice"),
    "rdp": "Gaussian mechanism, RDP at q=1 (opacus rdp.compute_rdp + get_privacy_spent); exact GDP search failed",
    "none": "no meaningful guarantee (epsilon is infinite)",
}
