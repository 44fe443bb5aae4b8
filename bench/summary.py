"""The run summary (`summary.json`): the one contract from a run to everything after it.

`build_summary` is the one place a run's records become numbers: each attack's aggregates and
verdict (`summarise_attack`), the worst case over attacks, the run's verdict and the certified
radius, with what the run measured besides its records (a `RunContext`: the defence's cost, the
blind guess, the position-1 gaps, where and with what it ran). Everything after the run reads the
summary back through `RunSummary.from_dict`, which validates it against the committed JSON Schema
`bench/schemas/summary.schema.json`: the CLI's table, leaderboard entries (which embed it whole),
`verify`, curves, the board and the studies. The schema also marks the fields `verify` compares,
each with its kind of tolerance (`x-verify`, see `invbench.submit`), so a new per-attack number is
a field of `AttackSummary`, its line in `summarise_attack` and its node in the schema: nothing else.

`from_dict` reads every version:
- version 1 (this one): adds `schema_version`, per-attack `search_failure_rate`, `verdict` and
  `diagnostics`, and the run's `verdict`, `radius` and `blind_token_accuracy`;
- version 0: the layout before versions (no `schema_version` field); read with those fields
  empty (no verdict: its records have no search-failure check).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from . import metrics, radius, verdicts
from .errors import InvbenchError
from .schema_check import load_schema
from .scoring import latest_records, recorded_seconds
from invbench.defenses.checks import described

SCHEMA_VERSION = 1
READABLE_VERSIONS = (0, 1)


class SummaryError(InvbenchError, ValueError):
    """A summary.json that does not fit the schema; the message names the field."""


@dataclass
class WorstCase:
    value: float
    attack: str


@dataclass
class AttackSummary:
    """One attack's aggregates over a run's prompts."""

    n: int
    exact_match: float
    token_accuracy: float
    similarity: float
    detector_auroc: float | None
    detector_note: str | None
    detector_tpr_at_1pct_fpr: float | None
    detector_threshold: float | None
    detector_flag_rate: float | None
    seconds_per_token: float | None
    tokens_per_second: float | None
    config: dict[str, Any]
    search_failure_rate: float | None = None  # None: not measured (version 0)
    verdict: str | None = None  # leaks | protected | inconclusive (invbench.verdicts)
    diagnostics: dict[str, Any] = field(default_factory=dict)  # the attack's own figures (guided: candidates)


@dataclass
class Verdict:
    """The run's verdict, the attack it rests on, and what to conclude, in words."""

    verdict: str | None
    attack: str | None
    says: str
    blind_token_accuracy: float | None
    thresholds: dict[str, float]
    blind_guess_ids: list[int] | None = None  # the blind guess itself: its accuracy can be recomputed per prompt


