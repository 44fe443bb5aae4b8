"""Scoring: per-prompt records of what an attack recovered, and their aggregates into a RunSummary.

`prompt_record` is the one place a line of records.jsonl is built; `summarise_attack` and
`summarise_run` the one place records are read back into numbers (the typed `RunSummary`).
Verdicts and the certified radius come from `invbench.verdicts` and `invbench.radius`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from . import metrics, radius, verdicts
from .summary import AttackSummary, RunSummary, Verdict, WorstCase


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


def recorded_seconds(records: list[dict]) -> float:
    """The attack time these records took (each holds its batch's seconds per prompt and token)."""
    return sum(r["seconds_per_token"] * len(r["target_ids"]) for r in records)


def summarise_attack(records: list[dict], *, flag_threshold: float, config: dict[str, Any],
                     diagnostics: dict[str, Any] | None = None,
                     blind_token_accuracy: float | None = None) -> AttackSummary:
    """Aggregates of one attack's records, with the failure detector scored on the cumulative
    discrete loss (failed prompts are the positives) and the attack's verdict."""
    seconds = [r["seconds_per_token"] for r in records]
    total_tokens = sum(len(r["target_ids"]) for r in records)
    total_seconds = recorded_seconds(records)
    final_loss = [r["cumulative_discrete_loss"][-1] for r in records]
    final_loss = [float("inf") if x is None else x for x in final_loss]
    failed = [not r["exact_match"] for r in records]
    auroc = metrics.detector_auroc(scores=final_loss, failed=failed)
    checked = all("search_failure" in r for r in records)
    exact = sum(not f for f in failed) / len(records)
    token_accuracy = sum(r["token_accuracy"] for r in records) / len(records)
    failure_rate = sum(bool(r["search_failure"]) for r in records) / len(records) if checked else None
    evidence = verdicts.Evidence(exact_match=exact, token_accuracy=token_accuracy, search_failure_rate=failure_rate)
    return AttackSummary(
        n=len(records),
        exact_match=exact,
        token_accuracy=token_accuracy,
        similarity=sum(r["similarity"] for r in records) / len(records),
        detector_auroc=auroc,
        detector_note=None if auroc is not None else
        ("undefined: every prompt was recovered exactly" if not any(failed) else "undefined: every prompt failed"),
        detector_tpr_at_1pct_fpr=metrics.tpr_at_fpr(scores=final_loss, failed=failed, fpr=0.01),
        detector_threshold=flag_threshold,
        detector_flag_rate=sum(x > flag_threshold for x in final_loss) / len(records),
        seconds_per_token=metrics.median(seconds),
        tokens_per_second=total_tokens / total_seconds if total_seconds > 0 else None,
        config=config,
        search_failure_rate=failure_rate,
        verdict=verdicts.attack_verdict(evidence, blind_token_accuracy=blind_token_accuracy),
        diagnostics=diagnostics or {},
    )


def latest_records(records: list[dict], *, attacks: list[str], prompt_indices: set[int]) -> dict[str, list[dict]]:
    """Per attack, the last record of each of this run's prompts (a resumed run may have
    written one twice), in prompt order."""
    by_attack: dict[str, dict[int, dict]] = {a: {} for a in attacks}
    for record in records:
        if record.get("attack") in by_attack and record.get("prompt_index") in prompt_indices:
            by_attack[record["attack"]][record["prompt_index"]] = record
    return {a: [found[i] for i in sorted(found)] for a, found in by_attack.items()}


def summarise_run(*, attacks: list, records: list[dict], prompts: list, head: dict[str, Any], defense,
                  dim: int, blind_token_accuracy: float | None, first_gaps: list[float] | None) -> RunSummary:
    """The RunSummary of a finished run: every attack's aggregates and verdict, the worst case
    over attacks, the run's verdict, and the certified radius where it could be measured.
    `head` holds the run's descriptive fields (model, dataset, defence, utility, ...)."""
    tokens = head["tokens"]
    flag = metrics.default_flag_threshold(noise_std=defense.noise_std, tokens=tokens, dim=dim)
    latest = latest_records(records, attacks=[a.name for a in attacks], prompt_indices={p.index for p in prompts})
    summaries = {a.name: summarise_attack(latest[a.name], flag_threshold=flag, config=a.config_dict(),
                                          diagnostics=a.diagnostics(latest[a.name], defense=defense),
                                          blind_token_accuracy=blind_token_accuracy) for a in attacks}
    worst = {m: WorstCase(**w) for m, w in metrics.worst_case({n: vars(s) for n, s in summaries.items()}).items()}
    # the strongest attack first, so that a leak is named after the attack that recovers the most
    order = dict.fromkeys([worst["exact_match"].attack, worst["token_accuracy"].attack, *summaries])
    verdict, resting_on = verdicts.run_verdict({n: summaries[n].verdict for n in order})
    on = summaries.get(resting_on)
    says = verdicts.explain(verdict, resting_on, exact_match=on.exact_match if on else 0.0,
                            token_accuracy=on.token_accuracy if on else None,
                            blind_token_accuracy=blind_token_accuracy,
                            search_failure_rate=on.search_failure_rate if on else None, attacks=list(summaries))
    return RunSummary(**head, attacks=summaries, worst_case=worst,
                      verdict=Verdict(verdict, resting_on, says, blind_token_accuracy, dict(verdicts.THRESHOLDS)),
                      radius=_radius(latest, defense, [p.index for p in prompts], first_gaps=first_gaps, dim=dim,
                                     tokens=tokens))


def _radius(latest: dict[str, list[dict]], defense, indices: list[int], *, first_gaps: list[float] | None, dim: int,
            tokens: int) -> dict[str, Any] | None:
    """The certified radius of this run's prompts: position 1 from the codebook's gaps; all
    positions where a scan ran on clean states (no defence) and recovered the prompt."""
    if first_gaps is None:
        return None
    clean_scan = {}
    if defense.name == "none" and "scan" in latest:
        clean_scan = {r["prompt_index"]: radius.later_gaps_from_clean_scan(r["margin"], dim=dim)
                      for r in latest["scan"] if r["exact_match"] and "margin" in r}
    later = [clean_scan.get(i) for i in indices]
    per_prompt = radius.prompt_radii(first_gaps, later, dim=dim, tokens=tokens)
    for entry, index in zip(per_prompt, indices):
        entry["prompt_index"] = index
    return radius.summarise_radii(per_prompt, dim=dim, tokens=tokens)


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
