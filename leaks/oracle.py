"""White-box access to the leaking model: what an attacker with the weights can compute.

Attacks never touch transformers internals; they get
- `embedding`: the token-embedding matrix (V, d),
- `capture(ids)`: the leaked targets H, one forward pass over whole prompts,
- `prefix(ids)`: the KV cache of a committed prefix, computed once per position, with the state
  the LM head reads at its last token (for the model's own prior over the next token),
- `hidden(prefix, embeds)`: the hidden state at the leaked layer of each candidate embedding
  appended after its prompt's prefix, differentiable in `embeds`,
- `hidden_of_tokens(prefix, ids)`: the same for token ids, chunked, without gradients,
- `log_prior(prefix)` and `log_prior_of(ids)`: the model's own next-token log-probabilities,
- `server_states(ids, states)`: what the rest of the model makes of (defended) states at the leak
  point: the final states the LM head reads (the server's view, for the defence's utility).

Leak points (`layer`, an index into `hidden_states`): 0 is the input of the first block (the token
embeddings; GPT-2 adds its position embeddings), k in 1..L-1 the output of block k (a split-
inference client runs blocks 1..k and sends that), L (or -1) the last layer after the final norm.
Before the last layer, states are computed through blocks 1..k only (`_client`: the forward stops
at block k), so a candidate costs about k/L of a last-layer one, and at layer 0 no block runs at
all; the KV-cached prefix keeps only blocks 1..k, and the prior still comes from the whole model.
The last layer's path is the full forward, as it always was.
"""
from __future__ import annotations

import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import DynamicCache, PreTrainedModel

from .cache import weights_fingerprint


@dataclass
class Prefix:
    """Per-layer (key, value) tensors of B committed prefixes of equal length, and the final
    (normed) state at each prefix's last token, which the LM head turns into the prior."""

    keys: list[torch.Tensor]  # each (B, heads, t, head_dim)
    values: list[torch.Tensor]
    length: int
    batch: int
    last_state: torch.Tensor | None = None  # (B, d); None for the empty prefix

    def select(self, rows: torch.Tensor) -> "Prefix":
        """The prefixes of a subset of prompts (e.g. those still optimising)."""
        if self.length == 0:
            return Prefix([], [], 0, len(rows))
        return Prefix([k[rows] for k in self.keys], [v[rows] for v in self.values], self.length, len(rows),
                      self.last_state[rows])

    def expanded(self, repeats: int) -> DynamicCache:
        """A fresh cache with each prompt's prefix repeated `repeats` times (prompt-major), so
        that a forward pass can append one candidate per row without touching this prefix. (Before
        the last layer the prefix holds only the blocks the client runs.)"""
        cache = DynamicCache()
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k.repeat_interleave(repeats, dim=0), v.repeat_interleave(repeats, dim=0), layer)
        return cache


def cache_keyword(body: torch.nn.Module) -> str:
    """The name under which this transformers version takes a KV cache: `cache` (5.x; the old
    name warns on every call) or `past_key_values` (4.x)."""
    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


