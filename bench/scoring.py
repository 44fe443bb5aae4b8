"""Scoring: per-prompt records of what an attack recovered, and the blind guess they are judged against.

`prompt_record` is the one place a line of records.jsonl is built; `invbench.summary.build_summary`
the one place records become numbers (the typed `RunSummary`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable

import torch

from . import metrics, verdicts
from .schema_check import first_problem, load_schema


def prompt_record(attack, prompt, out, row: int, decode: Callable, *, objective: tuple[float, float]) -> dict[str, Any]:
    """One line of records.jsonl: what was recovered and how well, and the attack's objective for
    its answer and for the truth (for the search-failure check)."""
    recovered = out.tokens[row].tolist()
    target = list(prompt.ids)
    recovered_text = decode(recovered)
    losses = out.discrete_loss[row].double()
    exact = metrics.exact_match(target=target, recovered=recovered)
    answer, truth = objective
    extras = {}
    for key, value in out.extras.items():
        labels = attack.extra_labels.get(key)
        values = value[row].tolist()
        extras[key] = [labels[int(v)] for v in values] if labels else [metrics.finite_or_none(x) for x in values]
    return {
        "attack": attack.name,
        "prompt_index": prompt.index,
        "text": prompt.text,
        "target_ids": target,
        "recovered_ids": recovered,
        "recovered_text": recovered_text,
        "exact_match": exact,
        "token_accuracy": metrics.token_accuracy(target=target, recovered=recovered),
        "similarity": metrics.similarity(target_text=prompt.text, recovered_text=recovered_text),
        "first_error": metrics.first_error(target=target, recovered=recovered),
        "discrete_loss": [metrics.finite_or_none(x) for x in losses.tolist()],
        "cumulative_discrete_loss": [metrics.finite_or_none(x) for x in losses.cumsum(0).tolist()],
        "seconds_per_token": float(out.seconds[row].mean()),
        "objective_answer": metrics.finite_or_none(answer),
        "objective_truth": metrics.finite_or_none(truth),
        "search_failure": verdicts.is_search_failure(truth=truth, answer=answer, tokens=len(target), exact=exact),
        **extras,
    }


def record_problem(record: Any) -> str | None:
    """What is wrong with one parsed line of records.jsonl, or None when it is a whole record: it fits
    `bench/schemas/record.schema.json`, and its ids and per-position losses have one value per token.
    A line that is not a whole record counts as torn (invbench.results.read_records skips it)."""
    problem = first_problem(_record_validator(), record)
    if problem:
        return problem
    length = len(record["target_ids"])
    for key in ("recovered_ids", "discrete_loss", "cumulative_discrete_loss"):
        if len(record[key]) != length:
            return f"field {key}: {len(record[key])} values for {length} tokens"
    target, recovered = record["target_ids"], record["recovered_ids"]
    if record["exact_match"] != metrics.exact_match(target=target, recovered=recovered):
        return "field exact_match: does not follow from the ids"
    if abs(record["token_accuracy"] - metrics.token_accuracy(target=target, recovered=recovered)) > 1e-9:
        return "field token_accuracy: does not follow from the ids"
    return None


@lru_cache(maxsize=None)
def _record_validator():
    from jsonschema import Draft202012Validator

    return Draft202012Validator(load_schema("record"))


def recorded_seconds(records: list[dict]) -> float:
    """The attack time these records took (each holds its batch's seconds per prompt and token)."""
    return sum(r["seconds_per_token"] * len(r["target_ids"]) for r in records)


def latest_records(records: list[dict], *, attacks: list[str], prompt_indices: set[int]) -> dict[str, list[dict]]:
    """Per attack, the last record of each of this run's prompts (a resumed run may have
    written one twice), in prompt order."""
    by_attack: dict[str, dict[int, dict]] = {a: {} for a in attacks}
    for record in records:
        if record.get("attack") in by_attack and record.get("prompt_index") in prompt_indices:
            by_attack[record["attack"]][record["prompt_index"]] = record
    return {a: [found[i] for i in sorted(found)] for a, found in by_attack.items()}


@torch.no_grad()
def blind_guess(oracle, *, tokens: int) -> list[int]:
    """The model's most likely text of `tokens` tokens, no leaked state seen: greedy from the
    start prior. Its token accuracy is what an attacker gets for free."""
    ids = torch.zeros(1, 0, dtype=torch.long, device=oracle.device)
    for _ in range(tokens):
        nxt = oracle.log_prior(oracle.prefix(ids)).argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[0].tolist()


def blind_token_accuracy(guess: list[int], prompts: list) -> float:
    return sum(metrics.token_accuracy(target=p.ids, recovered=guess) for p in prompts) / len(prompts)
