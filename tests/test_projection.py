"""projection (SIPIT's per-step projection loop) on the seeded tiny GPT-2, full GPT-2 vocabulary."""
import pytest
import torch

from invbench.attacks import AttackError, available_attacks, make_attack
from invbench.attacks.base import mse
from invbench.attacks.projection import ProjectionAttack, ProjectionConfig, nearest_unbanned, reset_period, step_lr
from invbench.defenses import make_defense

NONE = make_defense("none", {})
pytestmark = pytest.mark.usefixtures("one_thread")



def committed_loss(oracle, tokens, targets, defense):
    """MSE of each committed token's simulated hidden state (after the committed prefix) vs the target."""
    return mse(defense.simulate(oracle.capture(tokens)), targets)


# --- pieces -------------------------------------------------------------------------------
def test_registered_presets_and_options():
    assert "projection" in available_attacks()
    assert ProjectionAttack.option_names == {"max_steps", "noisy_max_steps"}
    for preset in (None, "fast", "baseline", "high-acc"):  # all presets are the same attack
        assert make_attack("projection", preset=preset).config == ProjectionConfig()
    assert (ProjectionConfig().max_steps, ProjectionConfig().noisy_max_steps) == (5000, 200)
    assert make_attack("projection", overrides={"max_steps": 7}).config.max_steps == 7
    with pytest.raises(AttackError):
        make_attack("projection", preset="turbo")
    with pytest.raises(AttackError):
        make_attack("projection", overrides={"steps": 3})
    with pytest.raises(AttackError):
        make_attack("projection", overrides={"noisy_max_steps": 0})


def test_reset_period_and_lr_schedule():
    assert reset_period(50257, 0, base=50) == 150 and reset_period(50257, 1, base=50) == 50
    assert reset_period(20000, 0, base=50) == 50
    assert step_lr(0, period=150, lr=1.0, lr_min=0.01) == 1.0
    assert step_lr(75, period=150, lr=1.0, lr_min=0.01) == pytest.approx(0.505)
    assert step_lr(150, period=150, lr=1.0, lr_min=0.01) == pytest.approx(0.01)
    assert step_lr(400, period=150, lr=1.0, lr_min=0.01) == pytest.approx(0.01)


def test_nearest_unbanned_skips_banned_tokens():
    embedding = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    proxy = torch.tensor([[0.9, 0.0], [0.9, 0.0]])
    banned = torch.tensor([[False, False, False], [False, True, False]])
    ids = nearest_unbanned(proxy, embedding, embedding.pow(2).sum(-1), banned)
    assert ids.tolist() == [1, 0]


# --- the attack ---------------------------------------------------------------------------
def test_recovers_every_prompt_exactly(oracle, prompt_ids):
    targets = oracle.capture(prompt_ids)
    out = make_attack("projection").run(oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=0)
    assert torch.equal(out.tokens, prompt_ids)
    assert out.extras["exhausted"].sum() == 0
    assert (out.extras["steps"] >= 1).all()
    assert out.discrete_loss.max() < 1e-9
    assert torch.allclose(out.discrete_loss, committed_loss(oracle, out.tokens, targets, NONE), atol=1e-10)
    assert out.seconds.shape == prompt_ids.shape and (out.seconds > 0).all()


@pytest.mark.parametrize("lr", [1.0, 0.1])  # lr 0.1: prompts finish after different step counts
def test_batched_equals_one_prompt_at_a_time(oracle, prompt_ids, lr):
    attack = ProjectionAttack(ProjectionConfig(lr=lr))
    targets = oracle.capture(prompt_ids)
    batched = attack.run(oracle, targets, defense=NONE, prompt_indices=[10, 11, 12], seed=3)
    if lr == 0.1:
        assert len(batched.extras["steps"].unique()) > 1  # rows really leave the batch at different steps
    for row, index in enumerate([10, 11, 12]):
        alone = attack.run(oracle, targets[row:row + 1], defense=NONE, prompt_indices=[index], seed=3)
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        assert torch.equal(alone.extras["steps"][0], batched.extras["steps"][row])


def test_budget_runs_out_commits_best_verified(oracle, prompt_ids):
    targets = oracle.capture(prompt_ids)
    out = ProjectionAttack(ProjectionConfig(max_steps=1, lr=0.1)).run(
        oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=0)
    exhausted = out.extras["exhausted"].bool()
    assert exhausted.any() and (out.extras["steps"] == 1).all()
    assert torch.allclose(out.discrete_loss, committed_loss(oracle, out.tokens, targets, NONE), atol=1e-10)
    assert (out.discrete_loss[exhausted] > 1e-3).all()  # one random candidate checked: a wrong token


def test_quantised_targets_recovered_exactly(oracle, prompt_ids):
    quantize = make_defense("quantize", {"bits": 8})
    targets = quantize.apply(oracle.capture(prompt_ids), generator=torch.Generator().manual_seed(0))
    out = make_attack("projection").run(oracle, targets, defense=quantize, prompt_indices=[0, 1, 2], seed=0)
    assert torch.equal(out.tokens, prompt_ids)
    assert out.extras["exhausted"].sum() == 0


