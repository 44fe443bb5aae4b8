"""Build the offline prompt samples bundled with invbench.leaks (run by hand, output committed).

    python leaks/data/build_sample.py [DATA_DIR]      # DATA_DIR defaults to ../shared/data

Reads DATA_DIR/c4-en-validation-sample.parquet and DATA_DIR/wikitext-2-raw-test-part.txt
(see DATA_DIR/README.md) and writes, next to this script:
- c4_validation_sample.jsonl: the first 300 C4 documents in order, text cut to 1000 characters;
- wikipedia_sentences.jsonl:  up to 2000 distinct WikiText-2 sentences of 25-70 characters;
- c4_ranker_train.jsonl:      C4 documents 300-1499 (after the sample's, so disjoint from every
                              offline prompt set), text cut to 600 characters, for fitting rankers;
- PROVENANCE.md:              sources, licences, the command and row counts.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Iterator

import pandas as pd

from invbench.leaks.prompts import (C4_RANKER_TRAIN, C4_SAMPLE, RANKER_FIRST_DOC, WIKIPEDIA_SAMPLE,
                                    is_prompt_sentence, split_sentences)

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DEFAULT_DATA = REPO_ROOT / ".." / "shared" / "data"

C4_FILE = "c4-en-validation-sample.parquet"
WIKITEXT_FILE = "wikitext-2-raw-test-part.txt"
C4_DOCS = 300
C4_CHARS = 1000  # far more than 64 GPT-2 tokens, keeps the file small
RANKER_CHARS = 600  # a ranker learns from the first 64 tokens of each document
MAX_SENTENCES = 2000

_TITLE = re.compile(r"^ = ([^=].*?) = $")  # " = Title = "; sections are " = = Name = = "
_HEADING = re.compile(r"^ (= )+.*( =)+ $")

# WikiText's tokenised spacing, undone in this order.
_DETOKENISE = (
    (re.compile(r" @([-,.])@ "), r"\1"),  # 1 @,@ 000 -> 1,000; well @-@ known -> well-known
    (re.compile(r'" (.*?) "'), r'"\1"'),  # paired double quotes hug their contents
    (re.compile(r"(?<=\w) '(?=[a-z])"), "'"),  # don 't, Teddy 's, Chang 'an
    (re.compile(r"(?<=s) ' "), "' "),  # plural possessive: ships ' -> ships'
    (re.compile(r" ([,.;:!?)\]%])"), r"\1"),  # no space before closing punctuation
    (re.compile(r"([(\[$]) "), r"\1"),  # no space after opening brackets and $
    (re.compile(r"\s{2,}"), " "),
)


def detokenise(line: str) -> str:
    for pattern, replacement in _DETOKENISE:
        line = pattern.sub(replacement, line)
    return line.strip()


def _ends_paragraph(line: str) -> bool:
    """True when a title may follow `line`. WikiText cuts some formulas into lines that look
    like titles (" = 1 henry and capacitance C = "); those follow a line cut mid-sentence."""
    text = line.strip()
    return not text or _HEADING.match(line) is not None or text[-1] in '.!?")]'


def wikitext_sentences(raw: str) -> Iterator[tuple[str, str]]:
    """(sentence, article title) for every prompt-sized sentence, in file order."""
    title = ""
    previous = ""
    for line in raw.splitlines():
        is_title = (match := _TITLE.match(line)) is not None and _ends_paragraph(previous)
        previous = line
        if is_title:
            title = detokenise(match.group(1))
        if not line.strip() or _HEADING.match(line):
            continue  # titles, section headings and formula pieces that look like them
        for sentence in split_sentences(detokenise(line)):
            if is_prompt_sentence(sentence):
                yield sentence, title


def build_c4(data: Path) -> list[dict]:
    frame = pd.read_parquet(data / C4_FILE, columns=["text", "url"]).head(C4_DOCS)
    return [{"text": text[:C4_CHARS], "url": url} for text, url in zip(frame["text"], frame["url"])]


def build_ranker_train(data: Path) -> list[dict]:
    """Every document of the source file from RANKER_FIRST_DOC on: none is in the bundled sample."""
    frame = pd.read_parquet(data / C4_FILE, columns=["text", "url"]).iloc[RANKER_FIRST_DOC:]
    return [{"text": text[:RANKER_CHARS], "url": url, "document": int(index)}
            for index, text, url in zip(frame.index, frame["text"], frame["url"])]


def build_wikipedia(data: Path) -> list[dict]:
    seen: dict[str, str] = {}  # sentence -> article, insertion-ordered; keeps the first occurrence
    for sentence, title in wikitext_sentences((data / WIKITEXT_FILE).read_text(encoding="utf-8")):
        seen.setdefault(sentence, title)
        if len(seen) == MAX_SENTENCES:
            break
    return [{"text": text, "article": title} for text, title in seen.items()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def provenance(data: Path, c4_rows: int, wiki_rows: int, articles: int, ranker_rows: int) -> str:
    c4_out, wiki_out, ranker_out = HERE / C4_SAMPLE, HERE / WIKIPEDIA_SAMPLE, HERE / C4_RANKER_TRAIN
    return f"""# Bundled prompt samples

