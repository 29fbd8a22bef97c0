"""What a prompt says not to draw is left out before it is resolved (``medprompt.negation``)."""

from __future__ import annotations

import pytest

from medprompt.negation import without_negated


@pytest.mark.parametrize("text, kept, excluded", [
    ("liver without the tumour", "liver", ["without the tumour"]),
    ("the right kidney, not the left one", "the right kidney", ["not the left one"]),
    ("kidneys but not the adrenals", "kidneys", ["but not the adrenals"]),
    ("the spleen, no tumour", "the spleen", ["no tumour"]),
    ("the left adrenal (not the kidney)", "the left adrenal", ["not the kidney"]),
    ("non-tumorous liver", "liver", ["non-tumorous"]),
    ("the liver, not the tumour, and not the gallbladder", "the liver", ["not the tumour", "and not the gallbladder"]),
])
def test_a_negated_phrase_runs_from_its_cue_to_the_next_punctuation(text: str, kept: str, excluded: list[str]):
    assert without_negated(text) == (kept, excluded)


@pytest.mark.parametrize("text", ["the knot in the liver", "a nodule", "note the liver", "the liver excluding the lesions",
                                  "kidneys except the adrenals", "Outline the patient, ignoring the table."])
def test_words_that_only_contain_a_cue_and_landmark_words_are_kept(text: str):
    """"knot", "nodule", "note" hold a cue's letters; "excluding" and "except" are read as landmarks
    (``medprompt.text.similarity.RELATIONS``), where what they name stays as context."""
    assert without_negated(text) == (text, [])