def test_heavy_noise_exhausts_the_noisy_budget(oracle, prompt_ids):
    noisy = make_defense("gaussian", {"sigma": 1.0})
    targets = noisy.apply(oracle.capture(prompt_ids[:2]), generator=torch.Generator().manual_seed(0))
    attack = make_attack("projection", overrides={"noisy_max_steps": 60})  # default 200: same path, 3x the time
    out = attack.run(oracle, targets, defense=noisy, prompt_indices=[0, 1], seed=0)
    assert (out.extras["steps"] == 60).all()  # max_steps (5000) does not apply under noise
    assert (out.extras["exhausted"] == 1).all()
    assert torch.isfinite(out.discrete_loss).all() and (out.discrete_loss > 0.5).all()  # noise floor sigma^2 = 1
    assert torch.allclose(out.discrete_loss, committed_loss(oracle, out.tokens, targets, noisy), rtol=1e-5)


def test_under_noise_a_prompts_answer_is_the_same_alone_and_among_twenty(oracle, tiny):
    """verify reruns a subset of an entry's prompts: under noise the search never accepts and its path
    amplifies float rounding, so a prompt must see the same arithmetic alone as among others (before: the
    batch's row count changed the model's rounding, and 6 of 11 C4 prompts got other answers in a rerun)."""
    ids = torch.randint(0, oracle.vocab_size, (20, 3), generator=torch.Generator().manual_seed(4))
    noisy = make_defense("gaussian", {"sigma": 0.5})
    targets = noisy.apply(oracle.capture(ids), generator=torch.Generator().manual_seed(0))
    attack = make_attack("projection", overrides={"noisy_max_steps": 25})
    attack.fixed_rows = 32
    together = attack.run(oracle, targets, defense=noisy, prompt_indices=list(range(20)), seed=1)
    for row in (0, 7, 19):
        alone = attack.run(oracle, targets[row:row + 1], defense=noisy, prompt_indices=[row], seed=1)
        assert torch.equal(alone.tokens[0], together.tokens[row]), row


def test_blocks_of_fixed_rows_cover_every_prompt_once_and_report_each_position_once(oracle, prompt_ids):
    """40 prompts: two blocks of 32 (the second padded); answers as the prompts' own, progress once per position."""
    targets = oracle.capture(prompt_ids)
    rows = [i % 3 for i in range(40)]
    calls, attack = [], make_attack("projection")
    attack.fixed_rows = 32
    out = attack.run(oracle, targets[rows], defense=NONE, prompt_indices=rows, seed=0,
                     progress=lambda done, total: calls.append((done, total)))
    assert torch.equal(out.tokens, prompt_ids[rows])
    assert calls == [(t + 1, 4) for t in range(4)]
    assert out.seconds.shape == (40, 4) and (out.seconds > 0).all()


def test_every_forward_pass_holds_the_same_number_of_rows(oracle, tiny, prompt_ids):
    """The mechanism behind the test above, visible on any CPU: the model sees 32 rows in every forward
    pass, for 1 prompt or 3, also after some prompts are accepted (before: 3, then fewer as rows left)."""
    seen, targets = [], oracle.capture(prompt_ids)
    block = tiny.model.transformer.h[0]
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        attack = ProjectionAttack(ProjectionConfig(lr=0.1))  # prompts finish after different step counts
        attack.fixed_rows = 32  # as a protocol's run sets it (PROTOCOL_ROWS)
        out = attack.run(oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=3)
        attack.run(oracle, targets[:1], defense=NONE, prompt_indices=[0], seed=3)
    finally:
        handle.remove()
    assert len(out.extras["steps"].unique()) > 1
    assert seen and set(seen) == {32}
    seen.clear()
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        ProjectionAttack(ProjectionConfig(lr=0.1)).run(oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=3)
    finally:
        handle.remove()
    assert set(seen) == {3}


def test_a_protocols_runs_fix_the_rows_of_the_batch_sensitive_attacks_and_a_plain_run_does_not():
    """Entries and their verification reruns come from protocol run configs (PROTOCOL_ROWS); the main job's
    5 prompts are not padded to 32 (that tripled continuous's share of it)."""
    from invbench.config import PROTOCOL_ROWS, RunConfig
    from invbench.protocols import get_protocol
    from invbench.runner import build_attacks

    cfg = get_protocol("c4-smollm2-10tok").run_config(defense="none", defense_params={}, out="unused")
    assert cfg.rows == PROTOCOL_ROWS == 32
    rows = {a.name: a.fixed_rows for a in build_attacks(cfg)}
    assert rows == {"sequence": None, "continuous": 32, "projection": 32}
    plain = RunConfig(attacks=["guided", "continuous", "projection"], preset="fast")
    assert {a.name: a.fixed_rows for a in build_attacks(plain)} == {"guided": None, "continuous": None,
                                                                     "projection": None}
