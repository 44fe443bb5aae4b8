"""What every attack receives and returns.

An attack gets white-box access (`invbench.leaks.oracle.WhiteBox`), the defended targets of a
batch of prompts (B, T, d), and the defence's public description (its `simulate` and
`noise_std`). It returns, per prompt and position, the committed token and its discrete loss:
the MSE between the committed token's (defence-simulated) hidden state and the target. The
discrete loss is what the ground-truth-free failure detector scores.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, ClassVar

import numpy as np
import torch

# Progress callback: called once per finished position with (position, total positions).
Progress = Callable[[int, int], None]


class AttackError(ValueError):
    """Invalid attack name or option; printed by the CLI as one line."""


@dataclass
class AttackOutput:
    tokens: torch.Tensor  # (B, T) committed token ids
    discrete_loss: torch.Tensor  # (B, T) MSE of the committed token's hidden state vs the target
    seconds: torch.Tensor  # (B, T) wall time per position, amortised over the prompts in the batch
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T) per-position diagnostics


def prompt_generator(seed: int, prompt_index: int, stream: int = 0) -> torch.Generator:
    """One CPU generator per (seed, prompt, stream), so a prompt draws the same random numbers
    whether it runs alone or in a batch, on any device, and on resume. Streams keep unrelated
    draws (an attack's init, a defence's noise) independent."""
    state = np.random.SeedSequence([seed, prompt_index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the last (hidden) dimension."""
    return (a - b).pow(2).mean(dim=-1)


def simulate_with_gradient(defense, hidden: torch.Tensor) -> torch.Tensor:
    """The defence's deterministic part with a usable gradient: its own where it has one
    (clipping), else straight-through (quantisation's rounding has zero gradient)."""
    if getattr(defense, "differentiable", True):
        return defense.simulate(hidden)
    return hidden + (defense.simulate(hidden) - hidden).detach()


class Attack:
    """Base class: subclasses set `name`, `config_class` (a dataclass with `validate()`), their
    `presets` (name -> field values) and implement `run`."""

    name: ClassVar[str] = "attack"
    config_class: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {"fast": {}, "baseline": {}, "high-acc": {}}
    default_preset: ClassVar[str] = "baseline"
    #: Options (CLI flags such as --steps) this attack accepts as overrides.
    option_names: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config) -> None:
        config.validate()
        self.config = config

    @classmethod
    def from_options(cls, *, preset: str | None, overrides: dict[str, Any]) -> "Attack":
        """The config of a preset (default `default_preset`) with option overrides on top."""
        preset = preset or cls.default_preset
        if preset not in cls.presets:
            raise AttackError(f"{cls.name}: unknown preset {preset!r}; choose from {', '.join(cls.presets)}")
        unknown = set(overrides) - set(cls.config_class.__dataclass_fields__)
        if unknown:
            raise AttackError(f"{cls.name}: unknown option(s) {', '.join(sorted(unknown))}")
        return cls(replace(cls.config_class(), **{**cls.presets[preset], **overrides}))

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Progress | None = None) -> AttackOutput:
        raise NotImplementedError
