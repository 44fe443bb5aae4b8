"""Verify's prompt-by-prompt comparison: each rerun prompt against the entry's own record of it.

A summary's means can be forged consistently; a prompt's answer cannot be forged without the rerun
finding out, once the prompt is drawn. So `invbench verify` reruns a random subset of the entry's
prompts and compares, for every prompt it reran and every attack:

- the recovered ids with the entry's transcript. Attacks and noise are seeded per prompt, so a rerun
  on the same code gives the same answer; only float error can change one (batches of another size
  round differently), and only where two answers score the same within float error. So where the ids
  differ, both answers are scored by the attack's own objective on the rerun's defended states
  (`runner.answer_objectives`), and the difference passes as a float tie only when it is within the
  tolerance the harness already uses to tell a search failure from float error
  (`verdicts.OBJECTIVE_RTOL`, `OBJECTIVE_ATOL_PER_TOKEN`). Nothing here comes from the entry's claims;
- the prompt's similarity and search-failure flag (entry schema 5), which follow from the ids and
  the objectives;
- the prompt's utility figures (entry schema 5): top-1 agreement equal, except that float error may
  flip one argmax in the whole comparison (one position of one prompt: two logits tied to float
  precision); the others within 1e-3 relative (the float facts of the run's own utility check).

The entry was checked on read: its transcript holds the protocol's prompts and averages to its
summary's means, so a subset that matches prompt by prompt vouches for the means, with the
detection probability of `detection_probability` for a forgery on a fraction of the prompts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from scipy import stats

from .transcript import Transcript
from .verdicts import OBJECTIVE_ATOL_PER_TOKEN, OBJECTIVE_RTOL

# verify's default subset catches an entry whose answers were forged on FORGED_FRACTION of its prompts
# with at least this probability (docs/SUBMITTING.md gives the arithmetic).
FORGED_FRACTION = 0.25
CATCH_PROBABILITY = 0.99
UTILITY_REL_TOL = 1e-3
UTILITY_ABS_TOL = 1e-6


def detection_probability(*, n: int, subset: int, forged: int) -> float:
    """The probability that `subset` prompts drawn at random (without replacement) from `n` include at
    least one of `forged` forged ones: 1 - hypergeometric P(none drawn)."""
    return float(1.0 - stats.hypergeom(M=n, n=forged, N=subset).pmf(0))


def required_subset(n: int, *, fraction: float = FORGED_FRACTION, probability: float = CATCH_PROBABILITY) -> int:
    """The smallest random subset of n prompts that catches a forgery on `fraction` of them (at least
    one prompt, rounded up) with at least `probability`."""
    forged = max(1, math.ceil(fraction * n - 1e-9))
    return next(k for k in range(1, n + 1) if detection_probability(n=n, subset=k, forged=forged) >= probability)


@dataclass
class PromptComparison:
    """What the prompt-by-prompt comparison found."""

    compared: int = 0  # (prompt, attack) answers compared
    equal: int = 0  # identical ids
    float_ties: int = 0  # different ids that score the same within float error
    failures: list[str] = field(default_factory=list)  # one line each: "prompt 7, sequence: ..."
    utility_compared: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures


def compare_prompts(*, transcript: Transcript, entry_utility: list[dict] | None, records: list[dict],
                    rerun_utility: list[dict] | None, attacks: list[str], tokens: int,
                    objectives: Callable[[dict[str, dict[int, list[list[int]]]]], dict[str, dict[int, list[float]]]],
                    token_text: Callable[[int], str] | None = None) -> PromptComparison:
    """Every rerun prompt and attack against the entry's transcript (and per-prompt utility, where both
    runs recorded it). `objectives` scores pairs of answers per attack and prompt on the rerun's states
    (called once, only where ids differ). `token_text` (the tokenizer's decode of one id): every prompt's
    texts, rerun or not, must be what its ids decode to (the page shows the texts)."""
    found = PromptComparison()
    if token_text is not None:
        found.failures += text_problems(transcript, token_text)
    entry_prompts = {p.prompt_index: p for p in transcript.prompts}
    rerun = {(r["attack"], r["prompt_index"]): r for r in records if r.get("attack") in attacks}
    differing: dict[str, dict[int, list[list[int]]]] = {}
    for (attack, index), record in sorted(rerun.items(), key=lambda item: (item[0][1], item[0][0])):
        prompt = entry_prompts.get(index)
        if prompt is None:
            found.failures.append(f"prompt {index}: not in the entry's transcript")
            continue
        if list(record["target_ids"]) != list(prompt.target_ids):
            found.failures.append(f"prompt {index}: the entry's target ids are not the prompt's")
            continue
        answer = prompt.attacks.get(attack)
        if answer is None:
            found.failures.append(f"prompt {index}, {attack}: not in the entry's transcript")
            continue
        found.compared += 1
        if list(answer.recovered_ids) == list(record["recovered_ids"]):
            found.equal += 1
            found.failures += _flag_problems(index, attack, answer, record)
        else:
            differing.setdefault(attack, {})[index] = [list(answer.recovered_ids), list(record["recovered_ids"])]
    if differing:
        scored = objectives(differing)
        for attack, prompts in differing.items():
            for index, (claimed, reran) in prompts.items():
                value_claimed, value_reran = scored[attack][index]
                if _float_tie(value_claimed, value_reran, tokens=tokens):
                    found.float_ties += 1
                else:
                    found.failures.append(f"prompt {index}, {attack}: the entry's answer {claimed} is not the rerun's "
                                          f"{reran} (objective {value_claimed:.6g} against {value_reran:.6g}: not a "
                                          "float tie)")
    found.failures += _utility_problems(entry_utility, rerun_utility, tokens=tokens, found=found)
    return found


def text_problems(transcript: Transcript, token_text: Callable[[int], str]) -> list[str]:
    """Prompts whose shown texts are not what their ids decode to (before: every true text replaced by
    "Nothing leaked here" passed a full verify)."""
    problems = []
    for prompt in transcript.prompts:
        shown = [(prompt.target_ids, prompt.target_tokens, "true")] + \
            [(a.recovered_ids, a.recovered_tokens, name) for name, a in prompt.attacks.items()]
        for ids, texts, whose in shown:
            if [token_text(i) for i in ids] != list(texts):
                problems.append(f"prompt {prompt.prompt_index}: the {whose} text is not what its ids decode to")
    return problems


def _float_tie(a: float, b: float, *, tokens: int) -> bool:
    """Two answers' objectives equal within the float error the harness allows a search-failure check."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return a == b
    return abs(a - b) <= OBJECTIVE_RTOL * max(abs(a), abs(b)) + OBJECTIVE_ATOL_PER_TOKEN * tokens


def _flag_problems(index: int, attack: str, answer: Any, record: dict) -> list[str]:
    """Where equal ids give the entry a different similarity or search-failure flag than the rerun."""
    problems = []
    if answer.similarity is not None and abs(answer.similarity - record["similarity"]) > 1e-9:
        problems.append(f"prompt {index}, {attack}: similarity {answer.similarity!r}, rerun {record['similarity']!r}")
    if answer.search_failure is not None and bool(answer.search_failure) != bool(record["search_failure"]):
        problems.append(f"prompt {index}, {attack}: search failure {answer.search_failure}, rerun "
                        f"{record['search_failure']}")
    return problems


def _utility_problems(entry: list[dict] | None, rerun: list[dict] | None, *, tokens: int,
                      found: PromptComparison) -> list[str]:
    """Each rerun prompt's utility against the entry's same prompt (where both recorded it)."""
    if not entry or not rerun:
        return []
    ours = {p["prompt_index"]: p for p in entry}
    problems, flips = [], 0
    for theirs in rerun:
        mine = ours.get(theirs["prompt_index"])
        if mine is None:
            problems.append(f"prompt {theirs['prompt_index']}: no utility in the entry")
            continue
        found.utility_compared += 1
        for key, value in theirs.items():
            if key == "prompt_index" or value is None or mine.get(key) is None:
                continue
            stated = mine[key]
            if key == "top1_agreement":  # a count of positions: equal, but for one float-tied argmax in all
                off = round(abs(value - stated) * tokens, 6)
                flips += off
                if off > 1 or flips > 1:
                    problems.append(f"prompt {theirs['prompt_index']}: top-1 agreement {stated!r}, rerun {value!r}")
            elif abs(value - stated) > UTILITY_REL_TOL * abs(stated) + UTILITY_ABS_TOL:
                problems.append(f"prompt {theirs['prompt_index']}: utility {key} {stated!r}, rerun {value!r}")
    return problems
