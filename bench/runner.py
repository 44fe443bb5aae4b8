"""`invbench run`: leak -> defend -> attack -> score -> record.

One function per stage; each stage sees only what the stage before hands it.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import metrics
from .lock import RunLock
from .config import RunConfig, config_hash, device_name, git_commit, package_versions
from .utility import cosine_only, utility_metrics
from .results import append_records, read_records, repair_records, write_json_atomic
from invbench.attacks import Attack, AttackOutput, available_attacks, make_attack
from invbench.attacks.base import prompt_generator
from invbench.defenses import Defense, make_defense
from invbench.leaks.models import LoadedModel, load_model
from invbench.leaks.oracle import WhiteBox
from invbench.leaks.prompts import Prompt, load_prompts

DEFENSE_NOISE_STREAM = 1  # generator stream for defence noise (attacks use stream 0)


class RunError(ValueError):
    """A run cannot start or continue (bad option, foreign output folder, ...)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during attacks: the message says what was saved and how to resume."""


@dataclass
class Leak:
    """What leaves the system: the prompts, their clean and defended hidden states (N, T, d)."""

    prompts: list[Prompt]
    clean: torch.Tensor
    defended: torch.Tensor


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise RunError(f"unknown --device {name!r}; choose auto, cuda or cpu")
    return torch.device(name)


def build_attacks(cfg: RunConfig) -> list[Attack]:
    """Each attack takes the options it knows; an option no chosen attack knows is an error."""
    attacks, used = [], set()
    for name in cfg.attacks:
        attack_cls = available_attacks()[name]
        own = {k: v for k, v in cfg.attack_options.items() if k in attack_cls.option_names}
        used |= own.keys()
        attacks.append(make_attack(name, preset=cfg.preset, overrides=own))
    unused = set(cfg.attack_options) - used
    if unused:
        raise RunError(f"option(s) {', '.join(sorted(unused))} do not apply to attack(s) {', '.join(cfg.attacks)}")
    return attacks


def load_source(cfg: RunConfig, device: torch.device, *,
                echo: Callable[[str], None]) -> tuple[LoadedModel, WhiteBox, list[Prompt], str]:
    """The leak's source: the model (checked against --tokens and --layer), white-box access to it,
    and the prompts with a one-line description of where they came from."""
    loaded = load_model(cfg.model, seed=cfg.seed, notify=echo)
    check_model_fits(loaded, cfg)
    try:
        oracle = WhiteBox(loaded.model.to(device), layer=cfg.layer)
    except ValueError as exc:
        raise RunError(f"--layer: {exc}") from None
    prompts, dataset_source = load_prompts(cfg.dataset, tokenizer=loaded.tokenizer, n=cfg.n, tokens=cfg.tokens,
                                           seed=cfg.seed, notify=echo)
    return loaded, oracle, prompts, dataset_source


def capture_and_defend(oracle: WhiteBox, prompts: list[Prompt], defense: Defense, *, seed: int,
                       batch_size: int) -> Leak:
    """Targets from one forward pass per batch; noise from one generator per prompt, so a prompt's
    defended states do not depend on batching, device or resumption.

    A defence only ever sees finite states: NaN or infinite captured states (a broken model or
    dtype overflow) stop the run here, before any defence or attack."""
    ids = torch.tensor([p.ids for p in prompts])
    clean = torch.cat([oracle.capture(ids[i:i + batch_size]).cpu() for i in range(0, len(ids), batch_size)])
    finite = torch.isfinite(clean).flatten(1).all(dim=1)
    if not finite.all():
        bad = [p.index for p, ok in zip(prompts, finite.tolist()) if not ok]
        raise RunError(f"the model's hidden states at layer {oracle.layer} are NaN or infinite for {len(bad)} of "
                       f"{len(prompts)} prompts (first: prompt {bad[0]}); check the model's weights and dtype")
    check_defense(defense, clean[0])
    defended = torch.stack([defend_one(defense, clean[i], prompt_generator(seed, p.index, DEFENSE_NOISE_STREAM))
                            for i, p in enumerate(prompts)])
    return Leak(prompts, clean, defended)


def one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines)[:300] or "(no message)"


def defense_label(defense: Defense) -> str:
    return f"defence {defense.name!r} ({type(defense).__module__}.{type(defense).__name__})"


def _check_output(label: str, what: str, out: object, like: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != like.shape or out.dtype != like.dtype:
        got = f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise RunError(f"{label}: {what} returned {got}; expected a tensor of shape {tuple(like.shape)} and "
                       f"dtype {like.dtype}")
    if out.device != like.device:
        raise RunError(f"{label}: {what} returned a tensor on {out.device}; expected it on {like.device}")
    if not torch.isfinite(out).all():
        bad = (~torch.isfinite(out)).sum().item()
        raise RunError(f"{label}: {what} returned NaN or infinite values ({bad} of {out.numel()}); "
                       "a defence must return finite hidden states")


def check_defense(defense: Defense, sample: torch.Tensor) -> None:
    """What attacks use of a (possibly outside) defence, checked once on real states: `simulate`
    and `noise_std`. A broken plug-in is named here rather than failing deep inside an attack."""
    label = defense_label(defense)
    try:
        simulated = defense.simulate(sample.clone())
    except Exception as exc:
        raise RunError(f"{label}: simulate raised {type(exc).__name__}: {one_line(exc)}") from exc
    _check_output(label, "simulate", simulated, sample)
    try:
        std = defense.noise_std
        ok = isinstance(std, (int, float)) and not isinstance(std, bool) and math.isfinite(std) and std >= 0
    except Exception as exc:
        raise RunError(f"{label}: noise_std raised {type(exc).__name__}: {one_line(exc)}") from exc
    if not ok:
        raise RunError(f"{label}: noise_std is {std!r}; expected a finite number >= 0")


def defend_one(defense: Defense, hidden: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply a (possibly outside) defence to one prompt's states and check what comes back, so a
    broken plug-in is named here rather than failing deep inside an attack."""
    label = defense_label(defense)
    try:
        out = defense.apply(hidden.clone(), generator=generator)
    except Exception as exc:
        raise RunError(f"{label}: apply raised {type(exc).__name__}: {one_line(exc)}") from exc
    _check_output(label, "apply", out, hidden)
    return out


