"""The run configuration, its hash, and the environment a result was produced in."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    import torch  # imported where used: the command line reads this module without loading torch

RECORDED_PACKAGES = ("torch", "transformers", "datasets", "opacus", "numpy", "scipy", "gguf")
SEED = 42  # prompts, noise, attacks and seeded random models, wherever a seed is not given
# Seeds go to numpy (non-negative only) and torch (64 bits at most) and are offset per prompt: 32 bits
# is the range every one of them takes.
SEED_MAX = 2**32 - 1
BATCH_SIZE = 256  # prompts attacked together
# Steps the published attacks (continuous, projection) get where a CPU runs them: the CPU defaults and
# the SmolLM2 protocols. More do not make them recover prompts of a trained model on any CPU budget
# (bench/studies/STUDY-published-attacks.md).
STEP_CAP = 20
# Rows every forward pass of a batch-sensitive attack holds in a protocol's runs (`Attack.fixed_rows`), so that
# a verify rerun of a subset reproduces each prompt's answer; 32 costs a 25-prompt board nothing on a CPU.
PROTOCOL_ROWS = 32


@dataclass
class RunConfig:
    """Everything `invbench run` needs. `model=None` means the default (gpt2, falling back to
    smollm2-135m offline); `n`, `tokens`, `attacks` and `preset` left None take the defaults of
    the device the run is on (`with_device_defaults`), for the CLI and for Python callers alike."""

    model: str | None = None
    dataset: str = "c4"
    n: int | None = None
    tokens: int | None = None
    layer: int = -1
    seed: int = SEED
    device: str = "auto"
    attacks: list[str] | None = None
    preset: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = BATCH_SIZE
    out: str = "runs/latest"
    # Which of the n prompts to run (their indices; None: all): `verify` reruns a random subset. A prompt
    # keeps its index, and so its noise and seeds.
    prompts: list[int] | None = None
    # The SHA-256 of the n prompts' ids (`prompts_digest`) that a protocol prescribes: a run whose data or
    # tokenizer gives other prompts is refused rather than compared with entries made on the prescribed ones.
    prompts_sha256: str | None = None
    # Rows every forward pass of a batch-sensitive attack (projection, continuous) holds (None: the batch as it
    # comes). Protocols set PROTOCOL_ROWS: a prompt's answer is then the same in an entry and in its verification.
    rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_out(cfg: RunConfig) -> str:
    """Where `invbench run` writes when --out is not given: runs/<defence and its parameters>-<8 hex digits of
    the command>, so that two commands never share a folder (before: every example wrote runs/latest, and the
    second was refused) and the same command resumes its own."""
    command = {k: v for k, v in cfg.to_dict().items()
               if k != "out" and not (k == "rows" and v is None)}  # a plain run's folder kept its name when rows came
    defence = Path(cfg.defense.split(":")[0]).stem if ":" in cfg.defense else cfg.defense
    words = [defence] + [f"{k}-{v}" for k, v in sorted(cfg.defense_params.items())]
    name = re.sub(r"[^a-z0-9.]+", "-", "-".join(map(str, words)).lower()).strip("-.")[:60] or "run"
    return f"runs/{name}-{config_hash(command)[:8]}"


def prompts_digest(ids: list[list[int]] | list[tuple[int, ...]]) -> str:
    """SHA-256 of prompts' token ids, in order: what identifies a protocol's prompts."""
    blob = json.dumps([list(map(int, p)) for p in ids], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class DeviceDefaults:
    """What a run measures when the caller does not say: sized to finish on the device."""

    n: int
    tokens: int
    attacks: tuple[str, ...]
    preset: str
    # attack -> options set when the preset is not given and that attack runs (a preset given keeps its budget)
    capped: dict[str, dict[str, Any]] = field(default_factory=dict)
    # attack -> options set only when the attacks themselves are the defaults (the main job): what a first run
    # should skip, but a user who names the attack may want (guided's codebook: the radius comes from it)
    unasked: dict[str, dict[str, Any]] = field(default_factory=dict)


# A GPU runs the paper's setting with every attack. A CPU has well under a minute: the exact attack (guided,
# position 1 verified in ranked order rather than by a codebook that costs about a minute to build, and 16
# candidates at least under noise rather than 64) on 10-token prompts, and the paper's continuous attack at
# CPU_STEPS Adam steps and CPU_CANDIDATES commit candidates, a few seconds, for comparison (it recovers
# nothing on a trained model at any CPU budget: bench/studies/STUDY-published-attacks.md).
CPU_STEPS, CPU_CANDIDATES = 2, 10
DEVICE_DEFAULTS = {
    "cuda": DeviceDefaults(n=100, tokens=10, attacks=("guided", "sequence", "continuous", "projection", "scan"),
                           preset="baseline"),
    "cpu": DeviceDefaults(n=5, tokens=10, attacks=("guided", "continuous"), preset="fast",
                          capped={"continuous": {"steps": CPU_STEPS, "candidates": CPU_CANDIDATES}},
                          unasked={"guided": {"codebook": False, "min_noisy_candidates": 16}}),
}


def with_device_defaults(cfg: RunConfig, device_type: str) -> tuple[RunConfig, list[str]]:
    """`cfg` with its unset fields filled from the device's defaults, and what was filled
    ("n=5", ...) for the one-line note that says so. A preset given keeps its own budget."""
    defaults = DEVICE_DEFAULTS.get(device_type, DEVICE_DEFAULTS["cpu"])
    filled, changes = [], {}
    for key in ("n", "tokens", "preset"):
        if getattr(cfg, key) is None:
            changes[key] = getattr(defaults, key)
            filled.append(f"{key}={changes[key]}")
    if cfg.attacks is None:
        changes["attacks"] = list(defaults.attacks)
        filled.append(f"attacks={','.join(defaults.attacks)}")
    if cfg.preset is None and (defaults.capped or defaults.unasked):
        options = dict(cfg.attack_options)
        attacks = changes.get("attacks", cfg.attacks)
        settings = [defaults.capped] + ([defaults.unasked] if cfg.attacks is None else [])
        for attack, capped in (item for setting in settings for item in setting.items()):
            for key, value in capped.items():
                if key not in options and attack in attacks:
                    options[key] = value
                    filled.append(f"{key}={value}")
        changes["attack_options"] = options
    return replace(cfg, **changes), filled


def cpu_threads(*, cores: int, busy: float) -> int:
    """Torch threads for a CPU run: the cores no other process keeps busy (`busy`: the load average), one at
    least. A BLAS thread that has to wait for a busy core stalls its siblings at every barrier: on this
    2-core machine with another CPU-bound job running, two threads made the main job 8.3x slower than one
    (551 s against 66 s, 2026-12-06)."""
    return max(1, min(cores, int(cores - busy + 0.5)))


def choose_cpu_threads() -> int | None:
    """Set torch's threads for this machine's free cores (`cpu_threads`), unless the user chose
    (OMP_NUM_THREADS or MKL_NUM_THREADS set): returns the number set, or None when left alone."""
    import torch

    if any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = cpu_threads(cores=cores, busy=busy)
    if threads != torch.get_num_threads():  # said in config.json's device ("cpu (..., 1 threads)"), not on screen
        torch.set_num_threads(threads)
    return threads


def config_hash(defining: dict[str, Any]) -> str:
    """Short sha256 of the parts of a run that decide its results (not device or output path)."""
    blob = json.dumps(defining, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"invbench": __version__, "python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def git_commit() -> str | None:
    """The project's git commit when running from a checkout, else None."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
