"""Prompt loading: the paper's truncation recipe, the bundled offline samples, user files and
bad input. Offline throughout: the Hub check is monkeypatched."""
from __future__ import annotations

import importlib.util
import json
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

from invbench.leaks import prompts as prompts_module
from invbench.leaks.models import offline_gpt2_tokenizer
from invbench.leaks.prompts import DatasetError, Prompt, is_prompt_sentence, load_prompts, split_sentences

BUILD_SAMPLE = Path(__file__).resolve().parents[1] / "leaks" / "data" / "build_sample.py"


@pytest.fixture(scope="module")
def tokenizer():
    return offline_gpt2_tokenizer()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setattr(prompts_module, "hub_reachable", lambda **_: False)


def bundled(name: str) -> list[dict]:
    text = (resources.files("invbench.leaks") / "data" / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def load(dataset: str, tokenizer, *, n: int = 5, tokens: int = 10, seed: int = 0, notes: list[str] | None = None):
    sink = notes if notes is not None else []
    return load_prompts(dataset, tokenizer=tokenizer, n=n, tokens=tokens, seed=seed, notify=sink.append)


# --- C4 -----------------------------------------------------------------------------------------


def test_c4_offline_takes_the_first_documents_in_order(tokenizer):
    notes: list[str] = []
    prompts, source = load("c4", tokenizer, n=8, tokens=10, notes=notes)
    documents = [row["text"] for row in bundled(prompts_module.C4_SAMPLE)]
    assert [p.index for p in prompts] == list(range(8))
    for prompt, document in zip(prompts, documents):  # no C4 document among the first 8 is short
        assert len(prompt.ids) == 10
        assert list(prompt.ids) == encode(tokenizer, document)[:10]
        assert prompt.text == tokenizer.decode(list(prompt.ids))
        assert document.startswith(prompt.text)
    assert len(notes) == 1 and "unreachable" in notes[0] and "bundled C4" in notes[0]
    assert "\n" not in source and "bundled C4" in source and "8 prompts of 10 tokens" in source


def test_first_c4_prompt_is_the_first_ten_tokens_of_the_first_document(tokenizer):
    first = bundled(prompts_module.C4_SAMPLE)[0]["text"]
    assert first.startswith("We offer valet parking")  # row 0 of the C4 validation sample
    (prompt,), _ = load("c4", tokenizer, n=1, tokens=10)
    assert prompt == Prompt(index=0, text=tokenizer.decode(encode(tokenizer, first)[:10]), ids=tuple(encode(tokenizer, first)[:10]))


def test_c4_ignores_the_seed(tokenizer):
    assert load("c4", tokenizer, seed=0)[0] == load("c4", tokenizer, seed=1)[0]


def test_hf_hub_offline_env_forces_the_bundled_sample(tokenizer, monkeypatch):
    monkeypatch.undo()  # the real hub_reachable, which honours HF_HUB_OFFLINE before any network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notes: list[str] = []
    prompts, _ = load("c4", tokenizer, n=2, notes=notes)
    assert len(prompts) == 2 and "unreachable" in notes[0]


def test_failed_online_load_falls_back_with_one_note(tokenizer, monkeypatch):
    def broken(*_args):
        raise ConnectionError("no route to host\nsecond line")
        yield  # a generator, like the real one

    monkeypatch.setattr(prompts_module, "hub_reachable", lambda **_: True)
    monkeypatch.setattr(prompts_module, "_stream_hub", broken)
    notes: list[str] = []
    prompts, source = load("c4", tokenizer, n=3, notes=notes)
    assert len(notes) == 1 and "ConnectionError: no route to host" in notes[0] and "\n" not in notes[0]
    assert "bundled C4" in source
    assert prompts == load("c4", tokenizer, n=3)[0]


def test_online_c4_streams_texts_in_order(tokenizer, monkeypatch):
    texts = ["short", "one two three four five six seven eight nine ten eleven", "a b c d e f g h i j k"]
    monkeypatch.setattr(prompts_module, "hub_reachable", lambda **_: True)
    monkeypatch.setattr(prompts_module, "_stream_hub", lambda *_: iter(texts))
    notes: list[str] = []
    prompts, source = load("c4", tokenizer, n=2, tokens=10, notes=notes)
    assert [list(p.ids) for p in prompts] == [encode(tokenizer, t)[:10] for t in texts[1:]]
    assert notes == [] and "allenai/c4" in source and "1 shorter texts skipped" in source


# --- Wikipedia ----------------------------------------------------------------------------------


def test_bundled_wikipedia_sentences_are_25_to_70_characters():
    rows = bundled(prompts_module.WIKIPEDIA_SAMPLE)
    assert 100 <= len(rows) <= 2000
    assert len({row["text"] for row in rows}) == len(rows)
    assert all(25 <= len(row["text"]) <= 70 and row["article"] for row in rows)
    assert not any("@" in row["text"] or " ," in row["text"] for row in rows)  # WikiText spacing undone


def test_wikipedia_offline_is_deterministic_for_a_seed(tokenizer):
    first, source = load("wikipedia", tokenizer, n=20, seed=3)
    again, _ = load("wikipedia", tokenizer, n=20, seed=3)
    other, _ = load("wikipedia", tokenizer, n=20, seed=4)
    assert first == again
    assert [p.ids for p in first] != [p.ids for p in other]
    sentences = [row["text"] for row in bundled(prompts_module.WIKIPEDIA_SAMPLE)]
    for prompt in first:
        assert len(prompt.ids) == 10
        assert any(s.startswith(prompt.text) for s in sentences)
    assert "seed 3" in source


def test_online_wikipedia_pools_then_shuffles(tokenizer, monkeypatch):
    articles = [
        "Title\nThe first article has one long sentence in it. It has another sentence too.\n",
        "Heading of a section\nA second article brings its own sentence along here. Short one.",
    ]
    monkeypatch.setattr(prompts_module, "hub_reachable", lambda **_: True)
    monkeypatch.setattr(prompts_module, "_stream_hub", lambda *_: iter(articles))
    prompts, source = load("wikipedia", tokenizer, n=3, tokens=4, seed=0)
    pool = ["The first article has one long sentence in it.", "It has another sentence too.",
            "A second article brings its own sentence along here."]
    assert sorted(p.text for p in prompts) == sorted(tokenizer.decode(encode(tokenizer, s)[:4]) for s in pool)
    assert "wikimedia/wikipedia" in source and "first 3 in article order" in source


def test_split_sentences():
    paragraph = 'He met Mr. Smith in St. Louis. Then J. R. Tolkien left! "Why?" she asked. (It rained.) Done'
    assert split_sentences(paragraph) == [
        "He met Mr. Smith in St. Louis.",
        "Then J. R. Tolkien left!",
        '"Why?" she asked.',
        "(It rained.)",
        "Done",
    ]


@pytest.mark.parametrize(
    ("sentence", "kept"),
    [
        ("This sentence has just enough characters.", True),
        ("Too short.", False),
        ("This one is far too long to be kept as a prompt sentence for the benchmark.", False),
        ("Early life and career of the subject", False),  # a heading: no full stop
        ('He said, "this is half of a quotation.', False),
    ],
)
def test_is_prompt_sentence(sentence, kept):
    assert is_prompt_sentence(sentence) is kept


# --- user files ---------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Tiny.",
    "Another line that is long enough to give us ten tokens or more, surely.",
]


