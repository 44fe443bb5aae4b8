"""`invbench run`: leak -> defend -> attack -> score -> record.

`run` is these five stages, one function each, and each sees only what the one before hands it:
1. leak (`load_source`, `capture`): the model, white-box access to it and the prompts; the hidden
   states of the prompts at the leaked layer, from one forward pass per batch;
2. defend (`defend`): the defence applied with one seeded noise generator per prompt;
3. attack (`attack_pending`): each attack on the prompts not yet recorded, a batch at a time,
   every batch's records appended as it finishes (with the attack's objective for its answer
   and for the truth, for the search-failure check);
4. score (`score`): what the records cannot hold measured once (the defence's utility cost, the
   blind guess, the position-1 gaps) into a `RunContext`, and the records aggregated with it into
   the typed RunSummary by `invbench.summary.build_summary`: privacy metrics, verdicts, the radius;
5. record: summary.json, written atomically, and read back through `RunSummary.from_dict`: what
   `run` returns is what the file holds.
The results folder (`invbench.folder.ResultsFolder`) is locked before anything loads, so a second
run into it is refused at once; every stage after that can be killed at any moment and the same
command resumes with exactly the records of an uninterrupted run.
With `--engine ray`, stage 3 runs its prompts in shards on a Ray cluster's workers (`invbench.sharding`,
each task this module's own stages on a worker); this process stays the one writer of the folder.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import radius, scoring
from .cluster import Engine
from .config import (SEED_MAX, RunConfig, choose_cpu_threads, config_hash, device_name, git_commit, package_versions,
                     prompts_digest, with_device_defaults)
from .errors import InvbenchError, refuse_exits
from .folder import ResultsFolder, read_summary
from .metrics import json_safe
from .summary import RunContext, RunSummary, build_summary, validate as validate_summary
from .utility import cosine_only, utility_metrics
from invbench.attacks import Attack, available_attacks, make_attack
from invbench.attacks.base import prompt_generator
from invbench.defenses import Defense, make_defense
from invbench.defenses.registry import code_identity
from invbench.defenses.checks import check_defense, defend_one, described
from invbench.leaks.codebook import Codebook
from invbench.leaks.models import LoadedModel, distinct_token_ids, load_model
from invbench.leaks.oracle import WhiteBox
from invbench.leaks.prompts import Prompt, load_prompts

DEFENSE_NOISE_STREAM = 1  # generator stream for defence noise (attacks use stream 0)


class RunError(InvbenchError, ValueError):
    """A run cannot start or continue (bad option, unusable model or states, ...)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during attacks: the message says what was saved and how to resume."""


@dataclass
class Source:
    """Where the leak comes from: the model, white-box access to it, and the prompts."""

    loaded: LoadedModel
    oracle: WhiteBox
    prompts: list[Prompt]
    dataset_source: str


@dataclass
class Leak:
    """What leaves the system: the prompts, their clean and defended hidden states (N, T, d)."""

    prompts: list[Prompt]
    clean: torch.Tensor
    defended: torch.Tensor


def resolve_device(name: str) -> torch.device:
    """The device a run uses; on a CPU, torch's threads are set to the cores other processes leave free
    (`config.choose_cpu_threads`), unless OMP_NUM_THREADS says otherwise."""
    if name not in ("auto", "cpu", "cuda"):
        raise RunError(f"unknown --device {name!r}; choose auto, cuda or cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    device = torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
    if device.type == "cpu":
        choose_cpu_threads()
    return device


def build_attacks(cfg: RunConfig) -> list[Attack]:
    """Each attack takes the options it knows; an option no chosen attack knows is an error."""
    attacks, used = [], set()
    for name in cfg.attacks:
        own = {k: v for k, v in cfg.attack_options.items() if k in available_attacks()[name].option_names}
        used |= own.keys()
        attack = make_attack(name, preset=cfg.preset, overrides=own)
        if attack.batch_sensitive:
            attack.fixed_rows = cfg.rows
        attacks.append(attack)
    unused = set(cfg.attack_options) - used
    if unused:
        raise RunError(f"option(s) {', '.join(sorted(unused))} do not apply to attack(s) {', '.join(cfg.attacks)}")
    return attacks


# --- 1. leak -------------------------------------------------------------------------------------

def load_source(cfg: RunConfig, device: torch.device, *, echo: Callable[[str], None]) -> Source:
    """The model (checked against --tokens and --layer), white-box access to it, and the prompts."""
    loaded = load_model(cfg.model, seed=cfg.seed, notify=echo)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(loaded.model.config, "n_positions", None)
    if context and cfg.tokens > context:
        raise RunError(f"--tokens {cfg.tokens} exceeds the context of {loaded.name} ({context} positions)")
    oracle = white_box(loaded, layer=cfg.layer, device=device)
    allowed = distinct_token_ids(loaded) if cfg.dataset == "random" else None
    prompts, dataset_source = load_prompts(cfg.dataset, tokenizer=loaded.tokenizer, n=cfg.n, tokens=cfg.tokens,
                                           seed=cfg.seed, notify=echo, allowed_ids=allowed)
    if cfg.prompts_sha256 is not None and prompts_digest([p.ids for p in prompts]) != cfg.prompts_sha256:
        raise RunError(f"the prompts loaded here ({dataset_source}) are not the protocol's (their SHA-256 differs from "
                       f"{cfg.prompts_sha256[:12]}...): the dataset or the tokenizer changed, so results would not be "
                       "comparable with the protocol's entries")
    return Source(loaded, oracle, choose_prompts(prompts, cfg.prompts), dataset_source)


def choose_prompts(prompts: list[Prompt], indices: list[int] | None) -> list[Prompt]:
    """The prompts with these indices (None: all), in index order; an index the run does not have is a RunError."""
    if indices is None:
        return prompts
    by_index = {p.index: p for p in prompts}
    missing = sorted(set(indices) - set(by_index))
    if missing:
        raise RunError(f"prompt {missing[0]} is not among the run's {len(prompts)} prompts")
    return [by_index[i] for i in sorted(set(indices))]


def white_box(loaded: LoadedModel, *, layer: int, device: torch.device) -> WhiteBox:
    """White-box access to the model at `layer`; a layer the model does not have is one RunError
    (`run`, `utility` and `fit-ranker` alike)."""
    try:
        return WhiteBox.of(loaded, layer=layer, device=device)
    except ValueError as exc:
        raise RunError(f"--layer: {exc}") from None


def capture(oracle: WhiteBox, prompts: list[Prompt], *, batch_size: int) -> torch.Tensor:
    """Targets (N, T, d) from one forward pass per batch. NaN or infinite states (a broken model
    or dtype overflow) stop the run here, before any defence or attack sees them."""
    ids = torch.tensor([p.ids for p in prompts])
    clean = torch.cat([oracle.capture(ids[i:i + batch_size]).cpu() for i in range(0, len(ids), batch_size)])
    finite = torch.isfinite(clean).flatten(1).all(dim=1)
    if not finite.all():
        bad = [p.index for p, ok in zip(prompts, finite.tolist()) if not ok]
        raise RunError(f"the model's hidden states at layer {oracle.layer} are NaN or infinite for {len(bad)} of "
                       f"{len(prompts)} prompts (first: prompt {bad[0]}); check the model's weights and dtype")
    return clean


# --- 2. defend -----------------------------------------------------------------------------------

def bind_needs(defense: Defense, loaded: LoadedModel) -> None:
    """Hand the defence the model tensors it names in `needs` (invbench.defenses.RESOURCES), before
    anything records or applies it. "embedding": the model's whole input embedding table (V, d).
    "fisher" (the Fisher diagonal at the leak point) is not computed here yet: a defence that needs it
    is refused with a line that says how to give it instead."""
    given = {}
    for name in defense.needs:
        if name == "embedding":
            given[name] = loaded.model.get_input_embeddings().weight.detach().float().cpu()
        else:
            raise RunError(f"defence {defense.name!r} needs {name!r}, which a run does not compute: write it once with "
                           "`invbench fisher --layer L --out FILE` and give --param fisher_file=FILE (or --param "
                           "std_file=PATH)")
    if given:
        defense.bind(**given)


def defend(defense: Defense, prompts: list[Prompt], clean: torch.Tensor, *, seed: int) -> Leak:
    """Noise from one generator per prompt, so a prompt's defended states do not depend on
    batching, device or resumption. A plug-in's output is checked (defenses/checks.py)."""
    check_defense(defense, clean[0])
    defended = torch.stack([defend_one(defense, clean[i], prompt_generator(seed, p.index, DEFENSE_NOISE_STREAM))
                            for i, p in enumerate(prompts)])
    return Leak(prompts, clean, defended)


