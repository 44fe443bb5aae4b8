"""The board's 95% intervals and ties (invbench.uncertainty), pinned to values computed by hand or by scipy."""
from __future__ import annotations

import pytest

from invbench.uncertainty import (exact_match_interval, intervals_of, mean_interval, overlaps, tied_ranks,
                                  worst_mean_interval)


def test_exact_match_interval_is_clopper_pearson():
    """0 of 25: [0, 1 - 0.025^(1/25)] = [0, 0.1372]; 25 of 25: [0.025^(1/25), 1] (the closed forms at the ends)."""
    low, high = exact_match_interval(successes=0, trials=25)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 25), rel=1e-9)
    low, high = exact_match_interval(successes=25, trials=25)
    assert low == pytest.approx(0.025 ** (1 / 25), rel=1e-9) and high == 1.0
    assert exact_match_interval(successes=3, trials=4) == pytest.approx((0.1941204497, 0.9936905368), abs=1e-9)


def test_a_constant_sample_has_a_point_interval_and_the_bootstrap_is_seeded():
    assert worst_mean_interval(values=[[1.0] * 25, [0.5] * 25]) == (1.0, 1.0)
    values = [[1.0] * 20 + [0.5] * 5, [0.9] * 25]
    assert worst_mean_interval(values=values) == worst_mean_interval(values=values)  # same values, same interval
    low, high = worst_mean_interval(values=values)
    assert 0.9 <= low <= 0.9 + 1e-12 and 0.95 <= high <= 1.0  # the max over attacks is never below 0.9


def test_the_worst_case_interval_resamples_prompts_together():
    """Two attacks that each miss a different prompt: a resample draws prompts, and both attacks' values of
    those prompts come with it, so the worst case of a resample is at least either attack's mean on it: the
    interval's low end is at least one attack's own."""
    a, b = [1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]
    low, _ = worst_mean_interval(values=[a, b])
    assert low >= mean_interval(values=a)[0]


def test_intervals_of_an_entry():
    found = intervals_of(token_accuracy={"x": [1.0, 0.5], "y": [0.0, 0.0]}, exact={"x": [True, False], "y": [False, False]},
                         worst_exact_attack="x", top1=None)
    assert found.worst_exact_match == pytest.approx(exact_match_interval(successes=1, trials=2))
    assert found.top1_agreement is None and found.worst_token_accuracy[0] >= 0.5


def test_ties_share_the_rank_of_their_groups_first_entry():
    intervals = [(0.0, 0.1), (0.05, 0.2), (0.15, 0.3), (0.5, 0.6), None]
    assert tied_ranks(intervals) == [(1, True), (1, True), (3, False), (4, False), (5, False)]
    # the third overlaps the second but not the group's first: a new group
    assert tied_ranks([(0.0, 0.1), (0.0, 0.1)], groups=[True, False]) == [(1, False), (2, False)]
    assert overlaps((0.0, 0.5), (0.5, 1.0)) and not overlaps((0.0, 0.4), (0.5, 1.0)) and not overlaps(None, (0, 1))
