"""What an entry derives from its other fields, recomputed whenever it is read.

A field comparison (`invbench verify`) checks what a rerun measures. Some of an entry's values are
not measurements but follow from others, and a file could state them falsely and still pass every
type check: the board would then print a DP guarantee that does not exist, or rank as protected a
defence whose every prompt leaks. So each is recomputed from what it follows from, and a file that
disagrees is refused with the field named (`problems`):

- the defence's guarantee (epsilon, delta, kind, per prompt, and its prose: the neighbouring relation
  and the reasons) and what it derives from its parameters (`derived`): from
  `make_defense(name, params).guarantee(tokens=T)` and `describe()`. A built-in's prose is compared
  too (an entry that rewrote "replace-one" as "user-level DP" is refused); only entries of schema 2,
  whose prose older versions worded differently, are compared on numbers alone.
  A plug-in loaded from a file cannot be instantiated when an entry is read (its code is not run
  then; only `invbench verify` runs it): its guarantee is shown as submitted, and `guarantee_note`
  says so. The same holds for a defence that is not installed here. A plug-in file may not carry
  the name of a registered defence (it would borrow that defence's citation and recomputed
  guarantee): such an entry is refused;
- every attack's verdict: from its own exact match, token accuracy and search-failure rate and the
  run's blind token accuracy, by `invbench.verdicts.attack_verdict` (exact match 1.0 cannot be
  "protected"); the run's verdict from the attacks' is checked in `invbench.entries`;
- every attack's n: the entry's n, which is the protocol's (every attack runs on every prompt);
- the certified radius: its summary numbers (minimum, median, sigmas, scope) from its per-prompt gaps
  (`invbench.radius`);
- the utility: each figure the mean of the prompts' own figures where they are recorded
  (`utility.per_prompt`, entry schema 5 on), and the perplexity ratio exp(nll_defended - nll_clean).

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
PROSE = ("reason", "neighbouring", "reason_per_prompt", "utility_note")  # compared too, but for schema-2 entries
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
    give, prose included (not for schema 2). A plug-in file named like a registered defence is
    refused; otherwise nothing when the record cannot be recomputed here (`guarantee_note`)."""
    from invbench.defenses import DefenseError, available_defenses

    where = f"{prefix}defense"
    if spec and is_file_spec(spec) and defense.get("name") in available_defenses():
        return [(f"{where}.name", f"{short(defense.get('name'))} is a registered defence's name, but this entry's "
                 f"defence came from the plug-in file {spec}: a plug-in cannot take a built-in's name (its guarantee "
                 "and citation would be shown as that defence's)")]
    if guarantee_note(defense, spec):
        return []
    try:
        expected = recomputed_defense(defense, tokens=tokens)
    except DefenseError as exc:
        return [(f"{where}.params", f"the defence {defense['name']!r} refuses these parameters ({exc})")]
    problems = []
    skipped = set(DESCRIPTION) | (set(PROSE) if legacy else set())
    for key in sorted((set(defense) | set(expected)) - skipped):
        core = key in CORE_GUARANTEE or key in PROSE
        if key not in defense and (legacy or not core):
            continue  # not recorded (version 2), or a figure this entry's invbench did not record yet
        if key not in expected and not core:
            continue  # a figure a later version no longer records
        stated, given = defense.get(key), expected.get(key)
        if not close(stated, given):
            problems.append((f"{where}.{key}", f"{short(stated)} is not what defence {defense['name']!r} with "
                             f"{short(defense['params'])} gives ({short(given)}; recomputed from its parameters)"))
    return problems


# --- the utility ------------------------------------------------------------------------------------------

UTILITY_MEANS = ("top1_agreement", "kl_clean_defended", "nll_clean", "nll_defended", "cosine")


def utility_problems(utility: Any, *, n: Any, prefix: str, required: bool) -> Problems:
    """(field, message) where the utility's figures are not the means of its per-prompt figures (one per
    prompt, each once), or the perplexity ratio is not exp(nll_defended - nll_clean). `required` (entry
    schema 5 on): the per-prompt figures must be there."""
    where = f"{prefix}utility"
    if not isinstance(utility, dict):
        return []
    per_prompt = utility.get("per_prompt")
    if per_prompt is None:
        return [(f"{where}.per_prompt", "missing (entry schema 5 records each prompt's utility)")] \
            if required and utility.get("top1_agreement") is not None else []
    if isinstance(n, int) and len(per_prompt) != n:
        return [(f"{where}.per_prompt", f"{len(per_prompt)} prompts, not the entry's n {n}")]
    indices = [p["prompt_index"] for p in per_prompt]
    if len(set(indices)) != len(indices):
        return [(f"{where}.per_prompt", "a prompt appears twice")]
    problems = []
    for key in UTILITY_MEANS:
        values = [p.get(key) for p in per_prompt]
        if utility.get(key) is None or any(v is None for v in values):
            continue
        mean = sum(values) / len(values)
        if not math.isclose(mean, utility[key], rel_tol=1e-9, abs_tol=1e-12):
            problems.append((f"{where}.{key}", f"{short(utility[key])} is not the mean of the per-prompt figures "
                             f"({short(mean)})"))
    nll_clean, nll_defended, ratio = (utility.get(k) for k in ("nll_clean", "nll_defended", "perplexity_ratio"))
    if _number(nll_clean) and _number(nll_defended) and _number(ratio):
        gap = nll_defended - nll_clean
        if gap < 700 and not math.isclose(ratio, math.exp(gap), rel_tol=1e-9):
            problems.append((f"{where}.perplexity_ratio", f"{short(ratio)} is not exp(nll_defended - nll_clean) "
                             f"({short(math.exp(gap))})"))
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
             legacy: bool = False, per_prompt_required: bool = False) -> Problems:
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
    if fits("utility") and fits("n"):
        found += utility_problems(summary.get("utility"), n=summary.get("n"), prefix=prefix,
                                  required=per_prompt_required)
    return found