def test_txt_file(tokenizer, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join([TEXTS[0], "", "   ", *TEXTS[1:]]) + "\n", encoding="utf-8")
    prompts, source = load(str(path), tokenizer, n=2)
    assert [list(p.ids) for p in prompts] == [encode(tokenizer, TEXTS[0])[:10], encode(tokenizer, TEXTS[2])[:10]]
    assert str(path) in source and "1 shorter texts skipped" in source


def test_jsonl_file(tokenizer, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)), encoding="utf-8")
    prompts, _ = load(str(path), tokenizer, n=2)
    assert [p.text for p in prompts] == [tokenizer.decode(encode(tokenizer, t)[:10]) for t in (TEXTS[0], TEXTS[2])]


def test_parquet_file(tokenizer, tmp_path):
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"text": TEXTS, "url": ["a", "b", "c"]}).to_parquet(path)
    prompts, _ = load(str(path), tokenizer, n=2)
    assert [list(p.ids) for p in prompts] == [encode(tokenizer, TEXTS[0])[:10], encode(tokenizer, TEXTS[2])[:10]]


def test_short_texts_are_skipped_and_counted(tokenizer, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TEXTS), encoding="utf-8")
    notes: list[str] = []
    prompts, source = load(str(path), tokenizer, n=5, notes=notes)
    assert len(prompts) == 2
    assert notes == ["note: only 2 of 5 prompts: the source ran out (1 texts shorter than 10 tokens skipped)"]
    assert "1 shorter texts skipped" in source


def test_no_long_enough_text_is_an_error(tokenizer, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Tiny.\nSmall too.\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="at least 10 tokens"):
        load(str(path), tokenizer)


# --- bad input ----------------------------------------------------------------------------------


