"""Command-line options shared by several commands, each declared once: the model, its layer and the
seed, the device, the runs and leaderboards folders, how a defence and its parameters are given,
and every attack's options (made from the attacks' own configs)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import click

from .config import DEVICE_DEFAULTS, SEED, SEED_MAX

class NamedPath(click.Path):
    """click.Path refusing an empty name: `--out ""` would write into the working directory (and
    `curve --out ""` a hidden file named `.png`)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, os.PathLike):  # from Python callers (main([... Path ...])): as text, like argv
            value = os.fspath(value)
        if isinstance(value, str) and not value.strip():
            self.fail(f"{value!r} is an empty name; name a file or folder", param, ctx)
        return super().convert(value, param, ctx)


DEVICE = click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
                      help="Where the model runs (auto: a CUDA GPU if there is one).")
LAYER = click.option("--layer", type=int, default=-1, show_default=True,
                     help="Leaked layer: index into hidden_states (-1 = last, after the final norm).")
SEED_OPTION = click.option("--seed", type=click.IntRange(0, SEED_MAX), default=SEED, show_default=True,
                           help="Seed for prompts, noise, attacks and seeded random models.")
RUNS_DIR = click.option("--runs-dir", type=NamedPath(file_okay=False, path_type=Path), default=Path("runs"),
                        show_default=True, help="Where runs are written, one folder per run (rerunning resumes).")
BOARD_DIR = click.option("--board-dir", type=NamedPath(file_okay=False, path_type=Path),
                         default=Path("leaderboards"), show_default=True,
                         help="The leaderboards folder: <protocol>/ holds the entries, <protocol>/curves/ the curves.")


# --- where the work runs: `run`, `submit`, `verify` (a run's prompts in shards) and `sweep` (its grid points) ------
ENGINE = click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                      help="local: here, one batch (or grid point) after another; ray: over a Ray cluster's workers, "
                           "one GPU each where it has GPUs (a run's prompts in shards, a sweep's grid points; "
                           "pip install 'invbench[ray]').")
ADDRESS = click.option("--address", default=None, metavar="HOST:PORT",
                       help="ray: the cluster's head, as `ray start --head` printed it [default: start a local Ray "
                            "instance].")
RAY_TOKEN_FILE = click.option("--ray-token-file", type=NamedPath(dir_okay=False), default=None, metavar="PATH",
                              help="ray: a file holding the cluster's token (token authentication). Without it the "
                                   "token is Ray's usual: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token "
                                   "(on the head: `ray get-auth-token`).")
SHARD_SIZE = click.option("--shard-size", type=click.IntRange(min=1), default=None, metavar="N",
                          help="ray: prompts per Ray task [the pending prompts spread evenly over the cluster's GPUs, "
                               "or CPUs, at most --batch-size]. Records equal an unsharded run's with --batch-size N "
                               "bit for bit, any other's up to float rounding.")


