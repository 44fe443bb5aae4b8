"""aniso-gaussian: Gaussian noise with a standard deviation per coordinate (Bell 2026, "Hidden-State
Privacy Has an Empty Middle", arXiv 2605.24042):

    y = h + N(0, diag(std^2))

Bell's diagonal inverse-Fisher release Sigma_diag(K) = (2K / d) diag(1 / F_ii) puts the noise where the
model's next-token distribution is least sensitive: F is the diagonal of the Fisher information of the
model's output with respect to the state at the leak point, K the first-order KL budget (the expected
KL between the clean and the noisy output is about K). The paper reports that a Mahalanobis attacker
(one that scores with the covariance) defeats other anisotropic releases; the law here,
`DiagonalGaussianNoise`, is that attacker's score (squared Mahalanobis distance).

Parameters, one of:
- `kl_budget=K` (the paper's K): std_i = sqrt(2K / (d F_ii)), with F the Fisher diagonal at the leak
  point, handed over by the runner (`needs` ("fisher",), `bind(fisher=F)`), or read from
  `fisher_file=PATH`;
- `std_file=PATH`: the per-coordinate std vector itself.
A vector file is `.npy`, `.json` (a list, or {"std": [...]} / {"fisher": [...]}) or `.safetensors` (one
tensor, or one named "std" / "fisher"), of d finite numbers > 0. Files are read when the defence is made;
a record names the vector by its sha256 (`derived.noise.sha256`), so an entry that uses a file needs that
file wherever it is verified.

Guarantee: none (Gaussian noise on unclipped states: unbounded sensitivity).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .laws import DiagonalGaussianNoise
from .registry import register_defense

VECTOR_SUFFIXES = (".npy", ".json", ".safetensors")


def load_vector(path: str, *, key: str, what: str) -> torch.Tensor:
    """A 1-D float64 vector from a .npy, .json or .safetensors file; DefenseError (one line) otherwise."""
    if not isinstance(path, str) or not path.strip():
        raise DefenseError(f"aniso-gaussian: {what} must name a file, got {path!r}")
    file = Path(path)
    if file.suffix not in VECTOR_SUFFIXES:
        raise DefenseError(f"aniso-gaussian: {what} {path!r} must end in {', '.join(VECTOR_SUFFIXES)}")
    if not file.is_file():
        raise DefenseError(f"aniso-gaussian: {what} not found: {path}")
    try:
        if file.suffix == ".npy":
            import numpy as np  # noqa: PLC0415

            vector = torch.as_tensor(np.load(file, allow_pickle=False))
        elif file.suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8"))
            vector = torch.tensor(data[key] if isinstance(data, dict) else data, dtype=torch.float64)
        else:
            from safetensors.torch import load_file  # noqa: PLC0415

            tensors = load_file(str(file))
            if key in tensors:
                vector = tensors[key]
            elif len(tensors) == 1:
                vector = next(iter(tensors.values()))
            else:
                raise ValueError(f"{len(tensors)} tensors and none named {key!r}")
    except DefenseError:
        raise
    except Exception as exc:  # a malformed file: say which, in one line
        raise DefenseError(f"aniso-gaussian: could not read {what} {path}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else '(no message)'}") from None
    return check_vector(vector, what=f"{what} {path}")


def check_vector(vector: Any, *, what: str) -> torch.Tensor:
    if (not isinstance(vector, torch.Tensor) or vector.dim() != 1 or len(vector) < 1 or torch.is_complex(vector)
            or vector.dtype == torch.bool):
        raise DefenseError(f"aniso-gaussian: {what} must be a 1-D vector of numbers")
    vector = vector.detach().to(dtype=torch.float64, device="cpu")
    bad = int((~torch.isfinite(vector) | (vector <= 0)).sum())
    if bad:
        raise DefenseError(f"aniso-gaussian: {what} has {bad} of {len(vector)} entries that are not finite numbers > 0")
    return vector


def inverse_fisher_std(fisher: torch.Tensor, kl_budget: float) -> torch.Tensor:
    """Bell's Sigma_diag(K) = (2K / d) diag(1 / F_ii), as a std vector sqrt(2K / (d F_ii))."""
    return torch.sqrt(2 * kl_budget / (len(fisher) * fisher))


