"""The `invbench` command line."""
from __future__ import annotations

import sys
from typing import Any

import click

from . import __version__
from .board_cli import leaderboard, protocols, submit, verify
from .cli_options import defence_options, defence_params
from .config import RunConfig
from .sweep_cli import curve, sweep

# A CPU has minutes, not hours: the main command's reduced run (SmolLM2's Adam steps cost ~0.1 s
# each on 2 cores) finishes in under 5 minutes. A smoke test, not a measurement.
CPU_REDUCED = {"n": 3, "tokens": 3, "preset": "fast", "steps": 200}
GPU_DEFAULTS = {"n": 100, "tokens": 10, "preset": "baseline"}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or an unavailable resource: one line, exit 2."""
    from invbench.attacks import AttackError
    from invbench.defenses import DefenseError
    from invbench.leaks.models import ModelLoadError
    from invbench.leaks.prompts import DatasetError

    from .curves import CurveError
    from .lock import LockedError
    from .protocols import ProtocolError
    from .runner import RunError
    from .sweep import SweepError

    return (AttackError, DefenseError, ModelLoadError, DatasetError, RunError, LockedError, ProtocolError, SweepError,
            CurveError, OSError)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="invbench")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """invbench: how much text leaks from a language model's hidden states, under which defence.

    `invbench run` captures hidden states of real text, applies a defence, runs inversion attacks
    and scores what they recover."""
    ctx.obj = {"debug": debug}


@cli.command()
@click.option("--model", default=None, help="Alias (gpt2, smollm2-135m, tiny-gpt2, gpt2-random), Hugging Face id or "
              "local directory. Default gpt2, falling back to smollm2-135m when GPT-2 is not available offline.")
@click.option("--dataset", default="c4", show_default=True,
              help="c4, wikipedia, or a file of your own texts (.txt one per line, .jsonl with 'text', .parquet).")
@click.option("--n", type=click.IntRange(min=1), default=None, help="Number of prompts [GPU: 100; CPU: 3].")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Tokens per prompt [GPU: 10; CPU: 3].")
@click.option("--layer", type=int, default=-1, show_default=True,
              help="Leaked layer: index into hidden_states (-1 = last, after the final norm).")
@click.option("--seed", type=int, default=42, show_default=True, help="Seed for prompts, noise and attacks.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--attack", "attack_spec", default="continuous", show_default=True,
              help="Attack name, comma-separated names, or 'all'.")
@click.option("--preset", default=None, help="Attack preset: fast, baseline, high-acc [GPU: baseline; CPU: fast].")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="continuous: Adam steps per position (K) [preset's; CPU: 200].")
@click.option("--candidates", type=click.IntRange(min=1), default=None, help="continuous: tokens checked at commit (C).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="continuous: Adam learning rate.")
@click.option("--loss-threshold", type=click.FloatRange(min=0), default=None, help="continuous: early-exit loss.")
@click.option("--init", type=click.Choice(["random", "zeros"]), default=None, help="continuous: proxy start.")
@click.option("--metric", type=click.Choice(["l1", "l2", "cosine"]), default=None, help="continuous: candidate metric.")
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="projection: step budget per position.")
@click.option("--noisy-max-steps", type=click.IntRange(min=1), default=None,
              help="projection: step budget per position under a noisy defence.")
@click.option("--beam", type=click.IntRange(min=1), default=None, help="scan: beam width over positions.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=None, help="scan: sequences per forward pass.")
@click.option("--recheck", type=click.IntRange(min=2), default=None,
              help="scan: shortlist re-checked in float32 after a bf16 scan (CUDA).")
@defence_options
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Prompts attacked together.")
@click.option("--out", default="runs/latest", show_default=True,
              help="Results folder (config.json, records.jsonl, summary.json); rerunning resumes.")
def run(**opts: Any) -> None:
    """Leak, defend, attack, score: write results to --out and print a table."""
    from .runner import resolve_device, run as run_benchmark
    from invbench.attacks import parse_attack_list

    device = resolve_device(opts["device"])
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_REDUCED
    reduced = [k for k in CPU_REDUCED if opts[k] is None] if device.type == "cpu" else []
    if "steps" in reduced and ("preset" not in reduced or "continuous" not in parse_attack_list(opts["attack_spec"])):
        reduced.remove("steps")  # an explicit preset keeps its own step budget
    if reduced:
        click.echo(f"note: no GPU, so this is a reduced run ({', '.join(f'{k}={CPU_REDUCED[k]}' for k in reduced)}); "
                   "pass --n/--tokens/--preset/--steps to change it", err=True)
    defense_params = defence_params(opts)
    if "steps" in reduced:
        opts["steps"] = CPU_REDUCED["steps"]
    attack_options = {k: opts[k] for k in ("steps", "candidates", "lr", "loss_threshold", "init", "metric",
                                           "max_steps", "noisy_max_steps", "beam", "chunk_size", "recheck")
                      if opts[k] is not None}
    cfg = RunConfig(model=opts["model"], dataset=opts["dataset"], n=opts["n"] or defaults["n"],
                    tokens=opts["tokens"] or defaults["tokens"], layer=opts["layer"], seed=opts["seed"],
                    device=opts["device"], attacks=parse_attack_list(opts["attack_spec"]),
                    preset=opts["preset"] or defaults["preset"], attack_options=attack_options,
                    defense=opts["defense"], defense_params=defense_params, batch_size=opts["batch_size"],
                    out=opts["out"])
    summary = run_benchmark(cfg, echo=lambda line: click.echo(line, err=True))
    click.echo(format_summary(summary))
    click.echo(f"results: {cfg.out}/summary.json (per prompt: {cfg.out}/records.jsonl)")


@cli.command()
def defenses() -> None:
    """List every registered defence (built-in and plug-in) with its parameters."""
    from invbench.defenses import available_defenses

    for name, cls in sorted(available_defenses().items()):
        params = ", ".join(f"{p}: {t.__name__}" for p, t in cls.param_types.items()) or "no parameters"
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        click.echo(f"{name:<10} {params:<60} {doc}")


@cli.command()
@click.option("--model", default=None, help="As for `invbench run`.")
@click.option("--dataset", default="c4", show_default=True)
@click.option("--n", type=click.IntRange(min=1), default=64, show_default=True, help="Number of texts.")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens per text.")
@click.option("--layer", type=int, default=-1, show_default=True)
@click.option("--seed", type=int, default=42, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@defence_options
@click.option("--out", default=None, help="Also write the result as JSON to this file.")
def utility(**opts: Any) -> None:
    """The defence's cost alone (no attack): LM-head agreement, KL, perplexity ratio, cosine."""
    from .results import write_json_atomic
    from .runner import utility_only

    cfg = RunConfig(model=opts["model"], dataset=opts["dataset"], n=opts["n"], tokens=opts["tokens"],
                    layer=opts["layer"], seed=opts["seed"], device=opts["device"], defense=opts["defense"],
                    defense_params=defence_params(opts))
    result = utility_only(cfg, echo=lambda line: click.echo(line, err=True))
    click.echo(format_utility(result))
    if opts["out"]:
        from pathlib import Path

        write_json_atomic(Path(opts["out"]), result)


