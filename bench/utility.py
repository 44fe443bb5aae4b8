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
from typing import Any, Callable

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


UTILITY_PER_PROMPT = ("top1_agreement", "kl_clean_defended", "nll_clean", "nll_defended", "cosine")


@torch.no_grad()
def utility_metrics(
    *,
    lm_head: LMHead,
    clean: torch.Tensor,
    defended: torch.Tensor,
    next_ids: torch.Tensor | None = None,
    chunk_size: int = 1024,
    prompt_indices: list[int] | None = None,
) -> dict[str, Any]:
    """Compare LM-head outputs on clean (N, d) and defended (N, d) hidden states (any leading
    shape is flattened to N positions). Returns
      top1_agreement     fraction of positions where argmax(defended logits) == argmax(clean logits)
      kl_clean_defended  mean over positions of KL(clean || defended), nats
      nll_clean, nll_defended  mean next-token NLL against next_ids (negative ids are ignored)
      perplexity_ratio   exp(nll_defended - nll_clean)
      cosine             mean cosine similarity of defended to clean
    The NLL entries are None without next_ids. Positions are processed `chunk_size` at a time
    so (chunk, V) logits bound the memory even for a 50k vocabulary.

    With `prompt_indices` (states shaped (P, T, d), one index per prompt), also "per_prompt": each
    prompt's own figures (UTILITY_PER_PROMPT), whose mean over prompts is the run's figure, so a
    verification can compare a rerun prompt by prompt and the board can give an interval."""
    if clean.shape != defended.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and defended {tuple(defended.shape)} differ in shape")
    if prompt_indices is not None and (clean.dim() != 3 or len(prompt_indices) != clean.shape[0]):
        raise ValueError("per-prompt utility needs states shaped (prompts, tokens, d) and one index per prompt")
    positions = clean.shape[1] if prompt_indices is not None else 1
    clean, defended = _rows(clean), _rows(defended)
    n = clean.shape[0]
    if next_ids is not None:
        next_ids = next_ids.reshape(-1)
        if next_ids.shape[0] != n:
            raise ValueError(f"next_ids has {next_ids.shape[0]} entries for {n} positions")
    device, dtype = _head_device_dtype(lm_head)

    # per position: agreement, KL, and the NLLs where a next token is scored (NaN elsewhere)
    agree, kl = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    nll = torch.full((2, n), math.nan, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        h, h_def = clean[rows], defended[rows]
        if device is not None:
            h, h_def = h.to(device, dtype), h_def.to(device, dtype)
        logp = F.log_softmax(lm_head(h).float(), dim=-1)
        logp_def = F.log_softmax(lm_head(h_def).float(), dim=-1)
        agree[rows] = (logp.argmax(-1) == logp_def.argmax(-1)).double().cpu()
        # sum_v p(v) (log p(v) - log q(v)), with p = clean
        kl[rows] = F.kl_div(logp_def, logp, log_target=True, reduction="none").sum(-1).double().cpu()
        if next_ids is not None:
            ids = next_ids[rows].to(logp.device)
            valid = ids >= 0
            picked = ids.clamp(min=0)[:, None]
            nll[0, rows] = torch.where(valid, -logp.gather(1, picked)[:, 0], math.nan).double().cpu()
            nll[1, rows] = torch.where(valid, -logp_def.gather(1, picked)[:, 0], math.nan).double().cpu()
    cosines = _cosines(clean=clean, defended=defended)

    out: dict[str, Any] = _aggregate(agree, kl, nll, cosines)
    if prompt_indices is not None:
        groups = zip(agree.split(positions), kl.split(positions), nll.split(positions, dim=1), cosines.split(positions))
        out["per_prompt"] = [{"prompt_index": index, **{k: v for k, v in _aggregate(*group).items()
                                                           if k in UTILITY_PER_PROMPT}}
                             for index, group in zip(prompt_indices, groups)]
    return out


def _aggregate(agree: torch.Tensor, kl: torch.Tensor, nll: torch.Tensor, cosines: torch.Tensor) -> dict[str, Any]:
    """The utility figures of some positions from their per-position values (NaN NLL: not scored)."""
    n = len(agree)
    scored = ~torch.isnan(nll[0])
    out: dict[str, Any] = {
        "top1_agreement": agree.mean().item() if n else None,
        "kl_clean_defended": kl.mean().item() if n else None,
        "nll_clean": None,
        "nll_defended": None,
        "perplexity_ratio": None,
    }
    if scored.any():
        out["nll_clean"], out["nll_defended"] = nll[0, scored].mean().item(), nll[1, scored].mean().item()
        # a defence that destroys the states can put the ratio beyond float range: infinite (null in JSON)
        gap = out["nll_defended"] - out["nll_clean"]
        out["perplexity_ratio"] = math.exp(gap) if gap < math.log(sys.float_info.max) else math.inf
    out["cosine"] = cosines.mean().item() if n else None
    return out


@torch.no_grad()
def cosine_only(*, clean: torch.Tensor, defended: torch.Tensor) -> dict[str, float | None]:
    """Mean cosine similarity of defended to clean vectors (last dim); for layers with no LM head.
    A zero vector has cosine 0 with anything."""
    if clean.shape != defended.shape:
        raise ValueError(f"clean {tuple(clean.shape)} and defended {tuple(defended.shape)} differ in shape")
    cosines = _cosines(clean=_rows(clean), defended=_rows(defended))
    return {"cosine": cosines.mean().item() if len(cosines) else None}


def _cosines(*, clean: torch.Tensor, defended: torch.Tensor) -> torch.Tensor:
    """The cosine of each defended row to its clean row, in float64 (N,)."""
    clean, defended = clean.double(), defended.to(clean.device).double()
    # Rounding can put identical vectors at 1 + 2e-16; a cosine is in [-1, 1] by definition.
    return F.cosine_similarity(defended, clean, dim=-1, eps=1e-12).clamp(-1.0, 1.0).cpu()