# --- 3. attack -----------------------------------------------------------------------------------

def attack_pending(attack: Attack, leak: Leak, oracle: WhiteBox, defense: Defense, *, seed: int, batch_size: int,
                   done: set[int], folder: ResultsFolder, decode: Callable,
                   echo: Callable[[str], None] = print, progress: bool = True) -> None:
    """Run one attack on the prompts it has not finished, a batch at a time, appending records.
    Out of GPU memory, a batch is split in two and retried (one line to `echo` per split). `progress`: the
    progress bar (a shard's task on a worker has none: `invbench.sharding`)."""
    pending = [i for i, p in enumerate(leak.prompts) if p.index not in done]
    if not pending:
        return
    tokens = leak.clean.shape[1]
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]

    def note(line: str) -> None:
        with tqdm.external_write_mode(file=sys.stderr):
            echo(line)

    with tqdm(total=len(batches) * tokens, desc=f"{attack.name}: {len(pending)} prompts", unit="pos",
              leave=False, disable=not progress) as bar:
        while batches:
            rows = batches.pop(0)
            prompts = [leak.prompts[r] for r in rows]
            position = bar.n
            try:
                targets = leak.defended[rows]
                out = attack.run(oracle, targets, defense=defense, prompt_indices=[p.index for p in prompts],
                                 seed=seed, progress=lambda done_, total: bar.update(1), notify=note)
                truth = torch.tensor([p.ids for p in prompts])
                objectives = zip(attack.objective(oracle, targets, out.tokens, defense=defense).sum(1).tolist(),
                                 attack.objective(oracle, targets, truth, defense=defense).sum(1).tolist())
            except torch.OutOfMemoryError:
                if len(rows) == 1:
                    raise RunError(f"{attack.name}: out of GPU memory with a single prompt; use a smaller model or "
                                   "--device cpu") from None
                half = len(rows) // 2
                batches[:0] = [rows[:half], rows[half:]]  # prompts keep their own seeds: results are unchanged
                bar.total += tokens
                bar.n = position  # the positions the failed batch got through are done again
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                note(f"note: {attack.name} ran out of GPU memory on {len(rows)} prompts; retrying as two "
                     f"batches of {half} and {len(rows) - half}")
                continue
            folder.append([scoring.prompt_record(attack, p, out, j, decode, objective=objective)
                           for j, (p, objective) in enumerate(zip(prompts, objectives))])


