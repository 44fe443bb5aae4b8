import math

import torch

from invbench.attacks import make_attack
from invbench.attacks.continuous import RowAdam, clip_rows, cosine_lr
from invbench.defenses import make_defense

NONE = make_defense("none", {})


def test_recovers_every_prompt_exactly_on_tiny_gpt2(oracle, prompt_ids):
    attack = make_attack("continuous", preset="fast")
    out = attack.run(oracle, oracle.capture(prompt_ids), defense=NONE, prompt_indices=[0, 1, 2], seed=0)
    assert torch.equal(out.tokens, prompt_ids)
    assert out.discrete_loss.max() < 1e-9  # exact tokens reproduce the target up to float32 noise
    assert out.extras["fallback"].sum() == 0


def test_batched_equals_one_prompt_at_a_time(oracle, prompt_ids):
    attack = make_attack("continuous", preset="fast", overrides={"steps": 40, "candidates": 20})
    targets = oracle.capture(prompt_ids)
    batched = attack.run(oracle, targets, defense=NONE, prompt_indices=[10, 11, 12], seed=1)
    for row, index in enumerate([10, 11, 12]):
        alone = attack.run(oracle, targets[row:row + 1], defense=NONE, prompt_indices=[index], seed=1)
        assert torch.equal(alone.tokens[0], batched.tokens[row])
        assert torch.equal(alone.extras["steps"][0], batched.extras["steps"][row])


def test_row_adam_matches_torch_adam_per_row():
    """Two rows stepped together, one frozen after 3 steps, equal torch.optim.Adam with
    clip_grad_norm_ and CosineAnnealingLR run on each row alone."""
    torch.manual_seed(0)
    start, grads = torch.randn(2, 5), torch.randn(6, 2, 5) * 3
    total, lr = 6, 0.05
    ours = start.clone()
    adam = RowAdam(ours.shape, device=ours.device, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-5)
    for k in range(total):
        rows = torch.tensor([0, 1]) if k < 3 else torch.tensor([0])
        adam.step(ours, clip_rows(grads[k, rows], max_norm=1.0), rows=rows, lr=cosine_lr(base_lr=lr, step=k, total=total),
                  count=k + 1)
    for row, steps in ((0, total), (1, 3)):
        param = torch.nn.Parameter(start[row].clone())
        opt = torch.optim.Adam([param], lr=lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        for k in range(steps):
            param.grad = grads[k, row].clone()
            torch.nn.utils.clip_grad_norm_([param], 1.0)
            opt.step()
            sched.step()
        assert torch.allclose(ours[row], param.detach(), atol=1e-6)


def test_cosine_schedule_by_hand():
    assert cosine_lr(base_lr=0.05, step=0, total=100) == 0.05
    assert math.isclose(cosine_lr(base_lr=0.05, step=50, total=100), 0.025)
    assert math.isclose(cosine_lr(base_lr=0.05, step=100, total=100), 0.0, abs_tol=1e-12)


def test_noisy_targets_commit_the_best_candidate(oracle, prompt_ids):
    """Under noise the threshold test cannot pass; the committed token must be the checked
    candidate with the smallest discrete loss, and prompts still finish within K steps."""
    noisy = make_defense("gaussian", {"sigma": 0.5})
    targets = noisy.apply(oracle.capture(prompt_ids), generator=torch.Generator().manual_seed(0))
    attack = make_attack("continuous", preset="fast", overrides={"steps": 30, "candidates": 10})
    out = attack.run(oracle, targets, defense=noisy, prompt_indices=[0, 1, 2], seed=0)
    assert out.extras["steps"].max() <= 30
    assert out.extras["fallback"].all()
    assert (out.discrete_loss > 0.1).all()  # near the noise floor: sigma^2 = 0.25 per coordinate


def test_reference_mode_commits_the_same_tokens(oracle, prompt_ids):
    """The straightforward loop (one prompt, no KV cache, torch.optim.Adam, candidate loop) and
    the batched attack agree for the same seeds."""
    options = {"steps": 120, "candidates": 20}
    targets = oracle.capture(prompt_ids)
    batched = make_attack("continuous", preset="fast", overrides=options).run(
        oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=3)
    reference = make_attack("continuous", preset="fast", overrides={**options, "reference": True}).run(
        oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=3)
    assert torch.equal(reference.tokens, batched.tokens)
    assert torch.equal(reference.tokens, prompt_ids)
    assert torch.equal(reference.extras["steps"], batched.extras["steps"])


def test_every_forward_pass_holds_the_same_number_of_rows(oracle, tiny, prompt_ids):
    """A prompt's answer must not depend on its batch: the model sees 32 rows in every forward pass (the Adam
    steps and the commit's candidate checks), for 1 prompt or 3, also after some prompts exit early (before:
    the batch's own size, then fewer rows as prompts exited; a C4 verify found another answer that way)."""
    seen, targets = [], oracle.capture(prompt_ids)
    handle = tiny.model.transformer.h[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    try:
        attack = make_attack("continuous", overrides={"steps": 60, "candidates": 8, "loss_threshold": 1e-2})
        attack.fixed_rows = 32  # as a protocol's run sets it (PROTOCOL_ROWS)
        out = attack.run(oracle, targets, defense=NONE, prompt_indices=[0, 1, 2], seed=0, notify=lambda line: None)
        attack.run(oracle, targets[:1], defense=NONE, prompt_indices=[0], seed=0, notify=lambda line: None)
    finally:
        handle.remove()
    assert len(out.extras["steps"].unique()) > 1  # prompts exited after different step counts
    assert seen and set(seen) == {32 * 8} | {32}  # the commit checks 8 candidates per row in one pass
