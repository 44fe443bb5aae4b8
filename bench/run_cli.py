"""`invbench run`, `utility`, `fit-ranker`, and the listings `defenses` and `attacks`, with the result table
they print. Their flags and listings come from `invbench.listing` (data, no model code), so `--help` and the
listings answer at once; what a command runs is imported when it runs."""
from __future__ import annotations

import shlex
import sys
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from .cli_options import (DEVICE, LAYER, SEED_OPTION, NamedPath, attack_options, defense_options, defense_params,
                          engine_of, engine_options, given_attack_options, model_option)
from .config import BATCH_SIZE, DEVICE_DEFAULTS, RunConfig, default_out
from .formats import cell
from .listing import ENTRY_POINT_GROUP, first_line, first_paragraph, load_listing

RANKER = load_listing()["ranker_recipe"]
RANKER_DOCUMENTS, RANKER_HELD_OUT, RANKER_TOKENS = RANKER["documents"], RANKER["held_out"], RANKER["tokens_per_document"]
PRESET_NAMES = tuple(load_listing()["preset_names"])
PAPER_STEPS = 600  # the fewest Adam steps of the paper's presets (fast)


def _device_default(key: str) -> str:
    values = {device: getattr(d, key) for device, d in DEVICE_DEFAULTS.items()}
    shown = {device: ",".join(v) if isinstance(v, tuple) else v for device, v in values.items()}
    return f"[GPU: {shown['cuda']}; CPU: {shown['cpu']}]"


@click.command()
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
              "on a CPU the preset left out also sets "
              + "; ".join(f"{attack} {', '.join(f'--{k} {v}' for k, v in options.items())}"
                          for attack, options in DEVICE_DEFAULTS["cpu"].capped.items())
              + " (and, with --attack left out too, "
              + "; ".join(f"{attack} {', '.join(f'--{k} {v}' for k, v in options.items())}"
                          for attack, options in DEVICE_DEFAULTS["cpu"].unasked.items()) + ").")
@attack_options
@defense_options
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
              help="Prompts attacked together.")
@click.option("--out", type=NamedPath(), default=None,
              help="Results folder (config.json, records.jsonl, summary.json); rerunning resumes [runs/<defence and "
                   "parameters>-<hash of the command>: each command its own folder].")
@engine_options(shards=True)
def run(**opts: Any) -> None:
    """Leak, defend, attack, score: write results to --out and print a table with a verdict."""
    engine = engine_of(opts)  # --address without --engine ray: one line before anything heavy is imported

    from invbench.attacks import parse_attack_list

    from .runner import run as run_benchmark

    cfg = RunConfig(model=opts["model"], dataset=opts["dataset"], n=opts["n"], tokens=opts["tokens"], layer=opts["layer"],
                    seed=opts["seed"], device=opts["device"],
                    attacks=parse_attack_list(opts["attack_spec"]) if opts["attack_spec"] is not None else None,
                    preset=opts["preset"], attack_options=given_attack_options(opts), defense=opts["defense"],
                    defense_params=defense_params(opts), batch_size=opts["batch_size"])
    cfg = replace(cfg, out=opts["out"] or default_out(cfg))
    summary = run_benchmark(cfg, echo=lambda line: click.echo(line, err=True), engine=engine)
    click.echo(format_summary(summary))
    click.echo(f"results: {cfg.out}/summary.json (per prompt: {cfg.out}/records.jsonl)")


@click.command()
def defenses() -> None:
    """List every registered defence (built-in and plug-in) with its parameters."""
    from importlib.metadata import entry_points

    shown = {name: (", ".join(f"{p}: {t}" for p, t in d["params"].items()), d["doc"])
             for name, d in load_listing()["defenses"].items()}
    outside = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in shown]
    # Another package's defences (entry points), or one registered by Python code that already loaded the
    # registry: only their own code can say what they take.
    if outside or "invbench.defenses.registry" in sys.modules:
        from invbench.defenses import available_defenses

        for name, cls in available_defenses().items():
            if name not in shown:
                shown[name] = (", ".join(f"{p}: {t.__name__}" for p, t in cls.param_types.items()),
                               first_paragraph(cls.__doc__))
    for name, (params, doc) in sorted(shown.items()):
        click.echo(f"{name:<10} {params or 'no parameters'}")
        for line in textwrap.wrap(doc, width=100):  # whole sentences, never cut
            click.echo(f"{'':<10} {line}")


