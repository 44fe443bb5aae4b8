"""The per-step projection baseline (SIPIT's inversion loop, written from its description).

Per position t, with the prefix x1..x(t-1) committed, each prompt keeps a continuous proxy e and a
discrete candidate c. Both start at the embedding of (and at) a uniformly random token. Each step:
1. check the candidate with one discrete forward pass: accept it when its (defence-simulated)
   hidden state matches the target elementwise, |h(c) - h~t| <= atol + rtol |h~t| (torch.allclose,
   rtol = atol = 1e-5), and move on to the next position;
2. otherwise one forward/backward of the proxy on MSE(f(e | prefix), h~t); the gradient is scaled to
   unit norm if its norm exceeds 1, and e takes an SGD step with lr 1.0 decayed linearly to 0.01 over
   the first `reset_every` steps, then held;
3. ban c, and take as the next candidate the nearest unbanned token to e (L2);
4. every `reset_every` steps, e is reset to the embedding of the current candidate.
reset_every is 50 (1 + V // 25000) at the first position (150 for GPT-2's vocabulary), 50 after.

`steps` counts candidates checked (one discrete forward each). The proxy's forward/backward is
skipped at the step whose candidate is accepted (and at the last step of the budget): the reference
computes it there too but never uses it, so the tokens are the same at one gradient step less.

Candidates are distinct (each is banned once checked), so at most V steps are ever needed. When
the step budget runs out the best-verified candidate (smallest discrete MSE among those checked)
is committed and the position is marked `exhausted`. Under a noisy defence (noise_std > 0) the
acceptance test still runs but cannot fire: the budget is then `noisy_max_steps` (default 200)
instead of `max_steps` (default 5000), so a noisy run costs a bounded, reported amount.

Defence-aware: candidates are compared after `defense.simulate`. The proxy's loss goes through
simulate with a straight-through gradient, because a quantiser's gradient is zero almost everywhere.

Batched over prompts, each prompt behaves as if alone: its own random start (drawn from its own
generator), ban mask, step count and acceptance. One candidate per prompt per step is checked, as in
the reference. The search amplifies float rounding (one flipped nearest token changes the whole
path), so in a protocol's runs every forward pass holds exactly 32 rows (`Attack.fixed_rows`: blocks
of 32 prompts, the last padded; finished prompts are always computed and ignored): a prompt's answer
is then the same alone, in a `verify` subset, or among a board's prompts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import (Attack, AttackError, AttackOutput, Candidates, Notify, distribution, mse, option,
                   position_values, prompt_generator, simulate_with_gradient)
from .registry import register_attack



@dataclass(frozen=True)
class ProjectionConfig:
    max_steps: int = option(5000, "step budget per position.", min=1)  # clean or deterministic defence
    noisy_max_steps: int = option(200, "step budget per position under a noisy defence.", min=1)
    lr: float = 1.0  # SGD lr at step 0 ...
    lr_min: float = 0.01  # ... decayed linearly to this over the first reset_every steps, then held
    reset_base: int = 50  # reset_every after the first position; times 1 + V // 25000 at the first
    rtol: float = 1e-5  # acceptance, torch.allclose semantics
    atol: float = 1e-5

    def validate(self) -> None:
        if self.max_steps < 1 or self.noisy_max_steps < 1:
            raise AttackError(f"projection: --max-steps and --noisy-max-steps must be >= 1, "
                              f"got {self.max_steps} and {self.noisy_max_steps}")
        if not (self.lr > 0 and self.lr_min > 0 and self.reset_base >= 1 and self.rtol >= 0 and self.atol >= 0):
            raise AttackError("projection: lr, lr_min must be > 0, reset_base >= 1, tolerances >= 0")


def reset_period(vocab_size: int, position: int, *, base: int) -> int:
    """Steps between proxy resets: longer at the first position, where there is no prefix."""
    return base * (1 + vocab_size // 25000) if position == 0 else base


def step_lr(step: int, *, period: int, lr: float, lr_min: float) -> float:
    """Linear decay from lr to lr_min over the first `period` steps (0-based), then held."""
    return lr + (lr_min - lr) * min(step, period) / period


def matches(hidden: torch.Tensor, target: torch.Tensor, *, rtol: float, atol: float) -> torch.Tensor:
    """torch.allclose per row: (B, d), (B, d) -> (B,) bool."""
    return ((hidden - target).abs() <= atol + rtol * target.abs()).all(dim=-1)


def unit_clip(grad: torch.Tensor) -> torch.Tensor:
    """Scale each row to unit L2 norm if its norm exceeds 1."""
    return grad / grad.norm(dim=-1, keepdim=True).clamp(min=1.0)


def nearest_unbanned(proxy: torch.Tensor, embedding: torch.Tensor, sq_norms: torch.Tensor,
                     banned: torch.Tensor) -> torch.Tensor:
    """Id (B,) of the nearest (L2) token to each proxy row among its row's unbanned tokens."""
    # ||e - p||^2 = ||e||^2 - 2 e.p + ||p||^2; the last term does not change the argmin
    dist = sq_norms - 2 * proxy @ embedding.T
    return dist.masked_fill(banned, float("inf")).argmin(dim=-1)


