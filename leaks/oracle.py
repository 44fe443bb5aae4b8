"""White-box access to the leaking model: what an attacker with the weights can compute.

Attacks never touch transformers internals; they get
- `embedding`: the token-embedding matrix (V, d),
- `capture(ids)`: the leaked targets H, one forward pass over whole prompts,
- `prefix(ids)`: the KV cache of a committed prefix, computed once per position,
- `hidden(prefix, embeds)`: the hidden state at the leaked layer of each candidate embedding
  appended after its prompt's prefix, differentiable in `embeds`,
- `hidden_of_tokens(prefix, ids)`: the same for token ids, chunked, without gradients.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Prefix:
    """Per-layer (key, value) tensors of B committed prefixes of equal length."""

    keys: list[torch.Tensor]  # each (B, heads, t, head_dim)
    values: list[torch.Tensor]
    length: int
    batch: int

    def select(self, rows: torch.Tensor) -> "Prefix":
        """The prefixes of a subset of prompts (e.g. those still optimising)."""
        if self.length == 0:
            return Prefix([], [], 0, len(rows))
        return Prefix([k[rows] for k in self.keys], [v[rows] for v in self.values], self.length, len(rows))

    def expanded(self, repeats: int) -> DynamicCache:
        """A fresh cache with each prompt's prefix repeated `repeats` times (prompt-major), so
        that a forward pass can append one candidate per row without touching this prefix."""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0), layer)
        return cache


class WhiteBox:
    """Differentiable oracle f(candidate | prefix) -> hidden state at `layer` (float32)."""

    def __init__(self, model: PreTrainedModel, *, layer: int = -1, chunk_size: int = 1024) -> None:
        n_layers = model.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model (allowed {-(n_layers + 1)}..{n_layers})")
        self.model = model.eval().requires_grad_(False)
        self.body = model.base_model  # the transformer without the LM head: no vocabulary-sized logits per call
        self.layer = layer
        self.chunk_size = chunk_size
        self.embedding = model.get_input_embeddings().weight.detach()

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    def _forward(self, embeds: torch.Tensor, *, cache: DynamicCache | None, start: int) -> torch.Tensor:
        rows, length, _ = embeds.shape
        positions = torch.arange(start, start + length, device=embeds.device).expand(rows, length)
        mask = torch.ones(rows, start + length, dtype=torch.long, device=embeds.device)
        out = self.body(inputs_embeds=embeds, past_key_values=cache, position_ids=positions,
                        attention_mask=mask, use_cache=cache is not None, output_hidden_states=True)
        return out.hidden_states[self.layer]

    @torch.no_grad()
    def capture(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, d) of whole prompts in one forward pass."""
        embeds = self.embedding[ids.to(self.device)]
        return self._forward(embeds, cache=None, start=0).float()

    def last_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, d) at the last position of whole sequences of embeddings (B, L, d), with
        no KV cache: what reference implementations compute every step. Differentiable."""
        return self._forward(embeds, cache=None, start=0)[:, -1]

    @torch.no_grad()
    def prefix(self, ids: torch.Tensor) -> Prefix:
        """KV cache of committed prefixes (B, t); t may be 0."""
        batch, length = ids.shape
        if length == 0:
            return Prefix([], [], 0, batch)
        cache = DynamicCache()
        self.body(inputs_embeds=self.embedding[ids.to(self.device)], past_key_values=cache, use_cache=True,
                  position_ids=torch.arange(length, device=self.device).expand(batch, length))
        keys = [layer.keys for layer in cache.layers]
        values = [layer.values for layer in cache.layers]
        return Prefix(keys, values, length, batch)

    def hidden(self, prefix: Prefix, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, M, d) of each of M candidate embeddings (B, M, d) placed after its
        prompt's prefix. Differentiable in `embeds`."""
        batch, m, d = embeds.shape
        cache = prefix.expanded(m) if prefix.length else None
        out = self._forward(embeds.reshape(batch * m, 1, d), cache=cache, start=prefix.length)
        return out.reshape(batch, m, d)

    @torch.no_grad()
    def hidden_of_tokens(self, prefix: Prefix, ids: torch.Tensor,
                         reduce: Callable[[torch.Tensor, slice], torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden state (B, M, d) of candidate token ids (B, M) after each prefix, chunked so that
        at most `chunk_size` sequences go through the model at once. With `reduce`, each chunk's
        hidden states (B, m, d) and its column slice are mapped to a smaller result (e.g. distances
        (B, m)) before concatenation, so (B, M, d) is never held at once."""
        batch, m = ids.shape
        per_chunk = max(1, self.chunk_size // batch)
        parts = []
        for start in range(0, m, per_chunk):
            columns = slice(start, min(m, start + per_chunk))
            hidden = self.hidden(prefix, self.embedding[ids[:, columns].to(self.device)]).float()
            parts.append(reduce(hidden, columns) if reduce else hidden)
        return torch.cat(parts, dim=1)
