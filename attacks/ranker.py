"""A learned ranker: from a leaked state h_t to a distribution over the token x_t at that position.

The `guided` attack verifies candidate tokens in the order of a ranker's score, so a good ranker
means few exact forward passes per token. The model's own prior p(x_t | prefix) is one ranker
(free, but blind to the leaked state); this module adds a small learned one, trained on the
model's own hidden states of public text that no prompt set contains.

The network (nanoGPT-sized: one file, one class):
- input: the state scaled to unit RMS (so a defence that only rescales, like clipping, changes
  nothing) and the noise ratio sigma / RMS(h~), which the attacker knows (the defence is public);
- a 2-layer MLP d -> 8d/3 -> d with GELU (576 -> 1536 -> 576 for SmolLM2);
- its output, L2-normalised, scored against the L2-normalised token embeddings with a learned
  scale: log-softmax over the vocabulary.
It is trained with cross-entropy on clean states and on states with Gaussian noise at many
levels, so it stays useful under noisy defences.

Files are safetensors (float16 weights, a few MB) with the recipe, the data, the model's weight
fingerprint and held-out accuracies in their metadata, and a JSON copy of that metadata beside
them. Nothing is unpickled. `invbench fit-ranker` fits one (resumable: the states and each epoch
are checkpointed); `load_ranker` finds the shipped one, a cached one, or fits one on first use.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from invbench.leaks.cache import cache_root, write_atomic
from invbench.leaks.prompts import ranker_training_texts

from .base import AttackError

FORMAT_VERSION = "2"  # 2: the next position's state as a second input; random-id sequences in the data
SHIPPED = "rankers"  # package folder of the fitted rankers invbench ships (invbench.attacks/rankers)
CACHE_SUBDIR = "rankers"
TOP_K = (1, 8, 64, 256, 1024)


@dataclass(frozen=True)
class Recipe:
    """How a ranker is fitted; its hash names the cache entry, so any change refits."""

    documents: int = 1200  # training documents (the last `held_out` of them are held out)
    held_out: int = 100
    tokens_per_document: int = 64  # states per document: positions 1..64
    hidden_ratio: float = 8 / 3  # hidden width / model width (576 -> 1536)
    epochs: int = 3
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.01
    clean_fraction: float = 0.25  # of training samples left noise-free
    noise_ratio_range: tuple[float, float] = (1e-3, 3.0)  # sigma / RMS(h), log-uniform, for the others
    seed: int = 0
    random_sequences: int = 1000  # sequences of uniformly random ids (the last `held_out` held out)
    without_next: float = 0.2  # of training samples shown no next state (a prompt's last position has none)


def scaled_input(state: torch.Tensor, noise_std: torch.Tensor | float) -> torch.Tensor:
    """A state scaled to unit RMS and its noise ratio sigma / RMS (capped at 1): (B, d + 1)."""
    rms = state.pow(2).mean(dim=-1, keepdim=True).sqrt().clamp_min(1e-12)
    ratio = (torch.as_tensor(noise_std, dtype=state.dtype, device=state.device).reshape(-1, 1) / rms).clamp(max=1.0)
    return torch.cat([state / rms, ratio.expand(len(state), 1)], dim=-1)


class RankerNet(torch.nn.Module):
    """x_t from the state at t and, where known, the state at t + 1, which depends on x_t too (under
    noise, two independent looks at the same token)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(2 * (dim + 1) + 1, hidden)
        self.fc2 = torch.nn.Linear(hidden, dim)
        self.log_scale = torch.nn.Parameter(torch.tensor(math.log(20.0)))

    def forward(self, hidden: torch.Tensor, noise_std: torch.Tensor | float, token_directions: torch.Tensor,
                following: torch.Tensor | None = None, has_next: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, V): hidden (B, d), noise_std scalar or (B,), token_directions (V, d) unit rows;
        `following` (B, d) the next position's state, with `has_next` (B,) saying where it is real
        (None: nowhere)."""
        rows = len(hidden)
        if following is None:
            following, has_next = torch.zeros_like(hidden), torch.zeros(rows, dtype=torch.bool, device=hidden.device)
        elif has_next is None:
            has_next = torch.ones(rows, dtype=torch.bool, device=hidden.device)
        ahead = scaled_input(following, noise_std) * has_next[:, None]
        x = torch.cat([scaled_input(hidden, noise_std), ahead, has_next[:, None].to(hidden.dtype)], dim=-1)
        direction = F.normalize(self.fc2(F.gelu(self.fc1(x))), dim=-1)
        return self.log_scale.exp() * direction @ token_directions.T


class Ranker:
    """A fitted ranker bound to one model's embeddings: `log_probs(h~_t, noise_std, h~_t+1)` -> (B, V)."""

    def __init__(self, net: RankerNet, embedding: torch.Tensor, metadata: dict[str, Any]) -> None:
        self.net = net.eval().requires_grad_(False).to(embedding.device)
        self.directions = F.normalize(embedding.float(), dim=-1)
        self.metadata = metadata

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor, noise_std: float = 0.0, following: torch.Tensor | None = None) -> torch.Tensor:
        """log q(x_t | h~_t[, h~_t+1]) (B, V); `following` the next position's defended state, or None
        (a prompt's last position)."""
        ahead = None if following is None else following.float()
        return torch.log_softmax(self.net(hidden.float(), noise_std, self.directions, ahead), dim=-1)

    @property
    def description(self) -> str:
        return f"learned ranker ({self.metadata.get('where', 'fitted')}; trained on {self.metadata.get('data')})"


