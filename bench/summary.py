"""The run summary (`summary.json`), typed and versioned: what a run measured, in one place.

`RunSummary` and `AttackSummary` are built by `invbench.scoring` and read by everything after it
(the CLI table, submissions, curves, the leaderboard) through these fields, so a renamed field
fails here, at import and in the schema test, not on the board. `from_dict` validates against the
committed JSON Schema `bench/schemas/summary.schema.json` (any JSON Schema tool can check a
summary with it) and reads every version:

- version 1 (this one): adds `schema_version`, per-attack `search_failure_rate`, `verdict` and
  `diagnostics`, and the run's `verdict`, `radius` and `blind_token_accuracy`;
- version 0: the layout before versions (no `schema_version` field); read with those fields
  empty (no verdict: its records have no search-failure check).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import InvbenchError
from .metrics import PRIVACY_METRICS
from .schema_check import load_schema

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
        from .metrics import json_safe

        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, data: Any) -> "RunSummary":
        """Validate (any readable version) and build; SummaryError names the first bad field."""
        validate(data)
        data = dict(data)
        data.setdefault("schema_version", 0)
        attacks = {name: _build(AttackSummary, a) for name, a in data.pop("attacks").items()}
        worst = {m: WorstCase(**w) for m, w in data.pop("worst_case").items()}
        verdict = data.pop("verdict", None)
        return cls(attacks=attacks, worst_case=worst, verdict=_build(Verdict, verdict) if verdict else None,
                   **{k: v for k, v in data.items() if k in _field_names(cls)})

    @property
    def strongest(self) -> str:
        """The attack with the highest exact match (ties: see metrics.worst_case)."""
        return self.worst_case["exact_match"].attack


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _build(cls: type, data: dict[str, Any]):
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
