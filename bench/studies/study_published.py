"""Study of the published attacks' settings on a trained model (issue 16).

Question: the seed paper's continuous attack and SIPIT's per-step projection recover GPT-2 small
almost perfectly, yet on the trained SmolLM2-135M both fail in our runs. Do they need other
settings there, or are they weak there?

Method. Positions are independent problems: at each studied position t of a prompt the TRUE
prefix x1..x(t-1) is given (as a committed prefix would be if every earlier position had been
recovered), and the attack's inner loop is run for that position alone. Per position we record
- the number of steps until the true token FIRST becomes the commit candidate, or None ("not
  within K"): continuous: the nearest token to the proxy under the attack's metric (L1 by
  default; L2 and cosine are recorded from the same trajectory, since the metric only changes the
  commit, not the optimisation); projection: the projected candidate (steps = candidates checked,
  as the attack counts them; the true candidate is accepted at that step);
- the final rank of the true token (number of tokens strictly closer than it; projection: among
  the unbanned tokens, the ones that can still become the candidate), the final loss, the wall
  time (amortised over the rows of a batched forward), and the rank every few steps.

The inner loops are written out here (the attacks do not expose per-step hooks) with the attack
modules' own math helpers, so that each row behaves as the attack would for that position:
continuous: `RowAdam`, `clip_rows`, `cosine_lr`, `nearest_tokens`, per-row early exit at the loss
threshold; projection: `step_lr`, `unit_clip`, `nearest_unbanned`, `reset_period`, `matches`.
Settings the attacks do not have (prior / ranker init, other gradient normalisations, SSE) are
options of this study only.

Positions: 10 C4 prompts x 10 tokens (the bundled C4 validation sample offline), positions
t = 0, 4 and 8 of every prompt by default (30 positions: the prefix-free first position, a middle
and a late one); `--positions ''` gives instead a balanced design in which each t = 0..9 is
studied in 3 prompts. Rows of the same t share one prefix length and run as rows of one forward
pass, several settings at once (each row keeps its own Adam state, schedule position, early exit,
ban mask; a test checks that stacked rows equal rows run alone).

Usage (python -m invbench.studies.study_published ...):
  run      --model M --attack continuous|projection --settings SPEC [SPEC ...] --out DIR
  diagnose --model M --out DIR          embedding geometry, gradient and landscape figures
  report   --runs DIR --md FILE --png FILE --json FILE
  list                                  the setting keys and their defaults
A SPEC is `paper` (the published defaults) or comma-separated key=value overrides of them, e.g.
`lr=0.01`, `init=prior,lr=0.02`, `grad=fixed,lr=0.1,lr_min=0.01`. Results go to
DIR/<model>/<attack>/<spec>.json, written atomically after every position group: a rerun skips
finished settings and resumes unfinished ones group by group.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from invbench.attacks.base import mse, prompt_generator
from invbench.attacks.continuous import RowAdam, clip_rows, cosine_lr, nearest_tokens
from invbench.attacks.projection import matches, nearest_unbanned, reset_period, step_lr, unit_clip
from invbench.config import SEED

METRICS = ("l1", "l2", "cosine")
SCHEMA = 1


# --- settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContinuousSetting:
    """The paper's Algorithm 1 inner loop; defaults are the published ones (Baseline, K=2000)."""

    lr: float = 0.05
    init: str = "random"  # random | zeros | prior | ranker
    steps: int = 2000  # K, also the cosine schedule's T_max
    weight_decay: float = 1e-5
    clip_norm: float = 1.0
    loss_threshold: float = 1e-4
    metric: str = "l1"  # the commit metric (all three are recorded)

    def validate(self) -> None:
        if self.init not in ("random", "zeros", "prior", "ranker"):
            raise ValueError(f"init must be random, zeros, prior or ranker, got {self.init!r}")
        if self.metric not in METRICS or self.steps < 1 or self.lr <= 0:
            raise ValueError("bad continuous setting")


@dataclass(frozen=True)
class ProjectionSetting:
    """SIPIT's per-step projection loop; defaults are the published ones (budget K=2000)."""

    lr: float = 1.0
    lr_min: float = 0.01
    grad: str = "unit"  # unit: scale to norm 1 if above | raw | fixed: always scale to fixed_norm
    fixed_norm: float = 1.0
    reset_base: int = 50  # reset_period(V, t, base=reset_base)
    loss: str = "mse"  # mse | sse (summed squared error: d times the MSE gradient)
    steps: int = 2000  # candidates checked at most
    init: str = "random"  # random | prior | ranker (the first candidate and the proxy's start)
    rtol: float = 1e-5
    atol: float = 1e-5

    def validate(self) -> None:
        if self.grad not in ("unit", "raw", "fixed") or self.loss not in ("mse", "sse"):
            raise ValueError("grad must be unit|raw|fixed and loss mse|sse")
        if self.init not in ("random", "prior", "ranker") or self.steps < 1 or self.reset_base < 1:
            raise ValueError("bad projection setting")


SETTING_CLASSES = {"continuous": ContinuousSetting, "projection": ProjectionSetting}


