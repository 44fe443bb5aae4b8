"""What leaked, per prompt: the text an attacker reads, as an entry carries it (`transcript`).

An entry's summary holds numbers; its transcript holds, for every prompt, the true tokens and each
attack's recovered tokens (ids and their text), with the attack's exact match, token accuracy,
character similarity and search-failure flag for that prompt (the last two since entry schema 5). `build_transcript` is the one place it is made (by `invbench submit`, from the
run's records.jsonl and the model's tokenizer); `Transcript.from_dict` the one place it is read
back (the entry page). The schema is `$defs/transcript` of `bench/schemas/entry.schema.json`; what
follows from the ids (exact match, token accuracy, the wrong positions) is recomputed on read
(`problems`), so a page never marks a token the ids do not say is wrong, and the per-prompt values
must average to the summary's means (`problems` too): a summary cannot claim what its prompts do not
show. `invbench verify` then compares a random subset of these prompts with a rerun, one by one.

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
    similarity: float | None = None  # None: an entry of schema 4, which did not record it
    search_failure: bool | None = None


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
                         r["token_accuracy"], r["similarity"], r.get("search_failure"))
            for a, r in mine.items()}))
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

# The per-prompt values whose mean over prompts is an attack's summary figure (transcript key, summary key).
MEANS = (("exact_match", "exact_match"), ("token_accuracy", "token_accuracy"), ("similarity", "similarity"),
         ("search_failure", "search_failure_rate"))
MEAN_TOLERANCE = 1e-9  # float rounding of a mean of at most a few thousand values


def problems(data: dict[str, Any], *, attacks: dict[str, Any], n: Any, prefix: str,
             complete: bool = False) -> list[tuple[str, str]]:
    """(field, message) where a transcript that fits the schema disagrees with itself or with its
    summary (`attacks`: the summary's attacks, name -> their figures; `n` its number of prompts): one
    text per id, each prompt's exact match and token accuracy as its ids give them, the summary's n
    prompts (each once), each with the summary's attacks, and each attack's per-prompt values averaging
    to the summary's figure (`MEANS`). `complete` (entry schema 5 on): every answer records its
    similarity and search-failure flag, so that every mean can be checked."""
    found = []
    prompts = data["prompts"]
    if isinstance(n, int) and len(prompts) != n:
        found.append((f"{prefix}prompts", f"{len(prompts)} prompts, the summary's n is {n}"))
    indices = [p["prompt_index"] for p in prompts]
    if len(set(indices)) != len(indices) or indices != sorted(indices):
        found.append((f"{prefix}prompts", "prompt indices must be distinct and in increasing order"))
    for i, prompt in enumerate(prompts):
        where = f"{prefix}prompts[{i}]"
        if len(prompt["target_tokens"]) != len(prompt["target_ids"]):
            found.append((f"{where}.target_tokens", "needs one text per target id"))
        if sorted(prompt["attacks"]) != sorted(attacks):
            found.append((f"{where}.attacks", f"expected the summary's attacks {sorted(attacks)}"))
        for name, answer in prompt["attacks"].items():
            missing = [key for key in ("similarity", "search_failure") if key not in answer] if complete else []
            if missing:
                found.append((f"{where}.attacks.{name}", f"missing {' and '.join(missing)} (entry schema 5 records them "
                              "per prompt)"))
            found += _answer_problems(prompt["target_ids"], answer, where=f"{where}.attacks.{name}")
    if not found:
        found += _mean_problems(prompts, attacks, prefix=prefix)
    return found


def _mean_problems(prompts: list[dict], attacks: dict[str, Any], *, prefix: str) -> list[tuple[str, str]]:
    """(field, message) for each summary figure that is not the mean of the transcript's per-prompt values."""
    found = []
    for name, figures in attacks.items():
        if not isinstance(figures, dict):
            continue
        for key, summary_key in MEANS:
            values = [p["attacks"][name].get(key) for p in prompts]
            stated = figures.get(summary_key)
            if any(v is None for v in values) or not isinstance(stated, (int, float)) or isinstance(stated, bool):
                continue  # not recorded per prompt (schema 4), or not measured
            mean = sum(float(v) for v in values) / len(values)
            if abs(mean - stated) > MEAN_TOLERANCE:
                found.append((f"summary.attacks.{name}.{summary_key}", f"{stated!r} is not the mean of the transcript's "
                              f"per-prompt {key} ({mean!r}): the summary must be what its prompts show"))
    return found


def _answer_problems(target: list[int], answer: dict[str, Any], *, where: str) -> list[tuple[str, str]]:
    ids = answer["recovered_ids"]
    if len(answer["recovered_tokens"]) != len(ids):
        return [(f"{where}.recovered_tokens", "needs one text per recovered id")]
    if answer["exact_match"] != metrics.exact_match(target=target, recovered=ids):
        return [(f"{where}.exact_match", "does not follow from the ids")]
    if abs(answer["token_accuracy"] - metrics.token_accuracy(target=target, recovered=ids)) > 1e-9:
        return [(f"{where}.token_accuracy", "does not follow from the ids")]
    if answer.get("search_failure") and answer["exact_match"]:
        return [(f"{where}.search_failure", "an exact answer cannot be a search failure")]
    return []
