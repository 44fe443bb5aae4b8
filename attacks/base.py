"""What every attack receives and returns.

An attack gets white-box access (`invbench.leaks.oracle.WhiteBox`), the defended targets of a
batch of prompts (B, T, d), and the defence's public description (its `simulate` and
`noise_std`). It returns, per prompt and position, the committed token and its discrete loss:
the MSE between the committed token's (defence-simulated) hidden state and the target. The
discrete loss is what the ground-truth-free failure detector scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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


class Attack:
    """Base class: subclasses set `name`, hold a config dataclass, implement `run`."""

    name: ClassVar[str] = "attack"
    #: Options (CLI flags such as --steps) this attack accepts as overrides.
    option_names: ClassVar[frozenset[str]] = frozenset()

    def config_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Progress | None = None) -> AttackOutput:
        raise NotImplementedError