@register_attack
class ProjectionAttack(Attack):
    name = "projection"
    config_class = ProjectionConfig
    batch_sensitive = True  # its search amplifies rounding: protocols give it fixed rows (Attack.fixed_rows)

    def prepare(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
                notify: Notify = print) -> dict:
        """Every prompt's random start tokens (B, T), the step budget and the embeddings' squared norms."""
        cfg, length, vocab = self.config, targets.shape[1], oracle.vocab_size
        init_ids = torch.stack([torch.randint(vocab, (length,), generator=prompt_generator(seed, i))
                                for i in prompt_indices]).to(oracle.device)
        budget = cfg.noisy_max_steps if defense.noise_std > 0 else cfg.max_steps
        budget = min(budget, vocab)  # candidates never repeat: after V steps every token was checked
        return {"init": init_ids, "budget": budget, "sq_norms": oracle.embedding.pow(2).sum(dim=-1)}

    def propose(self, oracle, prefix, goal: torch.Tensor, *, defense, position: int, owner: torch.Tensor,
                state: dict) -> Candidates:
        period = reset_period(oracle.vocab_size, position, base=self.config.reset_base)
        chosen, loss, steps, accepted = self._search(oracle, prefix, goal, state["init"][owner, position], defense,
                                                     budget=state["budget"], period=period, sq_norms=state["sq_norms"])
        return Candidates(chosen[:, None], loss[:, None], extras={"steps": steps, "exhausted": ~accepted})

    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        """Candidates checked per position and how often the step budget ran out."""
        exhausted = position_values(records, "exhausted")
        return {"steps_per_token": distribution(position_values(records, "steps")),
                "budget_exhausted_rate": sum(exhausted) / len(exhausted) if exhausted else None}

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        return float(out.extras["steps"].mean()) * 4 * 2 * params  # one forward/backward of the proxy, one check

    def _search(self, oracle, prefix, target: torch.Tensor, init: torch.Tensor, defense, *, budget: int,
                period: int, sq_norms: torch.Tensor):
        """Run the projection loop for one position of every prompt. Returns the committed token,
        its discrete loss, the steps spent and whether the acceptance test fired, each (B,).
        Every step computes all B rows (a finished prompt's row is computed and ignored): dropping
        it would change the row count, and with it the rounding of the others (`fixed_rows`)."""
        cfg = self.config
        batch, device = target.shape[0], oracle.device
        embedding = oracle.embedding
        proxy = embedding[init].clone()
        candidate = init.clone()
        banned = torch.zeros(batch, oracle.vocab_size, dtype=torch.bool, device=device)
        best_token, best_loss = init.clone(), torch.full((batch,), float("inf"), device=device)
        steps = torch.zeros(batch, dtype=torch.long, device=device)
        accepted = torch.zeros(batch, dtype=torch.bool, device=device)
        live = torch.ones(batch, dtype=torch.bool, device=device)
        rows = torch.arange(batch, device=device)
        for k in range(budget):
            if k and k % period == 0:
                proxy = embedding[candidate]  # indexing copies
            # 1. discrete check of the current candidate
            simulated = defense.simulate(oracle.hidden_of_tokens(prefix, candidate[:, None])[:, 0])
            loss, ok = mse(simulated, target), live & matches(simulated, target, rtol=cfg.rtol, atol=cfg.atol)
            keep = ok | (live & (loss < best_loss))  # an accepted candidate is committed even if not the min
            best_token = torch.where(keep, candidate, best_token)
            best_loss = torch.where(keep, loss, best_loss)
            steps += live.long()
            accepted |= ok
            live &= ~ok  # accepted prompts are done
            if not live.any() or k == budget - 1:
                break
            # 2. proxy step, 3. ban and project
            grad = self._proxy_grad(oracle, prefix, proxy, target, defense)
            lr = step_lr(k, period=period, lr=cfg.lr, lr_min=cfg.lr_min)
            proxy = torch.where(live[:, None], proxy - lr * unit_clip(grad), proxy)
            banned[rows[live], candidate[live]] = True
            candidate = torch.where(live, nearest_unbanned(proxy, embedding, sq_norms, banned), candidate)
        return best_token, best_loss, steps, accepted

    @staticmethod
    def _proxy_grad(oracle, prefix, proxy: torch.Tensor, target: torch.Tensor, defense) -> torch.Tensor:
        """Gradient (B, d) of each prompt's MSE(f(e | prefix), h~t) with respect to its proxy e."""
        leaf = proxy.detach().requires_grad_(True)
        with torch.enable_grad():
            hidden = oracle.hidden(prefix, leaf[:, None, :])[:, 0]
            loss = mse(simulate_with_gradient(defense, hidden), target)
            (grad,) = torch.autograd.grad(loss.sum(), leaf)  # rows are independent: the sum separates them
        return grad
