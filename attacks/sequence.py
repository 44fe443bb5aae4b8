"""sequence: sequence-level decoding under noise (ours): the most probable whole text, not each token alone.

`guided` decides each position alone: position 1 is the nearest codebook entry, position t the best
verified token after the committed prefix. Under heavy noise that throws evidence away. A prompt's
first state h_1 varies little between tokens (measured on SmolLM2 at sigma 0.3: the codebook lookup
gets the first token right for 2 of 16 held-out prompts), but every later state depends on x_1 as
well, and there the evidence is strong: with the true x_1, the true x_2's state fits y_2 far better
than any token's state after a wrong x_1 (bench/SEQUENCE.md). So this attack searches the sequence
objective itself, the negative log posterior of the whole text under the defence's noise law,

    sum_t nll(y_t | simulate(h_t(x_1..t))) - log p(x_1..T)     (map; ml drops the prior),

with guided's ranked verification as the step, by beam search over hypotheses (prefixes):

1. Position 1: every codebook entry is scored (no forward pass); the hypotheses are the entries
   within `margin` nats of the best, at most `hypotheses` of them.
2. Each later position: every hypothesis verifies candidates in guided's order (its prior plus the
   learned ranker) and stop (a pass of the noise law's test, then `lookahead`). The best hypothesis
   verifies up to `wide` candidates, the one ranked r-th up to max(`narrow`, `wide` // r): a wrong
   hypothesis, whose states no token reproduces, is given up cheaply. If no hypothesis of a prompt
   passes, the most promising one continues as guided would (the whole vocabulary, or
   `max_candidates`; `after_failure` once a hypothesis has failed before).
3. The extensions (each hypothesis' `keep` best verified tokens) within `margin` nats of the
   prompt's best become the next hypotheses, at most `hypotheses`. After `max_forwards` candidate
   forwards a prompt keeps only its best hypothesis (the stated per-prompt budget).
4. The answer is the prompt's best hypothesis at the last position.

Exactness. A prompt whose decision is never close (every runner-up more than `margin` nats behind,
as on clean states and light noise) keeps one hypothesis throughout and is decoded exactly as
`guided` decodes it, at guided's cost. Noise-free defences have no likelihood to weigh hypotheses
by, so they are decoded by guided's loop outright (where guided is as exact as `scan`). Under noise
the search is a beam search, not an exhaustive one: the truth can be dropped (its first token
outside the kept hypotheses, a token outside the verified candidates), and the harness's
search-failure check flags every miss where the truth scores better than the answer under this
same objective.

Destroyed states (flat positions, bench/studies/HEAVY-NOISE.md). Where the noise is so large that
(nearly) every candidate passes the noise law's test, the test cannot tell tokens apart and the prior
decides; the beam then fills to `hypotheses` and every hypothesis spends its whole budget, an hour per
25-prompt entry on a 2-core CPU. While every verified position of a prompt has been flat, it keeps at
most `flat_hypotheses` hypotheses, and they skip candidates whose prior alone rules them out
(`SequenceConfig`'s notes say what was measured). Clean states and light noise never meet that rate,
so nothing changes there.

Recorded per position (prompt): `candidates` (exact forward passes of all its hypotheses),
`hypotheses` (how many were alive), `flat` (1 where the position was flat), and of the answer's own
hypothesis `ended` (as guided's) and `rank` (its place among the prompt's hypotheses: how deep in the
beam the answer came from).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from invbench.leaks.oracle import PrefixTree

from .base import AttackError, AttackOutput, distribution, mse, option, position_values
from .guided import CERTIFIED, CODEBOOK, ENDINGS, GuidedAttack, GuidedConfig, GuidedState, SCORINGS
from .registry import register_attack

ROW_CHUNK = 256  # hypotheses verified together (each holds a (V,) ranking: 256 x 49,152 ids is 100 MB)
# Where no hypothesis of a prompt passes, its most promising ones verify deeper, round by round:
# (how many, budget each); None: guided's own budget (the whole vocabulary, or --max-candidates).
DEEPENING = ((16, 64), (4, 512), (1, None))


@dataclass(frozen=True)
class SequenceConfig(GuidedConfig):
    scoring: str = option("map", "map: the whole text's log-likelihood under the defence's noise law plus the "
                          "model's log prior; ml: the likelihood alone (text no prior describes, e.g. random ids).",
                          choices=SCORINGS)
    hypotheses: int = option(256, "hypotheses (prefixes) kept per prompt at most.", min=1)
    margin: float = option(20.0, "nats: a hypothesis is kept while its objective is within this of the best.", min=0)
    max_forwards: int = option(50_000, "candidate forwards per prompt after which only its best hypothesis is "
                               "kept (the per-prompt budget of the search).", min=1)
    noisy_max_candidates: int = option(8192, "under noise, candidates a position verifies at most (noise-free: "
                                       "guided's --max-candidates).", min=1)
    keep: int = 4  # verified candidates per hypothesis that may become hypotheses
    # Noisy stop: where many wrong tokens pass the test (heavy noise), a pass says little, so after
    # the first pass verification goes on to `per_pass` candidates per pass seen (at most `wide`).
    per_pass: int = 16
    wide: int = 1024  # candidates the best hypothesis of several verifies before the others are heard
    second: int = 256  # candidates the second-best verifies; the r-th (from 0) second // r
    narrow: int = 8  # candidates every hypothesis verifies at least
    # Flat positions (bench/studies/HEAVY-NOISE.md). A verified position is flat for a prompt where at
    # least `flat_pass` of the candidates its hypotheses walked past pass the noise law's test: the test
    # cannot tell tokens apart there. A prompt is destroyed while every verified position so far was flat
    # (under gaussian sigma 10, dp Z 1 and Laplace eps 8 every candidate of every position passes; under
    # sigma 3 at most 82% of a position's did; under dp Z 0.1 flat and telling positions alternate). On
    # destroyed states the likelihood spreads a position's candidates over a few nats (4-37 measured)
    # and the prior decides. There:
    # - a prompt keeps at most `flat_hypotheses` hypotheses (measured without the cap: the answer's
    #   hypothesis ranked at most 7th after the first verified position, while 46% of the forwards went
    #   to those ranked 33rd to 256th; with it, at most 20th);
    # - from the second verified position on, a hypothesis whose own candidates pass at that rate does not
    #   verify a candidate whose prior alone puts it out of reach (MAP scoring): even with an nll
    #   `flat_slack` nats under the lowest its prompt verified so far at this position, it would neither
    #   enter its hypothesis' `keep` best nor come within `margin` of the prompt's best (measured on
    #   destroyed states: no candidate's nll fell more than 4.1 nats under that floor; where the test
    #   tells tokens apart a candidate's fell 69 nats under it, hence the destroyed prompts only).
    # A prompt with a telling position is searched as before from then on (capping the beam where flat
    # and telling positions alternate cost one dp Z 0.1 prompt 20 nats and two tokens); clean states and
    # light noise never meet the rate, so nothing changes there.
    flat_pass: float = 0.99  # above 1: no position is flat (the search before issue 38)
    flat_slack: float = 5.0
    flat_hypotheses: int = 32

    def validate(self) -> None:
        super().validate()
        if min(self.hypotheses, self.keep, self.narrow, self.per_pass, self.max_forwards, self.noisy_max_candidates) < 1 \
                or not self.narrow <= self.second <= self.wide:
            raise AttackError("sequence: --hypotheses, --max-forwards, --noisy-max-candidates, keep, narrow and per_pass "
                              "must be >= 1, and narrow <= second <= wide")
        if not (self.flat_pass > 0 and self.flat_slack >= 0 and self.flat_hypotheses >= 1):
            raise AttackError("sequence: flat_pass must be > 0 (above 1: no position is flat), flat_slack >= 0 and "
                              "flat_hypotheses >= 1")
        if not self.margin >= 0:
            raise AttackError(f"sequence: --margin must be a number >= 0 (nats), got {self.margin!r}")


def _share(values: list) -> float | None:
    """The fraction of true (1) values, None for none."""
    return sum(float(v) for v in values) / len(values) if values else None


def group_rank(owner: torch.Tensor) -> torch.Tensor:
    """Each row's place within its run of equal `owner` values (rows of a prompt are contiguous)."""
    index = torch.arange(len(owner), device=owner.device)
    starts = torch.ones_like(owner, dtype=torch.bool)
    starts[1:] = owner[1:] != owner[:-1]
    return index - torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=0).values


