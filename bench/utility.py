"""Utility of a defence, no attack needed: what the model downstream loses when it reads the
defended hidden states h~ instead of the clean h.

Final layer: feed both through the LM head and compare the next-token distributions.
Earlier leak points (the runner's `defense_utility`): the server runs the rest of the model on the
defended states (`WhiteBox.server_states`), and the final states of that run and of the clean run are
compared here in the same way; the cosine reported is that of the leaked vectors (`cosine_only`).
"""
from __future__ import annotations

import math
import sys
from typing import Callable

import torch
import torch.nn.functional as F

LMHead = Callable[[torch.Tensor], torch.Tensor]


def _head_device_dtype(lm_head: LMHead) -> tuple[torch.device | None, torch.dtype | None]:
    """Where the head's weights live, so chunks can be moved there (None for plain callables)."""
    if isinstance(lm_head, torch.nn.Module):
        for param in lm_head.parameters():
            return param.device, param.dtype
    return None, None


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def utility_metrics(
    *,
    lm_head: LMHead,
    clean: torch.Tensor,
    defended: torch.Tensor,
    next_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
) -> dict[str, float | None]:
    """Compare LM-head outputs on clean (N, d) and defended (N, d) hidden states (any leading
    shape is flattened to N positions). Returns
      top1_agreement     fraction of positions where argmax(defended logits) == argmax(clean logits)
      kl_clean_defended  mean over positions of KL(clean || defended), nats
      nll_clean, nll_defended  mean next-token NLL against next_ids (negative ids are ignored)
      perplexity_ratio   exp(nll_defended - nll_clean)
      cosine             mean cosine similarity of defended to clean
    The NLL entries are None without next_ids. Positions are processed `chunk_size` at a time
    so (chunk, V) logits bound the memory even for a 50k vocabulary."""
    if clean.shape != defended.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and defended {tuple(defended.shape)} differ in shape")
    clean, defended = _rows(clean), _rows(defended)
    n = clean.shape[0]
    if next_ids is not None:
        next_ids = next_ids.reshape(-1)
        if next_ids.shape[0] != n:
            raise ValueError(f"next_ids has {next_ids.shape[0]} entries for {n} positions")
    device, dtype = _head_device_dtype(lm_head)

    agree = kl = nll_clean = nll_defended = 0.0
    scored = 0
    for start in range(0, n, chunk_size):
        h, h_def = clean[start:start + chunk_size], defended[start:start + chunk_size]
        if device is not None:
            h, h_def = h.to(device, dtype), h_def.to(device, dtype)
        logp = F.log_softmax(lm_head(h).float(), dim=-1)
        logp_def = F.log_softmax(lm_head(h_def).float(), dim=-1)
        agree += (logp.argmax(-1) == logp_def.argmax(-1)).sum().item()
        # sum_v p(v) (log p(v) - log q(v)), with p = clean
        kl += F.kl_div(logp_def, logp, log_target=True, reduction="sum").item()
        if next_ids is not None:
            ids = next_ids[start:start + chunk_size].to(logp.device)
            valid = ids >= 0
            if valid.any():
                ids, rows = ids[valid], valid.nonzero().squeeze(-1)
                nll_clean -= logp[rows, ids].sum().item()
                nll_defended -= logp_def[rows, ids].sum().item()
                scored += int(valid.sum())

    out: dict[str, float | None] = {
        "top1_agreement": agree / n if n else None,
        "kl_clean_defended": kl / n if n else None,
        "nll_clean": None,
        "nll_defended": None,
        "perplexity_ratio": None,
    }
    if scored:
        out["nll_clean"], out["nll_defended"] = nll_clean / scored, nll_defended / scored
        # a defence that destroys the states can put the ratio beyond float range: infinite (null in JSON)
        gap = out["nll_defended"] - out["nll_clean"]
        out["perplexity_ratio"] = math.exp(gap) if gap < math.log(sys.float_info.max) else math.inf
    out.update(cosine_only(clean=clean, defended=defended))
    return out


@torch.no_grad()
def cosine_only(*, clean: torch.Tensor, defended: torch.Tensor) -> dict[str, float | None]:
    """Mean cosine similarity of defended to clean vectors (last dim); for layers with no LM head.
    A zero vector has cosine 0 with anything."""
    if clean.shape != defended.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and defended {tuple(defended.shape)} differ in shape")
    clean, defended = _rows(clean).double(), _rows(defended.to(clean.device)).double()
    if clean.shape[0] == 0:
        return {"cosine": None}
    # Rounding can put identical vectors at 1 + 2e-16; a cosine is in [-1, 1] by definition.
    cosines = F.cosine_similarity(defended, clean, dim=-1, eps=1e-12).clamp(-1.0, 1.0)
    return {"cosine": cosines.mean().item()}