def parse_setting(attack: str, spec: str):
    """`paper` or `key=value,...` (overrides of the published defaults) -> setting."""
    cls = SETTING_CLASSES[attack]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if spec != "paper":
        for part in spec.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise SystemExit(f"bad setting {part!r} for {attack}; keys: {', '.join(fields)}")
            kind = type(fields[key].default)
            values[key] = kind(float(raw)) if kind in (int, float) else raw.strip()
    setting = cls(**values)
    setting.validate()
    return setting


def setting_name(setting) -> str:
    """Canonical spec: the non-default fields in declaration order, or `paper`."""
    default = type(setting)()
    parts = [f"{f.name}={getattr(setting, f.name):g}" if isinstance(getattr(setting, f.name), float)
             else f"{f.name}={getattr(setting, f.name)}"
             for f in dataclasses.fields(setting) if getattr(setting, f.name) != getattr(default, f.name)]
    return ",".join(parts) or "paper"


# --- problems --------------------------------------------------------------------------------


@dataclass
class Problems:
    """The studied positions of one model: prompts, targets, and per-position starts."""

    model_name: str
    ids: torch.Tensor  # (P, T) prompt token ids
    targets: torch.Tensor  # (P, T, d) leaked hidden states (clean)
    positions: list[tuple[int, int]]  # (prompt, t)
    random_init: torch.Tensor  # (P, T) the attacks' own random start tokens (seeded per prompt)
    prior_top1: torch.Tensor  # (P, T) argmax of the LM's next-token distribution given the true prefix
    ranker_top1: torch.Tensor | None  # (P, T) or None when no ranker is available
    ranker_note: str
    texts: list[str] = field(default_factory=list)
    source: str = ""

    def groups(self) -> dict[int, list[int]]:
        """t -> indices into `positions` with that prefix length."""
        out: dict[int, list[int]] = {}
        for i, (_, t) in enumerate(self.positions):
            out.setdefault(t, []).append(i)
        return dict(sorted(out.items()))