def whole_prompts(index: torch.Tensor, budget: torch.Tensor, owner: torch.Tensor,
                  size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`index` (rows of several prompts, each prompt's together) and their `budget` in chunks of at most
    `size` rows that never split a prompt (a prompt of more rows is a chunk of its own): what a chunk
    decides about a prompt (its flat skip's floor) then depends on that prompt alone, not on where the
    prompts before it put the chunk's boundary."""
    prompts = owner[index]
    starts = torch.ones_like(prompts, dtype=torch.bool)
    starts[1:] = prompts[1:] != prompts[:-1]
    bounds = starts.nonzero().flatten().tolist() + [len(index)]
    chunks, first = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - first > size and start > first:  # this prompt would not fit beside the chunk's
            chunks.append((index[first:start], budget[first:start]))
            first = start
    if first < len(index):
        chunks.append((index[first:], budget[first:]))
    return chunks


@dataclass
class Hypotheses:
    """The live prefixes of every prompt, flat (R rows), each prompt's rows together, best first."""

    tokens: torch.Tensor  # (R, t)
    score: torch.Tensor  # (R,) objective so far, in nats (the search's sum)
    owner: torch.Tensor  # (R,) the prompt of each row
    failed: torch.Tensor  # (R,) whether the row's last position found no passing candidate
    history: dict[str, torch.Tensor]  # name -> (R, t) per-position values along each row's lineage
    node: torch.Tensor | None = None  # (R,) before the last layer: each row's node in the run's PrefixTree


@register_attack
class SequenceAttack(GuidedAttack):
    name = "sequence"
    config_class = SequenceConfig
    extra_labels = {"ended": ENDINGS}

    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Callable[[int, int], None] | None = None, notify: Callable[[str], None] = print) -> AttackOutput:
        state = self.prepare(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed, notify=notify)
        if not state.likelihood.noisy or state.codebook is None:
            # no likelihood to weigh hypotheses by (or no codebook): guided's per-position loop
            return super().run(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed,
                               progress=progress, notify=notify)
        batch, length, _ = targets.shape
        targets = targets.to(oracle.device)
        seconds = torch.zeros(batch, length)
        spent = torch.zeros(batch, device=oracle.device)  # candidate forwards per prompt
        per_prompt = {"candidates": torch.zeros(batch, length), "hypotheses": torch.zeros(batch, length),
                      "flat": torch.zeros(batch, length)}
        rows = None
        # Before the last layer a candidate is cheap and a hypothesis' prior (a forward of its whole prefix
        # through the whole model) is not: the hypotheses' caches are kept in a tree, each extended by its
        # new token. (At the last layer prefixes are recomputed, as the committed results were made.)
        tree = None if oracle.final else PrefixTree(oracle, chunk=ROW_CHUNK)
        for t in range(length):
            start = time.perf_counter()
            if t == 0:
                rows = self._first(oracle, targets, state)
                forwards = torch.zeros(batch, device=oracle.device)
                flat = torch.zeros(batch, dtype=torch.bool, device=oracle.device)  # the codebook's position: never
                destroyed = flat  # prompts every verified position of which so far was flat (none yet)
            else:
                rows, forwards, flat, destroyed = self._extend(oracle, rows, t, defense, state, spent=spent,
                                                               destroyed=destroyed, tree=tree)
            if tree is not None and t + 1 < length:
                rows.node = tree.append(None if t == 0 else tree.prune(rows.node), rows.tokens[:, -1])
            spent += forwards
            per_prompt["candidates"][:, t] = forwards.cpu()
            per_prompt["flat"][:, t] = flat.float().cpu()
            per_prompt["hypotheses"][:, t] = torch.bincount(rows.owner, minlength=batch).float().cpu()
            seconds[:, t] = (time.perf_counter() - start) / batch
            if progress:
                progress(t + 1, length)
        answer = self._most_promising(rows.score, rows.owner, 1)  # each prompt's best hypothesis
        losses = rows.history.pop("discrete_loss")[answer]
        extras = {"ended": rows.history["ended"][answer].cpu(), "rank": rows.history["rank"][answer].cpu(), **per_prompt}
        return AttackOutput(rows.tokens[answer].cpu(), losses.cpu(), seconds, extras)

    # --- the search -----------------------------------------------------------------------------
    @staticmethod
    def _nats(objective: torch.Tensor, state: GuidedState) -> torch.Tensor:
        """What the search sums, in nats, from guided's objective: under map that already is
        nll - log prior; under ml it is the law's statistic, whose nll is taken."""
        return objective if state.map else state.likelihood.nll(objective)

    def _first(self, oracle, targets: torch.Tensor, state: GuidedState) -> Hypotheses:
        """Position 1: the codebook entries within `margin` nats of each prompt's best, at most
        `hypotheses`; where more are that close, those the learned ranker finds likeliest given the
        first two defended states (the second depends on x_1 too). Best (by that order) first.
        Never flat: first states vary little between tokens, so most of the codebook passes the test
        even under light noise, and the later positions tell the hypotheses apart."""
        goal = targets[:, 0]
        statistic, objective = self._codebook_scores(oracle, goal, state)
        score = self._nats(objective, state)
        close = score <= score.min(dim=1, keepdim=True).values + self.config.margin
        key = score.clone()
        if state.ranker is not None:
            key = key - state.ranker.log_probs(goal, state.likelihood.std, state.following(torch.arange(len(goal), device=goal.device), 0))
        key = torch.where(close, key, float("inf"))
        width = min(self.config.hypotheses, key.shape[1])
        value, token = key.sort(dim=1, stable=True)
        alive = torch.isfinite(value[:, :width])
        owner, column = alive.nonzero(as_tuple=True)
        chosen = token[owner, column]
        stat = statistic[owner, chosen]
        loss = stat if state.likelihood.scores_mse else mse(state.codebook[chosen], goal[owner])
        history = {"discrete_loss": loss[:, None], "ended": torch.full((len(owner), 1), float(CODEBOOK), device=goal.device),
                   "rank": column[:, None].float()}
        return Hypotheses(chosen[:, None], score[owner, chosen], owner, torch.zeros_like(owner, dtype=torch.bool), history)

    def _width(self, destroyed: torch.Tensor) -> torch.Tensor:
        """Hypotheses each prompt may keep: `hypotheses`, or `flat_hypotheses` where destroyed."""
        cfg = self.config
        return torch.where(destroyed, min(cfg.hypotheses, cfg.flat_hypotheses), cfg.hypotheses)

    def _extend(self, oracle, rows: Hypotheses, position: int, defense, state: GuidedState, *,
                spent: torch.Tensor, destroyed: torch.Tensor,
                tree: PrefixTree | None = None) -> tuple[Hypotheses, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One position: verify every hypothesis' candidates, keep the best extensions per prompt.
        `destroyed` (B,): prompts every earlier verified position of which was flat (none before the
        first). Returns the new hypotheses, the forwards each prompt spent, whether its position was
        flat, and `destroyed` after it."""
        cfg = self.config
        goal = state.targets[:, position]
        vocab = oracle.vocab_size
        full = min(cfg.noisy_max_candidates, vocab)  # when nothing passes (guided: the whole vocabulary)
        alone = torch.bincount(rows.owner, minlength=len(goal))[rows.owner] == 1
        rank = group_rank(rows.owner)
        # a prompt's only hypothesis is verified as guided verifies; among several, the best gets
        # `wide`, the r-th `second` // r, and every one at least `narrow`
        ranked = torch.clamp(cfg.second // rank.clamp(min=1), min=cfg.narrow)
        budget = torch.where(alone, full, torch.where(rank == 0, cfg.wide, ranked)).clamp(max=full)
        budget = self._after_failure(budget, rows.failed)
        everyone = torch.arange(len(rows.owner), device=goal.device)
        found = self._verify_rows(oracle, rows, everyone, position, defense, state, budget=budget, destroyed=destroyed,
                                  tree=tree)
        for width, deeper in DEEPENING:
            # a prompt none of whose hypotheses passed: its `width` most promising ones verify deeper
            passed = torch.zeros(len(goal), dtype=torch.bool, device=goal.device)
            passed[rows.owner[found["ended"] == CERTIFIED]] = True
            total = rows.score + found["score"][:, 0]
            again = self._most_promising(total, rows.owner, width)
            again = again[~passed[rows.owner[again]] & ~alone[again]]
            more = self._after_failure(torch.full((len(again),), min(deeper or full, full), device=goal.device,
                                                  dtype=torch.long), rows.failed[again])
            again, more = again[more > budget[again]], more[more > budget[again]]
            if not len(again):
                continue
            result = self._verify_rows(oracle, rows, again, position, defense, state, budget=more, destroyed=destroyed,
                                       tree=tree)
            result["candidates"] += found["candidates"][again]  # it verified from the start again: both count
            result["passes"] += found["passes"][again]
            result["walked"] += found["walked"][again]
            budget[again] = more
            for key, value in result.items():
                found[key][again] = value
        total = rows.score[:, None] + found["score"]
        forwards = torch.zeros(len(goal), device=goal.device).index_add_(0, rows.owner, found["candidates"])
        passes, walked = (torch.zeros(len(goal), device=goal.device).index_add_(0, rows.owner, found[k]) for k in ("passes", "walked"))
        flat = passes >= cfg.flat_pass * walked.clamp(min=1)  # the pass rate of what the prompt's hypotheses walked past
        destroyed = flat & (destroyed if position > 1 else True)
        hypotheses = self._select(rows, found, total, keep_all=spent + forwards < cfg.max_forwards, destroyed=destroyed)
        return hypotheses, forwards, flat, destroyed

    def _after_failure(self, budget: torch.Tensor, failed: torch.Tensor) -> torch.Tensor:
        """A hypothesis whose last position found no passing candidate verifies at most
        `after_failure` (as guided: its prefix is almost surely wrong)."""
        return torch.where(failed, budget.clamp(max=self.config.after_failure), budget)

    @staticmethod
    def _most_promising(total: torch.Tensor, owner: torch.Tensor, width: int) -> torch.Tensor:
        """The rows (sorted) of each prompt's `width` lowest totals."""
        order = total.argsort(stable=True)
        order = order[owner[order].argsort(stable=True)]
        return order[group_rank(owner[order]) < width].sort().values

    def _verify_rows(self, oracle, rows: Hypotheses, index: torch.Tensor, position: int, defense,
                     state: GuidedState, *, budget: torch.Tensor, destroyed: torch.Tensor,
                     tree: PrefixTree | None = None) -> dict[str, torch.Tensor]:
        """guided's verification for the hypotheses `index` (with their `budget`), ROW_CHUNK at a time:
        each row's `keep` best candidates (token, discrete loss, score in nats), forwards, passes,
        candidates walked past and ending. Rows of `destroyed` prompts with several hypotheses may skip
        candidates (`_flat_skip`); a prompt's only hypothesis is verified as guided verifies it."""
        may_skip = (torch.bincount(rows.owner)[rows.owner] > 1) & destroyed[rows.owner]
        parts = []
        for rows_at, budget_at in whole_prompts(index, budget, rows.owner, ROW_CHUNK):
            prefix = oracle.prefix(rows.tokens[rows_at]) if tree is None else tree.prefix(rows.node[rows_at])
            prior = oracle.log_prior(prefix)
            owner = rows.owner[rows_at]
            goal_at = state.targets[owner, position]
            order = self._order(goal_at, prior, state, state.following(owner, position), position,
                                limit=self.order_limit(oracle, budget_at), owner=owner)
            skip = self._flat_skip(rows.score[rows_at], owner, may_skip[rows_at]) if state.map else None
            found = self._verify(oracle, prefix, goal_at, order, prior, defense, state,
                                 budget=budget_at, keep=self.config.keep, skip=skip)
            parts.append({"token": found.tokens, "loss": found.losses, "score": self._nats(found.objective, state),
                          **{k: found.extras[k] for k in ("candidates", "ended", "passes", "walked")}})
        return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

    def _flat_skip(self, score: torch.Tensor, owner: torch.Tensor, may_skip: torch.Tensor):
        """The candidates (MAP scoring) that a flat hypothesis need not verify (see `flat_pass`), for rows
        with these scores so far (R,), prompts (R,) and whether they may skip at all (R,)."""
        cfg = self.config

        def skip(active: torch.Tensor, log_prior: torch.Tensor, *, objective: torch.Tensor, lowest: torch.Tensor,
                 passes: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
            # the prompt's lowest nll and best total so far, over its rows (a chunk holds whole prompts)
            prompts = int(owner.max()) + 1
            floor = torch.full((prompts,), float("inf"), device=score.device).scatter_reduce(0, owner, lowest, "amin")
            best = torch.full((prompts,), float("inf"), device=score.device).scatter_reduce(
                0, owner, score + objective[:, 0], "amin")
            lower = (floor[owner] - cfg.flat_slack)[active, None] - log_prior  # its objective is at least this
            out_of_row = lower >= objective[active, -1:]  # would not enter its row's `keep` best
            out_of_margin = score[active, None] + lower > (best[owner] + cfg.margin)[active, None]
            flat = (passes[active] >= cfg.flat_pass * verified) & may_skip[active]  # verified: the active rows' own
            return (out_of_row | out_of_margin) & flat[:, None]

        return skip

    def _select(self, rows: Hypotheses, found: dict[str, torch.Tensor], total: torch.Tensor, *,
                keep_all: torch.Tensor, destroyed: torch.Tensor) -> Hypotheses:
        """The extensions within `margin` of each prompt's best, at most `hypotheses` (`flat_hypotheses`
        for `destroyed` prompts; only the best for prompts past `max_forwards`), as the next position's
        hypotheses, best first."""
        width = total.shape[1]
        flat = total.reshape(-1)
        parent = torch.arange(len(rows.owner), device=flat.device).repeat_interleave(width)
        order = flat.argsort(stable=True)  # by score, then (stable) by prompt: a prompt's rows best first
        order = order[rows.owner[parent[order]].argsort(stable=True)]
        flat, parent, column = flat[order], parent[order], order % width
        owner = rows.owner[parent]
        best = torch.full((len(keep_all),), float("inf"), device=flat.device).scatter_reduce(0, owner, flat, "amin")
        limit = torch.where(keep_all, self._width(destroyed), 1)[owner]
        alive = torch.isfinite(flat) & (flat <= best[owner] + self.config.margin) & (group_rank(owner) < limit)
        parent, column, owner = parent[alive], column[alive], owner[alive]
        steps = {"discrete_loss": found["loss"][parent, column], "ended": found["ended"][parent].float(),
                 "rank": group_rank(owner).float()}  # each new hypothesis' place in its prompt's beam
        history = {name: torch.cat([rows.history[name][parent], value[:, None]], dim=1) for name, value in steps.items()}
        tokens = torch.cat([rows.tokens[parent], found["token"][parent, column][:, None]], dim=1)
        return Hypotheses(tokens, flat[alive], owner, found["ended"][parent] != CERTIFIED, history,
                          node=None if rows.node is None else rows.node[parent])

    def _stop(self, first_pass: torch.Tensor, verified: torch.Tensor, *, noisy: bool, passes: torch.Tensor) -> torch.Tensor:
        """guided's stop, and under noise at least `per_pass` candidates per pass seen, at most `wide`
        (where only the true token passes this is guided's stop)."""
        guided = super()._stop(first_pass, verified, noisy=noisy, passes=passes)
        if not noisy:
            return guided
        crowded = verified >= torch.clamp(passes * self.config.per_pass, max=self.config.wide)
        return guided & crowded

    # --- what the harness asks of every attack ----------------------------------------------------
    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        """guided's figures, and how many hypotheses the search kept per position."""
        return {**super().diagnostics(records, defense=defense),
                "hypotheses_per_position": distribution(position_values(records, "hypotheses")),
                "flat_positions": _share(position_values(records, "flat")),
                "answer_rank_per_position": distribution(position_values(records, "rank")),
                "budget": {"hypotheses": self.config.hypotheses, "margin_nats": self.config.margin,
                           "max_forwards_per_prompt": self.config.max_forwards,
                           "noisy_max_candidates": self.config.noisy_max_candidates}}
