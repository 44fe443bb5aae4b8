"""The `invbench` command line."""
from __future__ import annotations

import shlex
import signal
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click

from . import __version__
from .board_cli import leaderboard, protocols, submit, verify
from .cli_options import (DEVICE, LAYER, SEED_OPTION, NamedPath, attack_options, defense_options, defense_params,
                          given_attack_options, model_option)
from .config import BATCH_SIZE, DEVICE_DEFAULTS, RunConfig
from .errors import InvbenchError, one_line
from .formats import cell
from .summary import Guarantee
from .sweep_cli import curve, sweep
from invbench.attacks.base import PRESET_NAMES
from invbench.attacks.ranker import Recipe as _RankerRecipe

RANKER_DOCUMENTS, RANKER_HELD_OUT, RANKER_TOKENS = (_RankerRecipe.documents, _RankerRecipe.held_out,
                                                    _RankerRecipe.tokens_per_document)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """invbench: how much text leaks from a language model's hidden states, under which defence.

    `invbench run` captures hidden states of real text, applies a defence, runs inversion attacks
    and scores what they recover."""
    ctx.obj = {"debug": debug}


def _device_default(key: str) -> str:
    values = {device: getattr(d, key) for device, d in DEVICE_DEFAULTS.items()}
    shown = {device: ",".join(v) if isinstance(v, tuple) else v for device, v in values.items()}
    return f"[GPU: {shown['cuda']}; CPU: {shown['cpu']}]"


@cli.command()
@model_option()
@click.option("--dataset", default="c4", show_default=True,
              help="c4, wikipedia, random (uniformly random token ids), or a file of your own texts (.txt one per line, "
                   ".jsonl with 'text', .parquet).")
@click.option("--n", type=click.IntRange(min=1), default=None, help=f"Number of prompts {_device_default('n')}.")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help=f"Tokens per prompt {_device_default('tokens')}.")
@LAYER
@SEED_OPTION
@DEVICE
@click.option("--attack", "attack_spec", default=None,
              help=f"Attack name, comma-separated names, or 'all' {_device_default('attacks')}.")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None,
              help=f"Attack preset (continuous; the other attacks have one setting) {_device_default('preset')}; "
              "on a CPU the preset left out also caps continuous at "
              f"{DEVICE_DEFAULTS['cpu'].capped.get('steps')} steps.")
@attack_options
@defense_options
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
              help="Prompts attacked together.")
@click.option("--out", type=NamedPath(), default="runs/latest", show_default=True,
              help="Results folder (config.json, records.jsonl, summary.json); rerunning resumes.")
def run(**opts: Any) -> None:
    """Leak, defend, attack, score: write results to --out and print a table with a verdict."""
    from invbench.attacks import parse_attack_list

    from .runner import run as run_benchmark

    cfg = RunConfig(model=opts["model"], dataset=opts["dataset"], n=opts["n"], tokens=opts["tokens"], layer=opts["layer"],
                    seed=opts["seed"], device=opts["device"],
                    attacks=parse_attack_list(opts["attack_spec"]) if opts["attack_spec"] is not None else None,
                    preset=opts["preset"], attack_options=given_attack_options(opts), defense=opts["defense"],
                    defense_params=defense_params(opts), batch_size=opts["batch_size"], out=opts["out"])
    summary = run_benchmark(cfg, echo=lambda line: click.echo(line, err=True))
    click.echo(format_summary(summary))
    click.echo(f"results: {cfg.out}/summary.json (per prompt: {cfg.out}/records.jsonl)")


@cli.command()
def defenses() -> None:
    """List every registered defence (built-in and plug-in) with its parameters."""
    from invbench.defenses import available_defenses

    for name, cls in sorted(available_defenses().items()):
        params = ", ".join(f"{p}: {t.__name__}" for p, t in cls.param_types.items()) or "no parameters"
        click.echo(f"{name:<10} {params}")
        for line in textwrap.wrap(first_paragraph(cls.__doc__), width=100):  # whole sentences, never cut
            click.echo(f"{'':<10} {line}")


@cli.command()
def attacks() -> None:
    """List every registered attack with its presets and options."""
    from invbench.attacks import available_attacks

    for name, cls in available_attacks().items():
        click.echo(f"{name:<11} {first_line(sys.modules[cls.__module__].__doc__)}")
        options = ", ".join(f"--{o.replace('_', '-')}" for o in sorted(cls.option_names)) or "none"
        presets = ", ".join(cls.presets) or "none (one setting, whatever --preset says)"
        click.echo(f"{'':<11} presets {presets}; options {options}")


def first_line(doc: str | None) -> str:
    """The first non-blank line of a docstring ('' for none or a blank one)."""
    return next((line.strip() for line in (doc or "").splitlines() if line.strip()), "")