def balanced_positions(n_prompts: int, tokens: int, per_prompt: int) -> list[tuple[int, int]]:
    """Each t in 0..tokens-1 studied in `per_prompt * n_prompts / tokens` prompts, prompts cycled
    so that every prompt gets `per_prompt` positions (with 10 x 10 and 3: t in prompts 3t..3t+2)."""
    out = []
    for t in range(tokens):
        for j in range(per_prompt * n_prompts // tokens):
            out.append(((per_prompt * t + j) % n_prompts, t))
    return sorted(out)


def prior_next_token(loaded, oracle, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(P, T) argmax of the LM head's next-token distribution given the true prefix. At t = 0 there
    is no prefix: the prior after the tokenizer's BOS (else EOS) token, the model's guess at a
    document start."""
    model = loaded.model
    head = model.get_output_embeddings()
    with torch.no_grad():
        logits = head(targets[:, :-1].to(oracle.device))  # prediction for t = 1..T-1
        first = getattr(loaded.tokenizer, "bos_token_id", None)
        if first is None:
            first = loaded.tokenizer.eos_token_id
        start = model(input_ids=torch.tensor([[first]], device=oracle.device)).logits[0, -1]
    top = torch.empty(ids.shape, dtype=torch.long)
    top[:, 0] = start.argmax().item()
    top[:, 1:] = logits.argmax(dim=-1).cpu()
    return top


def ranker_top1(oracle, targets: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """Top-1 current token of the `guided` attack's learned ranker (the one invbench ships for this
    model and layer, or a cached fit) from each clean hidden state, or None with a note when there is
    none: the study does not fit one."""
    from invbench.attacks.ranker import load_ranker

    ranker = load_ranker(oracle, notify=lambda _: None, fit_if_missing=False)
    if ranker is None:
        return None, "warm start `ranker` skipped: no shipped or cached ranker for this model and layer"
    flat = targets.reshape(-1, targets.shape[-1]).float()
    top = ranker.log_probs(flat).argmax(dim=-1).reshape(targets.shape[:2]).cpu()
    return top, f"ranker: the guided attack's {ranker.description}, top-1 of log_probs(h_t)"


def build_problems(loaded, oracle, *, n_prompts: int = 10, tokens: int = 10, per_prompt: int = 3,
                   seed: int = SEED, dataset: str = "c4", positions: list[tuple[int, int]] | None = None) -> Problems:
    from invbench.leaks.prompts import load_prompts

    prompts, source = load_prompts(dataset, tokenizer=loaded.tokenizer, n=n_prompts, tokens=tokens, seed=seed,
                                   notify=lambda _: None)
    ids = torch.tensor([p.ids for p in prompts])
    targets = oracle.capture(ids).cpu()
    vocab = oracle.vocab_size
    # exactly the draw the attacks make: randint(V, (T,), generator=prompt_generator(seed, prompt))
    random_init = torch.stack([torch.randint(vocab, (tokens,), generator=prompt_generator(seed, p.index))
                               for p in prompts])
    ranker, note = ranker_top1(oracle, targets)
    return Problems(loaded.name, ids, targets, positions or balanced_positions(n_prompts, tokens, per_prompt),
                    random_init, prior_next_token(loaded, oracle, ids, targets), ranker, note,
                    [p.text for p in prompts], source)


def start_tokens(problems: Problems, init: str, rows: list[int]) -> torch.Tensor | None:
    table = {"random": problems.random_init, "prior": problems.prior_top1, "ranker": problems.ranker_top1}.get(init)
    if table is None:
        return None
    return torch.tensor([int(table[problems.positions[i]]) for i in rows])


# --- trajectories ----------------------------------------------------------------------------


def trajectory_steps(total: int) -> list[int]:
    """Steps at which the rank is recorded: every step to 10, every 5 to 100, every 25 after."""
    steps = set(range(0, min(total, 10) + 1)) | set(range(0, min(total, 100) + 1, 5)) | set(range(0, total + 1, 25))
    return sorted(steps | {total})


def ranks_from_scores(dist: torch.Tensor, truth: torch.Tensor, *, larger_is_closer: bool = False) -> torch.Tensor:
    """Rank of the true token: tokens strictly closer than it (0 = nearest)."""
    own = dist.gather(1, truth[:, None])
    closer = dist > own if larger_is_closer else dist < own
    return closer.sum(dim=1)


class RankTracker:
    """Ranks of the true token under L1, L2 and cosine for rows of proxies. L2 and cosine come
    from one matmul per step (exact); an L1 hit is only possible where the true token is L1-nearest
    within a shortlist that contains it, so the full L1 distance (the attack's own
    `nearest_tokens`) is computed only for those rows, and for every row at trajectory steps."""

    def __init__(self, embedding: torch.Tensor, shortlist: int = 32) -> None:
        self.embedding = embedding
        self.sq = embedding.pow(2).sum(dim=1)
        self.norms = embedding.norm(dim=1).clamp(min=1e-12)
        self.shortlist = shortlist

    def l2_cos(self, proxy: torch.Tensor, truth: torch.Tensor):
        """Ranks under L2 and cosine; a rank-0 true token tied with another (e.g. every cosine is
        0 at a zero proxy, where the attack's choice is arbitrary) is reported as rank 1, not a hit."""
        dots = proxy @ self.embedding.T
        dist2 = self.sq - 2 * dots  # + |p|^2, the same for every token
        cos = dots / self.norms
        r2 = ranks_from_scores(dist2, truth)
        rc = ranks_from_scores(cos, truth, larger_is_closer=True)
        r2 = r2 + ((r2 == 0) & ((dist2 <= dist2.gather(1, truth[:, None])).sum(1) > 1)).long()
        rc = rc + ((rc == 0) & ((cos >= cos.gather(1, truth[:, None])).sum(1) > 1)).long()
        return r2, rc, dist2, cos

    def full_l1(self, proxy: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return ranks_from_scores(torch.cdist(proxy, self.embedding, p=1.0), truth)

    def l1_hit(self, proxy: torch.Tensor, truth: torch.Tensor, dist2: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """(R,) bool: the true token is the L1-nearest token (the attack's L1 commit candidate)."""
        short = torch.cat([dist2.topk(self.shortlist, largest=False).indices, cos.topk(self.shortlist).indices,
                           truth[:, None]], dim=1)
        l1 = (proxy[:, None, :] - self.embedding[short]).abs().sum(-1)
        maybe = l1.argmin(dim=1) == short.shape[1] - 1
        maybe |= l1.min(dim=1).values >= l1[:, -1]  # ties: let the exact check decide
        hit = torch.zeros_like(maybe)
        for r in maybe.nonzero().flatten().tolist():
            hit[r] = nearest_tokens(proxy[r:r + 1], self.embedding, k=1, metric="l1")[0, 0] == truth[r]
        return hit


# --- the continuous inner loop ---------------------------------------------------------------


def continuous_rows(oracle, prefix, targets: torch.Tensor, truth: torch.Tensor, init: torch.Tensor,
                    lrs: torch.Tensor, setting: ContinuousSetting, *, tracker: RankTracker | None = None,
                    progress=None) -> list[dict]:
    """Algorithm 1's inner loop for R rows (each its own problem: prefix row, target, start, lr).
    Per row, as ContinuousAttack._optimise: Adam (RowAdam) on MSE with per-row gradient clipping,
    lr * cosine_lr(step, K), exit once the loss (of the proxy before the step) is under the
    threshold. Rows whose proxy is no longer finite stop (Adam's state is then NaN for good)."""
    device = oracle.device
    tracker = tracker or RankTracker(oracle.embedding)
    n, d = init.shape
    K = setting.steps
    proxy = init.clone().to(device)
    adam = RowAdam(proxy.shape, device=device, betas=(0.9, 0.999), eps=1e-8, weight_decay=setting.weight_decay)
    record_at = set(trajectory_steps(K))
    first = {m: [None] * n for m in METRICS}
    traj: list[list[int]] = [[] for _ in range(n)]
    traj_steps: list[list[int]] = [[] for _ in range(n)]
    final_rank = {m: [None] * n for m in METRICS}
    steps_run = [0] * n
    seconds = [0.0] * n
    last_loss = [math.inf] * n
    exit_reason = ["budget"] * n
    nonfinite = [False] * n

    def observe(k: int, rows: torch.Tensor) -> None:
        p, tr = proxy[rows], truth[rows]
        r2, rc, dist2, cos = tracker.l2_cos(p, tr)
        hit1 = tracker.l1_hit(p, tr, dist2, cos)
        full = tracker.full_l1(p, tr) if (k in record_at or k == K) else None
        for j, r in enumerate(rows.tolist()):
            for m, hit in (("l2", r2[j] == 0), ("cosine", rc[j] == 0), ("l1", bool(hit1[j]) or (full is not None and full[j] == 0))):
                if hit and first[m][r] is None:
                    first[m][r] = k
            final_rank["l2"][r], final_rank["cosine"][r] = int(r2[j]), int(rc[j])
            if full is not None:
                final_rank["l1"][r] = int(full[j])
                traj[r].append(int(full[j]))
                traj_steps[r].append(k)

    rows = torch.arange(n, device=device)
    observe(0, rows)
    for k in range(K):
        tick = time.perf_counter()
        leaf = proxy[rows].clone().requires_grad_(True)
        with torch.enable_grad():
            hidden = oracle.hidden(prefix.select(rows), leaf[:, None, :])[:, 0]
            loss = mse(hidden, targets[rows])
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        lr = (lrs[rows] * cosine_lr(base_lr=1.0, step=k, total=K))[:, None]
        adam.step(proxy, clip_rows(grad, max_norm=setting.clip_norm), rows=rows, lr=lr, count=k + 1)
        loss = loss.detach()
        finite = torch.isfinite(proxy[rows]).all(dim=1)
        done = (loss < setting.loss_threshold) | ~finite
        ok_rows = rows[finite]
        if len(ok_rows):
            observe(k + 1, ok_rows)
        spent = (time.perf_counter() - tick) / len(rows)
        for j, r in enumerate(rows.tolist()):
            steps_run[r] = k + 1
            seconds[r] += spent
            last_loss[r] = float(loss[j])
            if not bool(finite[j]):
                nonfinite[r], exit_reason[r] = True, "nonfinite"
                for m in METRICS:
                    final_rank[m][r] = None
            elif bool(done[j]):
                exit_reason[r] = "loss_threshold"
                if (k + 1) not in record_at:  # the proxy is frozen from here: record its final L1 rank
                    full = tracker.full_l1(proxy[r:r + 1], truth[r:r + 1])
                    final_rank["l1"][r] = int(full[0])
                    traj[r].append(int(full[0]))
                    traj_steps[r].append(k + 1)
        rows = rows[~done]
        if progress:
            progress(1)
        if len(rows) == 0:
            break
    dist_truth = (proxy - oracle.embedding[truth]).norm(dim=1).tolist()
    proxy_norm = proxy.norm(dim=1).tolist()
    embedding_true_norm = oracle.embedding[truth].norm(dim=1).tolist()
    finite_rows = torch.isfinite(proxy).all(dim=1)
    nearest_l1 = [None] * n
    if finite_rows.any():
        ids = nearest_tokens(proxy[finite_rows], oracle.embedding, k=1, metric="l1")[:, 0].tolist()
        for r, i in zip(finite_rows.nonzero().flatten().tolist(), ids):
            nearest_l1[r] = i
    out = []
    for r in range(n):
        out.append({"first_hit": {m: first[m][r] for m in METRICS}, "final_rank": {m: final_rank[m][r] for m in METRICS},
                    "steps_run": steps_run[r], "exit": exit_reason[r], "nonfinite": nonfinite[r],
                    "final_loss": last_loss[r] if math.isfinite(last_loss[r]) else None, "seconds": seconds[r],
                    "final_dist_to_truth": _finite(dist_truth[r]), "final_proxy_norm": _finite(proxy_norm[r]),
                    "true_norm": float(embedding_true_norm[r]), "final_nearest_l1": nearest_l1[r],
                    "traj_steps": traj_steps[r], "traj_rank": traj[r]})
    return out


# --- the projection inner loop ---------------------------------------------------------------


def projection_rows(oracle, prefix, targets: torch.Tensor, truth: torch.Tensor, init_tokens: torch.Tensor,
                    settings: list[ProjectionSetting], *, t: int, progress=None) -> list[dict]:
    """ProjectionAttack._search for R rows, each with its own setting (lr, normalisation, reset,
    loss). Steps count candidates checked; the true candidate passes `matches` and is accepted."""
    device, embedding = oracle.device, oracle.embedding
    vocab, d = embedding.shape
    n = len(settings)
    K = max(s.steps for s in settings)
    budget = torch.tensor([min(s.steps, vocab) for s in settings], device=device)
    periods = torch.tensor([reset_period(vocab, t, base=s.reset_base) for s in settings], device=device)
    sq_norms = embedding.pow(2).sum(dim=-1)
    proxy = embedding[init_tokens].clone()
    candidate = init_tokens.clone().to(device)
    banned = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    record_at = set(trajectory_steps(K))
    first = [None] * n
    accepted = [False] * n
    traj: list[list[int]] = [[] for _ in range(n)]
    traj_steps: list[list[int]] = [[] for _ in range(n)]
    final_rank = [None] * n
    steps_run = [0] * n
    seconds = [0.0] * n
    best_loss = [math.inf] * n
    grad_norms: list[list[float]] = [[] for _ in range(n)]

    def rank_unbanned(rows: torch.Tensor) -> torch.Tensor:
        dist = (sq_norms - 2 * proxy[rows] @ embedding.T).masked_fill(banned[rows], float("inf"))
        return ranks_from_scores(dist, truth[rows])

    rows = torch.arange(n, device=device)
    for k in range(K):
        tick = time.perf_counter()
        if k:
            reset = rows[(k % periods[rows]) == 0]
            if len(reset):
                proxy[reset] = embedding[candidate[reset]]
        # 1. check the current candidate (rank recorded for the candidate that is checked at step k+1)
        if k in record_at:
            rk = rank_unbanned(rows)
            for j, r in enumerate(rows.tolist()):
                traj[r].append(int(rk[j]))
                traj_steps[r].append(k)
        hidden = oracle.hidden_of_tokens(prefix.select(rows), candidate[rows, None])[:, 0]
        loss = mse(hidden, targets[rows])
        ok = matches(hidden, targets[rows], rtol=torch.tensor([settings[r].rtol for r in rows.tolist()])[:, None],
                     atol=torch.tensor([settings[r].atol for r in rows.tolist()])[:, None])
        is_true = candidate[rows] == truth[rows]
        for j, r in enumerate(rows.tolist()):
            steps_run[r] = k + 1
            best_loss[r] = min(best_loss[r], float(loss[j]))
            if bool(is_true[j]) and first[r] is None:
                first[r] = k + 1
            accepted[r] = accepted[r] or bool(ok[j])
        stop = ok | (k + 1 >= budget[rows])
        if stop.any():
            for j, r in enumerate(rows.tolist()):
                if bool(stop[j]):
                    final_rank[r] = 0 if bool(ok[j]) and bool(is_true[j]) else int(rank_unbanned(rows[j:j + 1])[0])
        live = rows[~stop]
        if len(live):
            # 2. proxy step, 3. ban and project
            leaf = proxy[live].detach().requires_grad_(True)
            with torch.enable_grad():
                h = oracle.hidden(prefix.select(live), leaf[:, None, :])[:, 0]
                err = (h - targets[live]).pow(2)
                per_row = torch.stack([err[j].sum() if settings[r].loss == "sse" else err[j].mean()
                                       for j, r in enumerate(live.tolist())])
                (grad,) = torch.autograd.grad(per_row.sum(), leaf)
            lr = torch.tensor([step_lr(k, period=int(periods[r]), lr=settings[r].lr, lr_min=settings[r].lr_min)
                               for r in live.tolist()], device=device)[:, None]
            norms = grad.norm(dim=-1)
            mode = [settings[r].grad for r in live.tolist()]
            scaled = torch.stack([
                unit_clip(grad[j:j + 1])[0] if m == "unit" else
                grad[j] if m == "raw" else grad[j] / norms[j].clamp(min=1e-12) * settings[r].fixed_norm
                for j, (m, r) in enumerate(zip(mode, live.tolist()))])
            proxy[live] = proxy[live] - lr * scaled
            banned[live, candidate[live]] = True
            candidate[live] = nearest_unbanned(proxy[live], embedding, sq_norms, banned[live])
            for j, r in enumerate(live.tolist()):
                if k in record_at:
                    grad_norms[r].append(float(norms[j]))
        spent = (time.perf_counter() - tick) / len(rows)
        for r in rows.tolist():
            seconds[r] += spent
        rows = live
        if progress:
            progress(1)
        if len(rows) == 0:
            break
    out = []
    for r in range(n):
        out.append({"first_hit": first[r], "accepted": accepted[r], "final_rank": final_rank[r],
                    "steps_run": steps_run[r], "best_loss": best_loss[r], "seconds": seconds[r],
                    "traj_steps": traj_steps[r], "traj_rank": traj[r],
                    "grad_norm_median": (sorted(grad_norms[r])[len(grad_norms[r]) // 2] if grad_norms[r] else None)})
    return out


# --- running settings ------------------------------------------------------------------------


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def study_settings(oracle, problems: Problems, attack: str, settings: list, *, on_group=None, done=None,
                   progress=None) -> dict[str, list[dict]]:
    """Run every setting on every studied position; rows of one prefix length (all settings
    stacked) go through one forward pass. Returns spec -> per-position records (in `positions`
    order). `done` (spec -> {group t: records}) skips finished groups; `on_group(spec, t, recs)`
    is called after each group (for checkpoints)."""
    done = done or {}
    tracker = RankTracker(oracle.embedding)
    results: dict[str, dict[int, list[dict]]] = {setting_name(s): dict(done.get(setting_name(s), {})) for s in settings}
    for t, members in problems.groups().items():
        todo = [s for s in settings if t not in results[setting_name(s)]]
        if attack == "continuous":
            # one batch per schedule: settings that differ only in lr and init share one loop
            by_key: dict[Any, list] = {}
            for s in todo:
                by_key.setdefault(dataclasses.replace(s, lr=0.05, init="random"), []).append(s)
            batches = list(by_key.values())
        else:
            batches = [todo] if todo else []
        for batch in batches:
            rows = [(s, i) for s in batch for i in members]
            usable = [(s, i) for s, i in rows if s.init != "ranker" or problems.ranker_top1 is not None]
            prompt_rows = torch.tensor([problems.positions[i][0] for _, i in usable])
            if not usable:
                recs = []
            else:
                prefix = oracle.prefix(problems.ids[prompt_rows, :t])
                targets = problems.targets[prompt_rows, t].to(oracle.device)
                truth = problems.ids[prompt_rows, t].to(oracle.device)
                if attack == "continuous":
                    init = torch.stack([oracle.embedding[int(start_tokens(problems, s.init, [i])[0])] if s.init != "zeros"
                                        else torch.zeros(oracle.embedding.shape[1], device=oracle.device)
                                        for s, i in usable])
                    recs = _continuous_mixed(oracle, prefix, targets, truth, init, usable, tracker, progress)
                else:
                    init_tokens = torch.cat([start_tokens(problems, s.init, [i]) for s, i in usable]).to(oracle.device)
                    recs = projection_rows(oracle, prefix, targets, truth, init_tokens, [s for s, _ in usable], t=t,
                                           progress=progress)
            it = iter(recs)
            for s in batch:
                group = []
                for i in members:
                    prompt, _ = problems.positions[i]
                    base = {"prompt": prompt, "t": t, "true_id": int(problems.ids[prompt, t])}
                    if s.init == "ranker" and problems.ranker_top1 is None:
                        group.append({**base, "skipped": problems.ranker_note})
                        continue
                    start = start_tokens(problems, s.init, [i])
                    group.append({**base, "start_id": None if start is None else int(start[0]), **next(it)})
                results[setting_name(s)][t] = group
                if on_group:
                    on_group(setting_name(s), t, group)
    return {spec: [rec for t in sorted(groups) for rec in groups[t]] for spec, groups in results.items()}


def _continuous_mixed(oracle, prefix, targets, truth, init, usable, tracker, progress):
    """Continuous rows of settings that share K (and every other field but lr and init, which are
    per row). Different weight decay / clip / threshold would need separate batches."""
    settings = [s for s, _ in usable]
    shared = {dataclasses.replace(s, lr=0.05, init="random") for s in settings}
    if len(shared) != 1:
        raise ValueError("continuous settings stacked in one batch must differ only in lr and init")
    lrs = torch.tensor([s.lr for s in settings], device=oracle.device)
    return continuous_rows(oracle, prefix, targets, truth, init, lrs, settings[0], tracker=tracker, progress=progress)


# --- diagnostics -----------------------------------------------------------------------------


def _loss_grad(oracle, prefix, points: torch.Tensor, targets: torch.Tensor):
    leaf = points.clone().requires_grad_(True)
    with torch.enable_grad():
        hidden = oracle.hidden(prefix, leaf[:, None, :])[:, 0]
        loss = mse(hidden, targets)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _q(values, qs=(0.1, 0.5, 0.9)) -> dict[str, float | None]:
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    x = x[torch.isfinite(x)]
    if not len(x):
        return {f"p{int(q * 100)}": None for q in qs}
    return {f"p{int(q * 100)}": float(x.quantile(q)) for q in qs}


def diagnose(oracle, problems: Problems, *, seed: int = 0) -> dict[str, Any]:
    """Embedding geometry and the loss landscape around the studied positions (see module doc)."""
    E = oracle.embedding
    V, d = E.shape
    gen = torch.Generator().manual_seed(seed)
    truth_all = torch.tensor([int(problems.ids[p, t]) for p, t in problems.positions])
    out: dict[str, Any] = {"vocab": V, "width": d}
    norms = E.norm(dim=1)
    out["row_norm"] = _q(norms)
    out["per_coordinate_std"] = float(E.std())
    geo = {}
    for label, ids in (("true_tokens", truth_all.unique()), ("random_500", torch.randint(V, (500,), generator=gen))):
        d2 = torch.cdist(E[ids], E)
        d2[torch.arange(len(ids)), ids] = float("inf")
        d1 = torch.cdist(E[ids], E, p=1.0)
        d1[torch.arange(len(ids)), ids] = float("inf")
        sorted2 = d2.sort(dim=1).values
        own = norms[ids]
        geo[label] = {"n": len(ids), "own_norm": _q(own), "nn_l2": _q(sorted2[:, 0]), "nn10_l2": _q(sorted2[:, 9]),
                      "nn100_l2": _q(sorted2[:, 99]), "nn_l1": _q(d1.min(dim=1).values),
                      "nn_l2_over_norm": _q(sorted2[:, 0] / own),
                      "within_half_norm": _q((d2 < 0.5 * own[:, None]).sum(dim=1).float()),
                      "nn1_nn100_ratio": _q(sorted2[:, 0] / sorted2[:, 99])}
    out["geometry"] = geo
    # Adam's first step moves every coordinate by ~lr (m / sqrt(v) = +-1): L2 step lr * sqrt(d)
    out["adam_first_step_l2"] = {f"{lr:g}": lr * math.sqrt(d) for lr in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)}
    per_pos: dict[str, list] = {k: [] for k in (
        "loss_random", "grad_random", "loss_zeros", "grad_zeros", "grad_zeros_nonfinite", "cos_to_truth_random",
        "radial_share_random", "line_monotone", "line_barrier", "cos_to_truth_midway", "dist_random_to_truth",
        "prior_is_true", "loss_prior", "cos_to_truth_prior")}
    radii = (0.01, 0.03, 0.1, 0.3, 1.0, 2.0)
    radial = (0.5, 0.8, 0.9, 0.95, 1.05, 1.1, 1.25, 2.0)
    per_radius = {f"{r:g}": {"loss": [], "grad": [], "true_l1_nearest": [], "true_l2_nearest": []} for r in radii}
    per_radial = {f"{a:g}": [] for a in radial}
    alphas = torch.linspace(0, 1, 21)
    for t, members in problems.groups().items():
        prompts = torch.tensor([problems.positions[i][0] for i in members])
        prefix = oracle.prefix(problems.ids[prompts, :t])
        tgt = problems.targets[prompts, t].to(oracle.device)
        truth = problems.ids[prompts, t]
        e_true = E[truth]
        e_rand = E[problems.random_init[prompts, t]]
        e_prior = E[problems.prior_top1[prompts, t]]
        loss, grad = _loss_grad(oracle, prefix, e_rand, tgt)
        per_pos["loss_random"] += loss.tolist()
        per_pos["grad_random"] += grad.norm(dim=1).tolist()
        per_pos["cos_to_truth_random"] += torch.cosine_similarity(-grad, e_true - e_rand, dim=1).tolist()
        per_pos["radial_share_random"] += ((grad * e_rand).sum(1).abs() / (grad.norm(dim=1) * e_rand.norm(dim=1))).tolist()
        per_pos["dist_random_to_truth"] += (e_true - e_rand).norm(dim=1).tolist()
        lz, gz = _loss_grad(oracle, prefix, torch.zeros_like(e_true), tgt)
        per_pos["loss_zeros"] += lz.tolist()
        per_pos["grad_zeros"] += gz.norm(dim=1).tolist()
        per_pos["grad_zeros_nonfinite"] += (~torch.isfinite(gz).all(dim=1)).tolist()
        lp, gp = _loss_grad(oracle, prefix, e_prior, tgt)
        per_pos["loss_prior"] += lp.tolist()
        per_pos["prior_is_true"] += (problems.prior_top1[prompts, t] == truth).tolist()
        per_pos["cos_to_truth_prior"] += torch.cosine_similarity(-gp, e_true - e_prior, dim=1).nan_to_num(1.0).tolist()
        # straight line from the random start to the truth
        line = []
        for a in alphas:
            la, ga = _loss_grad(oracle, prefix, (1 - a) * e_rand + a * e_true, tgt)
            line.append(la)
            if abs(float(a) - 0.5) < 1e-6:
                per_pos["cos_to_truth_midway"] += torch.cosine_similarity(-ga, e_true - e_rand, dim=1).tolist()
        line = torch.stack(line, dim=1)  # (R, 21)
        per_pos["line_monotone"] += (line[:, 1:] <= line[:, :-1] + 1e-9).all(dim=1).tolist()
        per_pos["line_barrier"] += ((line - line[:, :1]).clamp(min=0).amax(dim=1)).tolist()
        # loss, gradient and nearest-token status at a random point at distance r from the truth
        for r in radii:
            u = torch.randn(e_true.shape, generator=gen)
            p = e_true + r * u / u.norm(dim=1, keepdim=True)
            lr_, gr_ = _loss_grad(oracle, prefix, p, tgt)
            rec = per_radius[f"{r:g}"]
            rec["loss"] += lr_.tolist()
            rec["grad"] += gr_.norm(dim=1).tolist()
            rec["true_l1_nearest"] += (nearest_tokens(p, E, k=1, metric="l1")[:, 0] == truth).tolist()
            rec["true_l2_nearest"] += (nearest_tokens(p, E, k=1, metric="l2")[:, 0] == truth).tolist()
        for a in radial:
            la, _ = _loss_grad(oracle, prefix, a * e_true, tgt)
            per_radial[f"{a:g}"] += la.tolist()
    summary = {}
    for k, v in per_pos.items():
        if k in ("line_monotone", "grad_zeros_nonfinite", "prior_is_true"):
            summary[k] = {"fraction": sum(map(bool, v)) / len(v), "n": len(v)}
        else:
            summary[k] = _q(v)
    out["at_positions"] = summary
    out["around_truth"] = {r: {"loss": _q(v["loss"]), "grad": _q(v["grad"]),
                               "true_l1_nearest": sum(v["true_l1_nearest"]) / len(v["true_l1_nearest"]),
                               "true_l2_nearest": sum(v["true_l2_nearest"]) / len(v["true_l2_nearest"])}
                           for r, v in per_radius.items()}
    out["radial_loss"] = {a: _q(v) for a, v in per_radial.items()}
    # the first-hit of zeros at t = 0: an all-zero input stays exactly zero through every layer
    # (no prefix to attend to), so each RMSNorm's Jacobian there is weight / sqrt(eps)
    out["rms_norm_eps"] = getattr(oracle.model.config, "rms_norm_eps", None)
    return out


# --- CLI -------------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import platform

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def _load_oracle(model: str, device: str):
    from invbench.leaks.models import load_model
    from invbench.leaks.oracle import WhiteBox

    loaded = load_model(model, seed=0, notify=lambda _: None)
    # opened as the runner opens it, so that the guided attack's shipped ranker is found for init=ranker
    return loaded, WhiteBox.of(loaded, device=device)


def _positions(args) -> list[tuple[int, int]] | None:
    if not args.positions:
        return None
    ts = [int(x) for x in args.positions.split(",")]
    return [(p, t) for p in range(args.n) for t in ts]


def cmd_run(args) -> None:
    from tqdm import tqdm

    loaded, oracle = _load_oracle(args.model, args.device)
    problems = build_problems(loaded, oracle, n_prompts=args.n, tokens=args.tokens, per_prompt=args.per_prompt,
                              seed=args.seed, positions=_positions(args))
    if problems.ranker_top1 is None:
        print(f"note: {problems.ranker_note}", file=sys.stderr)
    settings = [parse_setting(args.attack, spec) for spec in args.settings]
    folder = Path(args.out) / args.model / args.attack
    done, files = {}, {}
    for s in settings:
        spec = setting_name(s)
        path = folder / f"{spec}.json"
        files[spec] = path
        if path.exists():
            data = json.loads(path.read_text())
            done[spec] = {int(t): recs for t, recs in data["groups"].items()}
    pending = [s for s in settings if len(done.get(setting_name(s), {})) < len(problems.groups())]
    if not pending:
        print("all settings done", file=sys.stderr)
        return
    # one bar step per loop step of a batch (stacked settings share it): continuous batches by
    # schedule, projection runs all its settings in one batch per group
    keys = {dataclasses.replace(s, lr=0.05, init="random") for s in pending} if args.attack == "continuous" else None
    total = (sum(k.steps for k in keys) if keys else max(s.steps for s in pending)) * len(problems.groups())
    bar = tqdm(total=total, desc=f"{args.model} {args.attack}", unit="step", mininterval=30)
    env = _environment()
    meta = {"schema": SCHEMA, "model": args.model, "attack": args.attack, "env": env, "command": " ".join(sys.argv),
            "source": problems.source, "positions": problems.positions, "ranker_note": problems.ranker_note,
            "cosine_ties": "a tied rank 0 is not a hit"}

    def save(spec, t, group) -> None:
        done.setdefault(spec, {})[t] = group
        setting = next(s for s in settings if setting_name(s) == spec)
        groups = done[spec]
        atomic_write(files[spec], json.dumps({**meta, "spec": spec, "setting": dataclasses.asdict(setting),
                                              "complete": len(groups) == len(problems.groups()),
                                              "groups": {str(k): v for k, v in sorted(groups.items())}}))
        bar.set_postfix_str(f"saved {spec} t={t}")

    def progress(n: int) -> None:
        bar.update(n)

    # the bar counts every row's full K; rows that finish early make it jump at the end of a group
    study_settings(oracle, problems, args.attack, pending, on_group=save, done=done, progress=progress)
    bar.close()


def cmd_diagnose(args) -> None:
    loaded, oracle = _load_oracle(args.model, args.device)
    problems = build_problems(loaded, oracle, n_prompts=args.n, tokens=args.tokens, per_prompt=args.per_prompt,
                              seed=args.seed, positions=_positions(args))
    start = time.perf_counter()
    out = diagnose(oracle, problems)
    out["seconds"] = time.perf_counter() - start
    out["env"] = _environment()
    out["command"] = " ".join(sys.argv)
    atomic_write(Path(args.out) / args.model / "diagnose.json", json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def cmd_list(args) -> None:
    for attack, cls in SETTING_CLASSES.items():
        print(attack + ": " + ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m invbench.studies.study_published", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--n", type=int, default=10, help="C4 prompts")
        p.add_argument("--tokens", type=int, default=10, help="tokens per prompt")
        p.add_argument("--per-prompt", type=int, default=3, help="positions studied per prompt (balanced design)")
        p.add_argument("--positions", default="0,4,8",
                       help="comma-separated position indices t studied in every prompt (empty: the balanced "
                            "design of --per-prompt, every t equally often)")
        p.add_argument("--seed", type=int, default=SEED, help="prompts and the attacks' random starts (as the CLI's)")
        p.add_argument("--device", default="cpu")
        p.add_argument("--out", default="study-runs", help="results folder")
        p.add_argument("--threads", type=int, default=1, help="torch threads (1 on the shared 2-core CPU)")

    run = sub.add_parser("run", help="run settings of one attack")
    common(run)
    run.add_argument("--attack", choices=sorted(SETTING_CLASSES), required=True)
    run.add_argument("--settings", nargs="+", default=["paper"], help="`paper` or key=value,... overrides")
    run.add_argument("--warm-start", choices=["none", "ranker"], default="none",
                     help="ranker: also run every setting with init=ranker (skipped with a note when "
                          "invbench.attacks.ranker is missing)")
    diag = sub.add_parser("diagnose", help="embedding geometry and landscape figures")
    common(diag)
    rep = sub.add_parser("report", help="tables, plot and compact results from the runs")
    rep.add_argument("--runs", default="study-runs")
    rep.add_argument("--md", default=None, help="markdown file whose tables section is rewritten")
    rep.add_argument("--png", default=None)
    rep.add_argument("--json", default=None)
    sub.add_parser("list", help="setting keys and defaults")
    args = parser.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "run":
        if args.warm_start == "ranker":
            args.settings = args.settings + [",".join(x for x in (spec if spec != "paper" else "", "init=ranker") if x)
                                             for spec in args.settings if "init=" not in spec]
        cmd_run(args)
    elif args.command == "diagnose":
        cmd_diagnose(args)
    elif args.command == "report":
        from invbench.studies.study_published_report import report

        report(Path(args.runs), md=args.md, png=args.png, json_out=args.json)
    else:
        cmd_list(args)


if __name__ == "__main__":
    main()
