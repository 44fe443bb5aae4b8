"""Utility metrics, pinned to a 3-token vocabulary whose numbers can be worked out by hand."""
import math

import pytest
import torch

from invbench.utility import cosine_only, utility_metrics

LN2, LN3 = math.log(2), math.log(3)


def identity_head() -> torch.nn.Linear:
    """d = V = 3, logits = hidden state."""
    head = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))
    return head


# row 0: p = softmax(0, 0, ln2) = (1/4, 1/4, 1/2), q = softmax(ln2, 0, 0) = (1/2, 1/4, 1/4)
#        argmax 2 vs 0; KL(p||q) = 1/4 ln(1/2) + 1/2 ln 2 = ln2 / 4; cosine 0
# row 1: clean = defended = (ln3, 0, 0), p = q = (3/5, 1/5, 1/5); KL 0, agree, cosine 1
CLEAN = torch.tensor([[0.0, 0.0, LN2], [LN3, 0.0, 0.0]])
DEFENDED = torch.tensor([[LN2, 0.0, 0.0], [LN3, 0.0, 0.0]])
NEXT = torch.tensor([2, 0])


def test_hand_computed_values():
    m = utility_metrics(lm_head=identity_head(), clean=CLEAN, defended=DEFENDED, next_ids=NEXT)
    assert m["top1_agreement"] == pytest.approx(0.5)
    assert m["kl_clean_defended"] == pytest.approx(LN2 / 8)
    # NLL of token 2 at row 0: clean -ln(1/2), defended -ln(1/4); row 1 token 0: -ln(3/5) both
    assert m["nll_clean"] == pytest.approx((LN2 + math.log(5 / 3)) / 2)
    assert m["nll_defended"] == pytest.approx((2 * LN2 + math.log(5 / 3)) / 2)
    assert m["perplexity_ratio"] == pytest.approx(math.sqrt(2))
    assert m["cosine"] == pytest.approx(0.5)


def test_without_next_ids_nll_is_none():
    m = utility_metrics(lm_head=identity_head(), clean=CLEAN, defended=DEFENDED, next_ids=None)
    assert m["nll_clean"] is None and m["nll_defended"] is None and m["perplexity_ratio"] is None
    assert m["top1_agreement"] == pytest.approx(0.5)


def test_negative_next_ids_are_ignored():
    m = utility_metrics(lm_head=identity_head(), clean=CLEAN, defended=DEFENDED, next_ids=torch.tensor([2, -100]))
    assert m["nll_clean"] == pytest.approx(LN2)
    assert m["perplexity_ratio"] == pytest.approx(2.0)


def test_identical_states_cost_nothing():
    h = torch.randn(7, 3)
    m = utility_metrics(lm_head=identity_head(), clean=h, defended=h.clone(), next_ids=torch.zeros(7, dtype=torch.long))
    assert m["top1_agreement"] == 1.0 and m["kl_clean_defended"] == pytest.approx(0.0, abs=1e-7)
    assert m["perplexity_ratio"] == pytest.approx(1.0) and m["cosine"] == pytest.approx(1.0)


def test_chunking_and_plain_callable_agree():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    clean = torch.randn(2, 37, 16)  # leading shape is flattened to 74 positions
    defended = clean + 0.5 * torch.randn_like(clean)
    ids = torch.randint(0, 50, (2, 37))
    whole = utility_metrics(lm_head=head, clean=clean, defended=defended, next_ids=ids)
    chunked = utility_metrics(lm_head=lambda x: head(x), clean=clean, defended=defended, next_ids=ids, chunk_size=5)
    assert whole.keys() == chunked.keys()
    for key in whole:
        assert chunked[key] == pytest.approx(whole[key], rel=1e-5)
    # against a direct computation over all positions at once
    logp = torch.log_softmax(head(clean.reshape(-1, 16)), -1)
    logq = torch.log_softmax(head(defended.reshape(-1, 16)), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    assert whole["kl_clean_defended"] == pytest.approx(kl, rel=1e-5)


def test_cosine_only():
    assert cosine_only(clean=CLEAN, defended=DEFENDED) == {"cosine": pytest.approx(0.5)}
    assert cosine_only(clean=torch.zeros(2, 3), defended=torch.ones(2, 3))["cosine"] == 0.0


def test_shape_mismatch_and_keyword_only():
    with pytest.raises(ValueError, match="shape"):
        utility_metrics(lm_head=identity_head(), clean=CLEAN, defended=DEFENDED[:1])
    with pytest.raises(TypeError):
        cosine_only(CLEAN, DEFENDED)


def test_cosine_of_identical_vectors_is_exactly_one():
    """Rounding once gave 1.0000000000000002, which the leaderboard schema rightly rejects."""
    clean = torch.randn(12, 128, generator=torch.Generator().manual_seed(28)) * 11  # unclamped mean: 1 + 2e-16
    assert cosine_only(clean=clean, defended=clean.clone())["cosine"] == 1.0


def test_a_destroyed_model_has_an_infinite_perplexity_ratio_not_an_overflow():
    """Defended logits 1e4 away from the next token: its NLL gap is far beyond exp's float range."""
    defended = torch.tensor([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0]])
    m = utility_metrics(lm_head=identity_head(), clean=CLEAN, defended=defended, next_ids=NEXT)
    assert m["nll_defended"] > 1000 and m["perplexity_ratio"] == math.inf