def prompt_record(attack: str, prompt: Prompt, out: AttackOutput, row: int, decode: Callable) -> dict[str, Any]:
    """One line of records.jsonl: what was recovered and how well."""
    recovered = out.tokens[row].tolist()
    target = list(prompt.ids)
    recovered_text = decode(recovered)
    losses = out.discrete_loss[row].double()
    return {
        "attack": attack,
        "prompt_index": prompt.index,
        "text": prompt.text,
        "target_ids": target,
        "recovered_ids": recovered,
        "recovered_text": recovered_text,
        "exact_match": metrics.exact_match(target=target, recovered=recovered),
        "token_accuracy": metrics.token_accuracy(target=target, recovered=recovered),
        "similarity": metrics.similarity(target_text=prompt.text, recovered_text=recovered_text),
        "first_error": metrics.first_error(target=target, recovered=recovered),
        "discrete_loss": [metrics.finite_or_none(x) for x in losses.tolist()],
        "cumulative_discrete_loss": [metrics.finite_or_none(x) for x in losses.cumsum(0).tolist()],
        "seconds_per_token": float(out.seconds[row].mean()),
        **{key: [metrics.finite_or_none(x) for x in value[row].tolist()] for key, value in out.extras.items()},
    }


def attack_pending(attack: Attack, leak: Leak, oracle: WhiteBox, defense: Defense, *, seed: int, batch_size: int,
                   done: set[int], records_path: Path, decode: Callable,
                   echo: Callable[[str], None] = print) -> None:
    """Run one attack on the prompts it has not finished, a batch at a time, appending records.
    Out of GPU memory, a batch is split in two and retried (one line to `echo` per split)."""
    pending = [i for i, p in enumerate(leak.prompts) if p.index not in done]
    if not pending:
        return
    tokens = leak.clean.shape[1]
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
    with tqdm(total=len(batches) * tokens, desc=f"{attack.name}: {len(pending)} prompts", unit="pos",
              leave=False) as bar:
        while batches:
            rows = batches.pop(0)
            prompts = [leak.prompts[r] for r in rows]
            position = bar.n
            try:
                out = attack.run(oracle, leak.defended[rows], defense=defense, prompt_indices=[p.index for p in prompts],
                                 seed=seed, progress=lambda done_, total: bar.update(1))
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
                with tqdm.external_write_mode(file=sys.stderr):
                    echo(f"note: {attack.name} ran out of GPU memory on {len(rows)} prompts; retrying as two "
                         f"batches of {half} and {len(rows) - half}")
                continue
            append_records(records_path, [prompt_record(attack.name, p, out, j, decode) for j, p in enumerate(prompts)])


