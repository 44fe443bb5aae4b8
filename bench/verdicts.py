"""Honest verdicts: is a miss the defence's success or the attack's failure?

The benchmark knows the truth; the attacker does not. For every prompt and attack it compares the
attack's own objective (its `Attack.objective`: the summed discrete loss, or the negative log
posterior under MAP scoring) for the attack's answer and for the true sequence, both against the
same defended targets. If the truth scores better, the attack failed to optimise its own
objective: a **search failure**, whose miss says nothing about the defence (a stronger search on
the same objective could recover more). If the answer scores at least as well as the truth, the
defence made a wrong text explain the leaked states as well as the right one: evidence of
protection.

Verdicts, per attack and for the run, with the thresholds below (the one place they are set):
- `leaks`: the attack recovers the text: exact match >= LEAK_EXACT_MATCH, or token accuracy at
  least LEAK_TOKEN_GAIN above a blind guess (the model's most likely text, no states seen);
- `inconclusive`: it does not leak, but its search failures could hide a leak: exact match plus
  the search-failure rate reaches LEAK_EXACT_MATCH;
- `protected`: neither: the attack misses, and (nearly) all of its misses are the defence's doing.
The run's verdict is `leaks` if any attack leaks, else `protected` if some attack's evidence is
conclusive, else `inconclusive`. A verdict is only as strong as the attacks run: `protected`
means these attacks, searching their objectives well, recover nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .formats import cell
from .protocols import UTILITY_FLOOR

LEAK_EXACT_MATCH = 0.05  # at least 1 prompt in 20 recovered token for token
LEAK_TOKEN_GAIN = 0.10  # token accuracy 10 points above a blind guess
OBJECTIVE_RTOL = 1e-5  # the truth must beat the answer by more than float error
OBJECTIVE_ATOL_PER_TOKEN = 1e-9
VERDICTS = ("leaks", "protected", "inconclusive")
THRESHOLDS = {"leak_exact_match": LEAK_EXACT_MATCH, "leak_token_gain_over_blind": LEAK_TOKEN_GAIN,
              "objective_rtol": OBJECTIVE_RTOL, "objective_atol_per_token": OBJECTIVE_ATOL_PER_TOKEN}


def is_search_failure(*, truth: float, answer: float, tokens: int, exact: bool) -> bool:
    """A wrong answer that scores worse on the attack's own objective than the true sequence
    (lower is better), by more than float error."""
    if exact:
        return False
    return truth < answer - (OBJECTIVE_RTOL * abs(answer) + OBJECTIVE_ATOL_PER_TOKEN * tokens)


@dataclass(frozen=True)
class Evidence:
    """What one attack's records say, for its verdict."""

    exact_match: float
    token_accuracy: float
    search_failure_rate: float | None  # None: not measured (results of an older invbench)


def attack_verdict(evidence: Evidence, *, blind_token_accuracy: float | None) -> str | None:
    """leaks, protected or inconclusive (None when the search failures were not measured)."""
    gain = evidence.token_accuracy - (blind_token_accuracy or 0.0)
    if evidence.exact_match >= LEAK_EXACT_MATCH or gain >= LEAK_TOKEN_GAIN:
        return "leaks"
    if evidence.search_failure_rate is None:
        return None
    if evidence.exact_match + evidence.search_failure_rate >= LEAK_EXACT_MATCH:
        return "inconclusive"
    return "protected"


def run_verdict(verdicts: dict[str, str | None]) -> tuple[str | None, str | None]:
    """(the run's verdict, the attack it rests on) from the attacks' verdicts, in their order."""
    for wanted in VERDICTS:
        for attack, verdict in verdicts.items():
            if verdict == wanted:
                return verdict, attack
    return None, None


def explain(verdict: str | None, attack: str | None, *, exact_match: float, search_failure_rate: float | None,
            attacks: Iterable[str], token_accuracy: float | None = None,
            blind_token_accuracy: float | None = None, top1_agreement: float | None = None) -> str:
    """One sentence under the CLI table: what to conclude from the run, and, where the defence leaves the
    model's top-1 agreement under the board's utility floor, that it costs the model its predictions too."""
    said = _explain(verdict, attack, exact_match=exact_match, search_failure_rate=search_failure_rate,
                    attacks=attacks, token_accuracy=token_accuracy, blind_token_accuracy=blind_token_accuracy)
    if top1_agreement is not None and top1_agreement < UTILITY_FLOOR:
        said += (f" The defence also destroys the model's own predictions: top-1 agreement {top1_agreement:.3f}, under "
                 f"the boards' utility floor {UTILITY_FLOOR:g}.")
    return said


def _explain(verdict: str | None, attack: str | None, *, exact_match: float, search_failure_rate: float | None,
             attacks: Iterable[str], token_accuracy: float | None, blind_token_accuracy: float | None) -> str:
    names = ", ".join(attacks)
    if verdict == "leaks" and exact_match < LEAK_EXACT_MATCH and token_accuracy is not None:
        return (f"LEAKS: {attack} recovers part of the text (token accuracy {token_accuracy:.2f} against "
                f"{blind_token_accuracy or 0.0:.2f} for a blind guess, exact match {exact_match:.2f}); this defence "
                "does not protect these states.")
    if verdict == "leaks":
        return (f"LEAKS: {attack} recovers the text (exact match {exact_match:.2f}); this defence does not protect "
                "these states.")
    if verdict == "protected":
        return (f"PROTECTED against {names}: {attack} misses and the truth explains the defended states no better "
                "than its answer, so the misses are the defence's doing (as far as these attacks search).")
    if verdict == "inconclusive":
        return (f"INCONCLUSIVE: no attack recovers the text, but the misses are search failures (rate "
                f"{cell(search_failure_rate, '.2f')} for "
                f"{attack}: the truth fits the defended states better than the answer), so a stronger attack could "
                "recover more. Do not read this as privacy.")
    return "no verdict: these results predate the search-failure check (rerun to get one)"