# --- 4. score ------------------------------------------------------------------------------------

def score(source: Source, leak: Leak, attacks: list[Attack], defense: Defense, records: list[dict], *,
          cfg: RunConfig, recorded: dict[str, Any], wall_seconds: float) -> RunSummary:
    """The run's RunSummary from its records and what they cannot hold: the defence's utility, the
    blind guess, the position-1 gaps (from the codebook, when guided or sequence ran with it: the radius
    then does not depend on what a machine happens to have cached), and the provenance `recorded` in
    config.json when the run began."""
    oracle, prompts = source.oracle, source.prompts
    guess = scoring.blind_guess(oracle, tokens=cfg.tokens)
    first = None
    if any(getattr(a.config, "codebook", False) for a in attacks):  # guided or sequence, which loaded the codebook
        codebook = Codebook(oracle, notify=lambda line: None)
        first = radius.first_gaps(codebook.states(), torch.tensor([p.ids[0] for p in prompts]))
    context = RunContext(
        model=source.loaded.name, model_source=recorded["model_source"], dataset=cfg.dataset,
        dataset_source=recorded["dataset_source"], prompt_indices=[p.index for p in prompts], tokens=cfg.tokens,
        layer=cfg.layer, seed=cfg.seed, dim=leak.clean.shape[-1], defense=defense, attacks=attacks,
        utility=defense_utility(source.loaded, leak, layer=cfg.layer, oracle=oracle),
        blind_token_accuracy=scoring.blind_token_accuracy(guess, prompts), blind_guess=guess,
        first_gaps=first, config_hash=recorded["config_hash"], device=recorded["device"],
        versions=recorded["versions"], wall_seconds=wall_seconds)
    return build_summary(records, context)