# --- finding one ------------------------------------------------------------------------------

def shipped_path(model_name: str, layer: int) -> Path:
    return Path(str(resources.files("invbench.attacks") / SHIPPED / f"{model_name}-layer{layer}.safetensors"))


def cache_key(fingerprint: str, layer: int, data: str, recipe: Recipe) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "weights": fingerprint, "layer": layer, "data": data,
                       "recipe": asdict(recipe)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def cache_path(oracle, data: str, recipe: Recipe) -> Path:
    """Where a ranker fitted for this model, layer, data and recipe is cached."""
    return cache_root() / CACHE_SUBDIR / f"{cache_key(oracle.fingerprint, oracle.layer_index, data, recipe)}.safetensors"


def load_ranker(oracle, *, spec: str = "auto", notify: Callable[[str], None] = print,
                fit_if_missing: bool = True, recipe: Recipe = Recipe()) -> Ranker | None:
    """The ranker `spec` names: "prior" -> None (the prior alone); a path -> that file; "auto"
    -> the one invbench ships for this model and layer, else a cached fit, else a new fit (said
    in one line). A file made for other weights or a damaged one is reported and not used."""
    if spec == "prior":
        return None
    model_name = oracle.name or "model"
    fingerprint = oracle.fingerprint
    if spec != "auto":
        path = Path(spec)
        if not path.is_file():
            raise AttackError(f"guided: --ranker {spec!r} is not a file; use auto, prior or a ranker .safetensors file")
        ranker = read_ranker(path, oracle, fingerprint=fingerprint, notify=notify)
        if ranker is None:
            raise AttackError(f"guided: --ranker {spec} cannot be used with this model (see the note above)")
        return ranker
    layer = oracle.layer_index
    shipped = shipped_path(model_name, layer)
    if shipped.is_file():
        ranker = read_ranker(shipped, oracle, fingerprint=fingerprint, notify=notify)
        if ranker is not None:
            return ranker
    texts, data = ranker_training_texts(notify=notify, limit=recipe.documents)
    path = cache_path(oracle, data, recipe)
    if path.is_file():
        ranker = read_ranker(path, oracle, fingerprint=fingerprint, notify=notify)
        if ranker is not None:
            return ranker
    if not fit_if_missing:
        return None
    minutes = estimate_fit_seconds(oracle, recipe) / 60
    notify(f"note: no ranker for {model_name} (layer {layer}) yet: fitting one once on {data} takes about "
           f"{minutes:.0f} minutes here (measured on its first batches; resumable), cached in {path.parent}. "
           "Pass --ranker prior to skip it (the model's prior alone: more candidates verified per token)")
    fit_ranker(oracle, texts=texts, data=data, out=path, recipe=recipe, notify=notify, model_name=model_name,
               command=f"invbench fit-ranker --model {model_name} --layer {oracle.layer} (fitted on first use)")
    ranker = read_ranker(path, oracle, fingerprint=fingerprint, notify=notify)
    assert ranker is not None, "a ranker just fitted must load"
    return ranker