@dataclass(frozen=True)
class Guarantee:
    """A defence's privacy guarantee as the run recorded it (its `guarantee()` in the summary's
    `defense`): epsilon, delta, the kind ("epsilon-DP", "(epsilon, delta)-DP", "metric DP" or None for
    an entry that did not record it) and epsilon per prompt. Epsilon None: no guarantee. Read here,
    never re-derived, so the board and the CLI say what the defence said."""

    epsilon: float | None
    delta: float | None
    kind: str | None
    epsilon_per_prompt: float | None = None
    scope: str | None = None  # what one epsilon covers: "vector" (None) or "sequence" (DP-Forward)
    distance: str | None = None  # metric DP's distance: "L2" (None) or "L1" (Split-N-Denoise)

    @classmethod
    def of(cls, defense: dict[str, Any]) -> "Guarantee":
        return cls(defense.get("epsilon"), defense.get("delta"), defense.get("kind"), defense.get("epsilon_per_prompt"),
                   defense.get("scope"), defense.get("distance"))

    def cell(self) -> str:
        """The board's epsilon cell: "8 (ε-DP per vector)", "24.4 ((ε, δ)-DP per vector, δ 1e-05)",
        "2880 per unit L2 (metric DP)"; "-" without a guarantee."""
        if self.epsilon is None:
            return "-"
        eps = epsilon_number(self.epsilon)
        per = self.scope or "vector"
        if self.kind == "metric DP":
            return f"{eps} per unit {self.distance or 'L2'} (metric DP)"
        if self.kind == "epsilon-DP":
            return f"{eps} (ε-DP per {per})"
        delta = f"δ {self.delta:g}" if self.delta is not None else ""
        if self.kind == "(epsilon, delta)-DP":
            return f"{eps} ((ε, δ)-DP per {per}{', ' + delta if delta else ''})"
        return f"{eps} ({delta})" if delta else eps  # an entry that did not record its kind (schema 2)

    def sentence(self) -> str:
        """The CLI's words: "epsilon 24.4 per vector at delta 1e-05 ((epsilon, delta)-DP), 52.8 per
        prompt"; metric DP's epsilon is per unit of L2 distance, not per vector."""
        if self.epsilon is None:
            return ""
        eps = epsilon_number(self.epsilon)
        per = self.scope or "vector"
        if self.kind == "metric DP":
            distance = self.distance or "L2"
            text = f"epsilon {eps} per unit of {distance} distance between states (metric DP)"
            per_prompt = f" per unit of a prompt's summed {distance} distance"
        elif self.kind == "epsilon-DP":
            text, per_prompt = f"epsilon {eps} per {per} (epsilon-DP, delta 0)", " per prompt"
        else:
            at = f" at delta {self.delta:g}" if self.delta is not None else ""
            text, per_prompt = f"epsilon {eps} per {per}{at}" + (f" ({self.kind})" if self.kind else ""), " per prompt"
        if self.epsilon_per_prompt is not None:
            text += f", {epsilon_number(self.epsilon_per_prompt)}{per_prompt}"
        return text


def epsilon_number(value: float) -> str:
    """Three significant digits, without an exponent below a million (2880, not 2.88e+03)."""
    text = f"{value:.3g}"
    return f"{value:.0f}" if "e+" in text and value < 1e6 else text


@dataclass
class RunSummary:
    model: str
    model_source: str
    dataset: str
    dataset_source: str
    n: int
    tokens: int
    layer: int
    seed: int
    defense: dict[str, Any]  # describe() and guarantee() of the defence
    utility: dict[str, Any]
    attacks: dict[str, AttackSummary]
    worst_case: dict[str, WorstCase]
    config_hash: str
    device: str
    versions: dict[str, Any]
    wall_seconds: float | None = None
    verdict: Verdict | None = None
    radius: dict[str, Any] | None = None  # invbench.radius.summarise_radii
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return metrics.json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> "RunSummary":
        """Validate (any readable version) and build; SummaryError names the first bad field."""
        validate(data)
        data = dict(data)
        data.setdefault("schema_version", 0)
        attacks = {name: build(AttackSummary, a) for name, a in data.pop("attacks").items()}
        worst = {m: WorstCase(**w) for m, w in data.pop("worst_case").items()}
        verdict = data.pop("verdict", None)
        return cls(attacks=attacks, worst_case=worst, verdict=build(Verdict, verdict) if verdict else None,
                   **{k: v for k, v in data.items() if k in _field_names(cls)})

    @property
    def guarantee(self) -> Guarantee:
        return Guarantee.of(self.defense)

    @property
    def strongest(self) -> str:
        """The attack with the highest exact match (ties: see metrics.worst_case)."""
        return self.worst_case["exact_match"].attack


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def build(cls: type, data: dict[str, Any]):
    """A dataclass of this module from the keys of `data` it has fields for."""
    return cls(**{k: v for k, v in data.items() if k in _field_names(cls)})


def schema() -> dict[str, Any]:
    return load_schema("summary")