def summarise_attack(records: list[dict], *, flag_threshold: float) -> dict[str, Any]:
    """Aggregates of one attack's records, with the failure detector scored on the cumulative
    discrete loss (failed prompts are the positives)."""
    seconds = [r["seconds_per_token"] for r in records]
    total_tokens = sum(len(r["target_ids"]) for r in records)
    total_seconds = sum(r["seconds_per_token"] * len(r["target_ids"]) for r in records)
    final_loss = [r["cumulative_discrete_loss"][-1] for r in records]
    final_loss = [float("inf") if x is None else x for x in final_loss]
    failed = [not r["exact_match"] for r in records]
    auroc = metrics.detector_auroc(scores=final_loss, failed=failed)
    return {
        "n": len(records),
        "exact_match": sum(not f for f in failed) / len(records),
        "token_accuracy": sum(r["token_accuracy"] for r in records) / len(records),
        "similarity": sum(r["similarity"] for r in records) / len(records),
        "detector_auroc": auroc,
        "detector_note": None if auroc is not None else
        ("undefined: every prompt was recovered exactly" if not any(failed) else "undefined: every prompt failed"),
        "detector_tpr_at_1pct_fpr": metrics.tpr_at_fpr(scores=final_loss, failed=failed, fpr=0.01),
        "detector_threshold": flag_threshold,
        "detector_flag_rate": sum(x > flag_threshold for x in final_loss) / len(records),
        "seconds_per_token": metrics.median(seconds),
        "tokens_per_second": total_tokens / total_seconds if total_seconds > 0 else None,
    }


STALE_TEMP_GLOBS = (".config.json.*.tmp", ".summary.json.*.tmp")  # left by a run killed mid-write


def previous_config(out: Path) -> dict[str, Any] | None:
    """The config.json of an earlier run in `out` (None when there is none), checked before any
    model loads so that an unusable folder is refused at once."""
    config_path = out / "config.json"
    records_path = out / "records.jsonl"
    if not config_path.exists():
        if records_path.exists() and records_path.stat().st_size > 0:
            raise RunError(f"{records_path} has results but {config_path} is missing, so they cannot be matched to "
                           "this run; choose another --out")
        return None
    try:
        previous = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise RunError(f"{config_path} is unreadable ({type(exc).__name__}: {one_line(exc)}); "
                       "remove it or choose another --out") from None
    if not isinstance(previous, dict) or not isinstance(previous.get("config_hash"), str):
        what = "an object without a config_hash" if isinstance(previous, dict) else f"a JSON {type(previous).__name__}"
        raise RunError(f"{config_path} is not an invbench config ({what}); remove it or choose another --out")
    return previous


