"""Named attacks: each registers with `@register_attack` and is built from a preset name and
option overrides (CLI flags such as --steps or --candidates)."""
from __future__ import annotations

from typing import Any

from invbench.registry import Registry

from .base import Attack, AttackError

ATTACKS: Registry[type[Attack]] = Registry("attack", base=Attack, error=AttackError)
register_attack = ATTACKS.register


def available_attacks() -> dict[str, type[Attack]]:
    return ATTACKS.items()


def parse_attack_list(spec: str) -> list[str]:
    """`continuous`, `continuous,scan` or `all` -> attack names, validated, in order."""
    names = ATTACKS.names() if spec.strip() == "all" else [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if not names:  # --attack "" once ran the defaults without a word
        raise AttackError(f"--attack {spec!r} names no attack; choose from {', '.join(ATTACKS)} or all")
    if unknown:
        raise AttackError(f"unknown attack {', '.join(unknown) or spec!r}; choose from {', '.join(ATTACKS)} or all")
    return list(dict.fromkeys(names))


def make_attack(name: str, *, preset: str | None = None, overrides: dict[str, Any] | None = None) -> Attack:
    return ATTACKS.get(name).from_options(preset=preset, overrides=overrides or {})
