"""snd: Split-N-Denoise's noise on each vector (Mai, Yan, Zhou, Zheng, Zhang, Zhang and Deng,
"Split-and-Denoise: Protect Large Language Model Inference with Local Differential Privacy", ICML 2024),
as NusIoraPrivacy/eaas-privacy runs it (`data/load_data.py` `sample_noise_Chi`, `util/utils.py`
`get_embeddings`; the same sampler in FLAIR-THU/VFLAIR-LLM `src/utils/snd_utils.py`):

    y = clip_L2(h + n, C),   n_i = l_i v_i,   l_i ~ Gamma(shape d, rate eta),   v_i ~ U(-1, 1)

on the input embeddings (leak point 0), every coordinate independent, the clip AFTER the noise (its
`--clip norm`, a per-model norm: gpt2 4, bert-base 2.5, t5-base 680; `--clip none` skips it). The
authors' scripts use eta 50, 100 and 150 (`run.sh`).

This is not dchi: dchi draws one Gamma radius per vector and a direction on the sphere; here every
coordinate has its own Gamma(d) magnitude, so the noise norm is about sqrt(d / 3) times dchi's at the
same parameter (13.9 times at eta 100, d = 576).

Guarantee: a coordinate's density is eta / (2 (d - 1)) Q(d - 1, eta |x|) (defenses/laws.py), whose log
has slope at most eta, so log p(y | h) - log p(y | h') <= eta ||h - h'||_1: eta-metric-DP per unit of
L1 distance; the clip after the noise is post-processing. A prompt's vectors get independent noise: the
prompt is eta-metric-DP for the sum of its vectors' L1 distances.

Utility: the mechanism's design has a client-side denoiser that restores the server's output; invbench
does not run it, so the utility measured here (the server's view of the noisy states) is a lower bound
on the mechanism's (`utility_note` in the guarantee).

Parameters: `eta` (the paper's eta), `clip` (optional, the L2 norm after the noise), `dim` (optional,
the hidden size d, as dchi's: it fixes the noise std, which depends on d).
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .laws import SnDNoise
from .registry import register_defense

UTILITY_NOTE = ("Split-N-Denoise's client-side denoiser is not run: the utility measured (the server's view of the "
                "noisy states) is a lower bound on the mechanism's, and its top-1 agreement a lower bound")


@register_defense
class SplitNDenoise(Defense):
    """Split-N-Denoise: per coordinate Gamma(d, rate eta) magnitude times U(-1, 1), then an optional L2
    clip to `clip`; eta-metric-DP per unit of L1 distance."""

    name = "snd"
    citation = ("Mai et al., \"Split-and-Denoise: Protect Large Language Model Inference with Local Differential "
                "Privacy\", ICML 2024; sampler and clip as NusIoraPrivacy/eaas-privacy data/load_data.py "
                "(sample_noise_Chi) and util/utils.py (get_embeddings)")
    param_types = {"eta": float, "clip": float, "dim": int}
    hidden_size_params = ("dim",)  # left out: the model's hidden size (the runner gives it)

    def __init__(self, *, eta: float | None = None, clip: float | None = None, dim: int | None = None) -> None:
        given = {k: v for k, v in dict(eta=eta, clip=clip, dim=dim).items() if v is not None}
        super().__init__(**given)
        if eta is None:
            raise DefenseError("snd: --param eta=E is required (the authors use 50, 100, 150)")
        self.eta = positive_param(eta, "snd: eta")
        self.clip = None if clip is None else positive_param(clip, "snd: --clip")
        if dim is not None:
            if isinstance(dim, float) and dim.is_integer():
                dim = int(dim)
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 2:
                raise DefenseError(f"snd: dim must be an integer >= 2 (the hidden size d), got {dim!r}")
        self.dim = dim
        self.params = {k: v for k, v in dict(eta=self.eta, clip=self.clip, dim=dim).items() if v is not None}

    def _check_dim(self, hidden: torch.Tensor) -> None:
        d = hidden.shape[-1]
        if d < 2:
            raise DefenseError(f"snd: the noise needs states of d >= 2, got d = {d}")
        if self.dim is not None and d != self.dim:
            raise DefenseError(f"snd: dim is {self.dim} but the states have d = {d}")

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        self._check_dim(hidden)
        return hidden  # the clip comes after the noise: it is part of the law's channel

    @property
    def noise_law(self) -> SnDNoise:
        return SnDNoise(eta=self.eta, clip=self.clip)

    @property
    def noise_std(self) -> float:
        if self.dim is None:
            raise DefenseError("snd: the per-coordinate noise std sqrt(d (d + 1) / 3) / eta depends on the hidden size d: "
                               "give --param dim=D, or use noise_law.std(dim=d)")
        return self.noise_law.std(dim=self.dim)

    def apply(self, hidden: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
        return self.noise_law.observe(self.simulate(hidden), generator=generator)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        out = {"epsilon": self.eta, "delta": 0.0, "kind": "metric DP", "distance": "L1",
               "neighbouring": "any two input vectors; epsilon (eta) is per unit of their L1 distance",
               "reason": ("Split-N-Denoise: each coordinate's log-density has slope at most eta, so the log-likelihood "
                          "ratio is <= eta * L1 distance; the L2 clip after the noise is post-processing"),
               "metric_epsilon": self.eta, "utility_note": UTILITY_NOTE}
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"snd: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            out["epsilon_per_prompt"] = self.eta
            out["reason_per_prompt"] = "metric DP per prompt for the sum of its vectors' L1 distances (same eta)"
        return out

    def describe(self) -> dict[str, Any]:
        derived = {"noise": self.noise_law.describe()}
        if self.dim is not None:
            derived["noise_std"] = self.noise_std
        return {**super().describe(), "derived": derived}
