"""How an attack scores a candidate against a defended target: with the defence's public noise law.

A defence is public (Kerckhoffs), its noise included (`Defense.noise_law`, defenses/noise.py). An
attack that compares a candidate's simulated state s with the observation y uses, per vector:

- `statistic(y, s)`: the law's sufficient statistic, lower = closer (Gaussian: MSE; Laplace: mean
  absolute error; dchi: the L2 distance). Noise-free: MSE, as every attack did before laws;
- `nll(statistic)`: -log p(y | s) in nats, up to a constant (noisy defences only), which sums over
  positions and adds to -log prior for MAP scoring;
- `threshold(...)`: the level the true token's statistic stays under, for a certified stop.

`Likelihood` binds the law to the state width d, so that attacks never branch on the law.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from invbench.defenses.noise import NoiseLaw, squared_distances

from .base import mse


@dataclass(frozen=True)
class Likelihood:
    law: NoiseLaw | None  # None: a noise-free defence
    dim: int

    @classmethod
    def of(cls, defense, *, dim: int) -> "Likelihood":
        return cls(defense.noise_law, dim)

    @property
    def noisy(self) -> bool:
        return self.law is not None

    @property
    def std(self) -> float:
        """The noise's standard deviation per coordinate (0 noise-free): the learned ranker's input."""
        return self.law.std(dim=self.dim) if self.noisy else 0.0

    @property
    def scores_mse(self) -> bool:
        """Whether the statistic is the MSE itself (noise-free and Gaussian), so the discrete loss
        that records keep (always the MSE) needs no second pass."""
        return self.law is None or self.law.name == "gaussian"

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        return mse(observed, simulated) if self.law is None else self.law.statistic(observed, simulated)

    def pairwise(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """statistic (R, V) of R observations (R, d) against a table of V states (V, d)."""
        if self.law is None:
            return squared_distances(observed, states) / observed.shape[-1]
        return self.law.pairwise_statistic(observed, states)

    def nll(self, statistic: torch.Tensor) -> torch.Tensor:
        """-log p(y | s) in nats up to a constant; a noise-free defence has no likelihood."""
        if self.law is None:
            raise ValueError("a noise-free defence has no likelihood; compare statistics instead")
        return self.law.nll(statistic, dim=self.dim)

    def threshold(self, *, miss_probability: float, tolerance: float) -> float:
        """The statistic under which the true token lies: `tolerance` (float32 error) noise-free;
        with noise, the law's 1 - miss quantile of the true state's statistic, plus `tolerance`."""
        if self.law is None:
            return tolerance
        return self.law.threshold(dim=self.dim, miss_probability=miss_probability) + tolerance