class PrefixTree:
    """The KV caches of many prefixes that share their beginnings (a beam search's hypotheses), one
    node per appended token: each node holds its token's keys and values in every block and the final
    state there (the prior's input), and points to its parent. A prefix of t tokens is the path of t
    nodes, so a hypothesis extended by one token costs one token's forward (not t), and memory is the
    nodes still on a live path (`prune`), not hypotheses x length.

    Level s holds the nodes of prefixes of s + 1 tokens; node ids are indices within a level."""

    def __init__(self, oracle: "WhiteBox", *, chunk: int = 256) -> None:
        self.oracle = oracle
        self.chunk = chunk
        self.keys: list[list[torch.Tensor]] = []  # level -> block -> (N, kv heads, head dim)
        self.values: list[list[torch.Tensor]] = []
        self.parent: list[torch.Tensor] = []  # level -> (N,) node ids at the level before (-1 at level 0)
        self.last: list[torch.Tensor] = []  # level -> (N, d) final state at the node's token

    def _paths(self, nodes: torch.Tensor, level: int) -> list[torch.Tensor]:
        """Node ids at levels 0..level of each node's path."""
        path = [nodes]
        for s in range(level, 0, -1):
            path.append(self.parent[s][path[-1]])
        return path[::-1]

    def prefix(self, nodes: torch.Tensor, *, blocks: int | None = None) -> Prefix:
        """The Prefix (keys of the first `blocks` blocks, default the oracle's client blocks) of nodes
        at the deepest level."""
        level = len(self.parent) - 1
        path = self._paths(nodes, level)
        if blocks is None:
            blocks = self.oracle.n_layers if self.oracle.final else self.oracle.layer_index
        keys = [torch.stack([self.keys[s][b][i] for s, i in enumerate(path)], dim=2) for b in range(blocks)]
        values = [torch.stack([self.values[s][b][i] for s, i in enumerate(path)], dim=2) for b in range(blocks)]
        return Prefix(keys, values, level + 1, len(nodes), self.last[level][nodes])

    @torch.no_grad()
    def append(self, parents: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
        """New nodes (a new level): token `tokens[i]` (R,) after node `parents[i]` of the deepest level
        (None: the first tokens). Returns their ids (0..R-1)."""
        oracle, level = self.oracle, len(self.parent)
        keys, values, last = [], [], []
        for start in range(0, len(tokens), self.chunk):
            rows = slice(start, start + self.chunk)
            embeds = oracle.embedding[tokens[rows].to(oracle.device)][:, None]
            cache = DynamicCache()
            if parents is not None:
                before = self.prefix(parents[rows], blocks=oracle.n_layers)
                for block, (k, v) in enumerate(zip(before.keys, before.values)):
                    cache.update(k, v, block)
            out = oracle._run(embeds, cache=cache, start=level, hidden_states=False)
            keys.append([layer.keys[:, :, -1] for layer in cache.layers])
            values.append([layer.values[:, :, -1] for layer in cache.layers])
            last.append(out.last_hidden_state[:, -1].float())
        self.keys.append([torch.cat([part[b] for part in keys]) for b in range(len(keys[0]))])
        self.values.append([torch.cat([part[b] for part in values]) for b in range(len(values[0]))])
        self.last.append(torch.cat(last))
        self.parent.append(torch.full((len(tokens),), -1, dtype=torch.long, device=oracle.device) if parents is None
                           else parents.to(oracle.device))
        return torch.arange(len(tokens), device=oracle.device)

    def prune(self, nodes: torch.Tensor) -> torch.Tensor:
        """Keep only the paths of `nodes` (ids at the deepest level, repeats allowed); returns their new ids."""
        level = len(self.parent) - 1
        keep, result = nodes, None
        for s in range(level, -1, -1):
            kept, inverse = torch.unique(keep, return_inverse=True)
            if s == level:
                result = inverse
            else:  # the level after points at this one's old ids: renumber
                remap = torch.full((len(self.last[s]),), -1, dtype=torch.long, device=kept.device)
                remap[kept] = torch.arange(len(kept), device=kept.device)
                self.parent[s + 1] = remap[self.parent[s + 1]]
            self.keys[s] = [k[kept] for k in self.keys[s]]
            self.values[s] = [v[kept] for v in self.values[s]]
            self.last[s] = self.last[s][kept]
            self.parent[s] = self.parent[s][kept]
            keep = self.parent[s]
        return result


class LeakPointReached(Exception):
    """Raised by the hook at the leak point: holds the state there, so the blocks after it never run."""

    def __init__(self, state: torch.Tensor) -> None:
        super().__init__("leak point reached")
        self.state = state


def decoder_blocks(body: torch.nn.Module, n_layers: int) -> torch.nn.ModuleList:
    """The model's decoder blocks: the first ModuleList of `n_layers` modules in its body (GPT-2's
    `h`, Llama's `layers`)."""
    for module in body.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"cannot find the {n_layers} decoder blocks of {type(body).__name__}; only the last layer "
                     "(--layer -1) can be leaked from this model")


