"""Leaderboard entries of schema_version 2: the layout before entries embedded the run's summary.

Version 2 copied the summary's fields into the entry by a list of names, and the certified radius in
part. The committed SmolLM2 entries are version 2 and their runs are not in this checkout, so they
cannot be resubmitted at once (they are rerun later, under a new protocol version). This module
keeps them on the board and verifiable without rewriting a byte of them; `invbench.entries` checks
them against the version-2 schema as it was committed (`bench/schemas/entry-v2.schema.json`) and
with the same cross-field rules as version 3, then reads them through `summary_of`:

- what version 2 did not record is None in the RunSummary it holds (`NOT_RECORDED`);
- guided's diagnostics keep the "ranker": null that version-2 runs recorded when reopened;
- the protocol's ranking rule is the one every version-2 board used (`RANKING`).
"""
from __future__ import annotations

from typing import Any, Callable

from .summary import AttackSummary, RunSummary, Verdict, WorstCase, build

SCHEMA_VERSION = 2
RANKING = "worst-case-exact-match"  # version-2 protocols name no ranking rule: this was the only one
NOT_RECORDED = ("model_source", "dataset_source", "verdict.thresholds", "radius.dim", "radius.tokens",
                "radius.per_prompt", "radius.min_sigma_expected", "radius.median_sigma_expected")
METADATA = ("schema_version", "entry_id", "name", "authors", "url", "date", "git_commit")


def is_legacy(data: Any) -> bool:
    return isinstance(data, dict) and data.get("schema_version") == SCHEMA_VERSION


def protocol_of(data: dict[str, Any]) -> Any:
    """The entry's protocol with the ranking rule it was made under."""
    protocol = data.get("protocol")
    return {**protocol, "ranking": protocol.get("ranking", RANKING)} if isinstance(protocol, dict) else protocol


def copy_problems(data: dict[str, Any], fits: Callable[..., bool]) -> list[tuple[str, str]]:
    """(field, message) for the copy version 2 kept of each attack's detector AUROC."""
    detector, attacks = data.get("detector_auroc"), data.get("attacks")
    if not isinstance(detector, dict) or not isinstance(attacks, dict):
        return []
    return [(f"detector_auroc.{name}", f"must equal attacks.{name}.detector_auroc")
            for name, metrics in attacks.items()
            if fits("attacks", name) and detector.get(name, "missing") != metrics["detector_auroc"]]


def metadata_of(data: dict[str, Any]) -> dict[str, Any]:
    """The submission's metadata, as a version-3 entry holds it beside its summary."""
    return {**{k: data.get(k) for k in METADATA}, "protocol": protocol_of(data),
            "defense_spec": data["defense"].get("spec") or data["defense"]["name"]}


def summary_of(data: dict[str, Any]) -> RunSummary:
    """The RunSummary a valid version-2 entry holds; what it did not record is None."""
    verdict = data["verdict"]
    return RunSummary(
        model=data["model"], model_source=None, dataset=data["dataset"], dataset_source=None, n=data["n"],
        tokens=data["tokens"], layer=data["protocol"].get("layer", -1), seed=data["seed"],  # -1: the only layer then
        defense={k: v for k, v in data["defense"].items() if k != "spec"}, utility=data["utility"],
        attacks={name: build(AttackSummary, metrics) for name, metrics in data["attacks"].items()},
        worst_case={m: WorstCase(**w) for m, w in data["worst_case"].items()}, config_hash=data["config_hash"],
        device=data["hardware"]["device"], versions=data["versions"], wall_seconds=data.get("wall_seconds"),
        verdict=Verdict(verdict["verdict"], verdict["attack"], verdict["says"], verdict["blind_token_accuracy"],
                        thresholds=None),
        radius=data.get("radius"), schema_version=1)
