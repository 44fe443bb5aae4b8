"""Broken outside defences, loaded by path in tests/test_reliability.py:
`--defense tests/plugins/bad.py:ReturnsNaN` and so on. Each breaks one rule of the interface."""
import torch

from invbench.defenses import Defense


class ReturnsNaN(Defense):
    """apply puts a NaN in every prompt's states."""

    name = "returns-nan"

    def apply(self, hidden, *, generator):
        out = hidden.clone()
        out[0, 0] = float("nan")
        return out


class ReturnsInf(Defense):
    """apply overflows to infinity."""

    name = "returns-inf"

    def apply(self, hidden, *, generator):
        return hidden * float("inf")


class WrongShape(Defense):
    """apply drops the last position."""

    name = "wrong-shape"

    def apply(self, hidden, *, generator):
        return hidden[:-1]


class WrongDtype(Defense):
    """apply returns float64 states."""

    name = "wrong-dtype"

    def apply(self, hidden, *, generator):
        return hidden.double()


class NotATensor(Defense):
    """apply returns a list."""

    name = "not-a-tensor"

    def apply(self, hidden, *, generator):
        return hidden.tolist()


class Raises(Defense):
    """apply raises."""

    name = "raises"

    def apply(self, hidden, *, generator):
        raise RuntimeError("the defence's server is down\nsecond line of the message")


class BadSimulate(Defense):
    """apply is fine, but simulate (what attacks call on candidates) changes the shape."""

    name = "bad-simulate"

    def simulate(self, hidden):
        return hidden.mean(dim=-1)


class BadNoiseStd(Defense):
    """noise_std is not a number."""

    name = "bad-noise-std"

    @property
    def noise_std(self):
        return float("nan")


class InPlace(Defense):
    """Writes its noise into the tensor it is given (allowed: the runner passes a copy)."""

    name = "in-place"
    param_types = {"sigma": float}

    def __init__(self, *, sigma: float = 0.1) -> None:
        super().__init__(sigma=sigma)
        self.sigma = sigma

    @property
    def noise_std(self):
        return self.sigma

    def apply(self, hidden, *, generator):
        return hidden.add_(torch.randn(hidden.shape, generator=generator) * self.sigma)



class InitRaises(Defense):
    """__init__ raises: the defence cannot be built."""

    name = "init-raises"

    def __init__(self, **params):
        raise RuntimeError("no licence for this defence\nsecond line")


class DescribeNotJson(Defense):
    """describe() holds an object JSON cannot write (config.json and summary.json would break)."""

    name = "describe-not-json"

    def describe(self):
        return {"name": self.name, "params": {}, "extra": object()}


class GuaranteeNotANumber(Defense):
    """guarantee() gives epsilon "lots" (once written into summary.json, breaking its schema)."""

    name = "guarantee-not-a-number"

    def guarantee(self, tokens=None):
        return {"epsilon": "lots", "delta": None, "kind": None, "neighbouring": None, "reason": "trust me"}