def defense_utility(loaded: LoadedModel, leak: Leak, *, layer: int, oracle: WhiteBox | None = None) -> dict[str, Any]:
    """What the defence costs the model, from the clean and defended states of the same prompts: at the
    last layer through the model's own LM head; at an earlier leak point as the server sees it, the
    rest of the model (blocks k+1..L, final norm, LM head) run causally on the defended states of every
    position against the same on the clean ones (`WhiteBox.server_states`), with the same metrics. The
    cosine is always that of the leaked vectors (defended to clean)."""
    ids = torch.tensor([p.ids for p in leak.prompts])
    next_ids = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], dim=1)  # the last position has no next token
    head = loaded.model.get_output_embeddings()
    n_layers = loaded.model.config.num_hidden_layers
    if layer not in (-1, n_layers):
        server = oracle if oracle is not None and oracle.layer_index == layer % (n_layers + 1) else \
            WhiteBox(loaded.model, layer=layer)
        clean, defended = server_view(server, ids, leak.clean), server_view(server, ids, leak.defended)
        metrics = utility_metrics(lm_head=head, clean=clean.to(head.weight.device),
                                  defended=defended.to(head.weight.device), next_ids=next_ids.to(head.weight.device),
                                  prompt_indices=[p.index for p in leak.prompts])
        leaked = [cosine_only(clean=leak.clean[i], defended=leak.defended[i])["cosine"] for i in range(len(ids))]
        for row, cosine in zip(metrics["per_prompt"], leaked):  # the cosine is of the leaked vectors
            row["cosine"] = cosine
        return {**metrics, "cosine": sum(leaked) / len(leaked),
                "note": f"server's view at layer {layer}: blocks {server.layer_index + 1}..{n_layers} and the LM head run "
                        "on the defended states of every position, compared with the same on the clean states; cosine "
                        "of the leaked vectors"}
    return utility_metrics(lm_head=head, clean=leak.clean.to(head.weight.device),
                           defended=leak.defended.to(head.weight.device), next_ids=next_ids.to(head.weight.device),
                           prompt_indices=[p.index for p in leak.prompts])


