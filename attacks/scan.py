"""Exhaustive nearest-hidden-state decoding.

Per position t, with the prefix x1..x(t-1) committed, compute the hidden state of every vocabulary
token placed after the prefix (one batched pass over the vocabulary, chunked to `chunk_size` rows
per forward, on the prefix's KV cache), apply the defence's deterministic part (`simulate`), and
commit the token whose simulated state is nearest (MSE, i.e. L2) to the defended target h~t.
Without a defence this is exact (the map is injective); under Gaussian noise it is the maximum-
likelihood token for that position. Recorded per position: the committed token's MSE
(discrete_loss) and `margin`, the MSE of the runner-up minus that of the best: how decisively the
position was decided (large on clean states, small once noise swamps the differences).

Beam search (`beam` > 1) keeps the `beam` prefixes of smallest cumulative MSE per prompt; the
prefixes then differ, so each prompt's batch rows are its beams (B * beam rows); the shared loop
in attacks/base.py keeps the beams, this module proposes the nearest tokens of each row.

Precision: on CUDA the scan runs under bf16 autocast, which can rank the vocabulary but not decide
between near ties (measured on an H100: tf32 put the true token at 1.4e-5, wrong ones from 1.4e-4), so the
`recheck` nearest by the low-precision distance are recomputed in float32 and the float32
distances decide. On CPU, `auto` runs everything in float32: bf16 is slower on most CPUs. On a CPU
with AMX it is faster (this project's 2-core Xeon, SmolLM2, one position of one prompt on 1 thread,
2026-12-04: 29.5 s against 70.6 s, same top token; a 4096 x 576 x 1536 matmul 1,719 against 136
GFLOP/s), so `precision = "bfloat16"` is worth setting there; it is the CUDA path, float32 re-check
included. The `precision` field forces either path.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch

from .base import Attack, AttackError, AttackOutput, Candidates, chunk_size_option, mse, option
from .likelihood import Likelihood
from .registry import register_attack

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass(frozen=True)
class ScanConfig:
    beam: int = option(1, "beam width over positions (prefixes kept per prompt; 1: greedy).", min=1)
    chunk_size: int = chunk_size_option()
    recheck: int = option(64, "shortlist re-checked in float32 after a bf16 scan (CUDA).", min=2)
    precision: str = option("auto", "the full pass's precision (auto: bfloat16 on CUDA, float32 elsewhere; bfloat16 is "
                                    "faster on a CPU with AMX); a float32 re-check of the shortlist decides.",
                            choices=PRECISIONS)

    def validate(self) -> None:
        if self.beam < 1 or self.chunk_size < 1:
            raise AttackError(f"scan: --beam and --chunk-size must be >= 1, got {self.beam} and {self.chunk_size}")
        if self.recheck < max(2, self.beam):
            raise AttackError(f"scan: --recheck must be >= 2 and >= --beam, got {self.recheck}")

    def low_precision(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the full scan, or None for float32 throughout."""
        if self.precision == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        return torch.bfloat16 if self.precision == "bfloat16" else None


def cast_prefix(prefix, dtype: torch.dtype):
    """The prefix's KV cache in `dtype`, so that autocast's keys and the cached ones concatenate
    in one dtype (the cache is computed in float32)."""
    if prefix.length == 0:
        return prefix
    return replace(prefix, keys=[k.to(dtype) for k in prefix.keys], values=[v.to(dtype) for v in prefix.values])


@torch.no_grad()
def vocabulary_distances(oracle, prefix, target: torch.Tensor, defense, *, chunk_size: int,
                         autocast: torch.dtype | None, likelihood: Likelihood | None = None) -> torch.Tensor:
    """The noise law's statistic (R, V) (MSE: Gaussian or noise-free) between simulate(hidden state
    of every token after each of R prefixes) and each row's target (R, d). At most `chunk_size`
    sequences per forward; only distances are kept."""
    likelihood = likelihood or Likelihood.of(defense, dim=target.shape[-1])
    vocab = oracle.vocab_size
    shared = prefix.length == 0  # the empty prefix is the same for every row: scan it once
    if shared:
        prefix = prefix.select(torch.zeros(1, dtype=torch.long))
    elif autocast is not None:
        prefix = cast_prefix(prefix, autocast)
    per_chunk = max(1, chunk_size // prefix.batch)
    parts = []
    for start in range(0, vocab, per_chunk):
        embeds = oracle.embedding[start:start + per_chunk].expand(prefix.batch, -1, -1)
        with torch.autocast(oracle.device.type, dtype=autocast) if autocast is not None else nullcontext():
            hidden = oracle.hidden(prefix, embeds)
        hidden = defense.simulate(hidden.float())
        if shared:  # (1, m, d) against every row's target
            parts.append(likelihood.pairwise(target, hidden[0]))
        else:
            parts.append(likelihood.statistic(target[:, None, :], hidden))
    return torch.cat(parts, dim=1)


@register_attack
class ScanAttack(Attack):
    name = "scan"
    config_class = ScanConfig

    def propose(self, oracle, prefix, goal: torch.Tensor, *, defense, position: int, owner: torch.Tensor,
                state: None) -> Candidates:
        likelihood = Likelihood.of(defense, dim=goal.shape[-1])
        ids, dist = self._shortlist(oracle, prefix, goal, defense, likelihood)  # (R, K), ascending float32
        loss = dist if likelihood.scores_mse else \
            oracle.hidden_of_tokens(prefix, ids, reduce=lambda hidden, _: mse(defense.simulate(hidden), goal[:, None, :]))
        # records keep the MSE; beams sum the law's statistic (the most likely states)
        return Candidates(ids, loss, objective=dist, extras={"margin": dist[:, 1] - dist[:, 0]})  # runner-up minus best

    @torch.no_grad()
    def objective(self, oracle, targets: torch.Tensor, tokens: torch.Tensor, *, defense) -> torch.Tensor:
        """The noise law's statistic per position (Gaussian or noise-free: the MSE)."""
        likelihood = Likelihood.of(defense, dim=targets.shape[-1])
        targets = targets.to(oracle.device)
        return likelihood.statistic(targets, defense.simulate(oracle.capture(tokens.to(oracle.device))))

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        return vocab * 2 * params  # every vocabulary entry once per position

    def _shortlist(self, oracle, prefix, goal: torch.Tensor, defense,
                   likelihood: Likelihood) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, the most likely tokens (R, K) and their float32 statistic (R, K), best first. K
        covers the beam and a runner-up (for the margin); after a low-precision scan it is `recheck`."""
        cfg = self.config
        autocast = cfg.low_precision(oracle.device)
        dist = vocabulary_distances(oracle, prefix, goal, defense, chunk_size=cfg.chunk_size, autocast=autocast,
                                    likelihood=likelihood)
        width = min(oracle.vocab_size, cfg.recheck if autocast is not None else max(2, cfg.beam))
        dist, ids = dist.topk(width, dim=1, largest=False)
        if autocast is not None:  # the float32 distances decide
            dist = oracle.hidden_of_tokens(prefix, ids, reduce=lambda hidden, _: likelihood.statistic(
                goal[:, None, :], defense.simulate(hidden)))
            dist, order = dist.sort(dim=1)
            ids = ids.gather(1, order)
        return ids, dist