def bad_file(tmp_path: Path, name: str, content: bytes | pd.DataFrame) -> str:
    path = tmp_path / name
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    else:
        path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty"),
        ("blank.txt", b"\n  \n\n", "no texts"),
        ("binary.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00", "binary"),
        ("latin1.txt", "caf\u00e9 au lait".encode("latin-1"), "not UTF-8"),
        ("notext.jsonl", b'{"content": "hello"}\n', "no string field 'text'"),
        ("badjson.jsonl", b'{"text": "ok there"}\n{not json\n', "line 2 .* not valid JSON"),
        ("notext.parquet", pd.DataFrame({"body": ["hello"]}), r"no 'text' column \(columns: body\)"),
        ("broken.parquet", b"this is not parquet", "cannot read .* as parquet"),
        ("data.csv", b"text\nhello\n", "unsupported dataset file type '.csv'"),
    ],
)
def test_bad_files(tokenizer, tmp_path, name, content, message):
    with pytest.raises(DatasetError, match=message) as error:
        load(bad_file(tmp_path, name, content), tokenizer)
    assert "\n" not in str(error.value)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="dataset file not found: .*missing.jsonl"):
        load(str(tmp_path / "missing.jsonl"), tokenizer)


def test_directory_is_not_a_file(tokenizer, tmp_path):
    with pytest.raises(DatasetError, match="not a file"):
        load(str(tmp_path), tokenizer)


def test_unknown_dataset_name(tokenizer):
    with pytest.raises(DatasetError, match=r"unknown dataset 'openwebtext': expected c4, wikipedia, random, or a path"):
        load("openwebtext", tokenizer)


@pytest.mark.parametrize(("n", "tokens", "message"), [(0, 10, "number of prompts"), (5, 0, "tokens per prompt"), (-1, 10, "got -1")])
def test_bad_counts(tokenizer, n, tokens, message):
    with pytest.raises(DatasetError, match=message):
        load("c4", tokenizer, n=n, tokens=tokens)


# --- the bundled sample and its build script ----------------------------------------------------


def test_bundled_samples_are_small_and_documented():
    data = resources.files("invbench.leaks") / "data"
    c4, wiki = bundled(prompts_module.C4_SAMPLE), bundled(prompts_module.WIKIPEDIA_SAMPLE)
    assert len(c4) == 300 and all(set(row) == {"text", "url"} and len(row["text"]) <= 1000 for row in c4)
    size = sum(len((data / name).read_bytes()) for name in (prompts_module.C4_SAMPLE, prompts_module.WIKIPEDIA_SAMPLE))
    assert size < 1_000_000
    provenance = (data / "PROVENANCE.md").read_text(encoding="utf-8")
    assert f"Rows: {len(c4)}" in provenance and f"Rows: {len(wiki)}" in provenance
    assert "ODC-BY 1.0" in provenance and "CC BY-SA 3.0" in provenance


@pytest.mark.skipif(not BUILD_SAMPLE.exists(), reason="build script is only in a source checkout")
def test_wikitext_detokenising():
    spec = importlib.util.spec_from_file_location("build_sample", BUILD_SAMPLE)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    raw = (
        ' = Some Article ( film ) = \n'
        ' It cost $ 1 @,@ 500 and ran 2 @.@ 5 hours ( roughly ) . The well @-@ known star didn \'t say " hi " . \n'
        ' = = Reception = = \n'
        " The critics ' reviews were mixed at best , he said ; it flopped . \n"
    )
    assert list(build.wikitext_sentences(raw)) == [
        ("It cost $1,500 and ran 2.5 hours (roughly).", "Some Article (film)"),
        ('The well-known star didn\'t say "hi".', "Some Article (film)"),
        ("The critics' reviews were mixed at best, he said; it flopped.", "Some Article (film)"),
    ]


def test_tiny_bytes_has_one_token_per_byte_and_a_257_token_model():
    """tiny-bytes, the tests' small-vocabulary model: GPT-2's byte tokens without merges, so a text's ids are its
    UTF-8 bytes in GPT-2's byte order ('W' is id 54 in GPT-2 too), and the model's vocabulary matches."""
    from invbench.leaks.models import load_model

    loaded = load_model("tiny-bytes", seed=0)
    ids = loaded.tokenizer("We é", add_special_tokens=False)["input_ids"]
    assert ids == [54, 68, 220, 127, 102]  # five bytes: 'é' is two, ' ' is GPT-2's 'Ġ' (220)
    assert offline_gpt2_tokenizer().convert_tokens_to_ids(["W", "e", "Ġ"]) == ids[:3]  # GPT-2's own byte tokens
    assert loaded.tokenizer.decode(ids) == "We é" and loaded.tokenizer.eos_token_id == 256
    assert loaded.model.get_input_embeddings().weight.shape == (257, 128)
    assert loaded.recipe["byte_tokens"] is True and "byte_tokens" not in load_model("tiny-gpt2", seed=0).recipe
