"""One run over many workers: its prompts in shards, each shard a Ray task, one writer of the results.

`invbench run|submit|verify --engine ray` runs the runner's five stages as always (`invbench.runner`), with
one difference in stage 3: the attacks' pending prompts are cut into shards (`cluster.shard_size`) and each
shard is attacked by a Ray task (`attack_shard`, one GPU each where the cluster has GPUs, else one CPU).

- The driver (the process the command runs in) holds the results folder's lock, leaks and defends the
  prompts once, and sends each task its shard's prompts with their defended states; attacks, noise and seeds
  are per prompt (`attacks.base.prompt_generator`), so a shard's answers do not depend on which worker, or
  which other prompts, it ran with (bit for bit when a shard is one of the batches an unsharded run attacks:
  `--shard-size` equal to `--batch-size`; else up to float rounding in the last bits of batched sums).
- A task is the runner's own stages on a worker: the model loaded and checked against the driver's (its
  name, recipe and weights' SHA-256, the defence and the attacks' configurations: a worker set up otherwise
  is refused), the attack set up, and `runner.attack_pending` on the shard, its records returned instead of
  written. What a worker process loaded is kept for the run's next shard it gets.
- The driver is the one writer of records.jsonl: it appends each shard's records, whole (`results.append_records`),
  as the shard finishes, after checking them as a resumed run checks its file (each record whole and of
  the run's prompts). A worker killed mid-shard loses that shard only: Ray runs it again elsewhere
  (`MAX_RETRIES`), and if it cannot, the run ends with one line after the other shards are in, and the same
  command resumes with the missing prompts. Finished shards are never held back: they are on disk when the
  next one is awaited. At the end the file is put in the order an unsharded run writes it (attack, then
  prompt), atomically, so the two runs' folders hold the same records in the same order.
"""
from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from tqdm.auto import tqdm

from . import cluster
from .cluster import describe, import_ray
from .config import RunConfig, config_hash, device_name
from .errors import InvbenchError, one_line, refuse_exits

MAX_RETRIES = 3  # times Ray reruns a shard whose worker died (a node lost, a process killed); not for errors


class ShardError(InvbenchError, ValueError):
    """A shard could not be attacked (a worker set up unlike the driver, an error in a task); one line."""


@dataclass
class Shard:
    """One task: an attack on some of the run's prompts (their rows in the run's Leak)."""

    attack: str
    rows: list[int]


@dataclass
class ShardResult:
    """What a task returns: the records of its prompts, the notes it would have printed, where it ran."""

    records: list[dict]
    notes: list[str] = field(default_factory=list)
    device: str = ""
    node: str = ""
    seconds: float = 0.0


# --- what a worker must share with the driver ------------------------------------------------------

def identity(cfg: RunConfig, oracle: Any, loaded: Any, defense: Any, attacks: list[Any]) -> dict[str, Any]:
    """What a worker must have exactly as the driver has it for its records to be the run's: the model (name,
    recipe, the SHA-256 of its weights), the layer, the defence (as recorded), each attack's configuration and,
    for a defence from outside invbench, its code."""
    from invbench.defenses.registry import code_identity

    return {"model": loaded.name, "model_recipe": loaded.recipe, "weights": oracle.fingerprint, "layer": cfg.layer,
            "defense": defense.describe(), "defense_code": code_identity(cfg.defense),
            "attacks": {a.name: a.config_dict() for a in attacks}}


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """The identity fields that differ (compared as JSON, as the configuration hash compares them)."""
    return [key for key in sorted(set(ours) | set(theirs))
            if config_hash({"v": ours.get(key)}) != config_hash({"v": theirs.get(key)})]


# --- the task: on a worker ---------------------------------------------------------------------------

@dataclass
class _Worker:
    key: str
    oracle: Any
    decode: Callable
    defense: Any
    attacks: dict[str, Any]
    device: str
    ready: set[str] = field(default_factory=set)


_WORKERS: dict[str, _Worker] = {}  # per worker process: the run it last served (one at a time)


class _Collected:
    """Stands in for the results folder in `runner.attack_pending` on a worker: keeps what it would append."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def append(self, records: list[dict]) -> None:
        self.records.extend(records)


def _worker(cfg: RunConfig, expected: dict[str, Any], note: Callable[[str], None]) -> _Worker:
    """This process's model, defence and attacks for the run `cfg` (loaded once per run), checked against
    the driver's `expected` identity."""
    from . import runner

    key = config_hash({"cfg": cfg.to_dict(), "expected": expected})
    if key in _WORKERS:
        return _WORKERS[key]
    _WORKERS.clear()  # one run at a time: the previous run's model is let go
    cfg, device, defense, attacks = runner.prepare(cfg, echo=note)
    loaded = runner.load_model(cfg.model, seed=cfg.seed, notify=note)
    oracle = runner.white_box(loaded, layer=cfg.layer, device=device)
    cfg, defense = runner.sized(cfg, defense, loaded, echo=lambda line: None)
    runner.bind_needs(defense, loaded)
    ours = identity(cfg, oracle, loaded, defense, attacks)
    wrong = differences(ours, expected)
    if wrong:
        raise ShardError(f"the worker on {socket.gethostname()} is not set up as the driver: its {', '.join(wrong)} "
                         f"differ{'s' if len(wrong) == 1 else ''} from the driver's; install the same invbench, model "
                         "files and defence plug-ins on every node")
    worker = _Worker(key, oracle, loaded.tokenizer.decode, defense, {a.name: a for a in attacks}, device_name(device))
    _WORKERS[key] = worker
    return worker