@register_defense
class AnisotropicGaussian(Defense):
    """N(0, diag(std^2)): std per coordinate from a file, or Bell's inverse-Fisher std sqrt(2K / (d F_ii))
    at KL budget K. No formal guarantee."""

    name = "aniso-gaussian"
    citation = ("Bell, \"Hidden-State Privacy Has an Empty Middle\", arXiv 2605.24042 (2026): the diagonal "
                "inverse-Fisher release Sigma_diag(K) = (2K/d) diag(1/F_ii)")
    param_types = {"kl_budget": float, "fisher_file": str, "std_file": str}

    def __init__(self, *, kl_budget: float | None = None, fisher_file: str | None = None,
                 std_file: str | None = None) -> None:
        given = {k: v for k, v in dict(kl_budget=kl_budget, fisher_file=fisher_file, std_file=std_file).items()
                 if v is not None}
        super().__init__(**given)
        if (std_file is None) == (kl_budget is None):
            raise DefenseError("aniso-gaussian: give exactly one of --param std_file=PATH or --param kl_budget=K "
                               "(with the Fisher diagonal from fisher_file=PATH or from the runner)")
        if std_file is not None and fisher_file is not None:
            raise DefenseError("aniso-gaussian: fisher_file goes with kl_budget, not with std_file")
        self.kl_budget = None if kl_budget is None else positive_param(kl_budget, "aniso-gaussian: kl_budget")
        self.std_vector: torch.Tensor | None = None
        if std_file is not None:
            self.std_vector = load_vector(std_file, key="std", what="std_file")
        elif fisher_file is not None:
            self.std_vector = inverse_fisher_std(load_vector(fisher_file, key="fisher", what="fisher_file"), self.kl_budget)
        self.needs = ("fisher",) if self.std_vector is None else ()
        self.params = dict(given)
        if self.kl_budget is not None:
            self.params["kl_budget"] = self.kl_budget

    def bind(self, **tensors: torch.Tensor) -> None:
        super().bind(**tensors)
        if "fisher" not in tensors:
            return
        fisher = check_vector(self.bound["fisher"], what="the Fisher diagonal")
        self.std_vector = inverse_fisher_std(fisher, self.kl_budget)

    @property
    def noise_law(self) -> DiagonalGaussianNoise:
        if self.std_vector is None:
            raise DefenseError("aniso-gaussian: kl_budget needs the Fisher diagonal at the leak point: give "
                               "--param fisher_file=PATH, or the runner hands it over with bind(fisher=F)")
        return DiagonalGaussianNoise(std_vector=self.std_vector)

    def _check_dim(self, hidden: torch.Tensor) -> None:
        if self.std_vector is not None and hidden.shape[-1] != len(self.std_vector):
            raise DefenseError(f"aniso-gaussian: the std vector has {len(self.std_vector)} coordinates but the states "
                               f"have d = {hidden.shape[-1]}")

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_dim(hidden)
        return hidden

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        simulated = self.simulate(hidden)  # first: a state of another size is refused in the defence's words
        return simulated + self.noise(hidden.shape, generator=generator, dtype=hidden.dtype).to(hidden.device)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise DefenseError(f"aniso-gaussian: tokens must be an int >= 1, got {tokens!r}")
        return {"epsilon": None, "delta": None, "kind": None, "neighbouring": None,
                "reason": "no formal guarantee: Gaussian noise on unclipped states (unbounded sensitivity)"}

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        if self.std_vector is not None:
            law = self.noise_law
            out["derived"] = {"noise": law.describe(), "noise_std": law.std()}
        return out
