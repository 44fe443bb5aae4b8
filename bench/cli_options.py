"""Command-line options shared by several commands: how a defence and its parameters are given."""
from __future__ import annotations

from typing import Any

import click


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected name=value, got {pair!r}", param_hint="--param")
        params[name.strip()] = value.strip()
    return params


def defence_flags(func):
    """A defence's named parameters (--sigma, --clip, ...) and the generic --param."""
    options = [
        click.option("--sigma", type=float, default=None, help="gaussian: noise standard deviation."),
        click.option("--clip", type=float, default=None, help="dp: L2 clipping norm C per vector."),
        click.option("--noise-multiplier", type=float, default=None, help="dp: noise std / C."),
        click.option("--epsilon", type=float, default=None, help="dp: target epsilon (instead of --noise-multiplier)."),
        click.option("--delta", type=float, default=None, help="dp: delta [1e-5]."),
        click.option("--bits", type=int, default=None, help="quantize: bits (1..16)."),
        click.option("--scheme", default=None, help="quantize: per-vector or per-tensor."),
        click.option("--param", "params", multiple=True, metavar="NAME=VALUE", help="Defence parameter (repeatable)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def defence_options(func):
    """--defense (default none) with its parameters, for `run` and `utility`."""
    func = defence_flags(func)
    return click.option("--defense", default="none", show_default=True,
                        help="Defence name (see `invbench defenses`) or path/to/file.py:ClassName.")(func)


NAMED_DEFENCE_FLAGS = ("sigma", "clip", "noise_multiplier", "epsilon", "delta", "bits", "scheme")


def defence_params(opts: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = parse_params(opts["params"])
    params.update({k: opts[k] for k in NAMED_DEFENCE_FLAGS if opts[k] is not None})
    return params
