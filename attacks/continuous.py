"""The continuous single-commit gradient attack (the seed paper's Algorithm 1).

Per position t, with the prefix x1..x(t-1) committed:
1. a proxy embedding e starts at the embedding of a uniformly random token (or zeros);
2. K steps of Adam on MSE(f(e | prefix), h~t), lr 0.05, weight decay 1e-5 (coupled, as
   torch.optim.Adam), cosine annealing with T_max = K, gradient-norm clip 1.0; exit early once
   the loss is under loss_threshold (checked after the step, as in the paper; under a noisy
   defence the threshold is raised by the known noise variance, the loss's floor). The proxy is
   never snapped to a token during these steps;
3. commit once: the C nearest tokens to e (L1 by default) are checked in distance order with a
   discrete forward pass each, and the first whose discrete loss is under verify_threshold is
   committed; if none passes, the nearest (fallback). Under a noisy defence the threshold test
   cannot pass, so the candidate with the smallest discrete loss is committed instead;
4. the committed token's discrete loss is recorded.

All prompts of a batch advance together, yet each behaves as if alone: per-prompt gradient
clipping, Adam state, early exit, and commit. A prompt that has exited is computed and not updated,
and in a protocol's runs every forward pass holds exactly 32 rows (blocks of 32 prompts, the last
padded: `Attack.fixed_rows`): a CPU's BLAS rounds a row differently in a batch of another size, and under heavy noise
the commit's near-ties turn that into another answer (a C4 Laplace eps 8 entry's verify found one
prompt of 11 committing another token at position 5), so a prompt's answer must not depend on its
batch.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .base import (Attack, AttackError, AttackOutput, Candidates, Notify, Progress, distribution, mse, option,
                   position_values, prompt_generator,
                   simulate_with_gradient)
from .registry import register_attack

PRESETS = {
    "fast": {"steps": 600, "candidates": 100},
    "baseline": {"steps": 1000, "candidates": 2000},
    "high-acc": {"steps": 2000, "candidates": 10000},
}


@dataclass(frozen=True)
class ContinuousConfig:
    steps: int = option(1000, "Adam steps per position (K).", min=1)
    candidates: int = option(2000, "tokens checked at commit (C).", min=1)
    lr: float = option(0.05, "Adam learning rate.", min=0, min_open=True)
    weight_decay: float = 1e-5
    clip_norm: float = 1.0
    loss_threshold: float = option(1e-4, "early-exit loss.", min=0)  # early exit of the continuous loop
    # Acceptance of a candidate's discrete loss. The true token scores ~1e-11 in float32 and the
    # nearest wrong token was seen as low as 1.4e-4 (SmolLM2), so 1e-5 separates them safely.
    verify_threshold: float = 1e-5
    init: str = option("random", "proxy start.", choices=("random", "zeros"))
    metric: str = option("l1", "candidate metric.", choices=("l1", "l2", "cosine"))
    # Reference mode: one prompt at a time, no KV cache, torch.optim.Adam and a candidate loop that
    # stops at the first pass, as the published code does it. For speed comparisons and equivalence.
    reference: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def validate(self) -> None:
        if self.steps < 1 or self.candidates < 1:
            raise AttackError(f"continuous: --steps and --candidates must be >= 1, got {self.steps} and {self.candidates}")
        if not (self.lr > 0 and self.loss_threshold >= 0 and self.verify_threshold >= 0):
            raise AttackError("continuous: --lr must be > 0 and thresholds >= 0")
        if self.init not in ("random", "zeros"):
            raise AttackError(f"continuous: --init must be random or zeros, got {self.init!r}")
        if self.metric not in ("l1", "l2", "cosine"):
            raise AttackError(f"continuous: --metric must be l1, l2 or cosine, got {self.metric!r}")


def cosine_lr(*, base_lr: float, step: int, total: int) -> float:
    """CosineAnnealingLR (eta_min 0) at 0-based `step`: the lr used by the step-th update."""
    return base_lr * (1 + math.cos(math.pi * step / total)) / 2


def clip_rows(grad: torch.Tensor, *, max_norm: float) -> torch.Tensor:
    """Per-row gradient-norm clipping, as torch.nn.utils.clip_grad_norm_ does for one prompt."""
    norms = grad.norm(dim=-1, keepdim=True)
    return grad * (max_norm / (norms + 1e-6)).clamp(max=1.0)


class RowAdam:
    """torch.optim.Adam (coupled weight decay) for a (B, d) parameter whose rows are independent
    problems: rows are updated only while listed as active. Written out because torch's
    optimiser keeps one step count and updates every row of a tensor."""

    def __init__(self, shape: torch.Size, *, device: torch.device, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        self.exp_avg = torch.zeros(shape, device=device)
        self.exp_avg_sq = torch.zeros(shape, device=device)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay

    def step(self, param: torch.Tensor, grad: torch.Tensor, *, rows: torch.Tensor, lr: float, count: int) -> None:
        """Update param[rows] in place with grad (for those rows); `count` is the 1-based step number."""
        beta1, beta2 = self.betas
        grad = grad + self.weight_decay * param[rows]
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        denom = v.sqrt() / math.sqrt(1 - beta2 ** count) + self.eps
        param[rows] = param[rows] - (lr / (1 - beta1 ** count)) * m / denom


def nearest_tokens(proxy: torch.Tensor, embedding: torch.Tensor, *, k: int, metric: str) -> torch.Tensor:
    """Ids (B, k) of the k tokens nearest to each proxy row, nearest first."""
    if metric == "cosine":
        sim = torch.nn.functional.normalize(proxy, dim=-1) @ torch.nn.functional.normalize(embedding, dim=-1).T
        return sim.topk(k, dim=-1).indices
    dist = torch.cdist(proxy, embedding, p=1.0 if metric == "l1" else 2.0)
    return dist.topk(k, dim=-1, largest=False).indices


@register_attack
class ContinuousAttack(Attack):
    name = "continuous"
    config_class = ContinuousConfig
    presets = PRESETS
    batch_sensitive = True  # protocols give it fixed rows (module docstring)

    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Progress | None = None, notify: Notify = print) -> AttackOutput:
        if self.config.reference:
            init_ids = self.prepare(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed)
            return self._run_reference(oracle, targets.to(oracle.device), init_ids.cpu(), defense, progress)
        return super().run(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed,
                           progress=progress, notify=notify)

    def prepare(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
                notify: Notify = print) -> torch.Tensor:
        """The random start token of every prompt and position (B, T), from the prompt's own generator."""
        length = targets.shape[1]
        return torch.stack([torch.randint(oracle.vocab_size, (length,), generator=prompt_generator(seed, i))
                            for i in prompt_indices]).to(oracle.device)

    def propose(self, oracle, prefix, goal: torch.Tensor, *, defense, position: int, owner: torch.Tensor,
                state: torch.Tensor) -> Candidates:
        proxy, steps, cont_loss = self._optimise(oracle, prefix, goal, state[owner, position], defense)
        chosen, disc_loss, fallback = self._commit(oracle, prefix, proxy, goal, defense)
        return Candidates(chosen[:, None], disc_loss[:, None],
                          extras={"continuous_loss": cont_loss, "steps": steps, "fallback": fallback})

    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        """Adam steps per position and how often the commit fell back to the nearest candidate."""
        fallback = position_values(records, "fallback")
        return {"steps_per_token": distribution(position_values(records, "steps")),
                "fallback_rate": sum(fallback) / len(fallback) if fallback else None}

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        forward = 2 * params
        return float(out.extras["steps"].mean()) * 3 * forward + min(self.config.candidates, vocab) * forward

    def _optimise(self, oracle, prefix, target: torch.Tensor, init_ids: torch.Tensor, defense):
        """Adam on the proxy of every prompt until each exits early or K steps are spent."""
        cfg = self.config
        batch, device = target.shape[0], oracle.device
        proxy = (oracle.embedding[init_ids.to(device)].clone() if cfg.init == "random"
                 else torch.zeros(batch, oracle.embedding.shape[1], device=device))
        adam = RowAdam(proxy.shape, device=device, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        last_loss = torch.full((batch,), float("inf"), device=device)
        live = torch.ones(batch, dtype=torch.bool, device=device)
        # Under noise the loss cannot fall below the noise variance: exit relative to that floor.
        exit_below = cfg.loss_threshold + defense.noise_std ** 2
        for k in range(cfg.steps):
            # every row goes through the model (the row count fixes the rounding); exited rows are not updated
            leaf = proxy.clone().requires_grad_(True)
            with torch.enable_grad():
                hidden = oracle.hidden(prefix, leaf[:, None, :])[:, 0]
                loss = mse(simulate_with_gradient(defense, hidden), target)
                (grad,) = torch.autograd.grad(loss.sum(), leaf)
            rows = live.nonzero().squeeze(1)
            lr = cosine_lr(base_lr=cfg.lr, step=k, total=cfg.steps)
            adam.step(proxy, clip_rows(grad[rows], max_norm=cfg.clip_norm), rows=rows, lr=lr, count=k + 1)
            steps[rows] += 1
            last_loss[rows] = loss.detach()[rows]
            live &= loss.detach() >= exit_below
            if not live.any():
                break
        return proxy, steps, last_loss

    def _commit(self, oracle, prefix, proxy: torch.Tensor, target: torch.Tensor, defense):
        """One discrete search: check the C nearest tokens, commit by the paper's rule."""
        cfg = self.config
        k = min(cfg.candidates, oracle.vocab_size)
        candidates = nearest_tokens(proxy, oracle.embedding, k=k, metric=cfg.metric)
        losses = oracle.hidden_of_tokens(
            prefix, candidates, reduce=lambda hidden, cols: mse(defense.simulate(hidden), target[:, None, :]))
        passed = losses < cfg.verify_threshold
        fallback = ~passed.any(dim=1)
        if defense.noise_std > 0:
            pick = losses.argmin(dim=1)  # noisy targets: the threshold cannot pass; keep the best match
        else:
            pick = torch.where(fallback, 0, passed.int().argmax(dim=1))  # first passing, else nearest
        rows = torch.arange(len(pick), device=pick.device)
        return candidates[rows, pick], losses[rows, pick], fallback

    # --- reference mode -------------------------------------------------------------------------
    def _run_reference(self, oracle, targets: torch.Tensor, init_ids: torch.Tensor, defense,
                       progress: Progress | None) -> AttackOutput:
        """The straightforward loop: each prompt alone, the whole sequence recomputed every step."""
        batch, length, _ = targets.shape
        tokens = torch.zeros(batch, length, dtype=torch.long)
        out = {key: torch.zeros(batch, length) for key in ("discrete_loss", "seconds", "continuous_loss", "steps", "fallback")}
        for b in range(batch):
            for t in range(length):
                start = time.perf_counter()
                prefix = oracle.embedding[tokens[b, :t].to(oracle.device)]
                proxy, steps, cont_loss = self._optimise_reference(oracle, prefix, targets[b, t], init_ids[b, t], defense)
                chosen, disc_loss, fallback = self._commit_reference(oracle, prefix, proxy, targets[b, t], defense)
                tokens[b, t] = chosen
                for key, value in (("discrete_loss", disc_loss), ("continuous_loss", cont_loss), ("steps", steps),
                                   ("fallback", fallback)):
                    out[key][b, t] = float(value)
                out["seconds"][b, t] = time.perf_counter() - start
                if progress and b == batch - 1:
                    progress(t + 1, length)
        return AttackOutput(tokens, out.pop("discrete_loss"), out.pop("seconds"), out)

    def _optimise_reference(self, oracle, prefix: torch.Tensor, target: torch.Tensor, init_id: torch.Tensor, defense):
        cfg = self.config
        start = oracle.embedding[init_id] if cfg.init == "random" else torch.zeros_like(oracle.embedding[0])
        proxy = torch.nn.Parameter(start.clone())
        optimiser = torch.optim.Adam([proxy], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.steps)
        exit_below = cfg.loss_threshold + defense.noise_std ** 2
        steps, loss = 0, torch.tensor(float("inf"))
        for _ in range(cfg.steps):
            optimiser.zero_grad()
            with torch.enable_grad():
                hidden = oracle.last_hidden(torch.cat([prefix, proxy[None]])[None])[0]
                loss = mse(simulate_with_gradient(defense, hidden), target)
                loss.backward()
            torch.nn.utils.clip_grad_norm_([proxy], cfg.clip_norm)
            optimiser.step()
            schedule.step()
            steps += 1
            if loss.item() < exit_below:
                break
        return proxy.detach(), steps, loss.item()

    def _commit_reference(self, oracle, prefix: torch.Tensor, proxy: torch.Tensor, target: torch.Tensor, defense):
        cfg = self.config
        k = min(cfg.candidates, oracle.vocab_size)
        candidates = nearest_tokens(proxy[None], oracle.embedding, k=k, metric=cfg.metric)[0].tolist()
        best, best_loss = candidates[0], float("inf")
        for rank, candidate in enumerate(candidates):
            with torch.no_grad():
                hidden = oracle.last_hidden(torch.cat([prefix, oracle.embedding[candidate][None]])[None])[0]
            loss = mse(defense.simulate(hidden), target).item()
            if defense.noise_std == 0 and loss < cfg.verify_threshold:
                return candidate, loss, False
            if rank == 0 or (defense.noise_std > 0 and loss < best_loss):
                best, best_loss = candidate, loss
        return best, best_loss, True
