"""guided: ranked verification with a certified stop (ours; exact like `scan`, at a fraction of its cost).

`scan` verifies every vocabulary token at every position; almost all of that work confirms what a
cheap ranker already knew. Per position t, with the prefix x1..x(t-1) committed:

1. Position 1 has no prefix, so h_1 depends on x_1 alone: the position-1 states of the whole
   vocabulary are a fixed codebook per (model, layer) (`invbench.leaks.codebook`, built once and
   cached). Position 1 is a lookup: the defence's `simulate` is applied to the codebook and the
   nearest entry wins, exactly as a full scan would decide.
2. Positions 2 and up: every token is ranked by the model's own prior p(x_t | prefix) plus a
   learned ranker's log p(x_t | h~_t) (`invbench.attacks.ranker`). The order verified is that
   ranking interleaved with the learned ranker's alone, so text the prior misjudges (random
   ids: passwords, keys) costs at most twice as much. Candidates are verified in that order with
   exact float32 forward passes after the committed prefix (its KV cache), in rounds that double
   (8, 8, 16, 32, ...), every prompt of the batch together; a prompt that stops costs no more work.
3. The stop:
   - noise-free defences: the first candidate whose (simulated) state is within `tolerance`
     (MSE) of the target is the token: certified, since the map from tokens to states is
     injective and float32 puts the true token at ~1e-12 and the nearest wrong one far above
     (measured: see `TOLERANCE_NOTE`);
   - noise of a known law (the defence's `noise_law`, scored through `attacks.likelihood`): a
     candidate passes when the law's statistic (Gaussian: the MSE) is below the level the true
     token stays under with probability 1 - `miss_probability` (Gaussian: sigma^2 chi2_d quantile
     / d; Laplace and dchi: Gamma quantiles). Several wrong tokens can pass once noise is large, so after
     the first pass verification goes on to `lookahead` times that many candidates (at least
     `min_noisy_candidates`) and the best verified candidate is committed;
   - no candidate passes: verification goes on through the whole vocabulary (or `max_candidates`,
     a stated budget) and commits the best, which is what `scan` commits. Noise-free, guided is
     as exact as scan, only slower on hard positions. Under noise it is not always: when wrong
     tokens pass first (noise far above the certified radius), the best of the lookahead can be
     worse than the truth that a full scan would find; the harness's search-failure check flags
     such misses and the verdict says inconclusive (seen on tiny-gpt2 at sigma 1.5 and on
     SmolLM2 under dp at Z 0.1);
   - a prompt whose position found no passing candidate almost surely has a wrong prefix (an
     earlier commit was wrong, so no token reproduces the target): its later positions verify at
     most `after_failure` candidates until one passes again. Exact match is lost either way, as
     it is for scan; this only stops a failed prompt from costing a full scan at every position.
     One exception, noise-free only: a discontinuous defence (top-k's mask, quantisation's
     rounding) can put a coordinate that sits on its boundary on one side in the capture's float
     path and on the other in the attack's KV-cached path, so the true token misses the strict
     test by one flipped coordinate or two (measured: top-k 256 on random ids, MSE 3e-3 against
     the usual 1e-12; which coordinates flip depends on the batch, so a rerun on 2 prompts lost a
     prompt that the 25-prompt entry decoded). When a candidate of the whole budget reproduces
     the target on all but `FLIP_COORDINATES` coordinates, that candidate is committed, even
     where another is nearer in plain MSE (a near twin of the token that the coarse defence maps
     close by), and the position ends `flipped`:
     the prefix is right, so the prompt keeps its full budget. Its recorded discrete loss is the
     trimmed MSE it was judged by, so the harness's failure detector does not flag it either.
4. Scoring of the candidates: `ml` commits the most likely simulated state under the law (the
   nearest under Gaussian noise, as `scan`); `map` (noisy defences only) the highest
   log-likelihood plus log prior (Gaussian: -d MSE / (2 sigma^2) + log p(x_t | prefix)), which
   wins once noise is large. Guided decides each position alone; `sequence` (attacks/sequence.py)
   decides the whole sequence with the same verification.

Recorded per position: `candidates` (exact forward passes; 0 at a codebook lookup) and `ended`
(certified; exhausted: the whole vocabulary verified without a pass; budget: stopped at
`max_candidates` or `after_failure` without a pass; codebook; flipped: no pass, but a candidate
agrees with the target on all but `FLIP_COORDINATES` coordinates).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from invbench.leaks.codebook import Codebook

from .base import (Attack, AttackError, AttackOutput, Candidates, chunk_size_option, distribution, mse, option,
                   position_values)
from .likelihood import Likelihood
from .ranker import Ranker, load_ranker
from .registry import register_attack

ENDINGS = ("certified", "exhausted", "codebook", "budget", "flipped")
CERTIFIED, EXHAUSTED, CODEBOOK, BUDGET, FLIPPED = range(5)
SCORINGS = ("ml", "map")
TOLERANCE_NOTE = "measured in bench/studies/GUIDED.md"
# Noise-free: a best candidate within `tolerance` of the target once its FLIP_COORDINATES largest
# squared errors are dropped has the right prefix (a discontinuous defence flipped those). A constant,
# not a config field: it changes no result but a flipped prompt's budget, and a field would change
# every entry's configuration hash.
FLIP_COORDINATES = 4


def ranks(score: torch.Tensor, *, groups: torch.Tensor | None = None) -> torch.Tensor:
    """Each token's place (R, V) in its row's descending order of `score` (0: the best), exactly
    what `score.argsort(dim=1, descending=True).argsort(dim=1)` gives, with one sort instead of two
    (the second only inverts a permutation: a scatter). `groups` (R,) may say which rows are copies
    of one another (sequence's hypotheses of one prompt share its learned-ranker row): rows equal to
    their group's first row take its places, sorted once (checked, so the result never changes)."""
    rows, vocab = score.shape
    if groups is not None and rows > 1:
        group = torch.unique_consecutive(groups, return_inverse=True)[1]  # 0, 0, 1, 1, 1, 2, ...
        heads = torch.searchsorted(group, torch.arange(int(group.max()) + 1, device=group.device))  # each one's first row
        if len(heads) < rows and torch.equal(score, score[heads[group]]):
            return ranks(score[heads])[group]
    order = score.argsort(dim=1, descending=True)
    places = torch.arange(vocab, device=score.device).expand(rows, vocab)
    return torch.empty_like(order).scatter_(1, order, places)


def interleaved_order(scores: list[torch.Tensor], *, groups: list[torch.Tensor | None] | None = None,
                      limit: int | None = None) -> torch.Tensor:
    """One ranking (R, V) of token ids from several scores (each (R, V), higher is better):
    first of the first, first of the second, ..., second of the first, ..., each token at its
    earliest place. Rank r of score j gets key k r + j (distinct), and keys are sorted. `groups`
    (one per score, or None): rows that are copies of one another, ranked once (see `ranks`). With
    `limit` (< V), only the first `limit` places (R, limit), from each score's top `limit` (no full sort).

    Cost matters here: under heavy noise `sequence` ranks 256 hypotheses x 49,152 tokens per prompt
    and position, and five full sorts per row took 28% of a destroyed-state run
    (bench/studies/HEAVY-NOISE.md). The keys are distinct integers below k V, so their order is a
    scatter into k V slots, not a sort; the result is identical token for token."""
    k = len(scores)
    rows, vocab = scores[0].shape
    if limit is not None and limit < vocab:
        return _interleaved_head(scores, limit)
    key = None
    for j, score in enumerate(scores):
        rank = ranks(score, groups=groups[j] if groups else None)
        slot = rank * k + j
        key = slot if key is None else torch.minimum(key, slot)
    rows, vocab = key.shape
    slots = torch.full((rows, k * vocab), -1, dtype=torch.long, device=key.device)
    slots.scatter_(1, key, torch.arange(vocab, device=key.device).expand(rows, vocab))
    return slots[slots >= 0].reshape(rows, vocab)  # every row fills exactly V of its k V slots


def _interleaved_head(scores: list[torch.Tensor], limit: int, tops: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """The first `limit` places of `interleaved_order`: every one of them is among some score's top
    `limit`, so only those are sorted (a token in several lists keeps its earliest slot). `tops`: a
    score's top `limit` ids where already known (None: computed here)."""
    k = len(scores)
    rows = len(scores[0])
    device = scores[0].device
    tops = tops or [None] * k
    ids = torch.cat([top if top is not None else score.topk(limit, dim=1).indices
                     for score, top in zip(scores, tops)], dim=1)  # (R, k limit)
    width = k * limit
    places = torch.arange(limit, device=device) * k
    slot = torch.cat([places + j for j in range(k)]).expand(rows, -1)
    # a token's copies side by side, earliest slot first: keep the first of each run
    by_token = (ids * width + slot).argsort(dim=1)
    sorted_ids = ids.gather(1, by_token)
    later = torch.zeros_like(sorted_ids, dtype=torch.bool)
    later[:, 1:] = sorted_ids[:, 1:] == sorted_ids[:, :-1]
    slot = slot.gather(1, by_token).masked_fill(later, width)
    return sorted_ids.gather(1, slot.argsort(dim=1)[:, :limit])


@dataclass(frozen=True)
class GuidedConfig:
    ranker: str = option("auto", "auto: the learned ranker (shipped, cached or fitted once) with the model's "
                         "prior; prior: the prior alone; or a ranker .safetensors file.")
    scoring: str = option("ml", "ml: the most likely simulated state under the defence's noise law (Gaussian: "
                          "the nearest); map: its log-likelihood plus the model's log prior (noisy defences).",
                          choices=SCORINGS)
    chunk_size: int = chunk_size_option()
    max_candidates: int = option(0, "candidates verified per position at most when none passes (0: the whole "
                                 "vocabulary, exact like scan).", min=0)
    after_failure: int = 64  # candidates per position once a prompt's position found none that passes
    first_round: int = 8  # candidates verified per prompt in the first two rounds; then doubling
    # Noise-free certified stop (MSE). The true token's MSE through the KV-cached path is ~1e-12 in
    # float32 and the nearest wrong token's >= 1e-4 on SmolLM2 and GPT-2-shaped models.
    tolerance: float = 1e-7
    miss_probability: float = 1e-4  # noisy stop: the true token fails the test with at most this
    lookahead: float = 4.0  # noisy stop: verify this many times the candidates of the first pass
    min_noisy_candidates: int = option(64, "under noise, candidates a position verifies at least before it stops at a "
                                       "pass (several wrong tokens can pass once noise is large).", min=1)
    codebook: bool = option(True, "position 1 by lookup in the codebook of every token's first state (built once "
                            "per model and layer, about a minute on 2 cores, then cached); false: verified in ranked "
                            "order like the later positions (exact without noise as well).")

    def validate(self) -> None:
        if self.scoring not in SCORINGS:
            raise AttackError(f"guided: --scoring must be ml or map, got {self.scoring!r}")
        if not isinstance(self.ranker, str) or not (self.ranker in ("auto", "prior") or Path(self.ranker).is_file()):
            raise AttackError(f"guided: --ranker {self.ranker!r} is not a file; use auto, prior or a ranker "
                              ".safetensors file")
        if self.chunk_size < 1 or self.first_round < 1 or self.min_noisy_candidates < 1 or self.after_failure < 1:
            raise AttackError("guided: --chunk-size, first_round, min_noisy_candidates and after_failure must be >= 1")
        if self.max_candidates < 0:
            raise AttackError(f"guided: --max-candidates must be >= 0 (0: the whole vocabulary), got {self.max_candidates}")
        if not (0 < self.miss_probability < 1 and self.tolerance >= 0 and self.lookahead >= 1):
            raise AttackError("guided: miss_probability in (0, 1), tolerance >= 0 and lookahead >= 1 are required")


class Skip(Protocol):
    """Which candidates of a round (R_active, M) need no forward pass, from the round's rows `active`,
    their candidates' log prior (R_active, M), and what the verification knows of every row so far:
    its `keep` best objectives (R, keep), lowest nll (R,), passes (R,) and the active rows' candidates walked."""

    def __call__(self, active: torch.Tensor, log_prior: torch.Tensor, *, objective: torch.Tensor,
                 lowest: torch.Tensor, passes: torch.Tensor, verified: torch.Tensor) -> torch.Tensor | None: ...


@dataclass
class GuidedState:
    """What one run needs at every position: the ranker, the simulated codebook, the stop level."""

    ranker: Ranker | None
    codebook: torch.Tensor | None  # (V, d) simulate(position-1 states)
    likelihood: Likelihood  # the defence's noise law: statistic, nll, threshold
    threshold: float  # the statistic the true token stays under (the certified stop)
    map: bool  # MAP scoring (noisy defences with scoring=map)
    failed: torch.Tensor  # (B,) prompts whose last verified position found no passing candidate
    targets: torch.Tensor  # (B, T, d) the defended states: the ranker also reads the next position's
    exact: "ExactScores | None" = None  # context-free leak point (layer 0): every token's likelihood, in place of a ranker

    def following(self, owner: torch.Tensor, position: int) -> torch.Tensor | None:
        """The defended states (R, d) one position after `position` of each row's prompt (None at the last)."""
        return self.targets[owner, position + 1] if position + 1 < self.targets.shape[1] else None


class ExactScores:
    """At a context-free leak point (layer 0) every candidate's state at a position is known without a
    forward pass (`WhiteBox.position_table`), so the learned ranker's estimate of p(x_t | h~_t) gives way
    to the exact log-likelihood of each token's simulated state under the defence's noise law (noise-
    free: minus the statistic, nearest first). Nothing is fitted: `--ranker auto` uses this there."""

    description = "the exact likelihood of every token's state (a context-free leak point: a table, no learned ranker)"

    def __init__(self, oracle, defense, likelihood: Likelihood) -> None:
        self.oracle, self.defense, self.likelihood = oracle, defense, likelihood
        self._position, self._table = -1, None

    def table(self, position: int) -> torch.Tensor:
        """simulate(the states of every token at `position`) (V, d), the latest position kept."""
        if position != self._position:
            self._position, self._table = position, self.defense.simulate(self.oracle.position_table(position))
        return self._table

    @torch.no_grad()
    def __call__(self, goal: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(goal | token) up to a constant (noise-free: minus the statistic) of the distinct goals
        (U, V) (a prompt's hypotheses share one), and each row's goal among them (R,)."""
        unique, inverse = torch.unique(goal, dim=0, return_inverse=True)
        statistic = self.likelihood.pairwise(unique, self.table(position))
        return (-self.likelihood.nll(statistic) if self.likelihood.noisy else -statistic), inverse


@register_attack
class GuidedAttack(Attack):
    name = "guided"
    config_class = GuidedConfig
    extra_labels = {"ended": ENDINGS}

    def __init__(self, config) -> None:
        super().__init__(config)
        self._resources: dict[tuple, Any] = {}  # per (weights, layer): ranker and codebook, loaded once
        self.ranker_description: str | None = None

    def setup(self, oracle, *, notify: Callable[[str], None] = print) -> None:
        self._load(oracle, notify)

    def _load(self, oracle, notify: Callable[[str], None]) -> tuple[Ranker | None, torch.Tensor | None]:
        """The ranker and codebook of this model and layer, loaded once, and the ranker's description
        that `diagnostics` reports (a finished run reopened never calls `prepare`)."""
        cfg = self.config
        key = (oracle.fingerprint, oracle.layer_index, cfg.ranker, cfg.codebook)
        if key not in self._resources:
            ranker = None if self.exact(oracle) else load_ranker(oracle, spec=cfg.ranker, notify=notify)
            codebook = Codebook(oracle, notify=notify).states() if cfg.codebook else None
            self._resources = {key: (ranker, codebook)}
        ranker, codebook = self._resources[key]
        self.ranker_description = (ExactScores.description if self.exact(oracle) else
                                   ranker.description if ranker is not None else "the model's prior alone")
        return ranker, codebook

    def exact(self, oracle) -> bool:
        """Whether candidates are ranked by their exact likelihood (a context-free leak point with --ranker auto)."""
        return oracle.context_free and self.config.ranker == "auto"

    def prepare(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
                notify: Callable[[str], None] = print) -> GuidedState:
        cfg = self.config
        ranker, codebook = self._load(oracle, notify)
        likelihood = Likelihood.of(defense, dim=oracle.embedding.shape[1])
        threshold = likelihood.threshold(miss_probability=cfg.miss_probability, tolerance=cfg.tolerance)
        simulated = defense.simulate(codebook) if codebook is not None else None
        return GuidedState(ranker, simulated, likelihood, threshold, map=self.uses_map(likelihood),
                           failed=torch.zeros(len(targets), dtype=torch.bool, device=oracle.device),
                           targets=targets.to(oracle.device),
                           exact=ExactScores(oracle, defense, likelihood) if self.exact(oracle) else None)

    def uses_map(self, likelihood: Likelihood) -> bool:
        """MAP scoring needs a likelihood: asked for, and the defence adds noise (without noise MAP is ML)."""
        return self.config.scoring == "map" and likelihood.noisy

    def propose(self, oracle, prefix, goal: torch.Tensor, *, defense, position: int, owner: torch.Tensor,
                state: GuidedState) -> Candidates:
        if position == 0 and state.codebook is not None:
            return self._lookup(oracle, goal, state)
        prior = oracle.log_prior(prefix)
        vocab = oracle.vocab_size
        budget = torch.full((len(goal),), self.config.max_candidates or vocab, device=goal.device)
        budget = torch.where(state.failed[owner], min(self.config.after_failure, vocab), budget.clamp(max=vocab))
        order = self._order(goal, prior, state, state.following(owner, position), position,
                            limit=self.order_limit(oracle, budget))
        found = self._verify(oracle, prefix, goal, order, prior, defense, state, budget=budget)
        ended = found.extras["ended"]
        state.failed[owner] = (ended != CERTIFIED) & (ended != FLIPPED)  # guided keeps no beams: rows are prompts
        for name in ("passes", "walked"):  # sequence's (attacks/sequence.py); guided records neither
            found.extras.pop(name)
        return found

    @staticmethod
    def order_limit(oracle, budget: torch.Tensor) -> int | None:
        """How much of the ranking to sort: the largest budget before the last layer (a (R, V) sort per
        position dominates the cost where candidates are cheap); at the last layer the whole ranking, as
        its committed results were made."""
        return None if oracle.final else int(budget.max())

    @staticmethod
    def _order(goal: torch.Tensor, prior: torch.Tensor, state: GuidedState,
               following: torch.Tensor | None, position: int, *, limit: int | None = None,
               owner: torch.Tensor | None = None) -> torch.Tensor:
        """Which tokens to verify first (R, V, or R x `limit`): the prior plus the learned ranker (which
        reads the row's defended state and the next position's), interleaved with the learned ranker
        alone (or the prior alone, without a ranker). At a context-free leak point the exact likelihood
        of every token stands in for the learned ranker. `owner` (R,): rows of one prompt (sequence's
        hypotheses) share the learned ranker's row, which is then ranked once per prompt."""
        if state.exact is not None:
            unique, inverse = state.exact(goal, position)
            learned = unique[inverse]
            if limit is not None and limit < prior.shape[1]:  # a prompt's rows share its own ranking: sorted once
                return _interleaved_head([learned + prior, learned], limit, [None, unique.topk(limit, dim=1).indices[inverse]])
        elif state.ranker is None:
            if limit is not None and limit < prior.shape[1]:
                return prior.topk(limit, dim=1).indices
            return prior.argsort(dim=1, descending=True)
        else:
            learned = state.ranker.log_probs(goal, state.likelihood.std, following)
        return interleaved_order([learned + prior, learned], groups=[None, owner], limit=limit)

    def _lookup(self, oracle, goal: torch.Tensor, state: GuidedState) -> Candidates:
        """Position 1: the best codebook entry (exact over the whole vocabulary, no forward pass)."""
        statistic, objective = self._codebook_scores(oracle, goal, state)
        best = objective.argmin(dim=1, keepdim=True)
        rows = len(goal)
        loss = statistic.gather(1, best) if state.likelihood.scores_mse else mse(state.codebook[best[:, 0]], goal)[:, None]
        return Candidates(best, loss, objective=objective.gather(1, best),
                          extras={"candidates": torch.zeros(rows, device=goal.device),  # on the rows' device:
                                  "ended": torch.full((rows,), float(CODEBOOK), device=goal.device)})  # run() indexes them

    def _codebook_scores(self, oracle, goal: torch.Tensor, state: GuidedState) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistic and the objective (both (R, V)) of every codebook entry as each row's first token."""
        statistic = state.likelihood.pairwise(goal, state.codebook)
        return statistic, self._objective(statistic, oracle.start_prior()[None, :], state)

    @staticmethod
    def _objective(statistic: torch.Tensor, log_prior: torch.Tensor, state: GuidedState) -> torch.Tensor:
        """What is minimised among verified candidates: the law's statistic (ml: the most likely
        state), or the negative log posterior, nll - log prior (map). The one place MAP is decided."""
        if not state.map:
            return statistic
        return state.likelihood.nll(statistic) - log_prior

    def _verify(self, oracle, prefix, goal: torch.Tensor, order: torch.Tensor, prior: torch.Tensor, defense,
                state: GuidedState, *, budget: torch.Tensor, keep: int = 1, skip: Skip | None = None) -> Candidates:
        """Verify candidates in `order` (R, V), all rows in lockstep rounds, until each row stops
        (a pass, or its `budget` (R,) of candidates spent). Returns each row's `keep` best verified
        candidates by objective, best first (inf where fewer were verified); an earlier candidate wins
        a tie. `skip` (sequence's, see `Skip`) may say which candidates of a round need no forward
        pass: they are walked past as if verified and passed, with an infinite objective."""
        cfg = self.config
        rows, vocab = len(order), oracle.vocab_size  # the ranking may hold only the first max(budget) places
        device = goal.device
        likelihood = state.likelihood
        best = {"token": torch.zeros(rows, keep, dtype=torch.long, device=device),
                "loss": torch.full((rows, keep), float("inf"), device=device),
                "objective": torch.full((rows, keep), float("inf"), device=device)}
        exact = not likelihood.noisy  # noise-free: also track the best by trimmed MSE (a flipped coordinate)
        nearest = {**{k: v[:, :1].clone() for k, v in best.items()},
                   "trimmed": torch.full((rows, 1), float("inf"), device=device)}
        first_pass = torch.zeros(rows, dtype=torch.long, device=device)  # candidates verified at the first pass; 0: none
        verified = torch.zeros(rows, dtype=torch.long, device=device)  # candidates walked past (skipped ones too)
        forwards = torch.zeros(rows, dtype=torch.long, device=device)  # forward passes: verified less skipped
        passes = torch.zeros(rows, dtype=torch.long, device=device)  # candidates that passed so far (and skipped ones)
        lowest = torch.full((rows,), float("inf"), device=device)  # lowest nll verified so far (for `skip`)
        ended = torch.full((rows,), float(EXHAUSTED), device=device)
        active = torch.arange(rows, device=device)
        done_so_far, size = 0, cfg.first_round
        while len(active):
            # Every row sees the same rounds (8, 8, 16, 32, ...) as it would alone, each cut at its own budget
            # (the candidates past it are masked): a prompt's answer never depends on the prompts beside it, so
            # verify's rerun of a subset reproduces each prompt (before: a round ended at the smallest budget
            # among the rows, and the rows that went on met other boundaries).
            columns = slice(done_so_far, min(order.shape[1], done_so_far + size))
            ids = order[active, columns]
            beyond = torch.arange(columns.start, columns.stop, device=device)[None, :] >= budget[active, None]
            log_prior = prior[active].gather(1, ids)
            skipped = None
            if skip is not None and done_so_far:
                skipped = skip(active, log_prior, objective=best["objective"], lowest=lowest, passes=passes,
                               verified=verified[active]) & ~beyond
            unmeasured = beyond if skipped is None else beyond | skipped
            statistic, loss, trimmed = self._measure(oracle, prefix.select(active), goal[active], ids, defense, state,
                                                     skipped=unmeasured).unbind(dim=-1)
            objective = self._objective(statistic, log_prior, state)
            found = {"token": ids, "loss": loss, "objective": objective, "trimmed": trimmed}
            self._merge(best, active, found)
            if exact:
                self._merge(nearest, active, found, by="trimmed")
            if skip is not None:
                lowest[active] = torch.minimum(lowest[active], likelihood.nll(statistic).min(dim=1).values)
            done_so_far = columns.stop
            verified[active] = torch.clamp(budget[active], max=done_so_far)
            passing = statistic < state.threshold
            forwards[active] += (~unmeasured).sum(dim=1)
            if skipped is not None:
                passing = passing | skipped  # what it could not change counts as what the test cannot tell apart
            passing = passing & ~beyond
            passes[active] += passing.sum(dim=1)
            newly = passing.any(dim=1) & (first_pass[active] == 0)
            first_pass[active[newly]] = columns.start + passing[newly].int().argmax(dim=1) + 1
            stop = self._stop(first_pass[active], verified[active], noisy=likelihood.noisy, passes=passes[active])
            spent = verified[active] >= budget[active]
            finished = stop | spent
            ended[active[spent & (budget[active] < vocab)]] = float(BUDGET)
            ended[active[finished & (first_pass[active] > 0)]] = float(CERTIFIED)
            active = active[~finished]
            size = cfg.first_round if done_so_far < 2 * cfg.first_round else done_so_far
        if exact:  # no pass: a candidate that agrees but for a few flipped coordinates is the token
            flipped = (ended != CERTIFIED) & (nearest["trimmed"][:, 0] < state.threshold)
            for k in best:
                best[k][flipped, 0] = nearest[k][flipped, 0]
            best["loss"][flipped, 0] = nearest["trimmed"][flipped, 0]  # the fit it was judged by (the detector's too)
            ended[flipped] = float(FLIPPED)
        return Candidates(best["token"], best["loss"], objective=best["objective"],
                          extras={"candidates": forwards.float(), "ended": ended, "passes": passes.float(),
                                  "walked": verified.float()})

    def _measure(self, oracle, prefix, goal: torch.Tensor, ids: torch.Tensor, defense, state: GuidedState, *,
                 skipped: torch.Tensor | None = None) -> torch.Tensor:
        """(R, M, 3): the law's statistic, the discrete loss (MSE) and the trimmed MSE of candidates
        `ids` (R, M) after each row's prefix, against each row's `goal` (R, d); inf where `skipped`
        (only the others go through the model, as a ragged batch of (row, token) pairs)."""
        cfg = self.config
        likelihood = state.likelihood
        exact = not likelihood.noisy

        def measure_against(goal_rows: torch.Tensor):
            def measure(hidden: torch.Tensor, _) -> torch.Tensor:
                simulated = defense.simulate(hidden)
                statistic = likelihood.statistic(goal_rows[:, None, :], simulated)
                loss = statistic if likelihood.scores_mse else mse(simulated, goal_rows[:, None, :])
                trimmed = self._trimmed_mse(simulated, goal_rows[:, None, :]) if exact else loss
                return torch.stack([statistic, loss, trimmed], dim=-1)
            return measure

        if skipped is None or not skipped.any():
            return oracle.hidden_of_tokens(prefix, ids, chunk_size=cfg.chunk_size, reduce=measure_against(goal))
        measured = torch.full((*ids.shape, 3), float("inf"), device=goal.device)
        row, column = (~skipped).nonzero(as_tuple=True)
        for pair in torch.arange(len(row), device=goal.device).split(cfg.chunk_size) if len(row) else ():
            r, c = row[pair], column[pair]  # one (row, token) pair per sequence: the row's prefix, then the token
            measured[r, c] = oracle.hidden_of_tokens(prefix.select(r), ids[r, c][:, None], chunk_size=len(pair),
                                                     reduce=measure_against(goal[r]))[:, 0]
        return measured

    @staticmethod
    def _trimmed_mse(simulated: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
        """The MSE without the FLIP_COORDINATES largest squared errors (what a few coordinates
        flipped across a discontinuous defence's boundary cannot move)."""
        errors = (simulated - goal).pow(2)
        drop = min(FLIP_COORDINATES, errors.shape[-1] - 1)
        dropped = errors.topk(drop, dim=-1).values.sum(dim=-1) if drop else 0.0
        return (errors.sum(dim=-1) - dropped) / (errors.shape[-1] - drop)

    @staticmethod
    def _merge(best: dict[str, torch.Tensor], rows: torch.Tensor, found: dict[str, torch.Tensor], *,
               by: str = "objective") -> None:
        """Keep, per row, the best of `best` and this round's `found` by `by`; a stable sort, so
        what was found earlier wins a tie (as the ranking put it first)."""
        keep = best[by].shape[1]
        joined = {k: torch.cat([best[k][rows], found[k]], dim=1) for k in best}
        order = joined[by].sort(dim=1, stable=True).indices[:, :keep]
        for k in best:
            best[k][rows] = joined[k].gather(1, order)

    def _stop(self, first_pass: torch.Tensor, verified: torch.Tensor, *, noisy: bool, passes: torch.Tensor) -> torch.Tensor:
        """Which rows stop after `verified` (R,) candidates each, given where each first passed (0: not
        yet) (and how many passed, which guided does not use)."""
        passed = first_pass > 0
        if not noisy:
            return passed  # certified: the passing candidate is the token
        enough = torch.clamp(torch.ceil(first_pass.float() * self.config.lookahead), min=self.config.min_noisy_candidates)
        return passed & (verified >= enough)

    # --- what the harness asks of every attack ----------------------------------------------------
    @torch.no_grad()
    def objective(self, oracle, targets: torch.Tensor, tokens: torch.Tensor, *, defense) -> torch.Tensor:
        """Per position (B, T): the noise law's statistic (ml; Gaussian: the MSE), or the negative log
        posterior nll - log p(x_t | x_<t) under MAP scoring with a noisy defence."""
        likelihood = Likelihood.of(defense, dim=targets.shape[-1])
        targets = targets.to(oracle.device)
        statistic = likelihood.statistic(targets, defense.simulate(oracle.capture(tokens.to(oracle.device))))
        if not self.uses_map(likelihood):
            return statistic
        return likelihood.nll(statistic) - oracle.log_prior_of(tokens)

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        return float(out.extras["candidates"].mean()) * 2 * params

    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        """Candidates verified per token (forward passes; a codebook lookup needs none), how the
        positions ended, and which scoring ran."""
        endings = position_values(records, "ended")
        return {"scoring": self.scoring_used(defense),
                "candidates_per_token": distribution(position_values(records, "candidates")),
                "ended": {name: endings.count(name) / len(endings) for name in ENDINGS} if endings else {},
                "ranker": self.ranker_description}

    def scoring_used(self, defense) -> str:
        """Which scoring ran: map needs noise (without it MAP is ML)."""
        law = defense.noise_law
        if self.config.scoring == "map" and law is not None:
            name, params = law_words(law)
            return f"map ({name} likelihood, {params}, plus the model's prior)"
        if law is not None and law.name != "gaussian":
            name, params = law_words(law)
            return f"ml (most likely simulated state under {name} noise, {params})"
        return "ml (nearest simulated state)" + (" (map asked; the defence has no noise)" if self.config.scoring == "map" else "")


def law_words(law) -> tuple[str, str]:
    """A noise law in the words the diagnostics use: ("Gaussian", "sigma 0.3")."""
    described = law.describe()
    name = {"gaussian": "Gaussian", "laplace": "Laplace"}.get(described.pop("law"), law.name)
    return name, ", ".join(f"{k} {v}" if isinstance(v, str) else f"{k} {v:g}"  # digests and metric names as they are
                           for k, v in described.items())
