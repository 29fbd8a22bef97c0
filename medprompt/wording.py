"""A prompt's wording that names no structure: rewritten before the prompt is read, or, where it asks for
something other than a drawing, refused (``other_request``).

Read as written, each of these named a class it does not ask for, or hid the class it asks for:
- a contrast phase names no vessel: "the colorectal tumour on the portal venous phase" asks for no portal vein,
  "was this done in the arterial phase?" for no aorta;
- a side of the screen is not the patient's: in the radiological convention axial and coronal images are shown as
  if facing the patient, so "the kidney on the right of the screen" is the patient's LEFT kidney;
- a dictation transcript spells its punctuation ("segment the left kidney comma lower pole mass full stop");
- a paired organ placed by a neighbour that lies on one side only has that side: "the kidney next to the spleen"
  is the left kidney, "the adrenal on the liver side" the right adrenal.
"""

from __future__ import annotations

import re

from medprompt.synonyms import SIDE_FORMS

# Words that ask for a drawing (what a request is: ``other_request``; which sentence asks: ``asked_sentence``).
DRAWING_WORDS = frozenset(
    "outline delineate mark highlight trace contour annotate label segment draw mask show".split())


def is_drawing(word: str) -> bool:
    """Whether ``word`` asks for a drawing, in any tense: "segment", "segmented", "outlined", "contoured"."""
    return any(w in DRAWING_WORDS for w in (word, word.removesuffix("ed"), word.removesuffix("d")))


_PHASES = (r"(?:portal[\s-]+venous|porto[\s-]*venous|portal|pv|venous|late[\s-]+arterial|early[\s-]+arterial|"
           r"hepatic[\s-]+arterial|arterial|nephrographic|corticomedullary|excretory|urographic|delayed|"
           r"equilibrium|hepatobiliary)")
_PHASE_RE = re.compile(r"\b" + _PHASES + r"[\s-]+(phases?)\b", re.IGNORECASE)

_SCREEN = (r"(?:(?:axial|coronal|ct|mr|mri|displayed|current|this)[\s-]+)?"
           r"(?:screen|image|monitor|display|picture|viewer|scan)")  # "left of the axial image"
_OPPOSITE = {"left": "right", "right": "left"}
_SCREEN_SIDE_RE = re.compile(
    r"\b(?:(?:on|to|at)\s+)?(?:the\s+)?(left|right)(?:[\s-]+(?:hand[\s-]+)?side)?\s+(?:of|on)\s+(?:the\s+)?"
    + _SCREEN + r"\b|\b" + _SCREEN + r"(?:['’]s)?[\s-]+(left|right)\b", re.IGNORECASE)

# Spoken punctuation as speech-to-text leaves it; "colon" is never read as one (it is an organ), "period" only
# where it ends the prompt.
_SPOKEN = ((re.compile(r"\s*\bfull\s+stop\b", re.IGNORECASE), "."),
           (re.compile(r"\s*\bquestion\s+mark\b", re.IGNORECASE), "?"),
           (re.compile(r"\s*\bnew\s+(?:line|paragraph)\b", re.IGNORECASE), "."),
           (re.compile(r"\s*\bsemicolon\b", re.IGNORECASE), ";"),
           (re.compile(r"\s*\bcomma\b(?![-\s]*shaped)", re.IGNORECASE), ","),  # not "the comma-shaped gland"
           (re.compile(r"\s*\bperiod\s*$", re.IGNORECASE), "."))

# Neighbours that lie on one side of the body, and the relations that place a paired organ by them.
_ONE_SIDED = {"spleen": "left", "splenic": "left", "liver": "right", "hepatic": "right", "gallbladder": "right",
              "ivc": "right", "vena cava": "right", "cava": "right"}
_PAIRED = r"(?<![a-z])(kidney|adrenal(?!\s+glands)|suprarenal(?!\s+glands))(?![a-z])"
_GAP = r"((?:\s+(?!(?:not|no|without|except|excluding|and|or|but|nor)\b)[a-z']+){0,5}?)"
_BY = (r"\s+(?:next\s+to|beside|near|nearest|nearest\s+to|closest\s+to|close\s+to|under|underneath|beneath|"
       r"below|behind|by|against|adjacent\s+to|abutting|touching|hugging)\s+(?:the\s+)?(spleen|liver|gallbladder|"
       r"ivc|vena\s+cava|cava)(?![a-z])")
