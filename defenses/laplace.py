"""laplace: the Laplace mechanism on each hidden-state vector, as VFLAIR-LLM's Laplace DP defence
(Laplace(0, sensitivity / epsilon) per coordinate of the hidden states; Dwork, McSherry, Nissim
and Smith 2006 for the mechanism).

    y = clip_L1(h, C) + Laplace(0, 2C / epsilon) per coordinate

Neighbouring relation: replace one vector by any other of L1 norm <= C, so the L1 sensitivity is
2C and each released vector is pure epsilon-DP; a prompt of T vectors is (T epsilon)-DP by basic
composition. Parameters in the mechanism's terms: `clip` (C, the L1 bound) and `epsilon`.

For scale: SmolLM2-135M's last-layer states have L1 norm about 570 (d = 576).

VFLAIR-LLM's own form (FLAIR-THU/VFLAIR-LLM `src/evaluates/defenses/defense_functions.py`,
`LaplaceDP_for_llm_pred`, on the output of the client's first blocks): NO clipping, and
Laplace(0, DELTAF / epsilon) per coordinate with DELTAF a per-model constant (Bert 81.82, Roberta
4.15, GPT2 110.2, 10 for any other model); its configs use epsilon 50. Here that is
`--param sensitivity=DELTAF --epsilon E` instead of `--clip`: y = h + Laplace(0, DELTAF / epsilon).
Unclipped states have unbounded sensitivity, so it has no formal guarantee (epsilon None, with the
reason): DELTAF is a stated constant, not a bound two states respect.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError, positive_param
from .dp import clip_rows
from .noise import LaplaceNoise
from .registry import register_defense

NEIGHBOURING = "replace-one: one hidden-state vector replaced by any other of L1 norm <= C (L1 sensitivity 2C)"
#: VFLAIR-LLM's DELTAF for a model its table does not list
VFLAIR_DEFAULT_SENSITIVITY = 10.0


@register_defense
class Laplace(Defense):
    """Clip each vector to L1 norm <= clip, add Laplace(0, 2*clip/epsilon) per coordinate; pure
    epsilon-DP per vector (replace-one), T*epsilon per prompt. Or VFLAIR-LLM's form: sensitivity=DELTAF
    instead of clip, no clipping, Laplace(0, DELTAF/epsilon), no formal guarantee."""

    name = "laplace"
    citation = ("the Laplace mechanism (Dwork, McSherry, Nissim and Smith 2006), as VFLAIR-LLM's Laplace DP defence "
                "(FLAIR-THU/VFLAIR-LLM src/evaluates/defenses/defense_functions.py, LaplaceDP_for_llm_pred: with "
                "--param sensitivity, its unclipped form)")
    param_types = {"clip": float, "epsilon": float, "sensitivity": float}

    def __init__(self, *, clip: float | None = None, epsilon: float | None = None,
                 sensitivity: float | None = None) -> None:
        given = {k: v for k, v in dict(clip=clip, epsilon=epsilon, sensitivity=sensitivity).items() if v is not None}
        super().__init__(**given)
        if clip is not None and sensitivity is not None:
            raise DefenseError("laplace: give --clip (clipped, epsilon-DP) or --param sensitivity=DELTAF "
                               "(VFLAIR-LLM's unclipped form), not both")
        if clip is None and sensitivity is None:
            raise DefenseError("laplace: --clip is required (the L1 norm bound of each hidden-state vector), or "
                               "--param sensitivity=DELTAF for VFLAIR-LLM's unclipped form")
        if epsilon is None:
            raise DefenseError("laplace: --epsilon is required")
        self.clip = None if clip is None else positive_param(clip, "laplace: --clip")
        self.sensitivity = None if sensitivity is None else positive_param(sensitivity, "laplace: sensitivity")
        self.epsilon = positive_param(epsilon, "laplace: --epsilon")
        if self.clip is not None:
            self.params = {"clip": self.clip, "epsilon": self.epsilon}
        else:
            self.params = {"sensitivity": self.sensitivity, "epsilon": self.epsilon}

    @property
    def scale(self) -> float:
        """b of Laplace(0, b): L1 sensitivity 2C over epsilon (VFLAIR-LLM's form: DELTAF over epsilon)."""
        if self.clip is None:
            return self.sensitivity / self.epsilon
        return 2 * self.clip / self.epsilon

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.clip is None:
            return hidden
        return clip_rows(hidden, self.clip, ord=1)

    @property
    def noise_law(self) -> LaplaceNoise:
        return LaplaceNoise(scale=self.scale)

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        if self.clip is None:
            if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
                raise DefenseError(f"laplace: tokens must be an int >= 1, got {tokens!r}")
            return {"epsilon": None, "delta": None, "kind": None, "neighbouring": None,
                    "reason": ("no formal guarantee: VFLAIR-LLM's Laplace does not clip, so two hidden states can be "
                               f"more than sensitivity {self.sensitivity:g} apart in L1 and epsilon {self.epsilon:g} "
                               "bounds nothing (unbounded sensitivity)")}
        out = {"epsilon": self.epsilon, "delta": 0.0, "kind": "epsilon-DP", "neighbouring": NEIGHBOURING,
               "reason": "Laplace mechanism: Laplace(0, 2C/epsilon) per coordinate, L1 sensitivity 2C"}
        if tokens is not None:
            if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
                raise DefenseError(f"laplace: tokens must be an int >= 1, got {tokens!r}")
            out["tokens"] = tokens
            out["epsilon_per_prompt"] = tokens * self.epsilon
            out["reason_per_prompt"] = "basic composition of pure DP over the prompt's T vectors: T * epsilon"
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(),
                "derived": {"scale": self.scale, "noise_std": self.noise_std, "noise": self.noise_law.describe()}}
