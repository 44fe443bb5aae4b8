"""The Fisher diagonal at a leak point (invbench.fisher), for aniso-gaussian, on the seeded tiny GPT-2."""
from __future__ import annotations

import torch

from invbench.fisher import fisher_diagonal
from invbench.leaks.oracle import WhiteBox


def exact_last_layer_fisher(oracle, ids: torch.Tensor) -> torch.Tensor:
    """At the last layer the server is the LM head alone: per position the Fisher of log softmax(W h) in h is
    W^T (diag(p) - p p^T) W, whose diagonal is sum_v p_v W_vi^2 - (sum_v p_v W_vi)^2."""
    states = oracle.capture(ids).reshape(-1, oracle.embedding.shape[1])
    weight = oracle.head.weight.double()
    probs = torch.softmax(oracle.head(states).double(), dim=-1)
    return (probs @ weight.pow(2) - (probs @ weight).pow(2)).mean(dim=0).float()


def test_the_estimate_matches_the_exact_fisher_at_the_last_layer(tiny, prompt_ids):
    oracle = WhiteBox(tiny.model)
    ids = prompt_ids.repeat(20, 1)  # 60 prompts of 4 tokens, 64 draws each: 15,360 drawn next tokens
    estimate = fisher_diagonal(oracle, ids, seed=0, draws=64, notify=lambda line: None)
    exact = exact_last_layer_fisher(oracle, ids)
    assert estimate.shape == exact.shape and (estimate >= 0).all()
    assert abs(estimate.sum() / exact.sum() - 1) < 0.15  # the trace, within Monte Carlo error
    assert torch.corrcoef(torch.stack([estimate, exact]))[0, 1] > 0.7  # 0.81-0.86 over seeds 0-3
    assert torch.equal(estimate, fisher_diagonal(oracle, ids, seed=0, draws=64, notify=lambda line: None))  # seeded


def test_before_the_last_layer_the_rest_of_the_model_is_differentiated(tiny, prompt_ids):
    """At layer 1 of 2 the noise must also pass block 2: the diagonal differs from the head alone's."""
    layer1 = fisher_diagonal(WhiteBox(tiny.model, layer=1), prompt_ids, seed=0, notify=lambda line: None)
    assert torch.isfinite(layer1).all() and (layer1 > 0).any()
    assert not torch.allclose(layer1, exact_last_layer_fisher(WhiteBox(tiny.model), prompt_ids), rtol=0.5)
