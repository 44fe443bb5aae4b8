"""The run configuration, its hash, and the environment a result was produced in."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    capped: dict[str, Any] = field(default_factory=dict)  # attack options set when the preset is not given


# A GPU runs the paper's setting with every attack. A CPU has minutes: the exact attack (guided, which
# needs ~0.2 s per token there) on 10-token prompts, and the paper's continuous attack at STEP_CAP
# for comparison (SmolLM2's Adam steps cost ~0.1 s each on 2 cores).
DEVICE_DEFAULTS = {
    "cuda": DeviceDefaults(n=100, tokens=10, attacks=("guided", "continuous", "projection", "scan"), preset="baseline"),
    "cpu": DeviceDefaults(n=5, tokens=10, attacks=("guided", "continuous"), preset="fast", capped={"steps": STEP_CAP}),
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
    if cfg.preset is None and defaults.capped:
        options = dict(cfg.attack_options)
        for key, value in defaults.capped.items():
            if key not in options and "continuous" in changes.get("attacks", cfg.attacks):
                options[key] = value
                filled.append(f"{key}={value}")
        changes["attack_options"] = options
    return replace(cfg, **changes), filled


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
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
