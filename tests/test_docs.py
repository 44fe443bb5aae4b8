"""The README is the front door: short, and every figure it quotes generated from what the code prints
(invbench.docgen): a block that no longer matches its source fails here; `python -m invbench.docgen`
rewrites it."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest

from invbench import docgen
from invbench.docgen import BLOCK, GENERATORS, stale_blocks

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
ONCE = {name: functools.cache(generate) for name, generate in GENERATORS.items()}  # 4 s a board-answers block


@pytest.fixture
def generated_once(monkeypatch):
    """The blocks' sources computed once for this module's tests (they read every committed entry)."""
    monkeypatch.setattr(docgen, "GENERATORS", ONCE)


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_every_generated_block_is_what_its_source_gives_now(generated_once):
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        assert {m.group("name") for m in BLOCK.finditer(text)} <= set(GENERATORS), path
        assert stale_blocks(text) == [], f"{path.name}: stale; run python -m invbench.docgen"
    names = {m.group("name") for m in BLOCK.finditer(README.read_text(encoding="utf-8"))}
    assert names == {"main-job", "board-answers", "published"}


def test_a_changed_figure_is_caught(generated_once):
    """The check can fail: the README's main-job table with one figure changed is stale."""
    text = README.read_text(encoding="utf-8")
    block = next(m for m in BLOCK.finditer(text) if m.group("name") == "main-job")
    forged = text.replace(block.group("body"), block.group("body").replace("1.000", "0.999", 1))
    assert forged != text and stale_blocks(forged) == ["main-job"]


def test_every_link_in_the_readme_and_docs_points_at_a_file():
    import re

    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text(encoding="utf-8")):
            if not target.startswith("http"):
                assert (path.parent / target).exists(), f"{path.name}: {target}"


def test_a_published_setting_shows_its_entry_or_says_it_is_not_run_yet():
    from invbench.docgen import published

    settings = (("Gaussian", "sigma 1.5", "quick", "Gaussian sigma 1.5"), ("Gaussian", "sigma 9", "quick", "Gaussian sigma 9"))
    rows = published(REPO / "leaderboards", settings).splitlines()[2:]
    assert rows[0].startswith("| Gaussian | sigma 1.5 | last layer | leaks | 1.000 [1.000, 1.000] | 1.000 | yes |")
    assert rows[1] == "| Gaussian | sigma 9 | last layer | not run yet | - | - | - |"