@click.command()
def attacks() -> None:
    """List every registered attack with its presets and options."""
    for name, attack in load_listing()["attacks"].items():
        click.echo(f"{name:<11} {attack['doc']}")
        options = ", ".join(f"--{o.replace('_', '-')}" for o in sorted(attack["options"])) or "none"
        presets = ", ".join(attack["presets"]) or "none (one setting, whatever --preset says)"
        click.echo(f"{'':<11} presets {presets}; options {options}")


@click.command()
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


@click.command("fit-ranker")
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
    from .summary import Guarantee

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
    lines += [f"  {key:<18} {cell(value, '.4f')}" for key, value in u.items() if key not in ("note", "per_prompt")]
    if u.get("note"):
        lines.append(f"  note: {u['note']}")
    return "\n".join(lines)


GAUSSIAN_NOISE = ("gaussian", "dp")  # the built-ins whose noise is Gaussian: the certified radius speaks of them


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
    lines.append("utility: " + ", ".join(f"{k} {cell(v, '.4f')}" for k, v in summary.utility.items()
                                         if k not in ("note", "per_prompt")))
    if len(summary.attacks) > 1:
        lines.append("worst case: " + ", ".join(f"{k} {cell(w.value)} ({w.attack})" for k, w in summary.worst_case.items()))
    for name, m in summary.attacks.items():
        if "candidates_per_token" in m.diagnostics and m.diagnostics["candidates_per_token"]:
            c = m.diagnostics["candidates_per_token"]
            lines.append(f"{name}: {c['mean']:.1f} candidates verified per token (median {c['median']:.0f}, "
                         f"p99 {c['p99']:.0f}); scoring {m.diagnostics['scoring']}")
        steps = m.config.get("steps") if name == "continuous" else None
        if isinstance(steps, int) and steps < PAPER_STEPS:
            lines.append(f"{name}: the paper's attack at {steps} Adam steps and {m.config.get('candidates')} candidates "
                         f"a position (its presets use {PAPER_STEPS}-2,000 and 100-10,000): a budget this small measures "
                         "the attack, not the defence (on trained models it recovers almost nothing at any CPU budget)")
    if summary.radius and summary.defense["name"] in GAUSSIAN_NOISE:
        r = summary.radius
        sigma = summary.defense.get("derived", {}).get("noise_std", summary.defense["params"].get("sigma"))
        side = "" if not isinstance(sigma, (int, float)) else (
            f"; this defence's sigma {sigma:.3g} is {'below' if sigma < r['min_sigma_certified'] else 'above'} it")
        lines.append(f"certified radius ({r['scope']}): median {r['median_radius']:.3g}; {r['note']}{side}")
    if summary.verdict:
        lines.append(f"verdict: {summary.verdict.says}")
    return "\n".join(lines)


@click.command()
@model_option("smollm2-135m")
@LAYER
@click.option("--documents", type=click.IntRange(min=1), default=100, show_default=True,
              help="Public documents to average over (the learned rankers' training documents, none a prompt).")
@click.option("--tokens", type=click.IntRange(min=1), default=32, show_default=True, help="Tokens per document.")
@SEED_OPTION
@DEVICE
@click.option("--out", type=NamedPath(dir_okay=False), required=True, help="The .safetensors file to write.")
def fisher(model: str, layer: int, documents: int, tokens: int, seed: int, device: str, out: str) -> None:
    """Write the Fisher diagonal at a leak point, for aniso-gaussian's --param fisher_file (Bell 2026)."""
    import torch

    from invbench.leaks.models import load_model
    from invbench.leaks.prompts import ranker_training_texts

    from .fisher import fisher_diagonal, write_fisher
    from .runner import resolve_device, white_box

    echo = lambda line: click.echo(line, err=True)  # noqa: E731
    loaded = load_model(model, seed=seed, notify=echo)
    oracle = white_box(loaded, layer=layer, device=resolve_device(device))
    texts, data = ranker_training_texts(notify=echo, limit=documents)
    rows = [ids[:tokens] for ids in (loaded.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)]
    ids = torch.tensor([r for r in rows if len(r) == tokens])
    vector = fisher_diagonal(oracle, ids, seed=seed, notify=echo)
    path = write_fisher(Path(out), vector, metadata={
        "model": loaded.name, "layer": str(layer), "texts": f"{len(ids)} of {data}, their first {tokens} tokens",
        "seed": str(seed), "estimator": "squared score of log p(y_t | h) summed over t, y_t drawn from the model"})
    click.echo(f"fisher: {path} (d = {len(vector)}, median {vector.median().item():.4g}, max {vector.max().item():.4g})")