def first_paragraph(doc: str | None) -> str:
    """The first paragraph of a docstring as one line ('' for none or a blank one): a docstring's
    first line is often half a sentence."""
    paragraph = []
    for line in (doc or "").strip().splitlines():
        if not line.strip():
            break
        paragraph.append(line.strip())
    return " ".join(paragraph)


@cli.command()
@model_option()
@click.option("--dataset", default="c4", show_default=True, help="As for `invbench run`.")
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of texts.")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens per text.")
@LAYER
@SEED_OPTION
@DEVICE
@defense_options
@click.option("--out", type=NamedPath(dir_okay=False), default=None, help="Also write the result as JSON to this file.")
def utility(**opts: Any) -> None:
    """The defence's cost alone (no attack): LM-head agreement, KL, perplexity ratio, cosine."""
    from .results import write_json_atomic
    from .runner import utility_only

    cfg = RunConfig(model=opts["model"], dataset=opts["dataset"], n=opts["n"], tokens=opts["tokens"],
                    layer=opts["layer"], seed=opts["seed"], device=opts["device"], defense=opts["defense"],
                    defense_params=defense_params(opts))
    result = utility_only(cfg, echo=lambda line: click.echo(line, err=True))
    click.echo(format_utility(result))
    if opts["out"]:
        write_json_atomic(Path(opts["out"]), result)


@cli.command("fit-ranker")
@model_option("smollm2-135m")
@LAYER
@click.option("--documents", type=click.IntRange(min=RANKER_HELD_OUT + 1), default=None,
              help=f"Training documents, more than the {RANKER_HELD_OUT} held out; those shorter than "
                   f"{RANKER_TOKENS} tokens are skipped [the recipe's: {RANKER_DOCUMENTS}].")
@SEED_OPTION
@DEVICE
@click.option("--out", type=NamedPath(dir_okay=False), default=None,
              help="Ranker file to write [the invbench cache, where `guided` finds it].")
def fit_ranker(model: str, layer: int, documents: int | None, seed: int, device: str, out: str | None) -> None:
    """Fit the `guided` attack's learned ranker on the model's states of public text (resumable)."""
    from dataclasses import replace

    from invbench.attacks.ranker import Recipe, cache_path, fit_ranker as fit
    from invbench.leaks.models import load_model
    from invbench.leaks.prompts import ranker_training_texts

    from .runner import resolve_device, white_box

    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    loaded = load_model(model, seed=seed, notify=echo)
    oracle = white_box(loaded, layer=layer, device=resolve_device(device))
    recipe = Recipe() if documents is None else replace(Recipe(), documents=documents)
    texts, data = ranker_training_texts(notify=echo, limit=recipe.documents)
    if len(texts) < recipe.documents:  # the recipe records what was used, not what was asked for
        echo(f"note: only {len(texts)} training documents are available ({data}); using {len(texts)}, "
             f"not --documents {recipe.documents}")
        recipe = replace(recipe, documents=len(texts))
    path = Path(out) if out else cache_path(oracle, data, recipe)
    fit(oracle, texts=texts, data=data, out=path, recipe=recipe, notify=echo, model_name=loaded.name,
        command="invbench " + shlex.join(["fit-ranker", *sys.argv[2:]]) if sys.argv[1:2] == ["fit-ranker"]
        else "invbench fit-ranker")
    click.echo(f"ranker: {path}")


# --- output ---------------------------------------------------------------------------------------