def server_view(oracle: WhiteBox, ids: torch.Tensor, states: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """The final states (N, T, d) the server's LM head reads from leak-point states (N, T, d), a batch at a time."""
    with torch.no_grad():
        return torch.cat([oracle.server_states(ids[i:i + batch_size], states[i:i + batch_size]).cpu()
                          for i in range(0, len(ids), batch_size)])


# --- the run -------------------------------------------------------------------------------------

def check_config(cfg: RunConfig) -> None:
    """What the CLI's flags bound, checked again for Python callers: a seed every generator takes, a
    results folder that is named (an empty --out would write into the working directory)."""
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= SEED_MAX:
        raise RunError(f"--seed must be an integer in 0..{SEED_MAX}, got {cfg.seed!r}")
    if not str(cfg.out).strip():
        raise RunError("--out is empty; name a results folder, or leave --out out for one named after the command")


def unsized(cfg: RunConfig) -> list[str]:
    """The defence's parameters that are the states' width and were left out (`Defense.hidden_size_params`)."""
    from invbench.defenses import load_defense_class

    return [p for p in load_defense_class(cfg.defense).hidden_size_params if p not in cfg.defense_params]


def sized(cfg: RunConfig, defense: Defense | None, loaded: LoadedModel, *,
          echo: Callable[[str], None]) -> tuple[RunConfig, Defense]:
    """The run's defence, made now with the model's hidden size for the parameters that are the states'
    width and were left out (`prepare` left it unmade), and cfg recording them."""
    if defense is not None:
        return cfg, defense
    width = int(loaded.model.get_input_embeddings().weight.shape[1])
    params = {**cfg.defense_params, **{p: width for p in unsized(cfg)}}
    echo(f"note: {', '.join(f'{p}={width}' for p in unsized(cfg))}: the hidden size of {loaded.name}")
    defense = make_defense(cfg.defense, params)
    described(defense, tokens=cfg.tokens)
    return replace(cfg, defense_params=params), defense


def prepare(cfg: RunConfig, *, echo: Callable[[str], None],
            defaults: str | None = None) -> tuple[RunConfig, torch.device, Defense | None, list[Attack]]:
    """The run as it will happen: the device, the device's defaults for what cfg leaves unset
    (said in one line when they reduce a CPU run), the defence and the attacks. Bad options
    fail here, before anything loads; a defence that takes the model's hidden size (`sized`) is made
    once the model is loaded. `defaults`: the device type whose defaults apply, when the attacks run
    elsewhere (a sharded run's workers: their GPUs, not the driver's CPU)."""
    check_config(cfg)
    device = resolve_device(cfg.device)
    cfg, filled = with_device_defaults(cfg, defaults or device.type)
    defense = None if unsized(cfg) else make_defense(cfg.defense, cfg.defense_params)
    if defense is not None:
        described(defense, tokens=cfg.tokens)  # a plug-in's description or guarantee that cannot be recorded fails now
    attacks = build_attacks(cfg)
    if filled and (defaults or device.type) == "cpu":
        echo(f"note: no GPU, so this run uses the CPU defaults ({', '.join(filled)}); "
             "pass --n/--tokens/--attack/--preset/--steps to change them")
    return cfg, device, defense, attacks


def run(cfg: RunConfig, *, echo: Callable[[str], None] = print, engine: Engine | None = None) -> RunSummary:
    """Leak, defend, attack, score, record into cfg.out (see the module docstring). A defence plug-in
    that calls sys.exit or os._exit during the run gets one error, not a silent exit (`refuse_exits`).
    `engine` (`invbench.cluster.Engine`) `ray`: the attacks' prompts in shards over a Ray cluster's workers
    (`invbench.sharding`), the same folder, records and summary; left out or `local`: here, a batch at a time."""
    if engine is None or not engine.sharded:
        with refuse_exits(f"the defence {cfg.defense}"):
            return _run(cfg, echo=echo)
    from . import cluster, sharding

    with refuse_exits(f"the defence {cfg.defense}"):
        checked, _, _, _ = prepare(cfg, echo=lambda line: None)  # bad options fail before Ray starts
        with cluster.session(engine, echo=echo):
            pool = sharding.RayExecutor(device=checked.device)
            return _run(cfg, echo=echo, pool=pool, shard_size=engine.shard_size)


def run_sharded(cfg: RunConfig, pool: Any, *, shard_size: int | None = None,
                echo: Callable[[str], None] = print) -> RunSummary:
    """`run` with stage 3 on `pool`'s workers (`invbench.sharding`: `RayExecutor` on a connected cluster, or
    `InProcess`, each shard in this process as a worker would run it)."""
    with refuse_exits(f"the defence {cfg.defense}"):
        return _run(cfg, echo=echo, pool=pool, shard_size=shard_size)


def _run(cfg: RunConfig, *, echo: Callable[[str], None], pool: Any = None, shard_size: int | None = None) -> RunSummary:
    started = time.perf_counter()
    cfg, device, defense, attacks = prepare(cfg, echo=echo, defaults=getattr(pool, "defaults", None))
    with ResultsFolder(cfg.out) as folder:  # locked, and a foreign or damaged folder refused, before the model loads
        source = load_source(cfg, device, echo=echo)
        cfg, defense = sized(cfg, defense, source.loaded, echo=echo)
        bind_needs(defense, source.loaded)
        defining = {"model": source.loaded.name, "model_recipe": source.loaded.recipe, "dataset": cfg.dataset,
                    "n": cfg.n, "tokens": cfg.tokens, "layer": cfg.layer, "seed": cfg.seed,
                    "prompt_ids": [list(p.ids) for p in source.prompts], "defense": defense.describe(),
                    "attacks": {a.name: a.config_dict() for a in attacks}}
        if cfg.prompts is not None:  # a subset: which prompts (their noise follows their index)
            defining["prompt_indices"] = [p.index for p in source.prompts]
        code = code_identity(cfg.defense)
        if code is not None:  # an outside defence's code: edited, it is another run (not resumed)
            defining["defense_code"] = code
        chash = config_hash(defining)
        done = folder.start({
            "config_hash": chash, "command": cfg.to_dict(), "defining": defining, "model_source": source.loaded.source,
            "dataset_source": source.dataset_source, "versions": package_versions(), "git_commit": git_commit(),
            "device": device_name(device) if pool is None else pool.device(device_name(device))},
            targets={p.index: list(p.ids) for p in source.prompts})
        resumed = {i for _, i in done}
        if resumed:
            echo(f"note: resuming {folder.path}: {len(done)} of {len(source.prompts) * len(attacks)} prompt results are "
                 f"already recorded ({len(resumed)} of {len(source.prompts)} prompts); the rest is attacked now")
        if folder.repaired:
            echo(f"note: {folder.repaired} damaged, repeated or foreign line(s) of {folder.records_path} were dropped "
                 "(the file is rewritten without them); their prompts are attacked again")
        echo(f"model {source.loaded.name} ({source.loaded.source}); {len(source.prompts)} prompts x {cfg.tokens} "
             f"tokens from {source.dataset_source}")
        try:
            leak = defend(defense, source.prompts, capture(source.oracle, source.prompts, batch_size=cfg.batch_size),
                          seed=cfg.seed)
            for attack in attacks:  # also when nothing is left to attack: diagnostics may report what it loads
                attack.setup(source.oracle, notify=echo)
            if pool is None:
                for attack in attacks:
                    attack_pending(attack, leak, source.oracle, defense, seed=cfg.seed, batch_size=cfg.batch_size,
                                   done={i for name, i in done if name == attack.name}, folder=folder,
                                   decode=source.loaded.tokenizer.decode, echo=echo)
            else:
                from . import sharding

                sharding.attack_sharded(pool=pool, cfg=cfg, attacks=attacks, leak=leak, done=done, folder=folder,
                                        expected=sharding.identity(cfg, source.oracle, source.loaded, defense, attacks),
                                        shard_size=shard_size, echo=echo)
        except KeyboardInterrupt:
            raise RunInterrupted(folder.interrupted_message(len(source.prompts) * len(attacks))) from None
        # a resumed run's wall time includes the attack time its earlier sessions recorded
        records = folder.records()
        earlier = scoring.recorded_seconds([r for r in records if (r.get("attack"), r.get("prompt_index")) in done])
        summary = score(source, leak, attacks, defense, records, cfg=cfg, recorded=folder.config,
                        wall_seconds=time.perf_counter() - started + earlier)
        data = summary.to_dict()
        validate_summary(data)  # nothing malformed is written: the file must read back
        folder.write_summary(data)
    return read_summary(folder.path)


def answer_objectives(cfg: RunConfig, answers: dict[str, dict[int, list[list[int]]]], *,
                      echo: Callable[[str], None] = print) -> dict[str, dict[int, list[float]]]:
    """Each attack's own objective (summed over positions) of given answers on the defended states of
    the run `cfg` describes: attack -> prompt index -> the objective of each answer listed for it.
    The states are captured and defended as the run does (same prompts, same batches, same seeds);
    verify uses this to tell a float tie between two answers from a different answer."""
    with refuse_exits(f"the defence {cfg.defense}"):
        cfg, device, defense, attacks = prepare(cfg, echo=lambda line: None)
        source = load_source(cfg, device, echo=lambda line: None)
        leak = defend(defense, source.prompts, capture(source.oracle, source.prompts, batch_size=cfg.batch_size),
                      seed=cfg.seed)
        row = {p.index: i for i, p in enumerate(source.prompts)}
        scored: dict[str, dict[int, list[float]]] = {}
        for attack in attacks:
            for index, listed in answers.get(attack.name, {}).items():
                targets = leak.defended[[row[index]] * len(listed)]
                values = attack.objective(source.oracle, targets, torch.tensor(listed), defense=defense).sum(1)
                scored.setdefault(attack.name, {})[index] = values.tolist()
        return scored


def utility_only(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`invbench utility`: the defence's cost alone (no attack), for privacy-utility curves."""
    with refuse_exits(f"the defence {cfg.defense}"):
        return _utility_only(cfg, echo=echo)


def _utility_only(cfg: RunConfig, *, echo: Callable[[str], None]) -> dict[str, Any]:
    check_config(cfg)
    device = resolve_device(cfg.device)
    defense = None if unsized(cfg) else make_defense(cfg.defense, cfg.defense_params)
    if defense is not None:
        described(defense, tokens=cfg.tokens)
    source = load_source(cfg, device, echo=echo)
    cfg, defense = sized(cfg, defense, source.loaded, echo=echo)
    bind_needs(defense, source.loaded)
    record = described(defense, tokens=cfg.tokens)  # again: a bound defence may describe more (its table's size)
    leak = defend(defense, source.prompts, capture(source.oracle, source.prompts, batch_size=cfg.batch_size),
                  seed=cfg.seed)
    return json_safe({
        "model": source.loaded.name, "dataset": cfg.dataset, "dataset_source": source.dataset_source,
        "n": len(source.prompts), "tokens": cfg.tokens, "layer": cfg.layer, "seed": cfg.seed,
        "defense": record,
        "utility": defense_utility(source.loaded, leak, layer=cfg.layer, oracle=source.oracle), "versions": package_versions()})
