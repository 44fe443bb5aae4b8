"""quantize: symmetric uniform quantisation to exactly 2^B levels (deterministic, no noise).

Levels (midrise, so B = 1 still has two levels and the grid is symmetric about 0):
    s = absmax / 2^(B-1)
    levels = s * (k + 0.5)   for k in -2^(B-1) .. 2^(B-1) - 1
    q(x) = s * (clamp(floor(x / s), -2^(B-1), 2^(B-1) - 1) + 0.5)
floor(x/s) + 0.5 is the nearest level (round to nearest, ties upwards); the clamp only moves
x = +absmax down to the top level. The largest error is s/2. 0 is not a level: an exact 0
goes to +s/2. An all-zero vector (absmax 0) stays all zero (no NaN).

scheme "per-vector" (default): one absmax per vector (last dim). "per-tensor": one absmax over
the whole tensor passed in; the runner passes one prompt's (T, d) states at a time, so this
means one scale per prompt.

An attacker can simulate it exactly: apply == simulate.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Defense, DefenseError
from .registry import register_defense

SCHEMES = ("per-vector", "per-tensor")


def quantize_tensor(hidden: torch.Tensor, *, bits: int, per_vector: bool = True) -> torch.Tensor:
    """Midrise symmetric uniform quantisation with 2^bits levels (see module docstring)."""
    work = hidden.to(torch.promote_types(hidden.dtype, torch.float32))
    if per_vector:
        absmax = work.abs().amax(dim=-1, keepdim=True)
    else:
        absmax = work.abs().amax()
    half = 2 ** (bits - 1)
    step = absmax / half
    safe_step = torch.where(step > 0, step, torch.ones_like(step))  # zero vector: any step, result 0
    k = torch.floor(work / safe_step).clamp(-half, half - 1)
    return (step * (k + 0.5)).to(hidden.dtype)


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise DefenseError(f"quantize: {what} must be an integer, got {value!r}")
    return value


@register_defense
class Quantize(Defense):
    """Symmetric uniform quantisation to 2^bits levels per vector (or per tensor = per prompt),
    absmax scale, midrise grid, round to nearest. Deterministic."""

    name = "quantize"
    param_types = {"bits": int, "scheme": str}
    differentiable = False  # rounding: attacks take a straight-through gradient

    def __init__(self, *, bits: int = 8, scheme: str = "per-vector") -> None:
        super().__init__(bits=bits, scheme=scheme)
        self.bits = _as_int(bits, "--bits")
        if not 1 <= self.bits <= 16:
            raise DefenseError(f"quantize: --bits must be between 1 and 16, got {bits!r}")
        if scheme not in SCHEMES:
            raise DefenseError(f"quantize: --scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        self.scheme = scheme
        self.params = {"bits": self.bits, "scheme": self.scheme}

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        return quantize_tensor(hidden, bits=self.bits, per_vector=self.scheme == "per-vector")

    def guarantee(self, tokens: int | None = None) -> dict[str, Any]:
        return {"epsilon": None, "delta": None, "kind": None, "neighbouring": None,
                "reason": "deterministic: no formal guarantee (an attacker can simulate it exactly)"}
