"""What every attack receives and returns, and the one loop over positions they all share.

An attack gets white-box access (`invbench.leaks.oracle.WhiteBox`), the defended targets of a
batch of prompts (B, T, d), and the defence's public description (its `simulate` and
`noise_std`). It returns, per prompt and position, the committed token and its discrete loss:
the MSE between the committed token's (defence-simulated) hidden state and the target. The
discrete loss is what the ground-truth-free failure detector scores.

Every attack decodes left to right: at position t, with the prefix x1..x(t-1) committed, it
proposes tokens for x_t. `Attack.run` is that loop, written once: it computes each position's
prefix, asks the attack to `propose` candidates, keeps the `beam` best prefixes per prompt by
their summed objective (1: greedy), and times each position. An attack writes only what is its
own: `prepare` (per-run state, e.g. random starts) and `propose` (one position).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar, Callable

import numpy as np
import torch

from invbench.errors import InvbenchError

# Progress callback: called once per finished position with (position, total positions).
Progress = Callable[[int, int], None]
Notify = Callable[[str], None]  # one-line notes for the user


class AttackError(InvbenchError, ValueError):
    """Invalid attack name or option; printed by the CLI as one line."""


@dataclass
class AttackOutput:
    tokens: torch.Tensor  # (B, T) committed token ids
    discrete_loss: torch.Tensor  # (B, T) MSE of the committed token's hidden state vs the target
    seconds: torch.Tensor  # (B, T) wall time per position, amortised over the prompts in the batch
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # (B, T) per-position diagnostics


@dataclass
class Candidates:
    """What an attack proposes at one position, for each of R rows (prompts, or their beams)."""

    tokens: torch.Tensor  # (R, K) candidate ids, best first
    losses: torch.Tensor  # (R, K) their discrete losses (MSE of the simulated state vs the target)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # (R,) diagnostics of this position
    objective: torch.Tensor | None = None  # (R, K) what beams sum and rank, lower is better; default: losses


# The operating points a run may name (the paper's Fast, Baseline and High-accuracy). A run names one
# preset for all its attacks, so an attack with a single operating point has no presets of its own and
# accepts any of these names.
PRESET_NAMES = ("fast", "baseline", "high-acc")
CHUNK_SIZE = 4096  # candidate sequences per forward pass, for the attacks that verify many at once
CHUNK_SIZE_HELP = "sequences per forward pass."


# The largest count an integer option takes unless it declares its own `max`: torch sizes tensors in
# int64, and a count beyond this is a typo, not a budget (before: --max-candidates 99999999999999999999
# overflowed deep inside guided).
OPTION_INT_MAX = 2**31 - 1


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A config field that is also a command-line option (`--name-with-dashes`) with this help
    (the CLI prefixes the names of the attacks that take it). `metadata` may bound numbers
    (`min`, `min_open`, `max`) or list `choices`. Numbers are finite and integers at most
    OPTION_INT_MAX unless `max` says otherwise: `check_options` and the CLI's flags apply these
    bounds, so no attack repeats them."""
    return field(default=default, metadata={"help": help, **metadata})


def option_problem(name: str, value: Any, metadata: dict[str, Any]) -> str | None:
    """What is wrong with `value` for the option declared with `metadata`, in words, or None."""
    if "choices" in metadata:
        return None if value in metadata["choices"] else f"must be one of {', '.join(map(str, metadata['choices']))}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # text options (a file name, a ranker) are the attack's own to check
    low, high = metadata.get("min"), metadata.get("max", OPTION_INT_MAX if isinstance(value, int) else None)
    bounds = " and ".join(([f"{'>' if metadata.get('min_open') else '>='} {low}"] if low is not None else [])
                          + ([f"<= {high}"] if high is not None else []))
    wanted = f"a finite number{f' {bounds}' if bounds else ''}" if isinstance(value, float) else f"an integer {bounds}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be {wanted}"
    if low is not None and (value <= low if metadata.get("min_open") else value < low):
        return f"must be {wanted}"
    if high is not None and value > high:
        return f"must be {wanted}"
    return None


def check_options(attack: str, config: Any) -> None:
    """Every command-line option of `config` within its declared bounds, else one AttackError
    naming the flag ("continuous: --lr must be a finite number > 0, got inf")."""
    for name, f in command_line_options(type(config)).items():
        value = getattr(config, name)
        problem = option_problem(name, value, f.metadata)
        if problem:
            raise AttackError(f"{attack}: --{name.replace('_', '-')} {problem}, got {value!r}")


def chunk_size_option() -> Any:
    """The --chunk-size option several attacks share, declared once."""
    return option(CHUNK_SIZE, CHUNK_SIZE_HELP, min=1)


def command_line_options(config_class: type) -> dict[str, Any]:
    """name -> dataclass field of a config's command-line options (fields made with `option`)."""
    return {f.name: f for f in fields(config_class) if "help" in f.metadata}


