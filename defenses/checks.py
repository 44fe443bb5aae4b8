"""Checks on what a (possibly outside) defence returns, beside the interface they enforce.

Plug-ins are user code: the runner calls `check_defense` once on real states before any attack,
and every `apply` through `defend_one`, so a broken plug-in is named in one line rather than
failing deep inside an attack. What is checked: a tensor of the input's shape, dtype and
device, all finite; `noise_law` None or a NoiseLaw whose std at the states' d is a finite
number >= 0; `noise_std` a finite number >= 0 (attacks still read it: a dchi defence without
`dim` is refused here until they use the law); and what a run records of it (`described`).
"""
from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any, Iterator

import torch

from invbench.errors import one_line as _one_line

from .base import GUARANTEE_KINDS, Defense, DefenseError
from .noise import NoiseLaw


def defense_label(defense: Defense) -> str:
    return f"defence {defense.name!r} ({type(defense).__module__}.{type(defense).__name__})"


def one_line(exc: BaseException) -> str:
    """A plug-in's exception as one line of at most 300 characters."""
    return _one_line(exc, limit=300) or "(no message)"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def described(defense: Defense, *, tokens: int | None = None) -> dict[str, Any]:
    """What a run records of its defence: `describe()` and `guarantee(tokens=T)` in one dict,
    checked before anything is written (a plug-in's epsilon "lots" once reached summary.json and broke
    its schema): a name and a params dict, epsilon None or a number >= 0 (inf: no meaningful
    guarantee), delta None or in [0, 1], kind None or one of GUARANTEE_KINDS, all of it JSON."""
    label = defense_label(defense)
    try:
        description = defense.describe()
    except Exception as exc:
        raise DefenseError(f"{label}: describe raised {type(exc).__name__}: {one_line(exc)}") from exc
    if (not isinstance(description, dict) or not isinstance(description.get("name"), str)
            or not isinstance(description.get("params"), dict)):
        raise DefenseError(f"{label}: describe returned {type(description).__name__} {str(description)[:80]!r}; "
                           "expected a dict with 'name' (a string) and 'params' (a dict)")
    try:
        guarantee = defense.guarantee(tokens=tokens)
    except Exception as exc:
        raise DefenseError(f"{label}: guarantee raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not isinstance(guarantee, dict):
        raise DefenseError(f"{label}: guarantee returned {type(guarantee).__name__}; expected a dict")
    checks = {"epsilon": lambda v: v is None or (_number(v) and v >= 0),
              "epsilon_per_prompt": lambda v: v is None or (_number(v) and v >= 0),
              "delta": lambda v: v is None or (_number(v) and 0 <= v <= 1),
              "kind": lambda v: v is None or v in GUARANTEE_KINDS}
    wanted = {"epsilon": "None or a number >= 0", "epsilon_per_prompt": "None or a number >= 0",
              "delta": "None or a number in [0, 1]", "kind": f"None or one of {', '.join(GUARANTEE_KINDS)}"}
    for key, ok in checks.items():
        if not ok(guarantee.get(key)):
            raise DefenseError(f"{label}: guarantee gives {key} {guarantee[key]!r}; expected {wanted[key]}")
    if not NAME.fullmatch(description["name"]):
        raise DefenseError(f"{label}: its name {description['name'][:80]!r} is not a name of letters, digits, '_', '.' "
                           "or '-' (at most 64)")
    record = {**description, **guarantee}
    bad_text = next((text for text in _strings(record) if any(unicodedata.category(ch)[0] == "C" for ch in text)), None)
    if bad_text is not None:
        raise DefenseError(f"{label}: describe or guarantee holds text with control or format characters "
                           f"({ascii(bad_text[:80])}); records and pages need plain one-line text")
    try:
        json.dumps(record)  # inf is allowed here: the summary stores it as null ("no meaningful guarantee")
    except (TypeError, ValueError) as exc:
        raise DefenseError(f"{label}: describe or guarantee returned what JSON cannot hold "
                           f"({type(exc).__name__}: {one_line(exc)})") from None
    return record


NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")  # as the entry schema's names


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def check_output(label: str, what: str, out: object, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype:
        got = f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise DefenseError(f"{label}: {what} returned {got}; expected a tensor of shape {tuple(like.shape)} and "
                           f"dtype {like.dtype}")
    if out.device != like.device:
        raise DefenseError(f"{label}: {what} returned a tensor on {out.device}; expected it on {like.device}")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise DefenseError(f"{label}: {what} returned NaN or infinite values ({bad} of {out.numel()}); "
                           "a defence must return finite hidden states")


def check_defense(defense: Defense, sample: torch.Tensor) -> None:
    """What attacks use of a defence, checked once on real states: `simulate`, `noise_law` and
    `noise_std`."""
    label = defense_label(defense)
    try:
        simulated = defense.simulate(sample.clone())
    except Exception as exc:
        raise DefenseError(f"{label}: simulate raised {type(exc).__name__}: {one_line(exc)}") from exc
    check_output(label, "simulate", simulated, sample)
    try:
        std = defense.noise_std
        ok = isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std >= 0
    except Exception as exc:
        raise DefenseError(f"{label}: noise_std raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not ok:
        raise DefenseError(f"{label}: noise_std is {std!r}; expected a finite number >= 0")
    try:
        law = defense.noise_law
        ok = law is None or isinstance(law, NoiseLaw)
        std = law.std(dim=sample.shape[-1]) if ok and law is not None else 0.0
        ok = ok and isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std >= 0
    except Exception as exc:
        raise DefenseError(f"{label}: noise_law raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not ok:
        raise DefenseError(f"{label}: noise_law is {law!r}; expected None or a NoiseLaw (invbench.defenses.noise) "
                           "with a finite std >= 0")


def defend_one(defense: Defense, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a defence to one prompt's states (a copy) and check what comes back."""
    label = defense_label(defense)
    try:
        out = defense.apply(hidden.clone(), generator=generator)
    except Exception as exc:
        raise DefenseError(f"{label}: apply raised {type(exc).__name__}: {one_line(exc)}") from exc
    check_output(label, "apply", out, hidden)
    return out