_SIDE_OF = r"\s+(?:on|at|towards?)\s+(?:the\s+)?(spleen|liver|splenic|hepatic)(?:['’]s)?[\s-]+side\b"
_NEIGHBOUR_RE = re.compile(_PAIRED + _GAP + "(?:" + _BY + "|" + _SIDE_OF + ")", re.IGNORECASE)


_SIDED = SIDE_FORMS | {"both", "bilateral", "either", "each", "other"}


def _side_before(text: str, start: int) -> bool:
    """Whether one of the three words before ``start`` names a side (any language the synonym table reads)."""
    return bool(set(re.findall(r"[a-zà-ÿ]+", text[:start].lower())[-3:]) & _SIDED)


def _neighbour_side(match: re.Match[str], text: str) -> str:
    """The match with its side put before the organ; as it was when a side is said, or when the prompt also names
    a neighbour of the other side ("the kidney between the liver and the spleen")."""
    neighbour = " ".join((match.group(3) or match.group(4)).lower().split())
    side = _ONE_SIDED[neighbour]
    named = {n for n in _ONE_SIDED if re.search(r"(?<![a-z])" + n + r"(?![a-z])", text.lower())}
    if _side_before(text, match.start()) or any(_ONE_SIDED[n] != side for n in named):
        return match.group(0)
    return f"{side} {match.group(0)}"


def plain_wording(text: str) -> str:
    """``text`` with contrast phases, the screen's sides, spoken punctuation and a paired organ's side implied by a
    one-sided neighbour rewritten (see the module docstring); the text itself when it has none of them."""
    out = _PHASE_RE.sub(lambda m: "contrast " + m.group(1), text)
    out = _SCREEN_SIDE_RE.sub(lambda m: f"on the patient's {_OPPOSITE[(m.group(1) or m.group(2)).lower()]}", out)
    for pattern, mark in _SPOKEN:
        out = pattern.sub(mark, out)
    return _NEIGHBOUR_RE.sub(lambda m: _neighbour_side(m, out), out)


# Commands of another kind ("export the contours as RTSTRUCT", "measure the max diameter of the sac in mm", "change
# it to lung window") and questions that ask for a judgement or a number ("Is this liver scan normal?", "what is the
# liver volume in ml?"): what they name is no structure to draw unless they also ask for a drawing.
_ACTIONS = frozenset("measure calculate compute quantify export save send convert change switch zoom adjust rename "
                     "print anonymise anonymize upload download email share tell".split())
_MEASURES = frozenset("diameter diameters volume volumes size length width thickness density attenuation hu "
                      "score weight area".split())
_SETTINGS = frozenset("window windowing level contrast brightness zoom".split())  # "what window level is best"
# What a study's record holds, not its image: "what is the patient's age?", "how many slices does this scan have?"
_RECORD = frozenset("age date name sex gender birth birthday accession slices series dob mrn".split())
_SIZES = frozenset("big large long wide thick heavy small".split())  # "how big is my spleen"
_LEAD_FILLERS = frozenset("please pls plz kindly can could would you just now then i we want wanted to "
                          "like".split())
_JUDGING = (("is", "this"), ("is", "it"), ("does", "this"), ("do", "i"), ("am", "i"), ("should", "i"))


def other_request(text: str) -> str | None:
    """What ``text`` asks for when it is no request to draw (a command of another kind, a measurement, a judgement),
    in a few words for a message; None when it asks for a drawing or names something to draw."""
    said = re.findall(r"[a-z0-9]+", text.lower())
    if any(is_drawing(w) for w in said):
        return None
    lead = said
    while lead and lead[0] in _LEAD_FILLERS:
        lead = lead[1:]
    if lead and lead[0] in _ACTIONS:
        return f"it asks to {lead[0]}"
    if tuple(lead[:2]) in _JUDGING:
        return "it asks a question about the image"
    if lead[:1] in (["what"], ["which"], ["whats"], ["how"]) and set(said) & _SETTINGS:
        return "it asks about display settings"
    if lead[:1] in (["what"], ["when"], ["who"], ["whats"], ["how"]) and set(said) & _RECORD:
        return "it asks about the study's record"
    asking = lead[:2] in (["what", "is"], ["what", "s"]) or lead[:1] in (["whats"], ["how"])
    if asking and (set(said) & _MEASURES or (lead[0] == "how" and lead[1:2] and lead[1] in _SIZES)):
        return "it asks for a measurement"
    return None