def prompt_generator(seed: int, prompt_index: int, stream: int = 0) -> torch.Generator:
    """One CPU generator per (seed, prompt, stream), so a prompt draws the same random numbers
    whether it runs alone or in a batch, on any device, and on resume. Streams keep unrelated
    draws (an attack's init, a defence's noise) independent."""
    state = np.random.SeedSequence([seed, prompt_index, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the last (hidden) dimension."""
    return (a - b).pow(2).mean(dim=-1)


def simulate_with_gradient(defense, hidden: torch.Tensor) -> torch.Tensor:
    """The defence's deterministic part with a usable gradient: its own where it has one
    (clipping), else straight-through (quantisation's rounding has zero gradient; a plug-in whose
    `simulate` returns a constant, e.g. zeros_like, has none at all, and gradient attacks would
    otherwise crash on it)."""
    simulated = defense.simulate(hidden)
    if getattr(defense, "differentiable", True) and (simulated.requires_grad or not hidden.requires_grad):
        return simulated
    return hidden + (simulated - hidden).detach()


class Attack:
    """Base class: subclasses set `name`, `config_class` (a dataclass with `validate()`, whose
    command-line options are made with `option`), their `presets` (name -> field values; none for an
    attack with one operating point) and implement `propose` (and `prepare` if they keep per-run state)."""

    name: ClassVar[str] = "attack"
    config_class: ClassVar[type]
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    default_preset: ClassVar[str] = "baseline"
    #: Per-position extras that are codes of named outcomes, e.g. {"ended": ("certified", ...)}:
    #: records store the names.
    extra_labels: ClassVar[dict[str, tuple[str, ...]]] = {}

    #: The options (CLI flags such as --steps) this attack takes: its config's `option` fields.
    option_names: ClassVar[frozenset[str]] = frozenset()
    #: Whether the attack's answer amplifies float rounding: BLAS kernels pick their reduction order by the
    #: number of rows (on a 2-core x86 CPU a row's state at the last layer differs below 16 rows), so a prompt
    #: among others can get another answer than alone, and `verify`'s rerun of a subset another than the entry.
    batch_sensitive: ClassVar[bool] = False
    #: Rows every forward pass of `run` holds (None: the prompts given; blocks padded with copies). The runner
    #: sets it for a batch-sensitive attack from the run's `rows` (protocols: 32, so that entries and their
    #: verification agree); a plain `invbench run` leaves it None (5 prompts padded to 32 tripled the main job).
    fixed_rows: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "config_class" in cls.__dict__:
            cls.option_names = frozenset(command_line_options(cls.config_class))

    def __init__(self, config) -> None:
        check_options(self.name, config)  # the declared bounds, for every attack alike
        config.validate()
        self.config = config

    @classmethod
    def from_options(cls, *, preset: str | None, overrides: dict[str, Any]) -> "Attack":
        """The config of a preset (default `default_preset`) with option overrides on top. An attack
        without presets takes any of PRESET_NAMES and keeps its one setting."""
        preset = preset or cls.default_preset
        known = tuple(cls.presets) or PRESET_NAMES
        if preset not in known:
            raise AttackError(f"{cls.name}: unknown preset {preset!r}; choose from {', '.join(known)}")
        unknown = set(overrides) - set(cls.config_class.__dataclass_fields__)
        if unknown:
            raise AttackError(f"{cls.name}: unknown option(s) {', '.join(sorted(unknown))}")
        return cls(replace(cls.config_class(), **{**cls.presets.get(preset, {}), **overrides}))

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)

    @property
    def beam(self) -> int:
        return getattr(self.config, "beam", 1)

    # --- what a subclass writes -----------------------------------------------------------------
    def setup(self, oracle, *, notify: Notify = print) -> None:
        """Load what the attack needs for this model and layer (default: nothing). The runner calls
        it once per run, also when no prompt is left to attack (a finished run reopened by `submit`),
        so that what `diagnostics` reports never depends on whether this session attacked."""

    def prepare(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
                notify: Notify = print) -> Any:
        """Per-run state handed to every `propose` call (default: none). `notify` takes one-line
        notes for the user (e.g. that a cache is being built)."""
        return None

    def propose(self, oracle, prefix, goal: torch.Tensor, *, defense, position: int, owner: torch.Tensor,
                state: Any) -> Candidates:
        """Candidates for position `position` of R rows: `prefix` holds each row's committed
        tokens, `goal` (R, d) its defended target, `owner` (R,) the batch index of its prompt."""
        raise NotImplementedError

    # --- the shared loop --------------------------------------------------------------------------
    def run(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
            progress: Progress | None = None, notify: Notify = print) -> AttackOutput:
        if self.fixed_rows and targets.shape[0] != self.fixed_rows:
            return self._run_in_blocks(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed,
                                       progress=progress, notify=notify)
        batch, length, _ = targets.shape
        targets = targets.to(oracle.device)
        device = oracle.device
        state = self.prepare(oracle, targets, defense=defense, prompt_indices=prompt_indices, seed=seed, notify=notify)
        # Per prompt: k live prefixes (k = 1 before the first position), their summed objective,
        # and per-position histories that follow each prefix when beams are reordered.
        seqs = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)
        scores = torch.zeros(batch, 1, device=device)
        history: dict[str, torch.Tensor] = {}
        seconds = torch.zeros(batch, length)
        for t in range(length):
            start = time.perf_counter()
            k = seqs.shape[1]
            owner = torch.arange(batch, device=device).repeat_interleave(k)  # row b * k + j is beam j of prompt b
            prefix = oracle.prefix(seqs.reshape(batch * k, t))
            found = self.propose(oracle, prefix, targets[owner, t], defense=defense, position=t, owner=owner,
                                 state=state)
            width = found.tokens.shape[1]
            objective = found.losses if found.objective is None else found.objective
            total = (scores.reshape(batch * k, 1) + objective).reshape(batch, k * width)
            best = total.topk(min(self.beam, k * width), dim=1, largest=False)  # ascending: beam 0 is best
            parent, column = best.indices // width, best.indices % width
            prompt = torch.arange(batch, device=device)[:, None]
            flat = prompt * k + parent  # row of each kept extension in the (B k) layout
            seqs = torch.cat([seqs[prompt, parent], found.tokens[flat, column][..., None]], dim=2)
            steps = {"discrete_loss": found.losses[flat, column], **{n: v[flat] for n, v in found.extras.items()}}
            for name, value in steps.items():
                past = history.get(name, torch.zeros(batch, k, 0, device=device))
                history[name] = torch.cat([past[prompt, parent], value.to(device).float()[..., None]], dim=2)
            scores = best.values
            seconds[:, t] = (time.perf_counter() - start) / batch
            if progress:
                progress(t + 1, length)
        losses = history.pop("discrete_loss")
        return AttackOutput(seqs[:, 0].cpu(), losses[:, 0].cpu(), seconds, {n: v[:, 0].cpu() for n, v in history.items()})

    def _run_in_blocks(self, oracle, targets: torch.Tensor, *, defense, prompt_indices: list[int], seed: int,
                       progress: Progress | None, notify: Notify) -> AttackOutput:
        """`run` on blocks of exactly `fixed_rows` prompts, the last padded with copies of its first prompt
        (their answers are dropped). Progress is reported once per position of the whole batch."""
        size, length = self.fixed_rows, targets.shape[1]
        starts = range(0, targets.shape[0], size)
        ticks = 0

        def tick(position: int, total: int) -> None:
            nonlocal ticks
            ticks += 1
            if progress and ticks % len(starts) == 0:
                progress(ticks // len(starts), length)

        parts = []
        for start in starts:
            real = list(range(start, min(start + size, targets.shape[0])))
            rows = real + [real[0]] * (size - len(real))
            out = self.run(oracle, targets[rows], defense=defense, prompt_indices=[prompt_indices[r] for r in rows],
                           seed=seed, progress=tick, notify=notify)
            keep = slice(0, len(real))
            parts.append(AttackOutput(out.tokens[keep], out.discrete_loss[keep], out.seconds[keep] * size / len(real),
                                      {name: value[keep] for name, value in out.extras.items()}))
        return AttackOutput(torch.cat([p.tokens for p in parts]), torch.cat([p.discrete_loss for p in parts]),
                            torch.cat([p.seconds for p in parts]),
                            {name: torch.cat([p.extras[name] for p in parts]) for name in parts[0].extras})

    # --- what the harness asks of every attack ------------------------------------------------------
    @torch.no_grad()
    def objective(self, oracle, targets: torch.Tensor, tokens: torch.Tensor, *, defense) -> torch.Tensor:
        """This attack's own per-position loss (B, T) of given sequences against the defended
        targets, lower is better: what it tries to minimise. The benchmark compares the truth's
        with the attack's answer to tell a search failure from a defence's success. Default: the
        discrete loss, MSE of each token's simulated state (one forward of the whole sequence)."""
        return mse(defense.simulate(oracle.capture(tokens.to(oracle.device))), targets.to(oracle.device))

    def flops_per_token(self, out: AttackOutput, *, params: int, vocab: int) -> float:
        """Matmul FLOPs this attack did per token in `out`: 2 * params per sequence forward (the
        prefix is cached and not counted), 3x that with a backward pass."""
        raise NotImplementedError

    def diagnostics(self, records: list[dict], *, defense) -> dict[str, Any]:
        """The attack's own figures for the run summary, from its records and its config, and from
        what `setup` loaded, never from state that only `prepare` sets (default: none)."""
        return {}


def position_values(records: list[dict], key: str) -> list:
    """Every position's value of a per-position record field, over all records that have it."""
    return [v for r in records for v in r.get(key, [])]


def distribution(values: list[float]) -> dict[str, float] | None:
    """Mean, median and 99th percentile, or None for no values."""
    if not values:
        return None
    array = np.asarray(values, dtype=float)
    return {"mean": float(array.mean()), "median": float(np.median(array)), "p99": float(np.percentile(array, 99))}
