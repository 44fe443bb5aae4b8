"""Prompts to invert: the paper's recipe applied to C4, Wikipedia sentences or a user file.

Recipe (the seed paper's): tokenize each text without special tokens, keep texts with at least
`tokens` tokens, take the first `tokens` ids, and decode them back to text. Shorter texts are
skipped and counted.

Sources
- c4:        C4 English validation documents in their original order ("the first N documents").
- wikipedia: English Wikipedia sentences of 25-70 characters, shuffled with the seed.
- random:    uniformly random token ids (passwords, keys): no text prior helps an attacker; drawn
             with the seed from the non-special tokens whose embedding row is unique (a token
             sharing its row with another cannot be told apart from it by any attack).
- a path:    .txt (one text per non-empty line), .jsonl (field `text`), .parquet (column `text`).

The built-in sources stream from the Hugging Face Hub through `datasets`; when the Hub is out of
reach or loading fails they fall back, with one line to `notify`, to the small samples bundled
in `leaks/data/` (see leaks/data/PROVENANCE.md and leaks/data/build_sample.py).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from invbench.errors import InvbenchError, one_line

from .hub import hub_reachable

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
SENTENCE_CHARS = (25, 70)  # the paper's Wikipedia sentence lengths, inclusive
POOL_FACTOR = 20  # online Wikipedia: collect 20*n sentences, then shuffle, so the draw is varied

C4_HUB = ("allenai/c4", "en", "validation")
WIKIPEDIA_HUB = ("wikimedia/wikipedia", "20231101.en", "train")
C4_SAMPLE = "c4_validation_sample.jsonl"
WIKIPEDIA_SAMPLE = "wikipedia_sentences.jsonl"
# Rankers learn from documents no prompt set uses: offline C4 validation documents from 300 on
# (the bundled sample holds 0-299), online the C4 train split.
C4_RANKER_TRAIN = "c4_ranker_train.jsonl"
RANKER_FIRST_DOC = 300
C4_TRAIN_HUB = ("allenai/c4", "en", "train")

_ALLOWED = "c4, wikipedia, random, or a path to a .txt, .jsonl or .parquet file"

# A sentence ends at . ! ? (optionally followed by a closing quote or bracket), then whitespace,
# then a capital letter (optionally after an opening quote or bracket).
_SENTENCE_BREAK = re.compile(r"""(?:(?<=[.!?])|(?<=[.!?]["')\]]))\s+(?=["'(\[]?[A-Z])""")
# Words whose full stop does not end a sentence: titles, initials ("J."), "U.S.".
_ABBREVIATION = re.compile(
    r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Lt|Gen|Col|Capt|Sgt|Rev|Prof|Mt|No|Nos|Vol|vs|c|ca|[A-Z]|(?:[A-Z]\.)+[A-Z])\.$"
)
_SENTENCE_END = re.compile(r"""[.!?]["')\]]?$""")


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the returned list, 0-based
    text: str  # tokenizer.decode(ids)
    ids: tuple[int, ...]  # the first `tokens` token ids of the source text


class DatasetError(InvbenchError, ValueError):
    """Bad dataset input; the message is one line naming the bad value and what is allowed."""


# --- sentences (shared with leaks/data/build_sample.py) ----------------------------------------


def split_sentences(paragraph: str) -> list[str]:
    """Split one paragraph into sentences at . ! ? followed by space and a capital letter,
    re-joining splits made after common abbreviations and initials."""
    sentences: list[str] = []
    for piece in _SENTENCE_BREAK.split(paragraph.strip()):
        if sentences and _ABBREVIATION.search(sentences[-1]):
            sentences[-1] = f"{sentences[-1]} {piece}"
        elif piece:
            sentences.append(piece)
    return sentences


def is_prompt_sentence(sentence: str) -> bool:
    """25-70 characters and a whole sentence: starts like one, ends with . ! ?, and has balanced
    double quotes and brackets. This drops headings, list items and the pieces of quotations
    that span several sentences, which the simple splitter cannot keep together."""
    low, high = SENTENCE_CHARS
    return (
        low <= len(sentence) <= high
        and (sentence[0].isupper() or sentence[0].isdigit() or sentence[0] in "\"'(")
        and _SENTENCE_END.search(sentence) is not None
        and sentence.count('"') % 2 == 0
        and sentence.count("(") == sentence.count(")")
    )


def prompt_sentences(article: str) -> Iterator[str]:
    """The prompt-sized sentences of an article whose paragraphs are separate lines."""
    for paragraph in article.splitlines():
        yield from (s for s in split_sentences(paragraph) if is_prompt_sentence(s))


# --- the recipe ---------------------------------------------------------------------------------


def load_prompts(
    dataset: str,
    *,
    tokenizer,
    n: int,
    tokens: int,
    seed: int,
    notify: Callable[[str], None] = print,
    allowed_ids: Sequence[int] | None = None,
) -> tuple[list[Prompt], str]:
    """Up to `n` prompts of exactly `tokens` token ids each, and a one-line source description.

    `dataset` is "c4", "wikipedia", "random" or a path to a .txt, .jsonl or .parquet file.
    `seed` only affects "wikipedia" (which sentences are drawn) and "random" (which ids, from
    `allowed_ids`, default every non-special token); C4 and files are taken in their order,
    as the paper took the first N C4 documents. Fewer than `n` prompts are returned, with one
    line to `notify`, when the source runs out; none at all raises DatasetError.
    """
    if n < 1:
        raise DatasetError(f"number of prompts must be at least 1, got {n}")
    if tokens < 1:
        raise DatasetError(f"tokens per prompt must be at least 1, got {tokens}")

    if dataset == "random":
        return random_prompts(tokenizer=tokenizer, n=n, tokens=tokens, seed=seed, allowed_ids=allowed_ids)
    if dataset == "c4":
        return _load_builtin(_c4_online, _c4_offline, tokenizer=tokenizer, n=n, tokens=tokens, notify=notify)
    if dataset == "wikipedia":
        online, offline = partial(_wikipedia_online, n=n, seed=seed), partial(_wikipedia_offline, seed=seed)
        return _load_builtin(online, offline, tokenizer=tokenizer, n=n, tokens=tokens, notify=notify)
    path = _user_file(dataset)
    texts = _read_user_file(path)
    return _finish(texts, f"file {path} ({_file_layout(path)}), in file order", tokenizer, n, tokens, notify)


def truncate_texts(texts: Iterable[str], tokenizer, *, n: int, tokens: int) -> tuple[list[Prompt], int]:
    """The paper's truncation: the first `tokens` ids of each text that has that many, until `n`
    prompts; returns the prompts and how many shorter texts were skipped on the way."""
    prompts: list[Prompt] = []
    skipped = 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < tokens:
            skipped += 1
            continue
        head = tuple(int(i) for i in ids[:tokens])
        # No clean-up: it strips spaces before punctuation, so the text would no longer be
        # what these ids spell.
        text = tokenizer.decode(list(head), clean_up_tokenization_spaces=False)
        prompts.append(Prompt(index=len(prompts), text=text, ids=head))
        if len(prompts) == n:
            break
    return prompts, skipped


def _finish(
    texts: Iterable[str], source: str, tokenizer, n: int, tokens: int, notify: Callable[[str], None]
) -> tuple[list[Prompt], str]:
    prompts, skipped = truncate_texts(texts, tokenizer, n=n, tokens=tokens)
    if not prompts:
        raise DatasetError(f"none of the {skipped} texts has at least {tokens} tokens (source: {source}); "
                           "use a smaller --tokens or longer texts")
    if len(prompts) < n:
        notify(f"note: only {len(prompts)} of {n} prompts: the source ran out ({skipped} texts shorter than {tokens} tokens skipped)")
    return prompts, f"{source}; {len(prompts)} prompts of {tokens} tokens, {skipped} shorter texts skipped"


def random_prompts(*, tokenizer, n: int, tokens: int, seed: int,
                   allowed_ids: Sequence[int] | None = None) -> tuple[list[Prompt], str]:
    """`n` prompts of `tokens` ids drawn uniformly (with replacement) from `allowed_ids`."""
    if allowed_ids is None:
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        allowed_ids = [i for i in range(len(tokenizer)) if i not in special]
    allowed = np.asarray(sorted(set(int(i) for i in allowed_ids)))
    if len(allowed) == 0:
        raise DatasetError("no token ids to draw random prompts from")
    draws = allowed[np.random.default_rng([seed, 0x52414E44]).integers(len(allowed), size=(n, tokens))]
    prompts = [Prompt(index=i, text=tokenizer.decode([int(x) for x in row], clean_up_tokenization_spaces=False),
                      ids=tuple(int(x) for x in row)) for i, row in enumerate(draws)]
    return prompts, f"uniformly random token ids ({len(allowed)} distinct tokens, seed {seed}); {n} prompts of {tokens} tokens"


def ranker_training_texts(*, notify: Callable[[str], None] = print,
                          limit: int = 1200) -> tuple[list[str], str]:
    """Texts a ranker may learn from, never those of a prompt set: online the first `limit`
    documents of the C4 English *train* split (prompts come from validation), offline the
    bundled C4 validation documents 300-1499 (the bundled prompt sample holds 0-299)."""
    if hub_reachable():
        try:
            name, config, split = C4_TRAIN_HUB
            texts = []
            for text in _stream_hub(name, config, split):
                texts.append(text)
                if len(texts) == limit:
                    break
            return texts, f"C4 {config} {split} ({name} via datasets, streamed), first {len(texts)} documents"
        except Exception as exc:  # noqa: BLE001 - as for prompts: fall back to the bundled file
            notify(f"note: loading C4 train from the Hugging Face Hub failed ({_one_line(exc)}); using the bundled documents")
    rows = _bundled_rows(C4_RANKER_TRAIN)[:limit]
    first, last = rows[0]["document"], rows[-1]["document"]
    return [row["text"] for row in rows], (f"bundled C4 validation documents {first}-{last} "
                                          f"(leaks/data/{C4_RANKER_TRAIN}; no prompt set uses them)")


# --- built-in sources: online first, bundled sample as fallback ---------------------------------

TextSource = Callable[[], tuple[Iterable[str], str]]  # -> (texts, one-line description)


def _load_builtin(
    online: TextSource, offline: TextSource, *, tokenizer, n: int, tokens: int, notify: Callable[[str], None]
) -> tuple[list[Prompt], str]:
    if hub_reachable():
        try:
            texts, source = online()
            return _finish(texts, source, tokenizer, n, tokens, notify)
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - streaming can fail anywhere (DNS, HTTP, auth): use the sample
            texts, source = offline()
            notify(f"note: loading from the Hugging Face Hub failed ({_one_line(exc)}); using the {source}")
            return _finish(texts, source, tokenizer, n, tokens, notify)
    texts, source = offline()
    notify(f"note: the Hugging Face Hub is unreachable; using the {source}")
    return _finish(texts, source, tokenizer, n, tokens, notify)


def _one_line(exc: Exception) -> str:
    """A Hub failure in a note: its type and, when it has one, its message in one line."""
    message = one_line(exc, limit=200)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _stream_hub(name: str, config: str, split: str) -> Iterator[str]:
    from datasets import load_dataset  # slow import; only the online path needs it

    for row in load_dataset(name, config, split=split, streaming=True):
        yield row["text"]


def _c4_online() -> tuple[Iterable[str], str]:
    name, config, split = C4_HUB
    return _stream_hub(name, config, split), f"C4 {config} {split} ({name} via datasets, streamed), documents in order"


def _c4_offline() -> tuple[Iterable[str], str]:
    rows = _bundled_rows(C4_SAMPLE)
    return (row["text"] for row in rows), (
        f"bundled C4 validation sample ({len(rows)} documents, leaks/data/PROVENANCE.md), documents in order"
    )


def _wikipedia_online(*, n: int, seed: int) -> tuple[Iterable[str], str]:
    name, config, split = WIKIPEDIA_HUB
    pool = _sentence_pool(_stream_hub(name, config, split), size=POOL_FACTOR * n)
    source = f"Wikipedia sentences of 25-70 characters ({name} {config} via datasets, first {len(pool)} in article order, shuffled with seed {seed})"
    return _shuffled(pool, seed), source


def _wikipedia_offline(*, seed: int) -> tuple[Iterable[str], str]:
    pool = [row["text"] for row in _bundled_rows(WIKIPEDIA_SAMPLE)]
    source = f"bundled Wikipedia sentence sample ({len(pool)} WikiText-2 sentences, leaks/data/PROVENANCE.md), shuffled with seed {seed}"
    return _shuffled(pool, seed), source


def _sentence_pool(articles: Iterable[str], *, size: int) -> list[str]:
    """The first `size` distinct prompt-sized sentences, in article order."""
    pool: dict[str, None] = {}  # ordered set
    for article in articles:
        for sentence in prompt_sentences(article):
            pool.setdefault(sentence)
            if len(pool) >= size:
                return list(pool)
    return list(pool)


def _shuffled(pool: list[str], seed: int) -> list[str]:
    order = np.random.default_rng(seed).permutation(len(pool))
    return [pool[i] for i in order]


def _bundled_rows(name: str) -> list[dict]:
    text = (resources.files("invbench.leaks") / "data" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- user files ---------------------------------------------------------------------------------


def _user_file(dataset: str) -> Path:
    path = Path(dataset).expanduser()
    if not path.exists():
        if path.suffix or "/" in dataset or "\\" in dataset:
            raise DatasetError(f"dataset file not found: {dataset} (expected {_ALLOWED})")
        raise DatasetError(f"unknown dataset {dataset!r}: expected {_ALLOWED}")
    if not path.is_file():
        raise DatasetError(f"dataset path is not a file: {dataset} (expected {_ALLOWED})")
    if path.suffix.lower() not in FILE_SUFFIXES:
        raise DatasetError(f"unsupported dataset file type {path.suffix or '(no suffix)'!r} for {dataset}: expected .txt, .jsonl or .parquet")
    if path.stat().st_size == 0:
        raise DatasetError(f"dataset file is empty: {dataset}")
    return path.resolve()


def _file_layout(path: Path) -> str:
    return {".txt": "one text per line", ".jsonl": "field text", ".parquet": "column text"}[path.suffix.lower()]


def _read_user_file(path: Path) -> list[str]:
    """All texts of a user file, checked up front so that a bad file fails before any work."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        texts = _parquet_texts(path)
    else:
        lines = [(number, line) for number, line in enumerate(_text_lines(path), start=1) if line.strip()]
        texts = [line for _, line in lines] if suffix == ".txt" else [_jsonl_text(line, number, path) for number, line in lines]
    if not texts:
        raise DatasetError(f"dataset file has no texts (only blank lines or no rows): {path}")
    return texts


def _text_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    if b"\x00" in data:
        raise DatasetError(f"dataset file looks binary (contains NUL bytes): {path}; expected UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"dataset file is not UTF-8 text: {path} (bad byte at offset {exc.start})") from None
    return text.splitlines()


def _jsonl_text(line: str, number: int, path: Path) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DatasetError(f"line {number} of {path} is not valid JSON ({exc.msg}); expected one object with a 'text' field per line") from None
    except RecursionError:  # thousands of nested brackets: malformed, like any other bad line
        raise DatasetError(f"line {number} of {path} nests too deeply to be read; expected one object with a 'text' "
                           "field per line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise DatasetError(f"line {number} of {path} has no string field 'text'; expected one object with a 'text' field per line")
    return row["text"]


def _parquet_texts(path: Path) -> list[str]:
    import pandas as pd  # only parquet files need it

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise DatasetError(f"cannot read {path} as parquet ({type(exc).__name__}); expected a parquet file with a 'text' column") from None
    if "text" not in frame.columns:
        columns = ", ".join(map(str, frame.columns)) or "none"
        raise DatasetError(f"parquet file {path} has no 'text' column (columns: {columns})")
    texts = frame["text"].tolist()
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise DatasetError(f"row {bad} of the 'text' column of {path} is not a string ({texts[bad]!r})")
    return texts