Offline fallbacks for `invbench.leaks.prompts.load_prompts` when the Hugging Face Hub is out of
reach. Online, `c4` streams `allenai/c4` (en, validation) and `wikipedia` streams
`wikimedia/wikipedia` (20231101.en) through `datasets` instead.

Built with `python leaks/data/build_sample.py` (from the repository root; the argument, default
`../shared/data`, is the folder holding the two source files below).

## {C4_SAMPLE}

- Rows: {c4_rows}, one JSON object a line: `{{"text": ..., "url": ...}}`.
- What: the first {c4_rows} documents of the C4 English validation split, in their original order,
  each text cut to its first {C4_CHARS} characters (plenty for 64+ GPT-2 tokens).
- Source file: `{C4_FILE}` (sha256 {sha256(data / C4_FILE)}), the first 1,500 rows of
  `validation/c4_validation_2k.parquet` in the public GitHub repository yxanul/yxanul_0.6B at
  commit d3ef06095f54f9e2a78c0abca1472a0188a5e1e9 (whole file sha256
  4083c86a02a942fcc54674a68d65a29ccd1aaabe2dddc7ba16624f16936b944b).
- Licence: C4 is released under ODC-BY 1.0 (Open Data Commons Attribution License); the
  documents themselves are web text from Common Crawl.
- sha256 of this file: {sha256(c4_out)}

## {WIKIPEDIA_SAMPLE}

- Rows: {wiki_rows} distinct sentences from {articles} articles, one JSON object a line:
  `{{"text": ..., "article": title}}`, in file order.
- What: English Wikipedia sentences of 25-70 characters (the paper's range) extracted from
  WikiText-2 raw (test split): heading lines skipped, WikiText's tokenised spacing undone
  (` @-@ ` -> `-`, ` @,@ ` -> `,`, ` @.@ ` -> `.`, no space before `, . ; : ! ? ) ] %` or inside
  quotes, `don 't` -> `don't`), paragraphs split into sentences with
  `invbench.leaks.prompts.split_sentences` (the same splitter the online path uses), kept when
  `is_prompt_sentence` holds (25-70 characters, starts like a sentence, ends with . ! ?,
  balanced double quotes and brackets), deduplicated, at most {MAX_SENTENCES}. Two formula
  pieces that WikiText renders like titles (` = 1 henry and capacitance C = `) are not taken
  as article titles.
- Source file: `{WIKITEXT_FILE}` (sha256 {sha256(data / WIKITEXT_FILE)}), the first 60% of the
  articles of `data/wikitext-2-raw/wiki.test.raw` in the public GitHub repository
  Tylogi/TyloQuant at commit 7989d038b13ca737da11a95fb90e77ae059f33c0 (whole file sha256
  4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c).
- Licence: WikiText (Wikipedia text) is released under CC BY-SA 3.0 (Creative Commons
  Attribution-ShareAlike); this derived sample is shared under the same licence.
- sha256 of this file: {sha256(wiki_out)}

## {C4_RANKER_TRAIN}

- Rows: {ranker_rows}, one JSON object a line: `{{"text": ..., "url": ..., "document": index}}`.
- What: documents {RANKER_FIRST_DOC} to {RANKER_FIRST_DOC + ranker_rows - 1} of the same C4 English validation source file
  (`document` is the 0-based row), each text cut to its first {RANKER_CHARS} characters. It starts
  where `{C4_SAMPLE}` ends, so no offline prompt set (every protocol's prompts among them)
  shares a document with it: the data `invbench fit-ranker` learns from offline. Online, rankers
  learn from the C4 English *train* split instead, disjoint from the validation split by
  construction.
- Source file and licence: as `{C4_SAMPLE}`.
- sha256 of this file: {sha256(ranker_out)}
"""


def main(argv: list[str]) -> None:
    data = Path(argv[0]) if argv else DEFAULT_DATA
    c4 = build_c4(data)
    wiki = build_wikipedia(data)
    write_jsonl(HERE / C4_SAMPLE, c4)
    write_jsonl(HERE / WIKIPEDIA_SAMPLE, wiki)
    ranker = build_ranker_train(data)
    write_jsonl(HERE / C4_RANKER_TRAIN, ranker)
    articles = len({row["article"] for row in wiki})
    (HERE / "PROVENANCE.md").write_text(provenance(data, len(c4), len(wiki), articles, len(ranker)), encoding="utf-8")
    print(f"wrote {len(c4)} C4 documents, {len(wiki)} Wikipedia sentences ({articles} articles) and "
          f"{len(ranker)} ranker-training documents to {HERE}")


if __name__ == "__main__":
    main(sys.argv[1:])
