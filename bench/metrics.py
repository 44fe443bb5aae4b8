"""Privacy metrics: per prompt, aggregated, and the ground-truth-free failure detector."""
from __future__ import annotations

import difflib
import math
from typing import Sequence

import numpy as np
from scipy.stats import mannwhitneyu


def exact_match(*, target: Sequence[int], recovered: Sequence[int]) -> bool:
    return list(target) == list(recovered)


def token_accuracy(*, target: Sequence[int], recovered: Sequence[int]) -> float:
    """Fraction of positions whose committed token is the true one."""
    return sum(a == b for a, b in zip(target, recovered)) / len(target)


def first_error(*, target: Sequence[int], recovered: Sequence[int]) -> int | None:
    """0-based position of the first wrong token, None when exact."""
    return next((i for i, (a, b) in enumerate(zip(target, recovered)) if a != b), None)


def similarity(*, target_text: str, recovered_text: str) -> float:
    """Character similarity of the decoded strings (difflib ratio, as the paper)."""
    return difflib.SequenceMatcher(None, target_text, recovered_text).ratio()


def detector_auroc(*, scores: Sequence[float], failed: Sequence[bool]) -> float | None:
    """ROC AUC of a score that should be higher for failed prompts (failed = positive), equal to
    the Mann-Whitney U statistic over n_pos * n_neg (ties count half). None when undefined:
    all prompts succeeded or all failed."""
    scores, failed = np.asarray(scores, dtype=float), np.asarray(failed, dtype=bool)
    if failed.all() or not failed.any():
        return None
    u = mannwhitneyu(scores[failed], scores[~failed], alternative="two-sided").statistic
    return float(u) / (failed.sum() * (~failed).sum())


def median(values: Sequence[float]) -> float | None:
    return float(np.median(values)) if len(values) else None


def finite_or_none(value: float | None) -> float | None:
    """JSON has no inf/NaN: store them as null."""
    return None if value is None or not math.isfinite(value) else float(value)