def _hidden_argument(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _block_output(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def document_start_token(tokenizer) -> int | None:
    """The token a document follows in pretraining, for the prior of a prompt's first token:
    `<|endoftext|>` where the vocabulary has it (GPT-2, SmolLM2), else the BOS token, else None
    (a uniform first-token prior). Measured on SmolLM2, 200 C4 documents: after <|endoftext|>
    the true first token is in the top 64 for 28%, after <|im_start|> (its BOS) for 1.5%."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    return getattr(tokenizer, "bos_token_id", None)


class WhiteBox:
    """Differentiable oracle f(candidate | prefix) -> hidden state at `layer` (float32)."""

    def __init__(self, model: PreTrainedModel, *, layer: int = -1, chunk_size: int = 1024,
                 start_token: int | None = None, tokenizer=None, name: str = "") -> None:
        n_layers = model.config.num_hidden_layers
        if not -(n_layers + 1) <= layer <= n_layers:
            raise ValueError(f"layer {layer} out of range for a {n_layers}-layer model (allowed {-(n_layers + 1)}..{n_layers})")
        self.model = model.eval().requires_grad_(False)
        self.body = model.base_model  # the transformer without the LM head: no vocabulary-sized logits per call
        self.head = model.get_output_embeddings()
        self.layer = layer
        self.chunk_size = chunk_size
        self.start_token = start_token
        self.tokenizer = tokenizer  # part of white-box knowledge; rankers are fitted with it
        self.name = name  # the model's alias or id, for artefacts made per model (rankers)
        self.embedding = model.get_input_embeddings().weight.detach()
        self.vocabulary: torch.Tensor | None = None  # model ids of the candidates when restricted (tests)
        self._cache_kw = cache_keyword(self.body)
        self.n_layers = n_layers
        # before the last layer: the blocks, so that a forward can stop at (or replace) the leak point
        self.blocks = None if self.final else decoder_blocks(self.body, n_layers)
        self._start_prior: torch.Tensor | None = None
        self._tables: dict[int, torch.Tensor] = {}  # position -> position_table (position 0 and the latest)
        self._fingerprint: tuple[int, str] | None = None

    @classmethod
    def of(cls, loaded, *, layer: int = -1, device: torch.device | str | None = None) -> "WhiteBox":
        """White-box access to a loaded model (`invbench.leaks.models.LoadedModel`) as runs, rankers and
        studies open it: named after the model (artefacts such as rankers are found by name), with its
        tokenizer and the document-start prior, moved to `device` when one is given."""
        model = loaded.model if device is None else loaded.model.to(device)
        return cls(model, layer=layer, tokenizer=loaded.tokenizer, name=loaded.name,
                   start_token=document_start_token(loaded.tokenizer))

    @property
    def fingerprint(self) -> str:
        """sha256 of the model's weights and of the candidate embeddings in use (computed once per
        embedding matrix): what cached artefacts are checked against."""
        if self._fingerprint is None or self._fingerprint[0] != id(self.embedding):
            weights = weights_fingerprint(self.model)
            own = self.model.get_input_embeddings().weight
            if self.embedding.data_ptr() != own.data_ptr() or self.embedding.shape != own.shape:
                digest = hashlib.sha256(weights.encode())  # candidates other than the model's own vocabulary
                digest.update(self.embedding.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                weights = digest.hexdigest()
            self._fingerprint = (id(self.embedding), weights)
        return self._fingerprint[1]

    def restrict_vocabulary(self, ids: torch.Tensor) -> "WhiteBox":
        """Candidates are only the model's tokens `ids` (sorted), renumbered 0..len-1: the same
        model with a smaller vocabulary, for fast tests. Priors are renormalised over them."""
        self.vocabulary = ids.to(self.device)
        self.embedding = self.model.get_input_embeddings().weight.detach()[self.vocabulary]
        self._start_prior = None
        self._tables = {}
        return self

    @property
    def device(self) -> torch.device:
        return self.embedding.device

    @property
    def vocab_size(self) -> int:
        return self.embedding.shape[0]

    @property
    def layer_index(self) -> int:
        """The leaked layer as a non-negative index into hidden_states (-1 and L name the same)."""
        return self.layer % (self.model.config.num_hidden_layers + 1)

    @property
    def context_free(self) -> bool:
        """Whether a token's state at the leak point ignores the tokens before it (layer 0: the
        embedding lookup), so that the states of every candidate at a position are one fixed table
        (`position_table`) and verifying a candidate is a look-up, not a forward pass."""
        return self.layer_index == 0

    @property
    def final(self) -> bool:
        """Whether the leak point is the last layer (after the final norm: what the LM head reads)."""
        return self.layer_index == self.model.config.num_hidden_layers

    def _run(self, embeds: torch.Tensor, *, cache: DynamicCache | None, start: int, hidden_states: bool):
        """The body on `embeds` at positions start.. (after `cache`, whose prefix has `start` tokens;
        with no cache, the positions alone: at layer 0 no block reads a prefix)."""
        rows, length, _ = embeds.shape
        positions = torch.arange(start, start + length, device=embeds.device).expand(rows, length)
        mask = torch.ones(rows, (start if cache is not None else 0) + length, dtype=torch.long, device=embeds.device)
        return self.body(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, use_cache=cache is not None,
                         output_hidden_states=hidden_states, **{self._cache_kw: cache})

    def _forward(self, embeds: torch.Tensor, *, cache: DynamicCache | None, start: int) -> torch.Tensor:
        if not self.final:
            return self._client(embeds, cache=cache, start=start)
        return self._run(embeds, cache=cache, start=start, hidden_states=True).hidden_states[self.layer]

    def _client(self, embeds: torch.Tensor, *, cache: DynamicCache | None, start: int) -> torch.Tensor:
        """The state at leak point k < L (what a split-inference client sends): the body runs up to
        block k and stops there (a hook raises with the state), so blocks k+1..L never run. k = 0: the
        input of block 1 (token embeddings, plus position embeddings where the model adds them)."""
        k = self.layer_index

        def before_first(module, args, kwargs):
            raise LeakPointReached(_hidden_argument(args, kwargs))

        def after_block(module, args, output):
            raise LeakPointReached(_block_output(output))

        handle = (self.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True) if k == 0
                  else self.blocks[k - 1].register_forward_hook(after_block))
        try:
            self._run(embeds, cache=cache, start=start, hidden_states=False)
        except LeakPointReached as reached:
            return reached.state
        finally:
            handle.remove()
        raise RuntimeError(f"the forward pass never reached layer {k}")

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
        out = self._run(self.embedding[ids.to(self.device)], cache=cache, start=0, hidden_states=False)
        client = len(cache.layers) if self.final else self.layer_index  # the blocks candidates run through
        keys = [layer.keys for layer in cache.layers[:client]]
        values = [layer.values for layer in cache.layers[:client]]
        return Prefix(keys, values, length, batch, out.last_hidden_state[:, -1].float())

    def hidden(self, prefix: Prefix, embeds: torch.Tensor) -> torch.Tensor:
        """Hidden state (B, M, d) of each of M candidate embeddings (B, M, d) placed after its
        prompt's prefix. Differentiable in `embeds`."""
        batch, m, d = embeds.shape
        cache = prefix.expanded(m) if prefix.length and (self.final or self.layer_index > 0) else None
        out = self._forward(embeds.reshape(batch * m, 1, d), cache=cache, start=prefix.length)
        return out.reshape(batch, m, d)

    @torch.no_grad()
    def hidden_of_tokens(self, prefix: Prefix, ids: torch.Tensor,
                         reduce: Callable[[torch.Tensor, slice], torch.Tensor] | None = None, *,
                         chunk_size: int | None = None) -> torch.Tensor:
        """Hidden state (B, M, d) of candidate token ids (B, M) after each prefix, chunked so that
        at most `chunk_size` (default: the oracle's) sequences go through the model at once. With
        `reduce`, each chunk's hidden states (B, m, d) and its column slice are mapped to a smaller
        result (e.g. distances (B, m)) before concatenation, so (B, M, d) is never held at once."""
        batch, m = ids.shape
        per_chunk = max(1, (chunk_size or self.chunk_size) // batch)
        table = self.position_table(prefix.length) if self.context_free else None
        parts = []
        for start in range(0, m, per_chunk):
            columns = slice(start, min(m, start + per_chunk))
            chosen = ids[:, columns].to(self.device)
            hidden = table[chosen] if table is not None else self.hidden(prefix, self.embedding[chosen]).float()
            parts.append(reduce(hidden, columns) if reduce else hidden)
        return torch.cat(parts, dim=1)

    @torch.no_grad()
    def position_table(self, position: int) -> torch.Tensor:
        """(V, d) float32: the state at the leak point of every candidate token alone at `position`
        (0-based; no token before it). At a context-free leak point (layer 0) that is its state after
        any prefix. Computed in chunks; where the states at `position` equal those at position 0 (a
        Llama's layer 0: the embeddings themselves; any model's single token under RoPE), checked on a
        sample of tokens, the position-0 table is reused. Position 0 and the latest are kept."""
        if position not in self._tables:
            first = self._tables.get(0)
            if first is None or position == 0:
                first = self._tables[0] = self._alone(torch.arange(self.vocab_size, device=self.device), 0)
            table = first
            if position:
                sample = torch.linspace(0, self.vocab_size - 1, 16, device=self.device).long()
                if not torch.equal(self._alone(sample, position), first[sample]):
                    table = self._alone(torch.arange(self.vocab_size, device=self.device), position)
            self._tables = {0: first, position: table}
        return self._tables[position]

    def _alone(self, ids: torch.Tensor, position: int) -> torch.Tensor:
        """States (N, d) of tokens `ids` each alone at `position` (no prefix), in chunks."""
        return torch.cat([self._forward(self.embedding[ids[i:i + self.chunk_size], None], cache=None, start=position)[:, 0]
                          .float() for i in range(0, len(ids), self.chunk_size)])

    # --- the server's view ---------------------------------------------------------------------
    def server_states(self, ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The final states (B, T, d) that the LM head reads when the server runs the rest of the
        model on `states` (B, T, d), the states of prompts `ids` (model ids) at the leak point: a causal
        forward of the whole model on `ids` in which block k's output (k = 0: block 1's input) is
        replaced by `states` at every position, so blocks k+1..L, the final norm and what follows
        read them as they would read what a client sent. At the last layer `states` themselves.
        Differentiable in `states` (the Fisher diagonal, bench/fisher.py); callers that only read it wrap it
        in torch.no_grad()."""
        if self.final:
            return states
        states = states.to(self.device, self.embedding.dtype)

        def before_first(module, args, kwargs):
            if args:
                return (states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": states}

        def after_block(module, args, output):
            return (states, *output[1:]) if isinstance(output, tuple) else states

        k = self.layer_index
        handle = (self.blocks[0].register_forward_pre_hook(before_first, with_kwargs=True) if k == 0
                  else self.blocks[k - 1].register_forward_hook(after_block))
        try:
            embeds = self.model.get_input_embeddings().weight.detach()[ids.to(self.device)]
            return self._run(embeds, cache=None, start=0, hidden_states=False).last_hidden_state.float()
        finally:
            handle.remove()

    # --- the model's own prior ------------------------------------------------------------------
    @torch.no_grad()
    def start_prior(self) -> torch.Tensor:
        """log p(first token) (V,): the next-token distribution after `start_token`, or uniform."""
        if self._start_prior is None:
            if self.start_token is None:
                self._start_prior = torch.full((self.vocab_size,), -math.log(self.vocab_size), device=self.device)
            else:
                start = self.model.get_input_embeddings().weight.detach()[[self.start_token]]  # a model id
                out = self._run(start[None], cache=None, start=0, hidden_states=False)
                self._start_prior = self._log_probs(out.last_hidden_state[0, -1:])[0]
        return self._start_prior

    @torch.no_grad()
    def log_prior(self, prefix: Prefix) -> torch.Tensor:
        """log p(next token | prefix) (B, V), from the LM head on each prefix's last state."""
        if prefix.length == 0:
            return self.start_prior().expand(prefix.batch, -1)
        return self._log_probs(prefix.last_state)

    @torch.no_grad()
    def next_token_log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(. | x_<t) (B, T, V) at every position of whole sequences (t = 1: the start prior)."""
        ids = ids.to(self.device)
        first = self.start_prior().expand(len(ids), 1, -1)
        if ids.shape[1] == 1:
            return first.clone()
        out = self._run(self.embedding[ids[:, :-1]], cache=None, start=0, hidden_states=False)
        return torch.cat([first, self._log_probs(out.last_hidden_state)], dim=1)

    @torch.no_grad()
    def log_prior_of(self, ids: torch.Tensor) -> torch.Tensor:
        """log p(x_t | x_<t) (B, T) of whole sequences: what the prior says of each of their tokens."""
        ids = ids.to(self.device)
        return self.next_token_log_probs(ids).gather(-1, ids[..., None])[..., 0]

    def _log_probs(self, final_state: torch.Tensor) -> torch.Tensor:
        logits = self.head(final_state.to(self.head.weight.dtype)).float()
        if self.vocabulary is not None:
            logits = logits[..., self.vocabulary]
        return torch.log_softmax(logits, dim=-1)
