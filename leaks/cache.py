"""Where invbench keeps what it computes once (model copies, codebooks, rankers), and how it
writes there: whole files only, so a killed process never leaves half of one behind."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch


def cache_root() -> Path:
    """$INVBENCH_CACHE, else ~/.cache/invbench."""
    return Path(os.environ.get("INVBENCH_CACHE", Path.home() / ".cache" / "invbench"))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it into place (readers
    see no file or the whole file). The file is made readable by others, like any cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of a model's parameters (names, shapes, dtypes, bytes): what a cached artefact
    computed from the model (a codebook, a ranker) must have been made from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()