def format_defense(defense: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
    text = f"defence {defense['name']}{f' ({params})' if params else ''}"
    guarantee = Guarantee.of(defense)
    if guarantee.epsilon is not None:
        text += f", {guarantee.sentence()}"
    elif defense.get("reason"):
        text += f" (epsilon: {defense['reason']})"
    return text


def format_utility(result: dict[str, Any]) -> str:
    u = result["utility"]
    lines = [f"{result['model']} | {result['dataset']} | {result['n']} texts x {result['tokens']} tokens | "
             f"{format_defense(result['defense'])}"]
    lines += [f"  {key:<18} {cell(value, '.4f')}" for key, value in u.items() if key != "note"]
    if u.get("note"):
        lines.append(f"  note: {u['note']}")
    return "\n".join(lines)


def format_summary(summary) -> str:
    """The result table printed at the end of a run (`summary`: a RunSummary), its verdict in words."""
    lines = [f"{summary.model} | {summary.dataset} | {summary.n} prompts x {summary.tokens} tokens | "
             f"{format_defense(summary.defense)}",
             f"{'attack':<12} {'exact':>6} {'tok acc':>8} {'similar':>8} {'search fail':>11} {'det AUROC':>10} "
             f"{'s/token':>9} {'verdict':>13}"]
    for name, m in summary.attacks.items():
        lines.append(f"{name:<12} {cell(m.exact_match):>6} {cell(m.token_accuracy):>8} {cell(m.similarity):>8} "
                     f"{cell(m.search_failure_rate):>11} {cell(m.detector_auroc):>10} {cell(m.seconds_per_token, '.4f'):>9} "
                     f"{cell(m.verdict):>13}")
    lines.append("utility: " + ", ".join(f"{k} {cell(v, '.4f')}" for k, v in summary.utility.items() if k != "note"))
    if len(summary.attacks) > 1:
        lines.append("worst case: " + ", ".join(f"{k} {cell(w.value)} ({w.attack})" for k, w in summary.worst_case.items()))
    for name, m in summary.attacks.items():
        if "candidates_per_token" in m.diagnostics and m.diagnostics["candidates_per_token"]:
            c = m.diagnostics["candidates_per_token"]
            lines.append(f"{name}: {c['mean']:.1f} candidates verified per token (median {c['median']:.0f}, "
                         f"p99 {c['p99']:.0f}); scoring {m.diagnostics['scoring']}")
    if summary.radius:
        r = summary.radius
        lines.append(f"certified radius ({r['scope']}): median {r['median_radius']:.3g}; {r['note']}")
    if summary.verdict:
        lines.append(f"verdict: {summary.verdict.says}")
    return "\n".join(lines)


DEBUG_HINT = "rerun with `invbench --debug ...` (before the command) for the traceback"
SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into what Ctrl-C raises, so a run saves and says what it kept in the same way."""


def debug_requested(args: list[str]) -> bool:
    """Whether --debug was given to invbench itself: among the options before the command."""
    for arg in args:
        if arg == "--debug":
            return True
        if not arg.startswith("-"):
            return False
    return False


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While the CLI runs, SIGTERM raises `Terminated` (a KeyboardInterrupt), so `kill PID` saves
    what Ctrl-C saves and prints the same message; the list holds the signal once it came."""
    received: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        received.append(signum)
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (an embedding program): leave signals to it
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors (InvbenchError, and the system's OSError such as a full disk)
    print one line (`error: ...`) and exit 2; anything else (a bug, an input nobody foresaw) one
    line naming the exception and exit 1; `invbench --debug ...` shows the traceback instead.
    Ctrl-C and SIGTERM print what was saved and how to resume, and exit 130 and 143."""
    args = sys.argv[1:] if argv is None else argv
    debug = debug_requested(args)
    with sigterm_as_interrupt() as terminated:
        try:
            cli.main(args=args, prog_name="invbench", standalone_mode=False)
        except click.exceptions.NoArgsIsHelpError as exc:  # plain `invbench`: its help, as help
            click.echo(exc.ctx.get_help() if exc.ctx else cli.get_help(click.Context(cli, info_name="invbench")))
            sys.exit(0)
        except click.UsageError as exc:  # bad option or value: click's message, without the usage block
            if debug:
                raise
            click.echo(f"error: {usage_message(exc, args)}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            if debug:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except (KeyboardInterrupt, click.Abort) as exc:
            if isinstance(exc, click.Abort) and isinstance(exc.__context__, KeyboardInterrupt):
                exc = exc.__context__  # click turns Ctrl-C into a bare Abort; the runner's message is on the original
            click.echo(one_line(str(exc)) or "interrupted: what was saved so far is kept; rerun the same command to "
                       "resume", err=True)
            sys.exit(SIGTERM_EXIT if terminated else 130)
        except (InvbenchError, OSError) as exc:
            if debug:
                raise
            click.echo(f"error: {one_line(str(exc)) or type(exc).__name__}", err=True)
            sys.exit(2)
        except Exception as exc:  # noqa: BLE001 - the promise is one line, even for what nobody foresaw
            if debug:
                raise
            click.echo(f"error: unexpected {type(exc).__name__}: {one_line(exc, limit=300) or '(no message)'}; "
                       f"this is an invbench bug or an input it does not check: {DEBUG_HINT}", err=True)
            sys.exit(1)


def usage_message(exc: click.UsageError, args: list[str]) -> str:
    """click's message in one line, with where to look; --debug after the command says where it goes."""
    if isinstance(exc, click.NoSuchOption) and exc.option_name == "--debug":
        return ("--debug is an option of invbench itself, not of the command: put it first "
                f"(invbench --debug {' '.join(a for a in args if a != '--debug')})")
    path = exc.ctx.command_path if exc.ctx else ""
    hint = f" (see: invbench {path.split(' ', 1)[1]} --help)" if " " in path else ""
    return f"{one_line(exc.format_message())}{hint}"


# Commands defined in their own modules (leaderboard and sweeps), registered on the one group.
for command in (submit, verify, leaderboard, protocols, sweep, curve):
    cli.add_command(command)