def prepare_out_dir(out: Path, config_record: dict[str, Any]) -> set[tuple[str, int]]:
    """Create or resume the results folder (its lock held); returns the (attack, prompt) pairs
    already done. A folder of another configuration, or records without a config, is refused."""
    previous = previous_config(out)
    if previous is not None and previous["config_hash"] != config_record["config_hash"]:
        raise RunError(f"{out} holds a different run (config hash {previous['config_hash']} vs "
                       f"{config_record['config_hash']}); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for pattern in STALE_TEMP_GLOBS:
        for stale in out.glob(pattern):
            stale.unlink(missing_ok=True)
    records_path = out / "records.jsonl"
    write_json_atomic(out / "config.json", config_record)
    repair_records(records_path)
    return {(r.get("attack"), r.get("prompt_index")) for r in read_records(records_path)}


def interrupted_message(records_path: Path, total: int) -> str:
    saved = len(read_records(records_path))
    return (f"interrupted: {saved} of {total} prompt results are saved in {records_path}; "
            "rerun the same command to resume")


def run(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Leak, defend, attack, score, record into cfg.out. The results folder is locked first, so a
    second run into it is refused before loading anything; every stage after that can be killed
    at any moment and the same command resumes with exactly the records of an uninterrupted run."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    defense = make_defense(cfg.defense, cfg.defense_params)
    attacks = build_attacks(cfg)
    out = Path(cfg.out)
    records_path = out / "records.jsonl"
    with RunLock(out):
        previous_config(out)  # a foreign or damaged folder is refused before the model loads
        loaded, oracle, prompts, dataset_source = load_source(cfg, device, echo=echo)
        defining = {"model": loaded.name, "model_recipe": loaded.recipe, "dataset": cfg.dataset, "n": cfg.n,
                    "tokens": cfg.tokens, "layer": cfg.layer, "seed": cfg.seed,
                    "prompt_ids": [list(p.ids) for p in prompts], "defense": defense.describe(),
                    "attacks": {a.name: a.config_dict() for a in attacks}}
        chash = config_hash(defining)
        done = prepare_out_dir(out, {
            "config_hash": chash, "command": cfg.to_dict(), "defining": defining, "model_source": loaded.source,
            "dataset_source": dataset_source, "versions": package_versions(), "git_commit": git_commit(),
            "device": device_name(device)})
        echo(f"model {loaded.name} ({loaded.source}); {len(prompts)} prompts x {cfg.tokens} tokens from {dataset_source}")
        try:
            leak = capture_and_defend(oracle, prompts, defense, seed=cfg.seed, batch_size=cfg.batch_size)
            for attack in attacks:
                finished = {i for name, i in done if name == attack.name}
                attack_pending(attack, leak, oracle, defense, seed=cfg.seed, batch_size=cfg.batch_size,
                               done=finished, records_path=records_path, decode=loaded.tokenizer.decode, echo=echo)
        except KeyboardInterrupt:
            raise RunInterrupted(interrupted_message(records_path, len(prompts) * len(attacks))) from None
        summary = {
            "model": loaded.name, "model_source": loaded.source, "dataset": cfg.dataset,
            "dataset_source": dataset_source, "n": len(prompts), "tokens": cfg.tokens, "layer": cfg.layer,
            "seed": cfg.seed, "defense": {**defense.describe(), **defense.guarantee(tokens=cfg.tokens)},
            "utility": defence_utility(loaded, leak, layer=cfg.layer),
            "attacks": summarise_attacks(attacks, read_records(records_path), prompts, flag_threshold=(
                metrics.default_flag_threshold(noise_std=defense.noise_std, tokens=cfg.tokens,
                                               dim=leak.clean.shape[-1]))),
            "config_hash": chash, "device": device_name(device), "versions": package_versions(),
            "wall_seconds": time.perf_counter() - started,
        }
        summary["worst_case"] = metrics.worst_case(summary["attacks"])
        summary = metrics.json_safe(summary)
        write_json_atomic(out / "summary.json", summary)
    return summary


def summarise_attacks(attacks: list[Attack], records: list[dict], prompts: list[Prompt], *,
                      flag_threshold: float) -> dict[str, dict]:
    """Per attack: aggregates over this run's prompts (the last record of a prompt wins)."""
    wanted = {p.index for p in prompts}
    by_attack: dict[str, dict[int, dict]] = {a.name: {} for a in attacks}
    for record in records:
        if record["attack"] in by_attack and record["prompt_index"] in wanted:
            by_attack[record["attack"]][record["prompt_index"]] = record
    return {a.name: {**summarise_attack(list(by_attack[a.name].values()), flag_threshold=flag_threshold),
                     "config": a.config_dict()} for a in attacks}


def defence_utility(loaded: LoadedModel, leak: Leak, *, layer: int) -> dict[str, Any]:
    """What the defence costs the model, from the clean and defended states of the same prompts:
    through the model's own LM head at the last layer, cosine only elsewhere."""
    n_layers = loaded.model.config.num_hidden_layers
    if layer not in (-1, n_layers):
        return {**cosine_only(clean=leak.clean, defended=leak.defended),
                "note": f"layer {layer} is not the last: the LM-head utility does not apply, cosine only"}
    ids = torch.tensor([p.ids for p in leak.prompts])
    next_ids = torch.cat([ids[:, 1:], torch.full((len(ids), 1), -100)], dim=1)  # the last position has no next token
    head = loaded.model.get_output_embeddings()
    return utility_metrics(lm_head=head, clean=leak.clean.to(head.weight.device),
                           defended=leak.defended.to(head.weight.device), next_ids=next_ids.to(head.weight.device))


def utility_only(cfg: RunConfig, *, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """`invbench utility`: the defence's cost alone (no attack), for privacy-utility curves."""
    device = resolve_device(cfg.device)
    defense = make_defense(cfg.defense, cfg.defense_params)
    loaded, oracle, prompts, dataset_source = load_source(cfg, device, echo=echo)
    leak = capture_and_defend(oracle, prompts, defense, seed=cfg.seed, batch_size=cfg.batch_size)
    return metrics.json_safe({
        "model": loaded.name, "dataset": cfg.dataset, "dataset_source": dataset_source, "n": len(prompts),
        "tokens": cfg.tokens, "layer": cfg.layer, "seed": cfg.seed,
        "defense": {**defense.describe(), **defense.guarantee(tokens=cfg.tokens)},
        "utility": defence_utility(loaded, leak, layer=cfg.layer), "versions": package_versions()})


def check_model_fits(loaded: LoadedModel, cfg: RunConfig) -> None:
    context = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(loaded.model.config, "n_positions", None)
    if context and cfg.tokens > context:
        raise RunError(f"--tokens {cfg.tokens} exceeds the context of {loaded.name} ({context} positions)")