def attack_shard(cfg: RunConfig, expected: dict[str, Any], attack_name: str, leak: Any) -> ShardResult:
    """A Ray task: `attack_name` on the prompts of `leak` (a shard of the run's Leak: its prompts and their
    defended states), with the runner's own stage (`runner.attack_pending`). Module-level, so Ray ships it
    by name; nothing is written here."""
    from . import runner

    started = time.perf_counter()
    notes: list[str] = []
    with refuse_exits(f"the defence {cfg.defense}"):
        worker = _worker(cfg, expected, notes.append)
        attack = worker.attacks[attack_name]
        if attack_name not in worker.ready:
            attack.setup(worker.oracle, notify=notes.append)
            worker.ready.add(attack_name)
        collected = _Collected()
        runner.attack_pending(attack, leak, worker.oracle, worker.defense, seed=cfg.seed, batch_size=cfg.batch_size,
                              done=set(), folder=collected, decode=worker.decode, echo=notes.append, progress=False)
    return ShardResult(collected.records, notes, worker.device, f"{socket.gethostname()} pid {os.getpid()}",
                       time.perf_counter() - started)


# --- executors: where tasks run ----------------------------------------------------------------------

class RayExecutor:
    """Shards as Ray tasks on the connected cluster: one GPU each where it has GPUs (and the run may use
    them), else one CPU."""

    def __init__(self, *, device: str) -> None:
        self.ray = import_ray()
        self.cluster = describe(self.ray)
        self.gpus = self.cluster["gpus"] >= 1 and device != "cpu"
        self.slots = self.cluster["gpus"] if self.gpus else max(1, self.cluster["cpus"])
        self.defaults = "cuda" if self.gpus else "cpu"  # the run's defaults are those of the workers' device
        options = {"num_gpus": 1} if self.gpus else {"num_cpus": 1}
        self.task = self.ray.remote(max_retries=MAX_RETRIES, **options)(attack_shard)

    @property
    def unit(self) -> str:
        return "GPU" if self.gpus else "CPU"

    def device(self, driver: str) -> str:
        """The run's recorded device: the cluster's slots and kinds, and the driver's device."""
        c = self.cluster
        kinds = f" ({', '.join(c['gpu_kinds'])})" if self.gpus and c["gpu_kinds"] else ""
        return f"ray: {_count(self.slots, self.unit)}{kinds} on {_count(c['nodes'], 'node')}; driver {driver}"

    def submit(self, *args: Any) -> Any:
        return self.task.remote(*args)

    def next_done(self, handles: list[Any]) -> tuple[Any, Any]:
        """The next finished task and its ShardResult, or the exception that ended it (the task's own error,
        or Ray's when its worker died MAX_RETRIES + 1 times)."""
        done, _ = self.ray.wait(handles, num_returns=1)
        try:
            return done[0], self.ray.get(done[0])
        except self.ray.exceptions.RayTaskError as exc:  # the task raised: its own exception
            return done[0], getattr(exc, "cause", None) or exc
        except self.ray.exceptions.RayError as exc:  # its worker or node died, and retries ran out
            return done[0], exc

    def cancel(self, handles: list[Any]) -> None:
        for handle in handles:
            try:
                self.ray.cancel(handle, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass


class InProcess:
    """Shards run one after another in this process, as a Ray worker would run them (tests, and a check of
    the sharded path without a cluster)."""

    unit, slots, defaults = "process", 1, None

    def __init__(self, *, slots: int = 1) -> None:
        self.slots = slots
        self._queue: deque = deque()

    def device(self, driver: str) -> str:
        return driver

    def submit(self, *args: Any) -> Any:
        handle = object()
        self._queue.append((handle, args))
        return handle

    def next_done(self, handles: list[Any]) -> tuple[Any, Any]:
        handle, args = next((h, a) for h, a in self._queue if h in handles)
        self._queue.remove((handle, args))
        try:
            return handle, attack_shard(*args)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - as a task's error comes back from Ray
            return handle, exc

    def cancel(self, handles: list[Any]) -> None:
        self._queue = deque((h, a) for h, a in self._queue if h not in handles)


# --- the driver ---------------------------------------------------------------------------------------

def plan(attacks: list[Any], leak: Any, done: set[tuple[str, int]], *, slots: int, batch_size: int,
         asked: int | None) -> list[Shard]:
    """The shards of what is not recorded yet: per attack, its pending prompts (in prompt order) cut into
    shards of `cluster.shard_size` prompts."""
    shards = []
    for attack in attacks:
        pending = [row for row, p in enumerate(leak.prompts) if (attack.name, p.index) not in done]
        if not pending:
            continue
        size = cluster.shard_size(len(pending), slots=slots, batch_size=batch_size, asked=asked)
        shards += [Shard(attack.name, pending[i:i + size]) for i in range(0, len(pending), size)]
    return shards


def sub_leak(leak: Any, rows: list[int]) -> Any:
    """The shard's part of the run's Leak: its prompts and their clean and defended states."""
    return replace(leak, prompts=[leak.prompts[r] for r in rows], clean=leak.clean[rows], defended=leak.defended[rows])


def _count(n: int, unit: str) -> str:
    return f"{n} {unit}" + ("" if n == 1 else "es" if unit.endswith("s") else "s")


def _failure(exc: BaseException) -> str:
    """A task's failure in one line: its own message (an invbench error says what to do), or Ray's last line."""
    if isinstance(exc, InvbenchError):
        return one_line(exc, limit=400)
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {one_line(lines[-1], limit=300)}" if lines else type(exc).__name__


def attack_sharded(*, pool: Any, cfg: RunConfig, attacks: list[Any], leak: Any, expected: dict[str, Any],
                   done: set[tuple[str, int]], folder: Any, shard_size: int | None,
                   echo: Callable[[str], None]) -> None:
    """Stage 3 over the pool's workers: every shard submitted, each one's records appended as it finishes (the
    driver the one writer), then the file put in prompt order. A failed shard does not stop the others;
    after they are in, the run ends with one ShardError line (a rerun resumes with the missing prompts)."""
    shards = plan(attacks, leak, done, slots=pool.slots, batch_size=cfg.batch_size, asked=shard_size)
    order = {(a.name, p.index): (i, j) for i, a in enumerate(attacks) for j, p in enumerate(leak.prompts)}
    if shards:
        largest = max(len(s.rows) for s in shards)
        echo(f"sharded: {len(shards)} shard(s) of at most {largest} prompt(s) over {_count(pool.slots, pool.unit)}")
        handles = {pool.submit(cfg, expected, s.attack, sub_leak(leak, s.rows)): s for s in shards}
        failures: list[tuple[Shard, BaseException]] = []
        seen: set[str] = set()
        with tqdm(total=len(shards), desc=f"shards ({pool.unit})", unit="shard", leave=False) as bar:
            try:
                while handles:
                    handle, outcome = pool.next_done(list(handles))
                    shard = handles.pop(handle)
                    bar.update(1)
                    if isinstance(outcome, BaseException):
                        failures.append((shard, outcome))
                        continue
                    _check(outcome, shard, leak, folder)
                    folder.append(outcome.records)
                    for line in outcome.notes:
                        if line not in seen:  # each worker says it once; the run says it once
                            seen.add(line)
                            with tqdm.external_write_mode():
                                echo(line)
            except BaseException:
                pool.cancel(list(handles))
                raise
        if failures:
            shard, exc = failures[0]
            prompts = sum(len(s.rows) for s, _ in failures)
            raise ShardError(f"{len(failures)} of {len(shards)} shards failed ({prompts} prompt results missing; first: "
                             f"{shard.attack} on prompts {', '.join(str(leak.prompts[r].index) for r in shard.rows)}: "
                             f"{_failure(exc)}); the other shards are saved: rerun the same command to resume")
    folder.reorder(lambda record: order.get((record.get("attack"), record.get("prompt_index")), (len(attacks), 0)))


def _check(result: Any, shard: Shard, leak: Any, folder: Any) -> None:
    """A task's records must be those of its shard, each a whole record of the run (as the folder reads them)."""
    expected = {(shard.attack, leak.prompts[r].index) for r in shard.rows}
    records = getattr(result, "records", None)
    found = [(r.get("attack"), r.get("prompt_index")) for r in records] if isinstance(records, list) and all(
        isinstance(r, dict) for r in records) else None
    if found is None or sorted(found, key=str) != sorted(expected, key=str):
        raise ShardError(f"a worker returned records that are not its shard's ({shard.attack} on "
                         f"{len(shard.rows)} prompts); install the same invbench on every node")
    for record in records:
        problem = folder.problem(record)
        if problem:
            raise ShardError(f"a worker returned a record that is not whole ({shard.attack}, prompt "
                             f"{record.get('prompt_index')}: {problem}); install the same invbench on every node")
