"""A tiny outside defence, loaded by path in the tests: `tests/plugins/my_defense.py:Scale`."""
import torch

from invbench.defenses import Defense, DefenseError


class Scale(Defense):
    """Multiply every hidden state by a constant."""

    name = "scale"
    param_types = {"factor": float, "enabled": bool}

    def __init__(self, *, factor: float = 0.5, enabled: bool = True) -> None:
        super().__init__(factor=factor, enabled=enabled)
        if not factor > 0:
            raise DefenseError(f"scale: --factor must be > 0, got {factor!r}")
        self.factor, self.enabled = float(factor), bool(enabled)

    def simulate(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * self.factor if self.enabled else hidden


class NotADefense:
    """Has the right shape of name but is not a Defense subclass."""

    name = "nope"
