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

As SplitLLM runs it (StupidTrees/SplitLLM `sfl/model/noise/dxp.py`, `DxPrivacy`, on the input
embeddings, relative epsilon 0.1-0.4 in its scripts):
- `shared_radius` (bool): one radius per call shared by every vector of the call (the runner calls
  a defence once per prompt: one radius per prompt), directions per vector. Each vector's noise has
  the same law as without it, so the per-vector guarantee stands; the prompt's does not compose
  (every residual has the same norm: two prompts that differ in one vector give outputs with
  disjoint supports), so no per-prompt bound is claimed. Law `SharedRadiusDChiNoise`: attacks score
  each vector by the exact marginal, and its `sequence_nll` scores the coupling.
- `snap` (bool): the noisy vector is replaced by the embedding of the token it snaps to (`snap_metric`
  "dot", what SplitLLM's code computes though it says cosine; "cosine"; "l2"). Needs the model's input
  embedding table: `needs` ("embedding",), handed over with `bind(embedding=E)`. Post-processing, so
  the guarantee is the unsnapped one. Law `SnappedDChiNoise`: -log P(snap = observed token | state),
  estimated with `snap_samples` fixed draws (defenses/laws.py says what that assumes).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .dp import clip_rows
from .laws import SNAP_METRICS, SharedRadiusDChiNoise, SnappedDChiNoise
from .noise import DChiNoise, NoiseLaw
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
                "Multivariate Perturbations\", WSDM 2020 (dchi metric DP); relative_epsilon, shared_radius and snap as "
                "SplitLLM's DxPrivacy (StupidTrees/SplitLLM sfl/model/noise/dxp.py)")
    param_types = {"epsilon": float, "relative_epsilon": float, "dim": int, "clip": float,
                   "shared_radius": bool, "snap": bool, "snap_metric": str, "snap_samples": int}
    hidden_size_params = ("dim",)  # left out: the model's hidden size (the runner gives it)

    def __init__(
        self,
        *,
        epsilon: float | None = None,
        relative_epsilon: float | None = None,
        dim: int | None = None,
        clip: float | None = None,
        shared_radius: bool | None = None,
        snap: bool | None = None,
        snap_metric: str | None = None,
        snap_samples: int | None = None,
    ) -> None:
        given = {k: v for k, v in dict(epsilon=epsilon, relative_epsilon=relative_epsilon, dim=dim, clip=clip,
                                       shared_radius=shared_radius, snap=snap, snap_metric=snap_metric,
                                       snap_samples=snap_samples).items()
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
        for key, value in (("shared_radius", shared_radius), ("snap", snap)):
            if value is not None and not isinstance(value, bool):
                raise DefenseError(f"dchi: {key} must be true or false, got {value!r}")
        self.shared_radius, self.snap = bool(shared_radius), bool(snap)
        if not self.snap and (snap_metric is not None or snap_samples is not None):
            raise DefenseError("dchi: snap_metric and snap_samples apply only with --param snap=true")
        self.snap_metric = "dot" if snap_metric is None else snap_metric
        if self.snap_metric not in SNAP_METRICS:
            raise DefenseError(f"dchi: snap_metric must be one of {', '.join(SNAP_METRICS)}, got {snap_metric!r}")
        self.snap_samples = 256 if snap_samples is None else snap_samples
        if isinstance(self.snap_samples, bool) or not isinstance(self.snap_samples, int) or self.snap_samples < 1:
            raise DefenseError(f"dchi: snap_samples must be an integer >= 1, got {snap_samples!r}")
        self.needs = ("embedding",) if self.snap else ()
        self.params = {k: v for k, v in dict(epsilon=None if epsilon is None else self.epsilon,
                                            relative_epsilon=self.relative_epsilon, dim=dim, clip=self.clip,
                                            shared_radius=shared_radius, snap=snap, snap_metric=snap_metric,
                                            snap_samples=snap_samples).items()
                       if v is not None}

    def _check_dim(self, hidden: torch.Tensor) -> None:
        if self.dim is not None and hidden.shape[-1] != self.dim:
            raise DefenseError(f"dchi: dim is {self.dim} but the states have d = {hidden.shape[-1]}")

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_dim(hidden)
        return hidden if self.clip is None else clip_rows(hidden, self.clip)

    def bind(self, **tensors: torch.Tensor) -> None:
        super().bind(**tensors)
        if "embedding" not in tensors:
            return
        table = self.bound["embedding"]
        if table.dim() != 2 or (self.dim is not None and table.shape[1] != self.dim):
            raise DefenseError(f"dchi: the embedding table has shape {tuple(table.shape)}; expected (V, d)"
                               + (f" with d = {self.dim}" if self.dim is not None else ""))
        self._snapped = SnappedDChiNoise(epsilon=self.epsilon, embedding=table, metric=self.snap_metric,
                                         samples=self.snap_samples, shared_radius=self.shared_radius)

    @property
    def noise_law(self) -> NoiseLaw:
        if self.snap:
            if self.missing():
                raise DefenseError("dchi: snap needs the model's input embedding table; the runner hands it over "
                                   "with bind(embedding=E) (defenses/README.md)")
            return self._snapped
        if self.shared_radius:
            return SharedRadiusDChiNoise(epsilon=self.epsilon)
        return DChiNoise(epsilon=self.epsilon)

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        if not self.snap:
            return super().apply(hidden, generator=generator)  # bit for bit what dchi always did
        return self.noise_law.observe(self.simulate(hidden), generator=generator)

    @property
    def noise_std(self) -> float:
        if self.dim is None:
            raise DefenseError("dchi: the per-coordinate noise std sqrt(d + 1)/epsilon depends on the hidden size d: "
                               "give --param dim=D, or use noise_law.std(dim=d)")
        return DChiNoise(epsilon=self.epsilon).std(dim=self.dim)  # the noise before any snap

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
        if self.snap:
            out["reason"] += "; snapping to a token is post-processing and keeps it"
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"dchi: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            if self.shared_radius:
                out["epsilon_per_prompt"] = None
                out["reason_per_prompt"] = ("no per-prompt bound: one radius is shared by the prompt's vectors, so "
                                            "their bounds do not compose (unsnapped, two prompts that differ in one "
                                            "vector give outputs with disjoint supports)")
            elif self.clip is None:
                out["epsilon_per_prompt"] = eps
                out["reason_per_prompt"] = "metric DP per prompt for the sum of its vectors' L2 distances (same epsilon)"
            else:
                out["epsilon_per_prompt"] = tokens * out["epsilon"]
                out["reason_per_prompt"] = "basic composition of pure DP over the prompt's T vectors: T * 2 C epsilon"
        return out

    def describe(self) -> dict[str, Any]:
        if self.snap and self.missing():  # what the law says of itself before the table is bound
            law = {"law": SnappedDChiNoise.name, "epsilon": self.epsilon, "metric": self.snap_metric,
                   "samples": self.snap_samples, "seed": 0, **({"shared_radius": True} if self.shared_radius else {})}
        else:
            law = self.noise_law.describe()
        derived = {"epsilon": self.epsilon, "noise": law}
        if self.dim is not None:
            derived["noise_std"] = self.noise_std
        return {**super().describe(), "derived": derived}
