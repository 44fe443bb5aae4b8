"""dp-forward: DP-Forward's Gaussian mechanism on a whole sequence (Du, Yue, Chow, Wang, Huang and Sun,
"DP-Forward: Fine-tuning and Inference on Language Models with Differential Privacy in Forward Pass",
CCS 2023), as xiangyue9607/DP-Forward `dp_noise.py` runs it:

    Y = clip_F(H, C) + N(0, sigma^2) per coordinate,   clip_F: the (T, d) matrix scaled to Frobenius norm <= C

`_max_norm_clip` flattens each example's whole sequence and clips that to `norm_c` (one scale for every
position), and `matrix_gaussian_noise` calibrates sigma by the analytic Gaussian mechanism (Balle and Wang,
ICML 2018) with sensitivity 1 (its commented-out call: 1.0 * norm_c at encoder positions). Here
Delta = C (equal at the authors' norm_c 1.0), and sigma is Delta / mu with mu solved from Opacus's exact
GDP dual `gdp.delta_eps_mu` (defenses/dp_accounting.py; the same calibration as Balle and Wang's:
sigma = 0.600229 at epsilon 8, delta 1e-5, Delta 1). The README's run: epsilon 8, delta 1e-5, norm_c 1,
at encoder layer 10 (a middle layer).

Guarantee, per sequence (the runner passes one prompt's (T, d) states: one sequence): (epsilon, delta) as
the authors state it, for the neighbouring relation with L2 sensitivity C, that is add/remove (a sequence
against none: the zero matrix, at most C away). For replace-one (any two sequences, clipped matrices up to
2C apart) mu doubles; `epsilon_replace_one` gives that epsilon at the same delta.

What attacks may use: the noise is Gaussian, but each position's state is scaled by one factor
c = min(1, C / ||H||_F) that depends on every position, the secret ones included. `simulate` is the
identity and the law `ScaledGaussianNoise` profiles c out per position (defenses/laws.py).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .dp import DEFAULT_DELTA
from .dp_accounting import MAX_EPSILON, epsilon_from_mu, mu_from_epsilon
from .laws import ScaledGaussianNoise
from .registry import register_defense

DEFAULT_NORM_C = 1.0  # DP-Forward's run_glue.py default norm_c
NEIGHBOURING = ("add/remove: one sequence against none (its clipped matrix against the zero matrix, Frobenius "
                "distance <= C): the authors' L2 sensitivity C")


def clip_sequences(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale each sequence, the last two dims (T, d) (a single vector (d,) is a sequence of one), to
    Frobenius norm <= clip, as DP-Forward's `_max_norm_clip` (without its + 1e-6 in the divisor)."""
    work = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    flat = work.reshape(-1, work.shape[-1] * (work.shape[-2] if work.dim() >= 2 else 1))
    norm = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    scale = (clip / norm.clamp_min(torch.finfo(work.dtype).tiny)).clamp(max=1.0)
    return (flat * scale).reshape(hidden.shape).to(hidden.dtype)


@register_defense
class DPForward(Defense):
    """DP-Forward: clip the whole sequence's (T, d) matrix to Frobenius norm C, add N(0, sigma^2) with
    sigma from the analytic Gaussian mechanism at (epsilon, delta), sensitivity C; (epsilon, delta)-DP
    per sequence (add/remove)."""

    name = "dp-forward"
    citation = ("Du et al., \"DP-Forward: Fine-tuning and Inference on Language Models with Differential Privacy in "
                "Forward Pass\", CCS 2023; clip and calibration as xiangyue9607/DP-Forward dp_noise.py "
                "(_max_norm_clip, matrix_gaussian_noise); the analytic Gaussian mechanism of Balle and Wang 2018")
    param_types = {"epsilon": float, "delta": float, "clip": float}

    def __init__(self, *, epsilon: float | None = None, delta: float | None = None, clip: float | None = None) -> None:
        given = {k: v for k, v in dict(epsilon=epsilon, delta=delta, clip=clip).items() if v is not None}
        super().__init__(**given)
        if epsilon is None:
            raise DefenseError("dp-forward: --epsilon is required (the authors use 8)")
        self.epsilon = positive_param(epsilon, "dp-forward: --epsilon")
        if self.epsilon > MAX_EPSILON:
            raise DefenseError(f"dp-forward: --epsilon must be <= {MAX_EPSILON:g}, got {epsilon!r}")
        self.delta = DEFAULT_DELTA if delta is None else positive_param(delta, "dp-forward: --delta")
        if not self.delta < 1:
            raise DefenseError(f"dp-forward: --delta must be in (0, 1), got {delta!r}")
        self.clip = DEFAULT_NORM_C if clip is None else positive_param(clip, "dp-forward: --clip")
        try:
            self.mu = mu_from_epsilon(epsilon=self.epsilon, delta=self.delta)
        except ValueError:
            raise DefenseError(f"dp-forward: no noise level gives epsilon={self.epsilon:g} at delta={self.delta:g}") from None
        self.sigma = self.clip / self.mu  # sensitivity C over mu
        self.params = {k: float(v) for k, v in given.items()}

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden  # the sequence's scale is not a per-vector operation: the law profiles it out

    @property
    def noise_law(self) -> ScaledGaussianNoise:
        return ScaledGaussianNoise(sigma=self.sigma)

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        clipped = clip_sequences(hidden, self.clip)
        return clipped + self.noise(hidden.shape, generator=generator, dtype=hidden.dtype).to(hidden.device)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        eps, method = epsilon_from_mu(mu=self.mu, delta=self.delta)
        replace, _ = epsilon_from_mu(mu=2 * self.mu, delta=self.delta)
        out = {"epsilon": eps, "delta": self.delta, "kind": "(epsilon, delta)-DP", "scope": "sequence",
               "neighbouring": NEIGHBOURING,
               "reason": ("DP-Forward: the analytic Gaussian mechanism on the sequence's matrix clipped to Frobenius norm "
                          f"C, sensitivity C, per sequence ({'exact GDP conversion' if method == 'gdp' else method})"),
               "mu": self.mu, "epsilon_replace_one": replace}
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"dp-forward: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            out["epsilon_per_prompt"] = eps
            out["reason_per_prompt"] = "one release of the whole prompt's matrix: the per-sequence epsilon"
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "derived": {"sigma": self.sigma, "noise_std": self.sigma, "sensitivity": self.clip,
                                                  "noise": self.noise_law.describe()}}
