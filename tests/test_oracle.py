import pytest
import torch

from invbench.leaks.models import load_model, offline_gpt2_tokenizer
from invbench.leaks.oracle import WhiteBox


def test_offline_tokenizer_matches_gpt2():
    ids = offline_gpt2_tokenizer()("Hello world! The capital of France is")["input_ids"]
    assert ids == [15496, 995, 0, 383, 3139, 286, 4881, 318]


def test_capture_is_the_models_last_hidden_state(tiny, oracle, prompt_ids):
    expected = tiny.model(prompt_ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(oracle.capture(prompt_ids), expected)


def test_kv_cached_candidate_reproduces_captured_target(oracle, prompt_ids):
    targets = oracle.capture(prompt_ids)
    for t in range(prompt_ids.shape[1]):
        hidden = oracle.hidden_of_tokens(oracle.prefix(prompt_ids[:, :t]), prompt_ids[:, t:t + 1])[:, 0]
        assert (hidden - targets[:, t]).abs().max() < 1e-5


def test_hidden_is_differentiable_in_the_candidate(oracle, prompt_ids):
    embeds = oracle.embedding[prompt_ids[:, 2:3]].clone().requires_grad_(True)
    oracle.hidden(oracle.prefix(prompt_ids[:, :2]), embeds).pow(2).sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_random_models_are_rebuilt_identically_from_the_seed():
    a, b, c = (load_model("tiny-gpt2", seed=s).model for s in (3, 3, 4))
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    # trained-like embedding scale: ~0.13 per coordinate, not transformers' 0.02
    assert a.transformer.wte.weight.std().item() == pytest.approx(0.13, rel=0.05)


def test_layer_out_of_range_is_refused(tiny):
    with pytest.raises(ValueError, match="layer 7 out of range"):
        WhiteBox(tiny.model, layer=7)