def validate(data: Any) -> None:
    """Raise SummaryError for a summary that fits no readable version of the schema."""
    from jsonschema import Draft202012Validator

    version = data.get("schema_version", 0) if isinstance(data, dict) else None
    if version not in READABLE_VERSIONS:
        raise SummaryError(f"summary schema_version {version!r} is not one this invbench reads "
                           f"({', '.join(map(str, READABLE_VERSIONS))})")
    errors = sorted(Draft202012Validator(schema()).iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = ".".join(str(p) for p in first.absolute_path) or "(top level)"
        raise SummaryError(f"summary field {where}: {first.message}")


# --- building it: the records and a small typed context --------------------------------------------

@dataclass(frozen=True)
class RunContext:
    """What a run knows besides its records: what ran (the attacks and the defence as objects, for
    their configs, diagnostics and noise level), on what (model, prompts, layer), what was measured
    on the states rather than per prompt (the defence's cost, the blind guess, the position-1 gaps),
    and where and with what the run was made (recorded when it began, so a reopened run says the same)."""

    model: str
    model_source: str
    dataset: str
    dataset_source: str
    prompt_indices: list[int]
    tokens: int
    layer: int
    seed: int
    dim: int
    defense: Any  # invbench.defenses.Defense
    attacks: list  # invbench.attacks.Attack, in the run's order
    utility: dict[str, Any]
    blind_token_accuracy: float | None
    blind_guess: list[int] | None  # the model's most likely text (its token ids), no state seen
    first_gaps: list[float] | None  # the prompts' position-1 gaps (guided's codebook), None without it
    config_hash: str
    device: str
    versions: dict[str, Any]
    wall_seconds: float | None


def build_summary(records: list[dict], context: RunContext) -> RunSummary:
    """The RunSummary of a finished run: every attack's aggregates and verdict, the worst case over
    attacks, the run's verdict and the certified radius where it could be measured."""
    ctx = context
    latest = latest_records(records, attacks=[a.name for a in ctx.attacks], prompt_indices=set(ctx.prompt_indices))
    flag = metrics.default_flag_threshold(noise_std=ctx.defense.noise_std, tokens=ctx.tokens, dim=ctx.dim)
    attacks = {a.name: summarise_attack(latest[a.name], flag_threshold=flag, config=a.config_dict(),
                                        diagnostics=a.diagnostics(latest[a.name], defense=ctx.defense),
                                        blind_token_accuracy=ctx.blind_token_accuracy) for a in ctx.attacks}
    worst = {m: WorstCase(**w) for m, w in metrics.worst_case({n: vars(s) for n, s in attacks.items()}).items()}
    return RunSummary(
        model=ctx.model, model_source=ctx.model_source, dataset=ctx.dataset, dataset_source=ctx.dataset_source,
        n=len(ctx.prompt_indices), tokens=ctx.tokens, layer=ctx.layer, seed=ctx.seed,
        defense=described(ctx.defense, tokens=ctx.tokens), utility=ctx.utility,
        attacks=attacks, worst_case=worst, config_hash=ctx.config_hash, device=ctx.device, versions=ctx.versions,
        wall_seconds=ctx.wall_seconds, verdict=run_verdict(attacks, worst, ctx.blind_token_accuracy, ctx.blind_guess,
                                                           top1_agreement=ctx.utility.get("top1_agreement")),
        radius=radius.of_run(latest, clean=ctx.defense.name == "none", prompt_indices=ctx.prompt_indices,
                             first_gaps=ctx.first_gaps, dim=ctx.dim, tokens=ctx.tokens))


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


def run_verdict(attacks: dict[str, AttackSummary], worst: dict[str, WorstCase],
                blind_token_accuracy: float | None, blind_guess: list[int] | None = None, *,
                top1_agreement: float | None = None) -> Verdict:
    """The run's verdict from its attacks' verdicts, named after the attack it rests on, in words."""
    # the strongest attack first, so that a leak is named after the attack that recovers the most
    order = dict.fromkeys([worst["exact_match"].attack, worst["token_accuracy"].attack, *attacks])
    verdict, resting_on = verdicts.run_verdict({n: attacks[n].verdict for n in order})
    on = attacks.get(resting_on)
    says = verdicts.explain(verdict, resting_on, exact_match=on.exact_match if on else 0.0,
                            token_accuracy=on.token_accuracy if on else None,
                            blind_token_accuracy=blind_token_accuracy,
                            search_failure_rate=on.search_failure_rate if on else None, attacks=list(attacks),
                            top1_agreement=top1_agreement)
    return Verdict(verdict, resting_on, says, blind_token_accuracy, dict(verdicts.THRESHOLDS), blind_guess)
