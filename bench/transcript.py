"""What leaked, per prompt: the text an attacker reads, as an entry carries it (`transcript`).

An entry's summary holds numbers; its transcript holds, for every prompt, the true tokens and each
attack's recovered tokens (ids and their text), with the attack's exact match and token accuracy
for that prompt. `build_transcript` is the one place it is made (by `invbench submit`, from the
run's records.jsonl and the model's tokenizer); `Transcript.from_dict` the one place it is read
back (the entry page). The schema is `$defs/transcript` of `bench/schemas/entry.schema.json`; what
follows from the ids (exact match, token accuracy, the wrong positions) is recomputed on read
(`problems`), so a page never marks a token the ids do not say is wrong.

Token text is any text a tokenizer gives back: markup, quotes, control characters. It is data: the
page escapes it (autoescape) and shows control characters as escapes (`visible`).
"""
from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass
from typing import Any, Callable

from . import metrics
from .scoring import latest_records


@dataclass(frozen=True)
class Recovered:
    """One attack's answer for one prompt."""

    recovered_ids: list[int]
    recovered_tokens: list[str]
    exact_match: bool
    token_accuracy: float


@dataclass(frozen=True)
class PromptText:
    """One prompt: its true tokens and what each attack recovered, in the protocol's attack order."""

    prompt_index: int
    target_ids: list[int]
    target_tokens: list[str]
    attacks: dict[str, Recovered]


@dataclass(frozen=True)
class Transcript:
    prompts: list[PromptText]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Transcript":
        """From data that passed the entry schema."""
        return cls([PromptText(p["prompt_index"], list(p["target_ids"]), list(p["target_tokens"]),
                               {name: Recovered(**a) for name, a in p["attacks"].items()})
                    for p in data["prompts"]])


def build_transcript(records: list[dict], *, attacks: list[str], prompt_indices: list[int],
                     token_text: Callable[[int], str]) -> Transcript:
    """The transcript of a finished run from its records (the last record of each prompt and attack,
    as the summary takes them); `token_text` turns one token id into its text (the tokenizer's decode)."""
    latest = latest_records(records, attacks=attacks, prompt_indices=set(prompt_indices))
    by_prompt = {a: {r["prompt_index"]: r for r in rs} for a, rs in latest.items()}
    prompts = []
    for index in sorted(prompt_indices):
        mine = {a: by_prompt[a][index] for a in attacks if index in by_prompt[a]}
        if not mine:
            continue
        target = list(next(iter(mine.values()))["target_ids"])
        prompts.append(PromptText(index, target, [token_text(t) for t in target], {
            a: Recovered(list(r["recovered_ids"]), [token_text(t) for t in r["recovered_ids"]], r["exact_match"],
                         r["token_accuracy"]) for a, r in mine.items()}))
    return Transcript(prompts)


# --- what the page shows ------------------------------------------------------------------------

@dataclass(frozen=True)
class Token:
    text: str  # as shown: control characters escaped
    wrong: bool


def wrong_positions(target_ids: list[int], recovered_ids: list[int]) -> list[bool]:
    """Per recovered position, whether its token is not the true one at that position (the rule of
    token accuracy: position by position; a position past the target's end is wrong)."""
    return [i >= len(target_ids) or token != target_ids[i] for i, token in enumerate(recovered_ids)]


def marked(target_ids: list[int], recovered: Recovered) -> list[Token]:
    """The recovered tokens with the wrong ones marked."""
    return [Token(visible(text), wrong)
            for text, wrong in zip(recovered.recovered_tokens, wrong_positions(target_ids, recovered.recovered_ids))]


def visible(text: str) -> str:
    """Token text with control and format characters (newlines, NUL, bidi overrides) written as
    escapes, so each shows as what it is and none reorders or breaks the page's text."""
    return "".join(ch if unicodedata.category(ch)[0] != "C" else ascii(ch)[1:-1] for ch in text)


# --- checked on read ------------------------------------------------------------------------------

def problems(data: dict[str, Any], *, attacks: list[str], n: Any, prefix: str) -> list[tuple[str, str]]:
    """(field, message) where a transcript that fits the schema disagrees with itself or with its
    summary (`attacks`: the summary's attack names, `n` its number of prompts): one text per id, each
    prompt's exact match and token accuracy as its ids give them, the summary's n prompts, each with
    the summary's attacks. (Not compared: the means with the summary's, which verify's rerun checks.)"""
    found = []
    prompts = data["prompts"]
    if isinstance(n, int) and len(prompts) != n:
        found.append((f"{prefix}prompts", f"{len(prompts)} prompts, the summary's n is {n}"))
    for i, prompt in enumerate(prompts):
        where = f"{prefix}prompts[{i}]"
        if len(prompt["target_tokens"]) != len(prompt["target_ids"]):
            found.append((f"{where}.target_tokens", "needs one text per target id"))
        if sorted(prompt["attacks"]) != sorted(attacks):
            found.append((f"{where}.attacks", f"expected the summary's attacks {sorted(attacks)}"))
        for name, answer in prompt["attacks"].items():
            found += _answer_problems(prompt["target_ids"], answer, where=f"{where}.attacks.{name}")
    return found


def _answer_problems(target: list[int], answer: dict[str, Any], *, where: str) -> list[tuple[str, str]]:
    ids = answer["recovered_ids"]
    if len(answer["recovered_tokens"]) != len(ids):
        return [(f"{where}.recovered_tokens", "needs one text per recovered id")]
    if answer["exact_match"] != metrics.exact_match(target=target, recovered=ids):
        return [(f"{where}.exact_match", "does not follow from the ids")]
    if abs(answer["token_accuracy"] - metrics.token_accuracy(target=target, recovered=ids)) > 1e-9:
        return [(f"{where}.token_accuracy", "does not follow from the ids")]
    return []
