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
    ("right kidney mask, exclude the left", "right kidney mask", ["exclude the left"]),  # its side goes with it
    ("the lungs, excluding the heart and airways.", "the lungs", ["excluding the heart and airways"]),
    ("left suprarenal, don't include the right one", "left suprarenal", ["don't include the right one"]),
    # the cue after what it negates (writer_w)
    ("both kidneys, right side excluded", "both kidneys", ["right side excluded"]),
    ("the liver with the tumour left out", "the liver", ["the tumour left out"]),
    ("outline the right kidney, leave the left alone", "outline the right kidney", ["leave the left alone"]),
    # "dont" typed without its apostrophe (writer_aa)
    ("can u draw the right suprarenal, dont include the kidney or the cava", "can u draw the right suprarenal",
     ["dont include the kidney or the cava"]),
])
def test_a_negated_phrase_runs_from_its_cue_to_the_next_punctuation(text: str, kept: str, excluded: list[str]):
    assert without_negated(text) == (kept, excluded)


@pytest.mark.parametrize("text", ["the knot in the liver", "a nodule", "note the liver", "nothing but the spleen",
                                  "Outline the patient, ignoring the table.", "the excluded region",
                                  "the organ removed at cholecystectomy"])
def test_words_that_only_contain_a_cue_are_kept(text: str):
    """"knot", "nodule", "note", "nothing" hold a cue's letters; "ignoring the table" is read where what else an
    image shows is (``medprompt.text.similarity.OTHER_CONTENT``)."""
    assert without_negated(text) == (text, [])


def test_an_option_box_keeps_a_negation_with_the_prompt_it_belongs_to():
    """Slicer's and OHIF's option boxes send prompts as one comma-separated string: "liver, not the tumour" is one
    prompt there (it had been the liver and a refused "not the tumour"), "liver, spleen" still two."""
    from medprompt.infers.draft import parse_prompts

    assert parse_prompts("liver, not the tumour, spleen") == ["liver, not the tumour", "spleen"]
    assert parse_prompts("right kidney, exclude the left, aorta,") == ["right kidney, exclude the left", "aorta"]
    assert parse_prompts("liver,spleen, inferior vena cava") == ["liver", "spleen", "inferior vena cava"]
    assert parse_prompts("not the liver") == ["not the liver"]  # alone it is refused by name when resolved
