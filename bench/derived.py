"""What an entry derives from its other fields, recomputed whenever it is read.

A field comparison (`invbench verify`) checks what a rerun measures. Some of an entry's values are
not measurements but follow from others, and a file could state them falsely and still pass every
type check: the board would then print a DP guarantee that does not exist, or rank as protected a
defence whose every prompt leaks. So each is recomputed from what it follows from, and a file that
disagrees is refused with the field named (`problems`):

- the defence's guarantee (epsilon, delta, kind, per prompt) and what it derives from its
  parameters (`derived`): from `make_defense(name, params).guarantee(tokens=T)` and `describe()`.
  A plug-in loaded from a file cannot be instantiated when an entry is read (its code is not run
  then; only `invbench verify` runs it): its guarantee is shown as submitted, and `guarantee_note`
  says so. The same holds for a defence that is not installed here;
- every attack's verdict: from its own exact match, token accuracy and search-failure rate and the
  run's blind token accuracy, by `invbench.verdicts.attack_verdict` (exact match 1.0 cannot be
  "protected"); the run's verdict from the attacks' is checked in `invbench.entries`;
- every attack's n: the entry's n, which is the protocol's (every attack runs on every prompt);
- the certified radius: its summary numbers (minimum, median, sigmas, scope) from its per-prompt gaps
  (`invbench.radius`).

What cannot be recomputed without rerunning (the metrics, the gaps themselves) is `verify`'s.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from . import radius as radius_module
from .formats import short
from .metrics import json_safe
from .registry import is_file_spec
from .verdicts import Evidence, attack_verdict

REL_TOL = 1e-6  # library versions may move a guarantee's last digits (Opacus's root search); a tamper moves more
# The guarantee fields the board and the CLI show: compared whether or not the entry states them (a
# version-2 entry, which did not record "kind", is compared on what it has).
CORE_GUARANTEE = ("epsilon", "delta", "kind", "epsilon_per_prompt")
PROSE = ("reason", "neighbouring", "reason_per_prompt", "utility_note")  # wording may change between versions: not compared
DESCRIPTION = ("name", "params", "spec")  # what the guarantee is recomputed from (spec: version 2's source)
RADIUS_NUMBERS = ("min_radius", "median_radius", "min_sigma_certified", "median_sigma_certified",
                  "min_sigma_expected", "median_sigma_expected")
PER_PROMPT_NUMBERS = ("radius", "sigma_expected", "sigma_certified")

Problems = list[tuple[str, str]]


def close(a: Any, b: Any) -> bool:
    """Equal, numbers to REL_TOL, lists element by element, dicts on the keys both have (a figure a
    later version adds to a description, or no longer gives, does not make an older entry disagree)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return all(close(a[k], b[k]) for k in a.keys() & b.keys())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b))
    return a == b


# --- the guarantee ----------------------------------------------------------------------------------

def guarantee_note(defense: dict[str, Any], spec: str | None) -> str | None:
    """Why this entry's guarantee cannot be recomputed when it is read, or None when it can."""
    from invbench.defenses import available_defenses

    if spec and is_file_spec(spec):
        return (f"its defence is a plug-in file ({spec}), whose code is not run when an entry is read: "
                "the guarantee is as submitted (invbench verify, which loads the file, checks it)")
    if defense.get("name") not in available_defenses():
        return (f"its defence {defense.get('name')!r} is not installed here: the guarantee is as submitted "
                "(invbench verify, with the defence, checks it)")
    return None


def recomputed_defense(defense: dict[str, Any], *, tokens: int) -> dict[str, Any]:
    """What a run records of the defence named with these parameters (describe() and guarantee(T)),
    as summary.json holds it; DefenseError when the defence refuses the parameters."""
    from invbench.defenses import make_defense
    from invbench.defenses.checks import described

    return json_safe(described(make_defense(defense["name"], dict(defense["params"])), tokens=tokens))


def defense_problems(defense: dict[str, Any], *, spec: str | None, tokens: int, prefix: str,
                     legacy: bool = False) -> Problems:
    """(field, message) where the entry's defence record disagrees with what its name and parameters
    give. Nothing when they cannot be recomputed here (`guarantee_note`)."""
    from invbench.defenses import DefenseError

    if guarantee_note(defense, spec):
        return []
    where = f"{prefix}defense"
    try:
        expected = recomputed_defense(defense, tokens=tokens)
    except DefenseError as exc:
        return [(f"{where}.params", f"the defence {defense['name']!r} refuses these parameters ({exc})")]
    problems = []
    for key in sorted((set(defense) | set(expected)) - set(DESCRIPTION) - set(PROSE)):
        core = key in CORE_GUARANTEE
        if key not in defense and (legacy or not core):
            continue  # not recorded (version 2), or a figure this entry's invbench did not record yet
        if key not in expected and not core:
            continue  # a figure a later version no longer records
        stated, given = defense.get(key), expected.get(key)
        if not close(stated, given):
            problems.append((f"{where}.{key}", f"{short(stated)} is not what defence {defense['name']!r} with "
                             f"{short(defense['params'])} gives ({short(given)}; recomputed from its parameters)"))
    return problems


