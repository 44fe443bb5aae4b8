"""The certified leak radius: the noise below which nearest-state decoding provably recovers a text.

Per prompt and position t, the clean gap g_t is the L2 distance from the true token's state to
the nearest state of any other vocabulary token after the same (true) prefix. If every position's
noise has norm below g_t / 2, the nearest state is still the true one at every position, so the
nearest-state decoder (`scan`, `guided` with ml scoring) recovers the prompt exactly (Nikolaou et
al. 2025, Theorem 3.2). The prompt's radius is r = min_t g_t / 2.

For isotropic Gaussian noise N(0, sigma^2 I_d), the noise norm is about sigma sqrt(d) (its
expectation is slightly below), so sigma_expected = r / sqrt(d) is where the typical noise
reaches the radius. With probability at least 1 - delta the norm stays under
sigma (sqrt(d) + sqrt(2 ln(T / delta))) at all T positions (Gaussian concentration of the norm, a
1-Lipschitz function, and a union bound), so below sigma_certified = r / (sqrt(d) +
sqrt(2 ln(T / delta))) the prompt is recovered with probability >= 1 - delta: Gaussian noise
that small cannot protect it.

Which gaps are known exactly: position 1 always (the codebook holds every token's position-1
state); positions 2 and up only where a full scan ran on clean states (`scan` without a defence,
whose runner-up margin along the true prefix is g_t^2 / d). Otherwise the prompt's radius is
reported from position 1 only: an upper bound on r (later gaps measured on SmolLM2 are ~25x
larger; bench/studies/GUIDED.md), labelled as such.
"""
from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

import torch

DELTA = 0.01  # the certified sigma holds with probability >= 1 - DELTA per prompt


def sigma_expected(radius: float, *, dim: int) -> float:
    return radius / math.sqrt(dim)


def sigma_certified(radius: float, *, dim: int, tokens: int, delta: float = DELTA) -> float:
    return radius / (math.sqrt(dim) + math.sqrt(2 * math.log(tokens / delta)))


def prompt_radii(first_gaps: Sequence[float], later_gaps: Sequence[Sequence[float] | None], *, dim: int,
                 tokens: int) -> list[dict[str, Any]]:
    """Per prompt: its gaps, radius, and the sigmas it corresponds to. `later_gaps[i]` holds the
    gaps of positions 2..T where a clean full scan measured them, else None."""
    out = []
    for first, later in zip(first_gaps, later_gaps):
        gaps = [first] + list(later) if later is not None else [first]
        radius = min(gaps) / 2
        out.append({"first_position_gap": first, "gaps": gaps if later is not None else None,
                    "positions": "all" if later is not None else "first", "radius": radius,
                    "sigma_expected": sigma_expected(radius, dim=dim),
                    "sigma_certified": sigma_certified(radius, dim=dim, tokens=tokens)})
    return out


def summarise_radii(per_prompt: list[dict[str, Any]], *, dim: int, tokens: int) -> dict[str, Any]:
    """The distribution over prompts, and what the numbers mean in one sentence."""
    radii = [p["radius"] for p in per_prompt]
    certified = [p["sigma_certified"] for p in per_prompt]
    scope = "all positions" if all(p["positions"] == "all" for p in per_prompt) else "position 1"
    note = (f"from {scope}: below sigma {min(certified):.3g} Gaussian noise cannot protect any of these prompts "
            f"(nearest-state decoding recovers each with probability >= {1 - DELTA:g})")
    if scope != "all positions":
        note += "; positions 2+ were not scanned, so this radius is an upper bound (position 1 is exact)"
    return {"dim": dim, "tokens": tokens, "delta": DELTA, "scope": scope, "per_prompt": per_prompt,
            "min_radius": min(radii), "median_radius": statistics.median(radii),
            "min_sigma_certified": min(certified), "median_sigma_certified": statistics.median(certified),
            "min_sigma_expected": min(p["sigma_expected"] for p in per_prompt),
            "median_sigma_expected": statistics.median(p["sigma_expected"] for p in per_prompt), "note": note}


def of_run(latest: dict[str, list[dict]], *, clean: bool, prompt_indices: list[int], first_gaps: list[float] | None,
           dim: int, tokens: int) -> dict[str, Any] | None:
    """The certified radius of a run's prompts (`latest`: each attack's records, one per prompt):
    position 1 from the codebook's gaps (None without them: no radius); every position where a scan
    ran on clean states (`clean`: no defence) and recovered the prompt."""
    if first_gaps is None:
        return None
    clean_scan = {}
    if clean and "scan" in latest:
        clean_scan = {r["prompt_index"]: later_gaps_from_clean_scan(r["margin"], dim=dim)
                      for r in latest["scan"] if r["exact_match"] and "margin" in r}
    per_prompt = prompt_radii(first_gaps, [clean_scan.get(i) for i in prompt_indices], dim=dim, tokens=tokens)
    for entry, index in zip(per_prompt, prompt_indices):
        entry["prompt_index"] = index
    return summarise_radii(per_prompt, dim=dim, tokens=tokens)


def later_gaps_from_clean_scan(margins: Sequence[float | None], *, dim: int) -> list[float] | None:
    """Gaps of positions 2..T from a clean scan's runner-up margins (MSE, the true token's ~0), or
    None when one is missing."""
    if any(m is None for m in margins):
        return None
    return [math.sqrt(max(m, 0.0) * dim) for m in margins[1:]]


@torch.no_grad()
def first_gaps(codebook: torch.Tensor, first_tokens: torch.Tensor) -> list[float]:
    from invbench.leaks.codebook import first_position_gaps

    return [float(g) for g in first_position_gaps(codebook, first_tokens.to(codebook.device))]
