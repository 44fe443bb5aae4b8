"""Defences: transform leaked hidden states. See defenses/README.md for the interface."""
from .base import GUARANTEE_KINDS, RESOURCES, Defense, DefenseError
from .noise import DChiNoise, GaussianNoise, LaplaceNoise, NoiseLaw
from .laws import DiagonalGaussianNoise, ScaledGaussianNoise, SharedRadiusDChiNoise, SnappedDChiNoise, SnDNoise
from .registry import DEFENSES, available_defenses, load_defense_class, make_defense, register_defense
from . import aniso, builtin, dchi, dp, dp_forward, laplace, quantize, snd  # noqa: F401  (registers the built-in defences; topk comes by entry point)

__all__ = ["GUARANTEE_KINDS", "RESOURCES", "DChiNoise", "Defense", "DefenseError", "DiagonalGaussianNoise",
           "GaussianNoise", "LaplaceNoise", "NoiseLaw", "ScaledGaussianNoise", "SharedRadiusDChiNoise", "SnDNoise",
           "SnappedDChiNoise", "available_defenses", "load_defense_class", "make_defense", "register_defense"]