# --- verdicts and sizes ---------------------------------------------------------------------------------

def attack_problems(summary: dict[str, Any], valid: dict[str, dict], *, prefix: str, blind: Any) -> Problems:
    """(field, message) for each attack whose verdict does not follow from its own metrics, or whose n
    is not the entry's."""
    problems = []
    blind = blind if isinstance(blind, (int, float)) and not isinstance(blind, bool) else None
    for name, metrics in valid.items():
        if isinstance(summary.get("n"), int) and metrics["n"] != summary["n"]:
            problems.append((f"{prefix}attacks.{name}.n", f"{metrics['n']} is not the entry's n {summary['n']} "
                             "(every attack runs on every prompt)"))
        evidence = Evidence(metrics["exact_match"], metrics["token_accuracy"], metrics.get("search_failure_rate"))
        expected = attack_verdict(evidence, blind_token_accuracy=blind)
        if metrics.get("verdict") != expected:
            problems.append((f"{prefix}attacks.{name}.verdict",
                             f"{short(metrics.get('verdict'))} does not follow from its exact match "
                             f"{evidence.exact_match:.3g}, token accuracy {evidence.token_accuracy:.3g}, search-failure "
                             f"rate {short(evidence.search_failure_rate)} and the blind token accuracy "
                             f"{short(blind)}: the rule gives {expected!r} (invbench.verdicts.attack_verdict)"))
    return problems


# --- the certified radius -------------------------------------------------------------------------------

def radius_problems(radius: Any, *, n: Any, tokens: Any, prefix: str) -> Problems:
    """(field, message) where the radius's summary numbers do not follow from its per-prompt gaps.
    Nothing for a radius that did not record them (version 2)."""
    where = f"{prefix}radius"
    if not isinstance(radius, dict) or not isinstance(radius.get("per_prompt"), list):
        return []
    per_prompt, dim = radius["per_prompt"], radius.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        return [(f"{where}.dim", f"expected the hidden size (an integer >= 1), got {short(dim)}")]
    if radius.get("tokens") != tokens:
        return [(f"{where}.tokens", f"{short(radius.get('tokens'))} is not the entry's tokens {short(tokens)}")]
    if len(per_prompt) != n:
        return [(f"{where}.per_prompt", f"{len(per_prompt)} prompts, not the entry's n {short(n)}")]
    firsts, laters = [], []
    for i, prompt in enumerate(per_prompt):
        gaps = prompt.get("gaps") if isinstance(prompt, dict) else None
        first = prompt.get("first_position_gap") if isinstance(prompt, dict) else None
        if not (_number(first) and first >= 0 and (gaps is None or (isinstance(gaps, list) and len(gaps) == tokens
                                                                        and all(_number(g) and g >= 0 for g in gaps)
                                                                        and close(gaps[0], first)))):
            return [(f"{where}.per_prompt[{i}]", "expected first_position_gap (a number >= 0) and gaps (null, or "
                     f"{tokens} numbers >= 0 starting with it)")]
        firsts.append(first)
        laters.append(gaps[1:] if gaps is not None else None)
    expected = radius_module.summarise_radii(radius_module.prompt_radii(firsts, laters, dim=dim, tokens=tokens),
                                             dim=dim, tokens=tokens)
    problems = []
    for i, (stated, given) in enumerate(zip(per_prompt, expected["per_prompt"])):
        for key in PER_PROMPT_NUMBERS + ("positions",):
            if key in stated and not close(stated[key], given[key]):
                problems.append((f"{where}.per_prompt[{i}].{key}", f"{short(stated[key])} does not follow from its "
                                 f"gaps ({short(given[key])}; invbench.radius)"))
    for key in RADIUS_NUMBERS + ("scope",):
        if key in radius and not close(radius[key], expected[key]):
            problems.append((f"{where}.{key}", f"{short(radius[key])} does not follow from the per-prompt gaps "
                             f"({short(expected[key])}; invbench.radius)"))
    return problems


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- all of it ---------------------------------------------------------------------------------------------

def problems(summary: dict[str, Any], *, spec: str | None, fits: Callable[..., bool], prefix: str,
             legacy: bool = False) -> Problems:
    """(field, message) for every derived value of a summary (as an entry holds it) that does not
    follow from what it derives from; only parts that fit the schema are recomputed."""
    found: Problems = []
    tokens = summary.get("tokens")
    if fits("defense") and fits("tokens"):
        found += defense_problems(summary["defense"], spec=spec, tokens=tokens, prefix=prefix, legacy=legacy)
    attacks = summary.get("attacks")
    if isinstance(attacks, dict) and fits("n"):
        verdict = summary.get("verdict")
        blind = verdict.get("blind_token_accuracy") if isinstance(verdict, dict) and fits("verdict") else None
        valid = {name: m for name, m in attacks.items() if fits("attacks", name)}
        found += attack_problems(summary, valid, prefix=prefix, blind=blind)
    if fits("radius") and fits("n") and fits("tokens"):
        found += radius_problems(summary.get("radius"), n=summary.get("n"), tokens=tokens, prefix=prefix)
    return found
