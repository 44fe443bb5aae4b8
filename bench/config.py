"""The run configuration, its hash, and the environment a result was produced in."""
from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from . import __version__

RECORDED_PACKAGES = ("torch", "transformers", "datasets", "opacus", "numpy", "scipy", "gguf")


@dataclass
class RunConfig:
    """Everything `invbench run` needs. `model=None` means the default (gpt2, falling back to
    smollm2-135m offline)."""

    model: str | None = None
    dataset: str = "c4"
    n: int = 100
    tokens: int = 10
    layer: int = -1
    seed: int = 42
    device: str = "auto"
    attacks: list[str] = field(default_factory=lambda: ["continuous"])
    preset: str | None = None
    attack_options: dict[str, Any] = field(default_factory=dict)
    defense: str = "none"
    defense_params: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 256
    out: str = "runs/latest"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