@torch.no_grad()
def _time_capture(oracle, recipe: Recipe, batch: int) -> float:
    ids = torch.randint(oracle.vocab_size, (batch, recipe.tokens_per_document), generator=torch.Generator().manual_seed(0))
    oracle.capture(ids[:1])  # warm-up
    started = time.perf_counter()
    oracle.capture(ids)
    return time.perf_counter() - started


def estimate_fit_seconds(oracle, recipe: Recipe = Recipe(), *, steps: int = 3) -> float:
    """How long `fit_ranker` will take on this machine, from one batch of states (at the oracle's leak
    point: a split after block k costs about k/L of the last layer's) and `steps` training steps, scaled
    to the recipe (an upper bound: documents shorter than the recipe's tokens are skipped)."""
    batch = 16  # document_states' batch
    sequences = recipe.documents + recipe.random_sequences
    states = _time_capture(oracle, recipe, batch) * math.ceil(sequences / batch)
    dim = oracle.embedding.shape[1]
    net = RankerNet(dim, int(round(recipe.hidden_ratio * dim)))
    directions = F.normalize(oracle.embedding.float().cpu(), dim=-1)
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    x, labels = torch.randn(recipe.batch_size, dim), torch.randint(len(directions), (recipe.batch_size,))
    started = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(net(x, 0.1, directions, x, None), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    per_step = (time.perf_counter() - started) / steps
    training = (sequences - recipe.held_out - (recipe.held_out if recipe.random_sequences else 0)) * recipe.tokens_per_document
    return states + per_step * recipe.epochs * math.ceil(training / recipe.batch_size)


def read_ranker(path: Path, oracle, *, fingerprint: str, notify: Callable[[str], None]) -> Ranker | None:
    """Load a ranker file for `oracle`'s model, or None after one line saying why it cannot be used."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get("invbench", "{}"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        notify(f"note: ranker {path} is unreadable ({type(exc).__name__}); not using it")
        return None
    dim = oracle.embedding.shape[1]
    expected = {"format": FORMAT_VERSION, "weights_sha256": fingerprint, "layer": oracle.layer_index, "dim": dim}
    wrong = sorted(k for k, v in expected.items() if metadata.get(k) != v)
    if wrong:
        notify(f"note: ranker {path} was made for another model or layer ({', '.join(wrong)} differ); not using it")
        return None
    try:
        net = RankerNet(dim, int(metadata["hidden"]))
        net.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (KeyError, RuntimeError, ValueError) as exc:
        notify(f"note: ranker {path} is damaged ({type(exc).__name__}); not using it")
        return None
    if not all(torch.isfinite(p).all() for p in net.parameters()):
        notify(f"note: ranker {path} holds non-finite weights; not using it")
        return None
    where = "shipped with invbench" if path.parent == shipped_path("x", 0).parent else str(path)
    return Ranker(net, oracle.embedding, {**metadata, "where": where})


# --- fitting -------------------------------------------------------------------------------------

def document_ids(texts: list[str], tokenizer, *, tokens: int) -> torch.Tensor:
    """(N, tokens) ids of the documents with at least `tokens` tokens (no special tokens)."""
    rows = [ids[:tokens] for ids in (tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
            if len(ids) >= tokens]
    if not rows:
        raise AttackError(f"no training document has {tokens} tokens")
    return torch.tensor(rows)


@torch.no_grad()
def document_states(oracle, ids: torch.Tensor, *, work: Path, batch: int = 16) -> torch.Tensor:
    """Leaked-layer states (N, T, d) of the training documents, checkpointed per batch under
    `work` (float16) so that an interrupted fit resumes where it stopped."""
    work.mkdir(parents=True, exist_ok=True)
    parts = []
    for start in tqdm(range(0, len(ids), batch), desc="ranker: states", unit="batch", leave=False):
        part = work / f"states-{start:06d}.safetensors"
        chunk = ids[start:start + batch]
        if part.is_file():
            try:
                stored = load_file(str(part))
                if torch.equal(stored["ids"], chunk):
                    parts.append(stored["states"].float())
                    continue
            except (SafetensorError, OSError, KeyError):
                pass
        states = oracle.capture(chunk).cpu()
        write_atomic(part, lambda tmp: save_file({"ids": chunk, "states": states.half()}, str(tmp)))
        parts.append(states.half().float())
    return torch.cat(parts)


def random_ids(oracle, recipe: Recipe) -> torch.Tensor:
    """(N, tokens) uniformly random ids of the model's non-special tokens, from a numpy stream of
    the recipe's seed and the label "RANK" (random prompt sets draw from the label "RAND": the two
    streams are independent, so no prompt set's secret is in the training data)."""
    special = set(getattr(oracle.tokenizer, "all_special_ids", []) or [])
    allowed = np.asarray([i for i in range(oracle.vocab_size) if i not in special])
    rng = np.random.default_rng([recipe.seed, 0x52414E4B])
    return torch.from_numpy(allowed[rng.integers(len(allowed), size=(recipe.random_sequences, recipe.tokens_per_document))])


def noisy_batch(states: torch.Tensor, following: torch.Tensor, recipe: Recipe,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """States and their next states with Gaussian noise of one sigma per sample, at a log-uniform
    ratio to the state's RMS (clean for a fraction): (noisy, noisy next, sigma)."""
    rms = states.pow(2).mean(dim=-1).sqrt()
    lo, hi = (math.log(r) for r in recipe.noise_ratio_range)
    ratio = torch.exp(lo + (hi - lo) * torch.rand(len(states), generator=generator))
    ratio = torch.where(torch.rand(len(states), generator=generator) < recipe.clean_fraction, 0.0, ratio)
    sigma = ratio * rms
    noise = torch.randn((2, *states.shape), generator=generator) * sigma[:, None]
    return states + noise[0], following + noise[1], sigma


def split_rows(count: int, held_out: int) -> tuple[slice, slice]:
    return slice(0, count - held_out), slice(count - held_out, count)


def fit_ranker(oracle, *, texts: list[str], data: str, out: Path, recipe: Recipe = Recipe(),
               notify: Callable[[str], None] = print, model_name: str = "", command: str = "") -> Path:
    """Fit a ranker on `texts` and `recipe.random_sequences` random-id sequences, and write it to
    `out` (with a .json of its metadata beside it). Resumable: states and each finished epoch are
    checkpointed in a work folder next to `out`."""
    if oracle.tokenizer is None:
        raise AttackError("fitting a ranker needs the model's tokenizer (WhiteBox(..., tokenizer=...))")
    tokenizer = oracle.tokenizer
    started = time.perf_counter()
    torch.manual_seed(recipe.seed)
    generator = torch.Generator().manual_seed(recipe.seed)
    work = out.parent / f".{out.stem}.work"
    ids = document_ids(texts[:recipe.documents], tokenizer, tokens=recipe.tokens_per_document)
    if len(ids) <= recipe.held_out or (recipe.random_sequences and recipe.random_sequences <= recipe.held_out):
        raise AttackError(f"only {len(ids)} training documents of {recipe.tokens_per_document} tokens and "
                          f"{recipe.random_sequences} random sequences; each needs more than the {recipe.held_out} held out")
    states = document_states(oracle, ids, work=work)
    text_train, text_test = split_rows(len(ids), recipe.held_out)
    noise_ids = random_ids(oracle, recipe)
    noise_states = document_states(oracle, noise_ids, work=work / "random") if len(noise_ids) else states[:0]
    random_train, random_test = split_rows(len(noise_ids), recipe.held_out if len(noise_ids) else 0)
    x_train = torch.cat([states[text_train], noise_states[random_train]])  # (N, L, d)
    y_train = torch.cat([ids[text_train], noise_ids[random_train]])
    length = x_train.shape[1]
    dim = states.shape[-1]
    hidden = int(round(recipe.hidden_ratio * dim))
    net = RankerNet(dim, hidden)
    directions = F.normalize(oracle.embedding.float().cpu(), dim=-1)
    samples = x_train.shape[0] * length
    steps_per_epoch = math.ceil(samples / recipe.batch_size)
    optimiser = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=recipe.lr, total_steps=recipe.epochs * steps_per_epoch)
    first_epoch = _resume(work, net, optimiser, schedule, generator)
    for epoch in range(first_epoch, recipe.epochs):
        order = torch.randperm(samples, generator=generator)
        bar = tqdm(range(0, len(order), recipe.batch_size), desc=f"ranker: epoch {epoch + 1}/{recipe.epochs}",
                   unit="batch", leave=False)
        for start in bar:
            rows, position = order[start:start + recipe.batch_size].div(length, rounding_mode="floor"), \
                order[start:start + recipe.batch_size] % length
            has_next = (position < length - 1) & (torch.rand(len(rows), generator=generator) >= recipe.without_next)
            noisy, ahead, sigma = noisy_batch(x_train[rows, position], x_train[rows, (position + 1).clamp(max=length - 1)],
                                              recipe, generator)
            loss = F.cross_entropy(net(noisy, sigma, directions, ahead, has_next), y_train[rows, position])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        _checkpoint(work, epoch + 1, net, optimiser, schedule, generator)
    metrics = evaluate(net, directions, states[text_test], ids[text_test], oracle=oracle)
    if len(noise_ids):
        metrics["random_ids"] = evaluate(net, directions, noise_states[random_test], noise_ids[random_test],
                                         oracle=oracle, with_prior=False)
    metadata = {"format": FORMAT_VERSION, "model": model_name, "weights_sha256": oracle.fingerprint,
                "layer": oracle.layer_index, "dim": dim, "hidden": hidden, "recipe": asdict(recipe),
                "data": data + (f"; {recipe.random_sequences} sequences of {recipe.tokens_per_document} uniformly random "
                                "token ids (a seeded stream apart from every random prompt set's)" if len(noise_ids) else ""),
                "documents": {"train": len(ids) - recipe.held_out, "held_out": recipe.held_out,
                              "random_sequences": {"train": random_train.stop - random_train.start,
                                                   "held_out": random_test.stop - random_test.start},
                              "states": int(samples), "texts_sha256": _texts_hash(texts[:recipe.documents])},
                "held_out_accuracy": metrics, "command": command,
                "fit": {"seconds": round(time.perf_counter() - started), "threads": torch.get_num_threads(),
                        "machine": f"{oracle.device.type} ({platform.processor() or platform.machine()})",
                        "note": "this session's time (a resumed fit counts only the session that finished it)"}}
    tensors = {k: v.detach().half().contiguous() for k, v in net.state_dict().items()}
    write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata={"invbench": json.dumps(metadata)}))
    write_atomic(out.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(metadata, indent=2) + "\n"))
    for leftover in sorted(work.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        leftover.rmdir() if leftover.is_dir() else leftover.unlink()
    work.rmdir()
    notify(f"ranker written to {out} (held-out top-1 {metrics['clean']['top1']:.2f}, top-64 {metrics['clean']['top64']:.2f})")
    return out


@torch.no_grad()
def evaluate(net: RankerNet, directions: torch.Tensor, states: torch.Tensor, ids: torch.Tensor, *, oracle,
             chunk: int = 10, with_prior: bool = True) -> dict:
    """Held-out top-k rates, positions 2 and up (position 1 has the codebook): of the ranker with
    the next state (as attacks use it), clean and at noise ratios 0.1 and 1, at ratio 1 also
    without the next state, and (`with_prior`) of the prior alone and of both summed."""
    net.eval()
    noise_levels = (("clean", 0.0), ("noise_ratio_0.1", 0.1), ("noise_ratio_1", 1.0))
    variants = [label for label, _ in noise_levels] + ["noise_ratio_1_without_next"]
    if with_prior:
        variants = ["prior", *variants, *(f"{label}_with_prior" for label in variants)]
    hits = {v: {k: 0 for k in TOP_K} for v in variants}
    generator = torch.Generator().manual_seed(1)
    total = 0
    length = ids.shape[1]
    for start in range(0, len(ids), chunk):
        doc_ids, truth = ids[start:start + chunk], ids[start:start + chunk, 1:].flatten()
        x = states[start:start + chunk, 1:].flatten(0, 1)
        ahead = torch.cat([states[start:start + chunk, 2:], states[start:start + chunk, -1:]], dim=1).flatten(0, 1)
        has_next = (torch.arange(1, length) < length - 1).repeat(len(doc_ids))
        scores = {}
        for label, ratio in (*noise_levels, ("noise_ratio_1_without_next", 1.0)):
            sigma = ratio * x.pow(2).mean(dim=-1).sqrt()
            noise = torch.randn((2, *x.shape), generator=generator) * sigma[:, None]
            shown = has_next & (label != "noise_ratio_1_without_next")
            scores[label] = torch.log_softmax(net(x + noise[0], sigma, directions, ahead + noise[1], shown), dim=-1)
        if with_prior:
            prior = oracle.next_token_log_probs(doc_ids).cpu()[:, 1:].flatten(0, 1)
            scores = {"prior": prior, **scores, **{f"{label}_with_prior": s + prior for label, s in scores.items()}}
        for variant, score in scores.items():
            rank = (score > score.gather(1, truth[:, None])).sum(dim=1)
            for k in TOP_K:
                hits[variant][k] += int((rank < k).sum())
        total += len(truth)
    net.train()
    return {"positions": "2 and up", "states": total,
            **{v: {f"top{k}": hits[v][k] / total for k in TOP_K} for v in variants}}


def _texts_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode("utf-8")).digest())
    return digest.hexdigest()


def _checkpoint(work: Path, epoch: int, net, optimiser, schedule, generator: torch.Generator) -> None:
    state = {"epoch": epoch, "net": net.state_dict(), "optimiser": optimiser.state_dict(),
             "schedule": schedule.state_dict(), "generator": generator.get_state()}
    write_atomic(work / "checkpoint.pt", lambda tmp: torch.save(state, tmp))


def _resume(work: Path, net, optimiser, schedule, generator: torch.Generator) -> int:
    """The epoch to start from: after the last checkpointed one (0 when there is none)."""
    path = work / "checkpoint.pt"
    if not path.is_file():
        return 0
    try:
        state = torch.load(path, weights_only=True)
        net.load_state_dict(state["net"])
        optimiser.load_state_dict(state["optimiser"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        return int(state["epoch"])
    except Exception:  # noqa: BLE001 - a damaged checkpoint only costs the epochs it held
        path.unlink(missing_ok=True)
        return 0
