"""Shared fixtures: a seeded tiny GPT-2 and a few real-text prompts, offline."""
from __future__ import annotations

import os

import pytest
import torch

from invbench.leaks.models import load_model
from invbench.leaks.oracle import WhiteBox

TEXTS = ["Hello world! The capital of France is Paris.", "Beginners BBQ Class Taking Place in Missoula!",
         "The quick brown fox jumps over the lazy dog."]


def pytest_configure(config):
    """One torch thread per pytest-xdist worker (two workers on two cores), and for the runs the tests start: a
    thread waiting on a core the other worker holds stalls its siblings (the 8.3x of bench/config.cpu_threads)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (a Ray cluster, the real SmolLM2) run only with INVBENCH_SLOW=1: the default run keeps to
    the 5-minute target, and CI runs them in a second step (.ci/run)."""
    if os.environ.get("INVBENCH_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: starts a Ray cluster or loads the real SmolLM2 (set INVBENCH_SLOW=1)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Tests never wait on the network: the Hub counts as unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-gpt2", seed=0)


@pytest.fixture(scope="session")
def oracle(tiny):
    return WhiteBox(tiny.model)


@pytest.fixture(scope="session")
def prompt_ids(tiny):
    """(3, 4) token ids of real text."""
    return torch.tensor([tiny.tokenizer(t, add_special_tokens=False)["input_ids"][:4] for t in TEXTS])


@pytest.fixture(scope="module")
def small(tiny, prompt_ids):
    """(oracle over a 2,000-token sub-vocabulary of tiny-gpt2 that always holds the prompts' tokens,
    the prompts' ids in it): the same model with a smaller vocabulary (priors renormalised over it),
    so that a full-vocabulary scan or fallback takes a second. One per test module: attacks keep
    per-oracle caches."""
    full = tiny.model.get_input_embeddings().weight.detach()
    extra = torch.randperm(full.shape[0], generator=torch.Generator().manual_seed(0))[:2000]
    keep = torch.unique(torch.cat([prompt_ids.flatten(), extra]))
    oracle = WhiteBox(tiny.model, tokenizer=tiny.tokenizer, name="tiny-gpt2-sub").restrict_vocabulary(keep)
    return oracle, torch.searchsorted(keep, prompt_ids)


@pytest.fixture(scope="module")
def one_thread():
    """Attack loops are many tiny ops: when other processes share the 2 cores, a second torch
    thread mostly waits (runs slowed down 10-25x), so these tests use one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
