"""dchi: dchi-privacy (metric DP) on each hidden-state vector (Feyisetan, Balle, Drake and Diethe,
"Privacy- and Utility-Preserving Textual Analysis via Calibrated Multivariate Perturbations",
WSDM 2020).

    y = simulate(h) + r u,   u uniform on the unit sphere of R^d,   r ~ Gamma(shape d, scale 1/epsilon)

p(y | h) is proportional to exp(-epsilon ||y - h||), so for two states at L2 distance D the
log-likelihood ratio of any output is at most epsilon * D: epsilon d_chi metric DP, epsilon per
unit of L2 distance (the paper's epsilon). A prompt's T vectors get independent noise, so the
prompt is epsilon-metric-DP for the sum of its vectors' L2 distances.

Parameters:
- `epsilon`: the paper's epsilon, per unit of L2 distance;
- or `relative_epsilon` with `dim`: split-learning frameworks (BiSR's SplitLLM "DxPrivacy")
  take a relative epsilon, epsilon / d: epsilon = relative_epsilon * dim, d the hidden size. `dim`
  fixes d so the guarantee can be stated before any state is seen; the defence then refuses
  states of another size. (`dim` may also be given with `epsilon`, for the same check.)
- `clip` (optional): first scale each vector to L2 norm <= C (simulate = clip). Any two clipped
  vectors are at most 2C apart, so the clipped variant is also pure (2 C epsilon)-DP per vector
  (replace-one), T (2 C epsilon) per prompt by basic composition.

Noise per coordinate: E r^2 = d (d + 1) / epsilon^2, so std sqrt(d + 1) / epsilon: it depends on
d, so `noise_std` is defined only when `dim` is given; attacks use `noise_law.std(dim=d)`.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .dp import clip_rows
from .noise import DChiNoise
from .registry import register_defense

# SmolLM2-135M's last-layer states (d = 576), measured on 1280 states of 40 C4 validation prompts:
# L2 norm median 45 (1%-99%: 37-58); two states are a median 49 apart (1%-99%: 29-69).
SMOLLM2_NORM = 45.0
SMOLLM2_DISTANCE = 49.0


@register_defense
class DChi(Defense):
    """dchi metric DP per vector (Feyisetan et al. 2020): y = h + r u, u uniform on the sphere,
    r ~ Gamma(d, 1/epsilon); optional L2 clip first. epsilon or relative_epsilon (with dim)."""

    name = "dchi"
    citation = ("Feyisetan, Balle, Drake and Diethe, \"Privacy- and Utility-Preserving Textual Analysis via Calibrated "
                "Multivariate Perturbations\", WSDM 2020 (dchi metric DP)")
    param_types = {"epsilon": float, "relative_epsilon": float, "dim": int, "clip": float}

    def __init__(
        self,
        *,
        epsilon: float | None = None,
        relative_epsilon: float | None = None,
        dim: int | None = None,
        clip: float | None = None,
    ) -> None:
        given = {k: v for k, v in dict(epsilon=epsilon, relative_epsilon=relative_epsilon, dim=dim, clip=clip).items()
                 if v is not None}
        super().__init__(**given)
        if (epsilon is None) == (relative_epsilon is None):
            raise DefenseError("dchi: give exactly one of --epsilon or --param relative_epsilon=R")
        if dim is not None:
            if isinstance(dim, float) and dim.is_integer():
                dim = int(dim)
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise DefenseError(f"dchi: dim must be an integer >= 1 (the hidden size d), got {dim!r}")
        self.dim = dim
        if relative_epsilon is not None:
            if dim is None:
                raise DefenseError("dchi: relative_epsilon needs --param dim=D, the hidden size d (epsilon = relative_epsilon * d)")
            self.relative_epsilon = positive_param(relative_epsilon, "dchi: relative_epsilon")
            self.epsilon = self.relative_epsilon * dim
        else:
            self.relative_epsilon = None
            self.epsilon = positive_param(epsilon, "dchi: --epsilon")
        self.clip = None if clip is None else positive_param(clip, "dchi: --clip")
        self.params = {k: v for k, v in dict(epsilon=None if epsilon is None else self.epsilon,
                                            relative_epsilon=self.relative_epsilon, dim=dim, clip=self.clip).items()
                       if v is not None}

    def _check_dim(self, hidden: torch.Tensor) -> None:
        if self.dim is not None and hidden.shape[-1] != self.dim:
            raise DefenseError(f"dchi: dim is {self.dim} but the states have d = {hidden.shape[-1]}")

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_dim(hidden)
        return hidden if self.clip is None else clip_rows(hidden, self.clip)

    @property
    def noise_law(self) -> DChiNoise:
        return DChiNoise(epsilon=self.epsilon)

    @property
    def noise_std(self) -> float:
        if self.dim is None:
            raise DefenseError("dchi: the per-coordinate noise std sqrt(d + 1)/epsilon depends on the hidden size d: "
                               "give --param dim=D, or use noise_law.std(dim=d)")
        return self.noise_law.std(dim=self.dim)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        """Unclipped: metric DP, epsilon per unit of L2 distance. Clipped to C: pure (2 C epsilon)-DP
        per vector (replace-one), T times that per prompt (basic composition)."""
        eps = self.epsilon
        if self.clip is None:
            out = {"epsilon": eps, "delta": 0.0, "kind": "metric DP",
                   "neighbouring": "any two hidden-state vectors; epsilon is per unit of their L2 distance",
                   "reason": (f"dchi metric DP: log-likelihood ratio <= epsilon * L2 distance; SmolLM2-135M's last-layer "
                              f"states have L2 norm about {SMOLLM2_NORM:g} and are typically {SMOLLM2_DISTANCE:g} apart, "
                              f"so two such states are only {SMOLLM2_DISTANCE * eps:.3g}-indistinguishable"),
                   "metric_epsilon": eps}
        else:
            out = {"epsilon": 2 * self.clip * eps, "delta": 0.0, "kind": "epsilon-DP",
                   "neighbouring": "replace-one: one hidden-state vector replaced by any other of norm <= C "
                                   "(L2 distance <= 2C)",
                   "reason": "dchi after clipping to L2 norm C: metric DP with any two vectors at most 2C apart, "
                             "so pure (2 C epsilon)-DP per vector",
                   "metric_epsilon": eps}
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"dchi: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            if self.clip is None:
                out["epsilon_per_prompt"] = eps
                out["reason_per_prompt"] = "metric DP per prompt for the sum of its vectors' L2 distances (same epsilon)"
            else:
                out["epsilon_per_prompt"] = tokens * out["epsilon"]
                out["reason_per_prompt"] = "basic composition of pure DP over the prompt's T vectors: T * 2 C epsilon"
        return out

    def describe(self) -> dict[str, Any]:
        derived = {"epsilon": self.epsilon, "noise": self.noise_law.describe()}
        if self.dim is not None:
            derived["noise_std"] = self.noise_std
        return {**super().describe(), "derived": derived}
