"""scan (exhaustive nearest-hidden-state decoding) on the seeded tiny GPT-2.

One test scans the full GPT-2 vocabulary; the others use the 2,000-token sub-vocabulary of
conftest.py's `small` (the same model with a smaller vocabulary, always including the prompts'
tokens), which keeps each scan under a second on CPU.
"""
import pytest
import torch

from invbench.attacks import AttackError, available_attacks, make_attack
from invbench.attacks.base import mse
from invbench.attacks.scan import ScanAttack, ScanConfig, vocabulary_distances
from invbench.defenses import make_defense

NONE = make_defense("none", {})
pytestmark = pytest.mark.usefixtures("one_thread")


def committed_loss(oracle, tokens, targets, defense):
    return mse(defense.simulate(oracle.capture(tokens)), targets)


# --- pieces -------------------------------------------------------------------------------
def test_registered_presets_and_options():
    assert "scan" in available_attacks()
    assert ScanAttack.option_names == {"beam", "chunk_size", "recheck", "precision"}
    for preset in (None, "fast", "baseline", "high-acc"):  # all presets are the same attack
        assert make_attack("scan", preset=preset).config == ScanConfig()
    assert make_attack("scan", overrides={"beam": 4, "chunk_size": 64}).config.beam == 4
    for bad in ({"beam": 0}, {"chunk_size": 0}, {"beam": 8, "recheck": 4}, {"precision": "fp8"}, {"steps": 1}):
        with pytest.raises(AttackError):
            make_attack("scan", overrides=bad)
    with pytest.raises(AttackError):
        make_attack("scan", preset="turbo")
    assert ScanConfig().low_precision(torch.device("cpu")) is None
    assert ScanConfig().low_precision(torch.device("cuda")) is torch.bfloat16
    assert ScanConfig(precision="bfloat16").low_precision(torch.device("cpu")) is torch.bfloat16


# --- the attack ---------------------------------------------------------------------------
def test_recovers_every_prompt_exactly_full_vocabulary(oracle, prompt_ids):
    targets = oracle.capture(prompt_ids[:2])
    out = make_attack("scan").run(oracle, targets, defense=NONE, prompt_indices=[0, 1], seed=0)
    assert torch.equal(out.tokens, prompt_ids[:2])
    assert out.discrete_loss.max() < 1e-9
    assert (out.extras["margin"] > 1e-3).all()  # the runner-up is far: clean states decide clearly
    assert out.seconds.shape == (2, 4) and (out.seconds > 0).all()


def test_chunked_and_unchunked_agree(small):
    oracle, ids = small
    targets = oracle.capture(ids)
    chunked = ScanAttack(ScanConfig(chunk_size=100)).run(oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=0)
    whole = ScanAttack(ScanConfig(chunk_size=3 * oracle.vocab_size)).run(
        oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=0)
    assert torch.equal(chunked.tokens, ids) and torch.equal(whole.tokens, ids)
    assert torch.allclose(chunked.discrete_loss, whole.discrete_loss, atol=1e-10)
    assert torch.allclose(chunked.extras["margin"], whole.extras["margin"], rtol=1e-4)


def test_quantised_targets_recovered_through_simulate(small):
    oracle, ids = small
    quantize = make_defense("quantize", {"bits": 8})
    targets = quantize.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(0))
    out = make_attack("scan").run(oracle, targets, defense=quantize, prompt_indices=[0, 1, 2], seed=0)
    assert torch.equal(out.tokens, ids)
    # simulate lands the true token on the target's grid; unquantised it would be ~step^2 / 12 away
    assert out.discrete_loss.max() < 1e-10
    assert mse(oracle.capture(ids), targets).min() > 1e-7


def test_heavy_noise_records_margin(small):
    oracle, ids = small
    noisy = make_defense("gaussian", {"sigma": 1.0})
    targets = noisy.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(0))
    out = make_attack("scan").run(oracle, targets, defense=noisy, prompt_indices=[0, 1, 2], seed=0)
    margin = out.extras["margin"]
    assert margin.shape == ids.shape and torch.isfinite(margin).all() and (margin >= 0).all()
    assert torch.isfinite(out.discrete_loss).all() and (out.discrete_loss > 0.5).all()  # noise floor sigma^2 = 1
    assert torch.allclose(out.discrete_loss, committed_loss(oracle, out.tokens, targets, noisy), rtol=1e-5)


def test_beam_search_recovers_exactly(small):
    oracle, ids = small
    targets = oracle.capture(ids[:2])
    out = ScanAttack(ScanConfig(beam=3)).run(oracle, targets, defense=NONE, prompt_indices=[0, 1], seed=0)
    assert torch.equal(out.tokens, ids[:2])
    assert out.discrete_loss.max() < 1e-9
    assert torch.allclose(out.discrete_loss, committed_loss(oracle, out.tokens, targets, NONE), atol=1e-10)


def test_bf16_scan_with_float32_recheck(small):
    """Forced bf16 autocast on CPU: the low-precision scan is coarse (the true token sits ~1e-6
    from its target), the float32 re-check of the shortlist decides and reports float32 losses."""
    oracle, ids = small
    targets = oracle.capture(ids[:2])
    prefix = oracle.prefix(ids[:2, :1])
    coarse = vocabulary_distances(oracle, prefix, targets[:, 1], NONE, chunk_size=4096, autocast=torch.bfloat16)
    assert (coarse.gather(1, ids[:2, 1:2]) > 1e-9).all()  # autocast really ran in bf16
    out = ScanAttack(ScanConfig(precision="bfloat16", recheck=16)).run(
        oracle, targets, defense=NONE, prompt_indices=[0, 1], seed=0)
    assert torch.equal(out.tokens, ids[:2])
    assert out.discrete_loss.max() < 1e-9
