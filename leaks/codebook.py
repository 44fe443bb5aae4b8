"""The position-1 codebook: the leaked-layer state of every vocabulary token as a prompt's first
token.

A prompt's first state h_1 depends on x_1 alone (causal attention, no prefix), so the states of
all V tokens at position 1 are a fixed table per (model weights, layer): computed once with one
batched pass over the vocabulary, cached, and then position 1 of any prompt is a nearest-
neighbour lookup instead of V forward passes.

Stored in float32 as safetensors under `<cache>/codebooks/`, named by a hash of the weights and
the layer, with the fingerprint, layer, vocabulary size, width and format version in the file's
metadata. A file that does not load, does not match, or holds non-finite values is reported in
one line and rebuilt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .cache import cache_root, write_atomic
from .oracle import WhiteBox

FORMAT_VERSION = "1"
SUBDIR = "codebooks"


class Codebook:
    """First-position states (V, d) of one oracle's model and layer, built or loaded on first use."""

    def __init__(self, oracle: WhiteBox, *, folder: Path | None = None, notify: Callable[[str], None] = print) -> None:
        self.oracle = oracle
        self.folder = Path(folder) if folder is not None else cache_root() / SUBDIR
        self.notify = notify
        self._states: torch.Tensor | None = None

    @property
    def fingerprint(self) -> str:
        return self.oracle.fingerprint

    @property
    def path(self) -> Path:
        return self.folder / f"{self.fingerprint[:20]}-layer{self.oracle.layer_index}-float32.safetensors"

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT_VERSION, "weights_sha256": self.fingerprint, "layer": str(self.oracle.layer_index),
                "vocab_size": str(self.oracle.vocab_size), "dim": str(self.oracle.embedding.shape[1]),
                "dtype": "float32"}

    def states(self) -> torch.Tensor:
        """(V, d) float32 on the oracle's device."""
        if self._states is None:
            states = self._load()
            if states is None:
                states = self.build()
                write_atomic(self.path, lambda tmp: save_file({"states": states.cpu()}, str(tmp),
                                                            metadata=self.metadata()))
            self._states = states.to(self.oracle.device)
        return self._states

    def _load(self) -> torch.Tensor | None:
        """The cached table, or None (after one line saying why) when it cannot be used."""
        if not self.path.exists():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(self.path), framework="pt") as handle:
                found = handle.metadata() or {}
            states = load_file(str(self.path))["states"]
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            self.notify(f"note: codebook {self.path} is unreadable ({type(exc).__name__}); rebuilding it")
            return None
        expected = self.metadata()
        wrong = sorted(k for k in expected if found.get(k) != expected[k])
        shape = (self.oracle.vocab_size, self.oracle.embedding.shape[1])
        if wrong or tuple(states.shape) != shape or states.dtype != torch.float32 or not torch.isfinite(states).all():
            why = f"its {', '.join(wrong)} differ" if wrong else "its table is damaged"
            self.notify(f"note: codebook {self.path} was made for another model or is damaged ({why}); rebuilding it")
            return None
        return states

    @torch.no_grad()
    def build(self) -> torch.Tensor:
        """One forward pass per vocabulary token at position 1 (no prefix), chunked."""
        oracle, vocab = self.oracle, self.oracle.vocab_size
        self.notify(f"building the position-1 codebook once ({vocab} tokens, cached in {self.folder})")
        empty = oracle.prefix(torch.zeros(1, 0, dtype=torch.long))
        ids = torch.arange(vocab, device=oracle.device)
        chunk = max(1, oracle.chunk_size)
        parts = [oracle.hidden_of_tokens(empty, ids[None, start:start + chunk])[0]
                 for start in tqdm(range(0, vocab, chunk), desc="codebook", unit="chunk", leave=False)]
        return torch.cat(parts)


def first_position_gaps(states: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """For each token id (N,), the L2 distance from its position-1 state to the nearest state of
    any other token: the clean gap that noise must close to change the decoded first token."""
    own = states[tokens]
    distances = torch.cdist(own, states, compute_mode="donot_use_mm_for_euclid_dist")
    distances[torch.arange(len(tokens)), tokens] = float("inf")
    return distances.min(dim=1).values
