"""Leak points before the last layer: the client's truncated forward and the server's view.

Layer 0 is the input of the first block, layer k (1..L-1) the output of block k, layer L (or -1) the
last layer after the final norm. tiny-gpt2 has L = 2; a seeded 3-block Llama stands for SmolLM2's
architecture (RoPE, RMSNorm: its layer-0 states are the token embeddings themselves).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from invbench.leaks.oracle import WhiteBox
from invbench.leaks.prompts import Prompt
from invbench.runner import Leak, defense_utility

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                            num_attention_heads=4, num_key_value_heads=2)).eval()


def models(tiny, llama):
    return [(tiny.model, torch.tensor([[464, 3139, 286, 4881, 318], [15496, 995, 0, 383, 3139]])),
            (llama, torch.tensor([[5, 17, 250, 3, 99], [42, 42, 7, 180, 2]]))]


def test_capture_at_every_layer_is_that_layers_hidden_state_and_cached_candidates_reproduce_it(tiny, llama):
    for model, ids in models(tiny, llama):
        full = model(ids, output_hidden_states=True).hidden_states
        for layer in range(-1, model.config.num_hidden_layers + 1):
            oracle = WhiteBox(model, layer=layer)
            targets = oracle.capture(ids)
            assert torch.equal(targets, full[layer]), (type(model).__name__, layer)
            for t in range(ids.shape[1]):
                hidden = oracle.hidden_of_tokens(oracle.prefix(ids[:, :t]), ids[:, t:t + 1])[:, 0]
                assert (hidden - targets[:, t]).abs().max() < 1e-5


def test_layer_0_of_a_llama_is_the_token_embedding_and_of_gpt2_adds_the_position(tiny, llama):
    ids = torch.tensor([[5, 17, 250, 3]])
    assert torch.equal(WhiteBox(llama, layer=0).capture(ids)[0], llama.get_input_embeddings().weight[ids[0]])
    gpt2 = tiny.model.transformer
    expected = gpt2.wte.weight[ids[0]] + gpt2.wpe.weight[:4]
    assert torch.allclose(WhiteBox(tiny.model, layer=0).capture(ids)[0], expected)


def test_the_client_runs_blocks_1_to_k_only(tiny):
    """A candidate at leak point k costs k blocks: no block after k runs, nor the final norm."""
    calls = []
    blocks = tiny.model.transformer.h
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    handles.append(tiny.model.transformer.ln_f.register_forward_hook(lambda m, a, o: calls.append("norm")))
    try:
        ids = torch.tensor([[464, 3139, 286]])
        for layer, expected in ((0, []), (1, [0]), (2, [0, 1, "norm"])):
            oracle = WhiteBox(tiny.model, layer=layer)
            prefix = oracle.prefix(ids[:, :2])  # the prefix runs the whole model: the prior needs it
            calls.clear()
            oracle.hidden_of_tokens(prefix, ids[:, 2:3])
            oracle.capture(ids)
            assert calls == expected * 2, layer
            assert len(prefix.keys) == (layer if layer < 2 else 2)  # the cache holds the client's blocks
    finally:
        for handle in handles:
            handle.remove()


def test_gradients_flow_through_the_truncated_forward(tiny):
    for layer in (0, 1):
        oracle = WhiteBox(tiny.model, layer=layer)
        prefix = oracle.prefix(torch.tensor([[464, 3139]]))
        embeds = oracle.embedding[torch.tensor([[286]])].clone().requires_grad_(True)
        oracle.hidden(prefix, embeds[:, None, 0]).pow(2).sum().backward()
        assert embeds.grad is not None and embeds.grad.abs().sum() > 0


# --- the server's view -------------------------------------------------------------------------
def gpt2_rest_by_hand(model, states: torch.Tensor, layer: int) -> torch.Tensor:
    """Logits (B, T, V) of GPT-2 blocks layer+1..L, ln_f and the LM head on `states`, written out:
    layer norm, causal multi-head attention, MLP, residuals."""
    body, h = model.transformer, states
    heads = model.config.n_head
    for block in body.h[layer:]:
        x = block.ln_1(h)
        q, k, v = block.attn.c_attn(x).split(h.shape[-1], dim=2)
        split = lambda t: t.reshape(*t.shape[:2], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        length = h.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        attention = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
        y = (attention @ v).transpose(1, 2).reshape(h.shape)
        h = h + block.attn.c_proj(y)
        h = h + block.mlp(block.ln_2(h))
    return model.lm_head(body.ln_f(h))


def leak_of(ids: torch.Tensor, clean: torch.Tensor, defended: torch.Tensor) -> Leak:
    prompts = [Prompt(i, "", tuple(row)) for i, row in enumerate(ids.tolist())]
    return Leak(prompts, clean, defended)


@pytest.mark.parametrize("layer", [0, 1])
def test_utility_at_a_leak_point_is_what_the_server_makes_of_the_defended_states(tiny, layer):
    ids = torch.tensor([[464, 3139, 286, 4881, 318, 6342], [15496, 995, 0, 383, 3139, 286]])
    oracle = WhiteBox(tiny.model, layer=layer)
    clean = oracle.capture(ids)
    untouched = defense_utility(tiny, leak_of(ids, clean, clean.clone()), layer=layer)
    assert untouched["top1_agreement"] == 1.0 and untouched["kl_clean_defended"] == 0.0
    assert untouched["perplexity_ratio"] == 1.0 and untouched["cosine"] == pytest.approx(1.0)
    assert "server's view" in untouched["note"]

    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    defended = clean + 0.3 * noise
    measured = defense_utility(tiny, leak_of(ids, clean, defended), layer=layer)
    with torch.no_grad():
        p = F.log_softmax(gpt2_rest_by_hand(tiny.model, clean, layer), dim=-1)
        q = F.log_softmax(gpt2_rest_by_hand(tiny.model, defended, layer), dim=-1)
    agreement = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    targets = ids[:, 1:]
    nll_clean = -p[:, :-1].gather(-1, targets[..., None]).mean().item()
    nll_defended = -q[:, :-1].gather(-1, targets[..., None]).mean().item()
    cosine = F.cosine_similarity(defended, clean, dim=-1).mean().item()
    assert 0 < agreement < 1  # the noise changes some predictions and not others
    assert measured["top1_agreement"] == pytest.approx(agreement)
    assert measured["kl_clean_defended"] == pytest.approx(kl, rel=1e-4)
    assert measured["perplexity_ratio"] == pytest.approx(math.exp(nll_defended - nll_clean), rel=1e-4)
    assert measured["cosine"] == pytest.approx(cosine, rel=1e-5)  # of the leaked vectors, not the final ones


def test_last_layer_utility_is_unchanged(tiny):
    """At the last layer the LM head reads the leaked states themselves (no note, as before)."""
    ids = torch.tensor([[464, 3139, 286, 4881]])
    clean = WhiteBox(tiny.model).capture(ids)
    defended = clean + 0.5
    out = defense_utility(tiny, leak_of(ids, clean, defended), layer=-1)
    head = tiny.model.lm_head
    p, q = F.log_softmax(head(clean), -1), F.log_softmax(head(defended), -1)
    assert "note" not in out
    assert out["kl_clean_defended"] == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-5)


# --- attacks at a leak point before the last layer ---------------------------------------------
from invbench.attacks import make_attack  # noqa: E402
from invbench.defenses import make_defense  # noqa: E402
from invbench.leaks.oracle import PrefixTree  # noqa: E402


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("INVBENCH_CACHE", str(tmp_path / "cache"))


def sub_vocabulary(tiny, prompt_ids, layer):
    """tiny-gpt2 at `layer` over a 2,000-token sub-vocabulary holding the prompts' tokens (as conftest's `small`)."""
    full = tiny.model.get_input_embeddings().weight.detach()
    extra = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(0))[:2000]
    keep = torch.unique(torch.cat([prompt_ids.flatten(), extra]))
    oracle = WhiteBox(tiny.model, layer=layer, tokenizer=tiny.tokenizer, name="tiny-gpt2-sub").restrict_vocabulary(keep)
    return oracle, torch.searchsorted(keep, prompt_ids)


def attack(name, oracle, targets, defense, **overrides):
    return make_attack(name, preset="fast", overrides=overrides).run(
        oracle, targets, defense=defense, prompt_indices=list(range(len(targets))), seed=0, notify=lambda line: None)


def noisy(oracle, ids, sigma, seed=1):
    defense = make_defense("gaussian", {"sigma": sigma}) if sigma else make_defense("none", {})
    return defense, defense.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(seed))


def test_a_prefix_tree_holds_the_same_caches_as_whole_prefixes(tiny):
    seqs = torch.tensor([[1, 2, 3], [1, 2, 5], [7, 8, 9]])
    for layer in (0, 1, -1):
        oracle = WhiteBox(tiny.model, layer=layer)
        tree = PrefixTree(oracle, chunk=2)
        nodes = tree.append(None, torch.tensor([1, 7]))
        nodes = tree.append(tree.prune(torch.tensor([0, 1])), torch.tensor([2, 8]))
        nodes = tree.append(tree.prune(torch.tensor([0, 0, 1])), torch.tensor([3, 5, 9]))
        built, whole = tree.prefix(nodes), oracle.prefix(seqs)
        assert len(built.keys) == len(whole.keys) == (layer if layer >= 0 else 2)
        for a, b in zip(built.keys + built.values, whole.keys + whole.values):
            assert (a - b).abs().max() < 1e-5
        assert (built.last_state - whole.last_state).abs().max() < 1e-5
        kept = tree.prune(torch.tensor([2]))  # one path left: the others' nodes are dropped
        assert [len(level) for level in tree.last] == [1, 1, 1]
        assert (tree.prefix(kept).last_state - whole.last_state[2:]).abs().max() < 1e-5


def test_nearest_is_the_per_token_nearest_state_and_exact_on_clean_embeddings(tiny, prompt_ids, cache):
    oracle, ids = sub_vocabulary(tiny, prompt_ids, 0)
    clean = attack("nearest", oracle, oracle.capture(ids), make_defense("none", {}))
    assert torch.equal(clean.tokens, ids)
    defense, targets = noisy(oracle, ids, 0.4)
    out = attack("nearest", oracle, targets, defense)
    wte, wpe = tiny.model.transformer.wte.weight[oracle.vocabulary], tiny.model.transformer.wpe.weight
    by_hand = torch.stack([torch.cdist(targets[:, t], wte + wpe[t]).argmin(dim=1) for t in range(ids.shape[1])], dim=1)
    assert torch.equal(out.tokens, by_hand)
    assert 0 < (out.tokens == ids).float().mean() < 1  # the noise costs it some tokens


def test_at_layer_0_ml_sequence_is_the_per_token_decoder_and_map_uses_the_prior(tiny, prompt_ids, cache):
    """Context-free states: the most likely sequence is the most likely token at each position, so
    sequence (ml) answers what nearest answers; its candidates are look-ups (the table), not forwards."""
    oracle, ids = sub_vocabulary(tiny, prompt_ids, 0)
    defense, targets = noisy(oracle, ids, 0.4)
    nearest = attack("nearest", oracle, targets, defense)
    ml = attack("sequence", oracle, targets, defense, scoring="ml")
    assert torch.equal(ml.tokens, nearest.tokens)
    sequence = make_attack("sequence", preset="fast")
    answer = attack("sequence", oracle, targets, defense)
    objective = lambda tokens: sequence.objective(oracle, targets, tokens, defense=defense).sum(1)  # noqa: E731
    assert (objective(answer.tokens) <= objective(nearest.tokens) + 1e-3).all()  # the MAP answer is at least as probable


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("name", ["guided", "sequence", "continuous", "projection"])
def test_clean_states_at_every_leak_point_are_recovered_exactly(tiny, prompt_ids, cache, layer, name):
    oracle, ids = sub_vocabulary(tiny, prompt_ids, layer)
    overrides = {"ranker": "prior"} if name in ("guided", "sequence") and layer else {}
    out = attack(name, oracle, oracle.capture(ids), make_defense("none", {}), **overrides)
    assert torch.equal(out.tokens, ids), (name, layer)


def test_sequence_before_the_last_layer_decodes_as_with_whole_prefixes(tiny, prompt_ids, cache, monkeypatch):
    """Layer 1: the hypotheses' caches live in a prefix tree (one token's forward per extension); the
    search decides exactly as it does recomputing every prefix, and light noise leaves the truth."""
    import invbench.attacks.sequence as module

    oracle, ids = sub_vocabulary(tiny, prompt_ids, 1)
    defense, targets = noisy(oracle, ids, 0.1)
    assert torch.equal(attack("sequence", oracle, targets, defense, ranker="prior").tokens, ids)
    defense, targets = noisy(oracle, ids, 0.3)  # heavy: hundreds of hypotheses
    tree = attack("sequence", oracle, targets, defense, ranker="prior")
    monkeypatch.setattr(module, "PrefixTree", lambda *args, **kwargs: None)
    whole = attack("sequence", oracle, targets, defense, ranker="prior")
    assert (tree.extras["hypotheses"] > 100).any()
    assert torch.equal(tree.tokens, whole.tokens) and torch.equal(tree.extras["candidates"], whole.extras["candidates"])


# --- protocols and rankers at the board leak points --------------------------------------------
def test_the_leak_point_protocols_follow_the_last_layer_board_and_say_where_they_leak(capsys):
    from helpers import invoke
    from invbench.protocols import PROTOCOLS, SPLIT_LAYER, defining

    last, layer0, split = (PROTOCOLS[name] for name in ("c4-smollm2-10tok", "c4-smollm2-10tok-layer0",
                                                         f"c4-smollm2-10tok-split{SPLIT_LAYER}"))
    assert (layer0.layer, split.layer, last.layer) == (0, 1, -1)
    assert layer0.attacks == (*last.attacks, "nearest") and split.attacks == last.attacks
    for protocol in (layer0, split):
        same = {k: v for k, v in defining(protocol.to_dict()).items() if k not in ("name", "layer", "attacks")}
        assert same == {k: v for k, v in defining(last.to_dict()).items() if k not in ("name", "layer", "attacks")}
    code, out, _ = invoke(["protocols"], capsys)
    assert code == 0 and "leak point: layer 0, the input embeddings" in out and "VFLAIR-LLM's default split" in out
    assert out.count("leak point: the last layer") == 4


def test_rankers_ship_for_the_board_leak_points():
    """Every board leak point of SmolLM2 runs without fitting a ranker: the last layer and the split have
    shipped ones (fitted on the disjoint documents, split recorded); layer 0 ranks by the exact likelihood."""
    import json

    from invbench.attacks.ranker import shipped_path
    from invbench.protocols import SPLIT_LAYER

    for layer in (30, SPLIT_LAYER):
        path = shipped_path("smollm2-135m", layer)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert path.is_file() and meta["layer"] == layer and meta["documents"]["held_out"] == 100
        assert "c4_ranker_train.jsonl" in meta["data"] and meta["held_out_accuracy"]["clean"]["top1"] > 0.7


def test_a_first_fit_says_how_long_it_will_take_and_how_to_skip_it(tiny, cache, monkeypatch):
    import invbench.attacks.ranker as ranker

    notes = []
    monkeypatch.setattr(ranker, "fit_ranker", lambda *args, **kwargs: (_ for _ in ()).throw(KeyboardInterrupt()))
    monkeypatch.setattr(ranker, "estimate_fit_seconds", lambda oracle, recipe: 600.0)
    with pytest.raises(KeyboardInterrupt):
        ranker.load_ranker(WhiteBox.of(tiny, layer=1), notify=notes.append)
    assert "takes about 10 minutes" in notes[-1] and "--ranker prior" in notes[-1]


def test_the_fit_estimate_is_measured_here(tiny):
    assert 0 < estimate_fit_seconds(WhiteBox.of(tiny, layer=1), ranker_recipe(epochs=1), steps=1) < float("inf")


def ranker_recipe(**changes):
    from invbench.attacks.ranker import Recipe

    return Recipe(documents=40, held_out=8, tokens_per_document=16, random_sequences=20, **changes)


from invbench.attacks.ranker import estimate_fit_seconds  # noqa: E402