def format_defence(defense: dict[str, Any]) -> str:
    params = ", ".join(f"{k}={v}" for k, v in defense["params"].items())
    text = f"defence {defense['name']}{f' ({params})' if params else ''}"
    if defense.get("epsilon") is not None:
        text += f", epsilon {defense['epsilon']:.3g} per vector at delta {defense['delta']:g}"
        if defense.get("epsilon_per_prompt") is not None:
            text += f", {defense['epsilon_per_prompt']:.3g} per prompt"
    elif defense.get("reason"):
        text += f" (epsilon: {defense['reason']})"
    return text


def format_utility(result: dict[str, Any]) -> str:
    u = result["utility"]
    lines = [f"{result['model']} | {result['dataset']} | {result['n']} texts x {result['tokens']} tokens | "
             f"{format_defence(result['defense'])}"]
    lines += [f"  {key:<18} {fmt(value, '.4f')}" for key, value in u.items() if key != "note"]
    if u.get("note"):
        lines.append(f"  note: {u['note']}")
    return "\n".join(lines)


def fmt(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def format_summary(summary: dict[str, Any]) -> str:
    """The result table printed at the end of a run."""
    lines = [f"{summary['model']} | {summary['dataset']} | {summary['n']} prompts x {summary['tokens']} tokens | "
             f"{format_defence(summary['defense'])}",
             f"{'attack':<12} {'exact':>6} {'tok acc':>8} {'similar':>8} {'det AUROC':>10} {'s/token':>9} {'tok/s':>8}"]
    for name, m in summary["attacks"].items():
        lines.append(f"{name:<12} {fmt(m['exact_match']):>6} {fmt(m['token_accuracy']):>8} {fmt(m['similarity']):>8} "
                     f"{fmt(m['detector_auroc']):>10} {fmt(m['seconds_per_token'], '.4f'):>9} "
                     f"{fmt(m['tokens_per_second'], '.1f'):>8}")
    u = summary.get("utility", {})
    lines.append("utility: " + ", ".join(f"{k} {fmt(v, '.4f')}" for k, v in u.items() if k != "note"))
    if len(summary["attacks"]) > 1:
        w = summary["worst_case"]
        lines.append("worst case: " + ", ".join(f"{k} {fmt(v['value'])} ({v['attack']})" for k, v in w.items()))
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A message as one line, whatever the raiser put in it."""
    return " ".join(line.strip() for line in str(message).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line (`error: ...`) and exit 2; --debug shows the
    traceback instead. Ctrl-C prints what was saved and how to resume, and exits 130."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        cli.main(args=args, prog_name="invbench", standalone_mode=False)
    except click.UsageError as exc:  # bad option or value: click's message, without the usage block
        if debug:
            raise
        hint = f" (see: invbench {exc.ctx.command_path.split(' ', 1)[1]} --help)" if exc.ctx and " " in exc.ctx.command_path else ""
        click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
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
        sys.exit(130)
    except user_errors() as exc:
        if debug:
            raise
        click.echo(f"error: {one_line(str(exc)) or type(exc).__name__}", err=True)
        sys.exit(2)



# Commands defined in their own modules (leaderboard and sweeps), registered on the one group.
for command in (submit, verify, leaderboard, protocols, sweep, curve):
    cli.add_command(command)
