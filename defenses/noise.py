"""Noise laws: the additive noise of a defence, as an attack may use it (defences are public).

A defended state is y = simulate(h) + n, n drawn from the defence's law. An attack that compares a
candidate's simulated state s with the observation y uses, per vector (last dim d):

- `statistic(y, s)` -> (...,): how far s is from y, lower = closer;
- `nll(statistic, dim=d)`: -log p(y | s) up to an additive constant that does not depend on s
  (for MAP scoring: add -log prior);
- `threshold(dim=d, miss_probability=m)`: the TRUE state's statistic is below it with
  probability 1 - m (the acceptance test of a certified stop);
- `std(dim=d)`: the noise's standard deviation per coordinate, for code that knows only a
  Gaussian sigma (the learned ranker's input, a flag threshold). A method of d because dchi's
  depends on d; Gaussian and Laplace ignore it (and accept dim=None);
- `sample(shape, generator=g, dtype=dt)`: the noise itself, on g's device, a function of g's
  state only;
- `observe(simulated, generator=g)`: the observation, simulated + sample (laws with a clip or a snap
  after the noise, defenses/laws.py, do more);
- `describe()`: {"law": name, parameters} for records.

The laws (Gaussian is what every defence meant before laws existed, bit for bit):

| law | noise | statistic | nll | statistic of the true state |
| --- | --- | --- | --- | --- |
| gaussian(sigma) | N(0, sigma^2) per coordinate | MSE | d mse / (2 sigma^2) | sigma^2 chi2_d / d |
| laplace(scale b) | Laplace(0, b) per coordinate | MAE | d mae / b | b Gamma(d, 1) / d |
| dchi(epsilon) | r u, u uniform on the sphere, r ~ Gamma(d, 1/eps) | L2 norm | eps norm | Gamma(d, 1/eps) |

dchi's density: r has density r^(d-1) e^(-eps r) and the sphere of radius r has area ~ r^(d-1),
so p(y | s) is proportional to exp(-eps ||y - s||) (Feyisetan et al., WSDM 2020).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from scipy.stats import chi2, gamma


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    return dim


def _check_miss(miss_probability: float) -> float:
    if not 0 < miss_probability < 1:
        raise ValueError(f"miss_probability must be in (0, 1), got {miss_probability!r}")
    return float(miss_probability)


def squared_distances(observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (R, V). cdist's direct kernel keeps tiny distances exact (a true
    token's state is ~1e-6 from a noise-free target; the matmul form loses that)."""
    return torch.cdist(observed, states, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # draw in at least float32 (bfloat16 samplers are coarse or missing), return in dtype
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class NoiseLaw:
    """Base of the laws; see the module docstring for what each method means."""

    name: ClassVar[str] = "law"

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        raise NotImplementedError

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        raise NotImplementedError

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """statistic (R, V) of each of R observations (R, d) against each of V states (V, d): how an
        attack scores a whole table of candidates (the position-1 codebook) at once."""
        return torch.stack([self.statistic(row[None, :], states) for row in observed])

    def std(self, *, dim: int | None = None) -> float:
        raise NotImplementedError

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def observe(self, simulated: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        """The observation a state gives: simulated + a draw of the law (drawn on the generator's device).
        Laws whose channel is more than adding the noise (a clip after it, a snap to a token: see
        defenses/laws.py) override this; a defence built on such a law applies it in `apply`."""
        return simulated + self.sample(simulated.shape, generator=generator, dtype=simulated.dtype).to(simulated.device)

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class GaussianNoise(NoiseLaw):
    """N(0, sigma^2) per coordinate."""

    sigma: float
    name: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        _positive(self.sigma, "gaussian: sigma")

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        return (observed - simulated).pow(2).mean(dim=-1)  # the MSE every attack used before laws

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return squared_distances(observed, states) / observed.shape[-1]

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return dim * statistic / (2 * self.sigma ** 2)

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        # the true state's MSE is sigma^2 chi2_d / d
        dim, miss = _check_dim(dim), _check_miss(miss_probability)
        return self.sigma ** 2 * float(chi2.ppf(1 - miss, dim)) / dim

    def std(self, *, dim: int | None = None) -> float:
        return self.sigma

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device) * self.sigma

    def describe(self) -> dict[str, Any]:
        return {"law": self.name, "sigma": self.sigma}


@dataclass(frozen=True)
class LaplaceNoise(NoiseLaw):
    """Laplace(0, b) per coordinate, b = `scale` (density exp(-|x|/b) / 2b, variance 2 b^2)."""

    scale: float
    name: ClassVar[str] = "laplace"

    def __post_init__(self) -> None:
        _positive(self.scale, "laplace: scale")

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        return (observed - simulated).abs().mean(dim=-1)

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return torch.cdist(observed, states, p=1) / observed.shape[-1]

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return dim * statistic / self.scale

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        # |n_i| / b ~ Exp(1), so d * MAE / b ~ Gamma(d, 1)
        dim, miss = _check_dim(dim), _check_miss(miss_probability)
        return self.scale * float(gamma.ppf(1 - miss, dim)) / dim

    def std(self, *, dim: int | None = None) -> float:
        return self.scale * math.sqrt(2)

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        # the difference of two Exp(1) draws is Laplace(0, 1)
        both = torch.empty((2, *shape), dtype=_work_dtype(dtype), device=generator.device).exponential_(generator=generator)
        return ((both[0] - both[1]) * self.scale).to(dtype)

    def describe(self) -> dict[str, Any]:
        return {"law": self.name, "scale": self.scale}


@dataclass(frozen=True)
class DChiNoise(NoiseLaw):
    """dchi metric-DP noise r u: u uniform on the unit sphere of R^d, r ~ Gamma(shape d, scale
    1/epsilon) (Feyisetan et al., WSDM 2020). `epsilon` is per unit of L2 distance."""

    epsilon: float
    name: ClassVar[str] = "dchi"

    def __post_init__(self) -> None:
        _positive(self.epsilon, "dchi: epsilon")

    def statistic(self, observed: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(observed - simulated, dim=-1)

    def pairwise_statistic(self, observed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        return squared_distances(observed, states).sqrt()

    def nll(self, statistic: torch.Tensor, *, dim: int) -> torch.Tensor:
        return self.epsilon * statistic  # p(y | s) ~ exp(-eps ||y - s||), whatever d

    def threshold(self, *, dim: int, miss_probability: float) -> float:
        # the true state's statistic is the radius r itself
        dim, miss = _check_dim(dim), _check_miss(miss_probability)
        return float(gamma.ppf(1 - miss, dim, scale=1 / self.epsilon))

    def std(self, *, dim: int | None = None) -> float:
        # E r^2 = d (d + 1) / eps^2, spread evenly over d coordinates
        if dim is None:
            raise ValueError("dchi: the per-coordinate std sqrt(d + 1) / epsilon depends on d; pass dim")
        return math.sqrt(_check_dim(dim) + 1) / self.epsilon

    def sample(self, shape: torch.Size, *, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        # direction first (a normalised standard normal), then the radius as a sum of d Exp(1) draws,
        # in float64: Gamma(d, 1) exactly for integer d, scaled by 1/eps
        shape = torch.Size(shape)
        d = shape[-1]
        work = _work_dtype(dtype)
        direction = torch.randn(shape, generator=generator, dtype=work, device=generator.device)
        norm = torch.linalg.vector_norm(direction, dim=-1, keepdim=True).clamp_min(torch.finfo(work).tiny)
        draws = torch.empty((*shape[:-1], d), dtype=torch.float64, device=generator.device).exponential_(generator=generator)
        radius = draws.sum(dim=-1, keepdim=True) / self.epsilon
        return (direction / norm * radius.to(work)).to(dtype)

    def describe(self) -> dict[str, Any]:
        return {"law": self.name, "epsilon": self.epsilon}
