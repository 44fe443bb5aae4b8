"""What leaked, per prompt (invbench.transcript): built from records, wrong tokens marked by
position, control characters made visible. Hand-made cases: no model runs here."""
from __future__ import annotations

import pytest

from invbench.transcript import Recovered, Token, Transcript, build_transcript, marked, visible, wrong_positions


def test_wrong_tokens_are_marked_position_by_position():
    """'the cat sat' recovered as 'the dog sat': only the middle token is wrong; a token that is right
    but at another position ('sat' first) is wrong where it stands, as token accuracy counts it."""
    assert wrong_positions([5, 6, 7], [5, 9, 7]) == [False, True, False]
    assert wrong_positions([5, 6, 7], [7, 5, 6]) == [True, True, True]
    assert wrong_positions([5, 6, 7], [5, 6, 7]) == [False, False, False]
    assert wrong_positions([5, 6], [5, 6, 8]) == [False, False, True]  # past the end of the truth: wrong
    answer = Recovered([5, 9, 7], ["the", " dog", " sat"], False, 2 / 3)
    assert marked([5, 6, 7], answer) == [Token("the", False), Token(" dog", True), Token(" sat", False)]


def test_the_marks_follow_the_ids_not_the_text():
    """Two ids can decode to the same text (a split UTF-8 character, a byte token): the id decides."""
    answer = Recovered([5, 9], ["\ufffd", "\ufffd"], False, 0.5)
    assert [t.wrong for t in marked([5, 6], answer)] == [False, True]


@pytest.mark.parametrize("raw, shown", [("plain text", "plain text"), (" lead", " lead"), ("a\nb", "a\\nb"),
                                        ("\x00", "\\x00"), ("\t", "\\t"), ("\u202eevil", "\\u202eevil"),
                                        ("<b>&\"'", "<b>&\"'"), ("é中", "é中")])
def test_visible_escapes_control_and_format_characters_only(raw, shown):
    assert visible(raw) == shown  # markup is left for the template's autoescaping


def record(attack: str, index: int, target: list[int], recovered: list[int]) -> dict:
    return {"attack": attack, "prompt_index": index, "target_ids": target, "recovered_ids": recovered,
            "exact_match": target == recovered,
            "token_accuracy": sum(a == b for a, b in zip(target, recovered)) / len(target),
            "similarity": 1.0 if target == recovered else 0.5, "search_failure": False}


def test_built_from_the_last_record_of_each_prompt_and_attack():
    records = [record("scan", 0, [1, 2], [1, 3]), record("scan", 0, [1, 2], [1, 2]),  # a resumed run wrote it twice
               record("guided", 0, [1, 2], [4, 2]), record("scan", 1, [5], [5]), record("guided", 1, [5], [6]),
               record("scan", 7, [9], [9])]  # not one of the run's prompts
    transcript = build_transcript(records, attacks=["scan", "guided"], prompt_indices=[0, 1],
                                  token_text=lambda t: f"<{t}>")
    assert [p.prompt_index for p in transcript.prompts] == [0, 1]
    first = transcript.prompts[0]
    assert first.target_tokens == ["<1>", "<2>"] and list(first.attacks) == ["scan", "guided"]
    assert first.attacks["scan"] == Recovered([1, 2], ["<1>", "<2>"], True, 1.0, 1.0, False)
    assert first.attacks["guided"].recovered_tokens == ["<4>", "<2>"]
    assert Transcript.from_dict(transcript.to_dict()) == transcript
