"""95% intervals for the board's ranked numbers, from per-prompt values, and the ties they make.

A board of 25 prompts cannot tell 0.988 from 0.992 (one token in 250): every ranked number carries
the interval the prompts allow, and entries whose intervals overlap share a rank.

- exact match: the exact (Clopper-Pearson) binomial interval of k exact prompts in n
  (`scipy.stats.binomtest(...).proportion_ci`);
- token accuracy, top-1 agreement and the worst case over attacks: a percentile bootstrap over
  prompts (`scipy.stats.bootstrap`), paired across attacks (a resample draws prompts, and every
  attack's value of those prompts comes with it), seeded, so the same values give the same interval.

Every function takes keyword arguments only and returns (low, high); tests pin them to values
computed by hand or by scipy directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 4000  # percentile bootstrap: the interval's ends move by < 0.005 between seeds at n = 25
SEED = 20261206  # fixed: an entry's interval is a function of its values, not of the day it is rendered

Interval = tuple[float, float]


def exact_match_interval(*, successes: int, trials: int, level: float = LEVEL) -> Interval:
    """Clopper-Pearson interval of a proportion of `successes` in `trials`."""
    result = stats.binomtest(int(successes), int(trials)).proportion_ci(confidence_level=level, method="exact")
    return float(result.low), float(result.high)


def worst_mean_interval(*, values: Sequence[Sequence[float]], level: float = LEVEL, resamples: int = RESAMPLES,
                        seed: int = SEED) -> Interval:
    """Percentile-bootstrap interval of max over rows of each row's mean, resampling columns (prompts)
    together: `values` holds one row per attack, one column per prompt (one row: a plain mean)."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 2 or data.shape[1] == 0:
        raise ValueError("values must be one non-empty row per attack, one column per prompt")
    if np.all(data == data[:, :1]):  # every prompt alike: nothing to resample (scipy would warn)
        point = float(data.mean(axis=1).max())
        return point, point

    def worst_mean(*rows: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.max(np.stack([row.mean(axis=axis) for row in rows]), axis=0)

    result = stats.bootstrap(tuple(data), worst_mean, paired=True, vectorized=True, n_resamples=resamples,
                             method="percentile", confidence_level=level, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def mean_interval(*, values: Sequence[float], level: float = LEVEL, resamples: int = RESAMPLES,
                  seed: int = SEED) -> Interval:
    """Percentile-bootstrap interval of a mean over prompts."""
    return worst_mean_interval(values=[list(values)], level=level, resamples=resamples, seed=seed)


@dataclass(frozen=True)
class Intervals:
    """The 95% intervals of what a board ranks, for one entry or run (None where not measured)."""

    worst_token_accuracy: Interval | None
    worst_exact_match: Interval | None
    top1_agreement: Interval | None


def intervals_of(*, token_accuracy: dict[str, list[float]], exact: dict[str, list[bool]],
                 worst_exact_attack: str | None, top1: list[float] | None) -> Intervals:
    """From per-prompt values (per attack, in one prompt order): the worst case over attacks of token
    accuracy (bootstrap of the maximum of means), the worst-case attack's exact match (binomial), and
    top-1 agreement (bootstrap) where per-prompt utility was recorded."""
    rows = [values for values in token_accuracy.values() if values]
    tok = worst_mean_interval(values=rows) if rows and len({len(r) for r in rows}) == 1 else None
    hits = exact.get(worst_exact_attack) if worst_exact_attack else None
    em = exact_match_interval(successes=sum(hits), trials=len(hits)) if hits else None
    return Intervals(tok, em, mean_interval(values=top1) if top1 else None)


def overlaps(a: Interval | None, b: Interval | None) -> bool:
    """Whether two intervals share a point; an unknown interval is told apart from nothing."""
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def tied_ranks(intervals: list[Interval | None], *, groups: list[object] | None = None) -> list[tuple[int, bool]]:
    """Ranks for entries already in ranking order: an entry whose interval overlaps that of the first
    entry of the current tie group (and is in the same `groups` class: a conclusive entry never ties
    with an inconclusive one) shares its rank; otherwise it starts a new group at its place
    (competition ranking: 1, =1, 3). Returns (rank, tied) per entry."""
    groups = groups if groups is not None else [None] * len(intervals)
    ranks: list[tuple[int, bool]] = []
    leader = None
    for place, (interval, group) in enumerate(zip(intervals, groups), start=1):
        if leader is not None and groups[leader] == group and overlaps(intervals[leader], interval):
            ranks.append((ranks[leader][0], True))
            ranks[leader] = (ranks[leader][0], True)
        else:
            leader = place - 1
            ranks.append((place, False))
    return ranks
