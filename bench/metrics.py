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


def tpr_at_fpr(*, scores: Sequence[float], failed: Sequence[bool], fpr: float = 0.01) -> float | None:
    """Fraction of failed prompts flagged by the lowest threshold that flags at most `fpr` of the
    exact ones (flag = score above the threshold). None when a class is missing."""
    scores, failed = np.asarray(scores, dtype=float), np.asarray(failed, dtype=bool)
    if failed.all() or not failed.any():
        return None
    negatives = np.sort(scores[~failed])
    allowed = int(np.floor(fpr * len(negatives)))  # exact prompts we may flag
    threshold = negatives[len(negatives) - 1 - allowed]
    return float((scores[failed] > threshold).mean())


def default_flag_threshold(*, noise_std: float, tokens: int, dim: int, float_floor: float = 1e-8) -> float:
    """Ground-truth-free threshold on the cumulative discrete loss, calibrated from the defence's
    known noise level. For an exactly recovered prompt each position's discrete loss is the mean
    of `dim` squared noise draws, so the cumulative loss is noise_std^2 * chi2(tokens*dim) / dim:
    mean T*s^2, standard deviation T*s^2*sqrt(2/(T*d)). Flag above the mean plus 5 standard
    deviations, plus a float32 floor per position (exact tokens score ~1e-11 without noise,
    wrong ones 1e-4 and above)."""
    mean = tokens * noise_std ** 2
    return mean * (1 + 5 * math.sqrt(2 / (tokens * dim))) + tokens * float_floor


PRIVACY_METRICS = ("exact_match", "token_accuracy", "similarity")


def worst_case(attacks: dict[str, dict]) -> dict[str, dict]:
    """For each privacy metric, the highest value over attacks (the strongest attack) and which
    attack reached it. The one rule for "the strongest attack": a tie goes to the attack that is
    stronger by the other metrics, in order (so at exact match 0 for all, the one that recovers
    most tokens), and then to the name that sorts first, whatever order the attacks come in, so a
    run, its entry and the board agree."""
    out = {}
    for key in PRIVACY_METRICS:
        order = (key, *(k for k in PRIVACY_METRICS if k != key))
        name = min(attacks, key=lambda a: (*(-attacks[a][k] for k in order), a))
        out[key] = {"value": attacks[name][key], "attack": name}
    return out


def json_safe(value):
    """Recursively replace non-finite floats with None (JSON has no inf/NaN)."""
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
