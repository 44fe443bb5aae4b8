"""Command-line options shared by several commands, each declared once: the model, its layer and the
seed, the device, the runs and leaderboards folders, how a defence and its parameters are given,
and every attack's options (made from the attacks' own configs)."""
from __future__ import annotations

from dataclasses import MISSING
from pathlib import Path
from typing import Any, Callable

import click

from .config import SEED

DEVICE = click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                      help="Where the model runs (auto: a CUDA GPU if there is one).")
LAYER = click.option("--layer", type=int, default=-1, show_default=True,
                     help="Leaked layer: index into hidden_states (-1 = last, after the final norm).")
SEED_OPTION = click.option("--seed", type=int, default=SEED, show_default=True,
                           help="Seed for prompts, noise, attacks and seeded random models.")
RUNS_DIR = click.option("--runs-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("runs"),
                        show_default=True, help="Where runs are written, one folder per run (rerunning resumes).")
BOARD_DIR = click.option("--board-dir", type=click.Path(file_okay=False, path_type=Path),
                         default=Path("leaderboards"), show_default=True,
                         help="The leaderboards folder: <protocol>/ holds the entries, <protocol>/curves/ the curves.")


def model_option(default: str | None = None) -> Callable:
    """--model; `default` None means gpt2, falling back to smollm2-135m when GPT-2 is not available offline."""
    shown = f"Default {default}." if default else ("Default gpt2, falling back to smollm2-135m when GPT-2 is not "
                                                   "available offline.")
    return click.option("--model", default=default, help="Alias (gpt2, smollm2-135m, tiny-gpt2, gpt2-random), "
                        f"Hugging Face id or local directory. {shown}")


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected name=value, got {pair!r}", param_hint="--param")
        params[name.strip()] = value.strip()
    return params


def defense_flags(func):
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


def defense_options(func):
    """--defense (default none) with its parameters, for `run` and `utility`."""
    func = defense_flags(func)
    return click.option("--defense", default="none", show_default=True,
                        help="Defence name (see `invbench defenses`) or path/to/file.py:ClassName.")(func)


NAMED_DEFENSE_FLAGS = ("sigma", "clip", "noise_multiplier", "epsilon", "delta", "bits", "scheme")


def defense_params(opts: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = parse_params(opts["params"])
    params.update({k: opts[k] for k in NAMED_DEFENSE_FLAGS if opts[k] is not None})
    return params


# --- attack options: one flag per option field of the registered attacks ---------------------------

def attack_option_specs() -> dict[str, dict[str, Any]]:
    """option name -> {help, type, metadata, defaults per attack}, from every attack's config."""
    from invbench.attacks import available_attacks
    from invbench.attacks.base import command_line_options

    specs: dict[str, dict[str, Any]] = {}
    for name, cls in available_attacks().items():
        for option_name, f in command_line_options(cls.config_class).items():
            spec = specs.setdefault(option_name, {"help": f.metadata["help"], "metadata": f.metadata,
                                                  "kind": type(f.default), "defaults": {}})
            spec["defaults"][name] = f.default if f.default is not MISSING else None
    return specs


def _click_type(kind: type, metadata: dict[str, Any]) -> Any:
    if "choices" in metadata:
        return click.Choice(list(metadata["choices"]))
    if kind is int:
        return click.IntRange(min=metadata.get("min"))
    if kind is float:
        return click.FloatRange(min=metadata.get("min"), min_open=metadata.get("min_open", False))
    return str


def attack_options(func: Callable) -> Callable:
    """Add `--<option>` for every attack option; the help names the attacks that take it and
    their defaults (presets may change them)."""
    for option_name, spec in sorted(attack_option_specs().items(), reverse=True):
        owners = ", ".join(spec["defaults"])
        defaults = ", ".join(f"{a}: {d}" for a, d in spec["defaults"].items())
        func = click.option(f"--{option_name.replace('_', '-')}", option_name, type=_click_type(spec["kind"], spec["metadata"]),
                            default=None, help=f"{owners}: {spec['help']} [{defaults}]")(func)
    return func


def given_attack_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The attack options the user gave (those left out stay the attack's or preset's own)."""
    return {k: opts[k] for k in attack_option_specs() if opts.get(k) is not None}
