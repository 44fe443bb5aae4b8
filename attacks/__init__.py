"""Attacks: recover token ids from (defended) hidden states with white-box access."""
from .base import Attack, AttackError, AttackOutput, Candidates
from .registry import available_attacks, make_attack, parse_attack_list, register_attack
from . import continuous  # noqa: F401  (registers the attack)
from . import guided, nearest, projection, scan, sequence  # noqa: F401

__all__ = ["Attack", "AttackError", "AttackOutput", "Candidates", "available_attacks", "make_attack", "parse_attack_list",
           "register_attack"]
