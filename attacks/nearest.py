"""nearest: each token alone, the most likely state under the noise law (the per-token baseline).

Per position t, with no context and no prior: the token whose state alone at position t (no token
before it, `WhiteBox.position_table`, after the defence's `simulate`) is the most likely under the
defence's noise law (Gaussian: the nearest in L2; Laplace: in L1; dchi: in L2 distance). No forward
pass per candidate: one table per position (at layer 0 on SmolLM2, the embedding table itself).

At layer 0 (the input embeddings), where a token's state does not depend on the text before it, this is
the per-token maximum-likelihood decoder of noisy embeddings: the baseline BeamClean (arXiv 2505.13758)
compares its LM-prior beam search against (42.1% token recovery for per-token nearest neighbour against
74.3% for the beam search, Gaussian noise, epsilon 15, MRPC). invbench's `sequence` is that kind of
decoder (MAP over whole texts with the model's prior), so a layer-0 board shows the same gap. At later
leak points the state depends on the text before it and this baseline ignores that context: it is a
weak attack there, reported, never one to rank a defence by.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from .base import Attack, AttackOutput, Notify, Progress, mse
from .likelihood import Likelihood
from .registry import register_attack


@dataclass(frozen=True)
class NearestConfig:
    """No options: one table look-up per position."""

    def validate(self) -> None:
        pass


@register_attack
class NearestAttack(Attack):
    name = "nearest"
    config_class = NearestConfig

    @torch.no_grad()
    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Progress | None = None, notify: Notify = print) -> AttackOutput:
        batch, length, dim = targets.shape
        targets = targets.to(oracle.device)
        likelihood = Likelihood.of(defense, dim=dim)
        tokens = torch.zeros(batch, length, dtype=torch.long)
        losses, seconds = torch.zeros(batch, length), torch.zeros(batch, length)
        for t in range(length):
            start = time.perf_counter()
            table = defense.simulate(oracle.position_table(t))
            best = likelihood.pairwise(targets[:, t], table).argmin(dim=1)
            tokens[:, t] = best.cpu()
            losses[:, t] = mse(table[best], targets[:, t]).cpu()
            seconds[:, t] = (time.perf_counter() - start) / batch
            if progress:
                progress(t + 1, length)
        return AttackOutput(tokens, losses, seconds)

    @torch.no_grad()
    def objective(self, oracle, targets: torch.Tensor, tokens: torch.Tensor, *, defense) -> torch.Tensor:
        """The noise law's statistic (B, T) of each token's state alone at its position (what this attack
        minimises, position by position; at layer 0 that is the token's state in any context)."""
        likelihood = Likelihood.of(defense, dim=targets.shape[-1])
        targets, tokens = targets.to(oracle.device), tokens.to(oracle.device)
        return torch.stack([likelihood.statistic(targets[:, t], defense.simulate(oracle.position_table(t)[tokens[:, t]]))
                            for t in range(targets.shape[1])], dim=1)

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        return 0.0  # no forward pass: distances to one table per position

    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        return {"note": "each token alone: its state at its position with no context and no prior (at layer 0 the "
                        "per-token maximum-likelihood decoder of noisy embeddings)"}
