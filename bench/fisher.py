"""The Fisher diagonal at a leak point: how much the model's next-token distribution moves per coordinate of
the leaked state, for `aniso-gaussian` (Bell 2026's inverse-Fisher release puts its noise where it is least).

    F_ii = mean over positions s of public texts of E_y [ (d/dh_{s,i} sum_t log p(y_t | h))^2 ]

with y_t drawn (`draws` times) from the model's own next-token distribution at every position t (the Fisher, not the
"empirical Fisher" of the texts' own next tokens) and h the clean states at the leak point, which the server
side of the model (blocks k+1..L and the LM head, `WhiteBox.server_states`) reads. Given h the y_t are
independent and each score has mean zero, so the square of the summed score is an unbiased estimate of
the sum over outputs t >= s of each output's Fisher with respect to h_s: the first-order KL that noise on
h_s costs all the outputs it reaches. The texts are the learned rankers' public training documents, none
of them a benchmark prompt; the file records which, with the seed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

FORMAT = "invbench-fisher/1"


def fisher_diagonal(oracle, ids: torch.Tensor, *, seed: int, draws: int = 16, batch_size: int = 8,
                    notify: Callable[[str], None] = print) -> torch.Tensor:
    """F (d,) at the oracle's leak point, averaged over every position of the token ids (N, T). `draws`
    next tokens per position: their summed score squared, over `draws`, is unbiased too (different draws'
    scores are independent with mean zero), with `draws` times less variance, which a peaked next-token
    distribution needs (its Fisher rests on its rare tokens)."""
    generator = torch.Generator().manual_seed(seed)
    total, positions = None, 0
    for start in tqdm(range(0, len(ids), batch_size), desc="fisher", unit="batch", leave=False):
        batch = ids[start:start + batch_size]
        states = oracle.capture(batch).detach().requires_grad_(True)
        logits = oracle.head(oracle.server_states(batch, states).to(oracle.head.weight.dtype)).float()
        log_probs = torch.log_softmax(logits, dim=-1)
        drawn = torch.multinomial(log_probs.detach().exp().reshape(-1, log_probs.shape[-1]).cpu(), draws,
                                  replacement=True, generator=generator).reshape(*batch.shape, draws)
        score = log_probs.gather(-1, drawn.to(log_probs.device)).sum()
        (grad,) = torch.autograd.grad(score, states)
        squared = grad.double().pow(2).sum(dim=(0, 1)).cpu() / draws
        total = squared if total is None else total + squared
        positions += batch.numel()
    return (total / positions).float()


def write_fisher(path: Path, fisher: torch.Tensor, *, metadata: dict[str, str]) -> Path:
    """The vector as safetensors ("fisher"), with where it came from in the file's metadata."""
    from safetensors.torch import save_file

    from .results import write_bytes_atomic

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"fisher": fisher.contiguous()}, str(tmp), metadata={"format": FORMAT, **metadata})
    write_bytes_atomic(path, tmp.read_bytes())
    tmp.unlink()
    return path