def engine_options(*, shards: bool) -> Callable:
    """--engine, --address and --ray-token-file, and with `shards` --shard-size (a run's prompts in shards)."""
    options = [ENGINE, ADDRESS, RAY_TOKEN_FILE] + ([SHARD_SIZE] if shards else [])

    def add(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func
    return add


def engine_of(opts: dict[str, Any]):
    """The `invbench.cluster.Engine` the flags describe; --address, --ray-token-file or --shard-size without
    --engine ray is one error line."""
    from .cluster import Engine

    return Engine(opts.pop("engine"), address=opts.pop("address"), token_file=opts.pop("ray_token_file"),
                  shard_size=opts.pop("shard_size", None))


def existing_board_dir(board_dir: Path) -> Path:
    """A --board-dir to read from must exist: a mistyped one once rendered an empty board without a word."""
    if not Path(board_dir).is_dir():
        raise click.UsageError(f"--board-dir {str(board_dir)!r} is not a folder (mistyped?); the boards are under "
                               "leaderboards/ by default")
    return Path(board_dir)


def model_option(default: str | None = None) -> Callable:
    """--model; `default` None means gpt2, falling back to smollm2-135m when GPT-2 is not available offline."""
    shown = f"Default {default}." if default else ("Default gpt2, falling back to smollm2-135m when GPT-2 is not "
                                                   "available offline.")
    return click.option("--model", default=default, help="Alias (gpt2, smollm2-135m, tiny-gpt2, tiny-bytes, gpt2-random), "
                        f"Hugging Face id or local directory. {shown}")


def parse_params(pairs: tuple[str, ...]) -> dict[str, str]:
    """`--param NAME=VALUE` pairs; a name given twice is refused (see `defense_params`)."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise click.BadParameter(f"expected name=value, got {pair!r}", param_hint="--param")
        key = name.strip().replace("-", "_")  # --param noise-multiplier=1 names noise_multiplier
        if key in params:
            raise click.BadParameter(f"{key} is given twice ({key}={params[key]} and {key}={value.strip()}); "
                                     "give each parameter once", param_hint="--param")
        params[key] = value.strip()
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
    """The defence's parameters from its named flags and --param. The one rule, in `run`, `utility`,
    `submit` and `sweep` alike: each parameter is given once. `--sigma 0.2 --param sigma=0.1` (before:
    0.2 silently won) and two `--param sigma=...` (before: the last won) are refused, as `sweep`
    refuses a swept parameter listed twice."""
    params: dict[str, Any] = parse_params(opts["params"])
    for key in NAMED_DEFENSE_FLAGS:
        if opts[key] is None:
            continue
        flag = f"--{key.replace('_', '-')}"
        if key in params:
            raise click.BadParameter(f"{flag} {opts[key]} and --param {key}={params[key]} both give {key}; "
                                     "give each parameter once", param_hint=flag)
        params[key] = opts[key]
    return params


# --- attack options: one flag per option field of the registered attacks ---------------------------

def attack_option_specs() -> dict[str, dict[str, Any]]:
    """option name -> {help, kind, metadata, defaults per attack}, from every attack's config as the listing
    holds it (`invbench.listing`: no attack code is imported to build the flags)."""
    from .listing import KINDS, load_listing

    specs: dict[str, dict[str, Any]] = {}
    for name, attack in load_listing()["attacks"].items():
        for option_name, option in attack["options"].items():
            spec = specs.setdefault(option_name, {"help": option["help"], "metadata": option["metadata"],
                                                  "kind": KINDS[option["kind"]], "defaults": {}})
            spec["defaults"][name] = option["default"]
    return specs


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, refusing nan and inf too (it lets them through: nan fails no comparison)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def _click_type(kind: type, metadata: dict[str, Any]) -> Any:
    """The flag's type from the option's declaration: the bounds `attacks.base.check_options` applies."""
    from .listing import load_listing

    int_max = load_listing()["option_int_max"]
    if "choices" in metadata:
        return click.Choice(list(metadata["choices"]))
    if kind is bool:
        return click.BOOL
    if kind is int:
        return click.IntRange(min=metadata.get("min"), max=metadata.get("max", int_max))
    if kind is float:
        return FiniteFloatRange(min=metadata.get("min"), min_open=metadata.get("min_open", False),
                                max=metadata.get("max"))
    return str


def attack_options(func: Callable) -> Callable:
    """Add `--<option>` for every attack option; the help names the attacks that take it and
    their defaults (presets may change them)."""
    for option_name, spec in sorted(attack_option_specs().items(), reverse=True):
        owners = ", ".join(spec["defaults"])
        defaults = ", ".join(f"{a}: {d}" for a, d in spec["defaults"].items())
        cpu = DEVICE_DEFAULTS["cpu"]
        on_cpu = {a: o[option_name] for a, o in (*cpu.capped.items(), *cpu.unasked.items()) if option_name in o}
        if on_cpu:
            defaults += "; a CPU run without --preset: " + ", ".join(f"{a}: {v}" for a, v in on_cpu.items())
        func = click.option(f"--{option_name.replace('_', '-')}", option_name, type=_click_type(spec["kind"], spec["metadata"]),
                            default=None, help=f"{owners}: {spec['help']} [{defaults}]")(func)
    return func


def given_attack_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The attack options the user gave (those left out stay the attack's or preset's own)."""
    return {k: opts[k] for k in attack_option_specs() if opts.get(k) is not None}
