"""Medical word forms a prompt may use for what the catalog names in plain English.

Anatomy has three vocabularies: English nouns (kidney), Latin/Greek adjectives (renal, nephric,
hepatic, splenic, gastric) and Latin names (ren, lien, vesica fellea), plus Latin laterality
(sinister, dexter). The prompt files spell classes in the first; a sentence embedding reads the
others poorly ("splenic tissue" lands near the splenic *vein*) and a spelling matcher takes them
for typos ("left renal" ~ "left adrenal"). So a prompt gets a second, *canonical* reading in which
each such form is replaced by the noun it means; resolution weighs both readings (catalog.py,
text/similarity.py), so a compound like "splenic vein" keeps its own reading too.

Radiology shorthand ("GB", "HCC", "L kidney") is read the same way, as the words it stands for.

The table maps word forms to nouns, never phrases to classes: it knows that "renal" means
"kidney", not which class a prompt wants. A user's prompt file needs no entry here.
"""

from __future__ import annotations

import re

# Laterality: Latin and clinical forms -> the words the class names use.
SIDE_WORDS: dict[str, str] = {
    "left": "left", "sinister": "left", "sinistra": "left", "sinistrum": "left", "sinistral": "left",
    "laevus": "left", "lt": "left",
    "right": "right", "dexter": "right", "dextra": "right", "dextrum": "right", "dextral": "right",
    "rt": "right", "l": "left", "r": "right",  # "L kidney", as reports and worklists write it
}

# Both sides, as the catalog's paired classes say it ("bilateral renal parenchyma": both kidneys).
BOTH_SIDES: dict[str, str] = {"bilateral": "both", "bilaterally": "on both sides"}

# Adjectives and Latin/Greek names -> the English noun (the word the prompt files use).
ORGAN_WORDS: dict[str, str] = {
    # kidney
    "renal": "kidney", "nephric": "kidney", "ren": "kidney", "renes": "kidney",
    # liver ("hepatic flexure" and "splenic flexure" are the colon's: kept whole)
    "hepatic": "liver", "hepar": "liver", "jecur": "liver", "hepatic flexure": "hepatic flexure",
    "splenic flexure": "splenic flexure",
    # spleen
    "splenic": "spleen", "lienal": "spleen", "lien": "spleen", "lienalis": "spleen", "splenica": "spleen",
    # stomach
    "gastric": "stomach", "gaster": "stomach", "ventriculus": "stomach",
    # pancreas
    "pancreatic": "pancreas",
    # gallbladder
    "cholecyst": "gallbladder", "cholecystic": "gallbladder", "vesica fellea": "gallbladder",
    "vesica biliaris": "gallbladder", "biliary vesicle": "gallbladder", "gall bladder": "gallbladder",
    "bile bladder": "gallbladder",
    # urinary bladder
    "vesical": "urinary bladder", "vesica urinaria": "urinary bladder",
    # adrenal glands
    "suprarenal": "adrenal", "epinephric": "adrenal", "suprarenals": "adrenals",
    # lungs
    "pulmonary": "lung", "pulmonic": "lung", "pulmo": "lung", "pulmones": "lung",
    # vessels ("v. portae", "vena lienalis": Latin vein names)
    "aortic": "aorta", "caval": "vena cava", "vena portae": "portal vein", "v portae": "portal vein",
    "vena lienalis": "splenic vein", "v lienalis": "splenic vein", "vena splenica": "splenic vein",
    "v splenica": "splenic vein", "vena cava inferior": "inferior vena cava", "v cava inferior": "inferior vena cava",
    # oesophagus
    "esophageal": "esophagus", "oesophageal": "esophagus", "oesophagus": "esophagus",
    # skeleton
    "osseous": "bone", "skeletal": "bone", "bony": "bone",
    # anatomy no shipped prompt file describes, read as a noun so it can be refused by name; lay names are
    # read as their anatomical noun too ("windpipe" read like the oesophagus)
    "cardiac": "heart", "windpipe": "trachea", "voice box": "larynx", "small intestine": "small bowel",
    "large intestine": "colon", "large bowel": "colon", "gullet": "esophagus", "ovarian": "ovary",
}


# Radiology shorthand -> the words it stands for; resolution then reads those words as it reads any
# prompt (an abbreviation is three letters to a sentence embedding: "GB" read like nothing, "CRC" like
# the vena cava). Unambiguous in an abdominal, brain or breast request; for anatomy no class describes
# (CBD, SVC) the expansion lets the prompt be refused by name.
ABBREVIATIONS: dict[str, str] = {
    "gb": "gallbladder", "pv": "portal vein", "pt": "patient", "panc": "pancreas", "lk": "left kidney",
    "rk": "right kidney",
    "aaa": "abdominal aortic aneurysm", "hcc": "hepatocellular carcinoma", "crc": "colorectal cancer",
    "gbm": "glioblastoma", "cbd": "common bile duct", "svc": "superior vena cava",
    "luq": "left upper quadrant", "ruq": "right upper quadrant", "llq": "left lower quadrant",
    "rlq": "right lower quadrant", "bi rads": "breast imaging", "birads": "breast imaging", "ub": "urinary bladder",
    "mets": "metastases", "ca": "cancer", "ao": "aorta", "eso": "esophagus",
    "dvt": "deep vein thrombosis", "idc": "invasive ductal carcinoma", "ilc": "invasive lobular carcinoma",
    "dcis": "ductal carcinoma in situ", "gtv": "gross tumour volume",
}


def _pattern(table: dict[str, str]) -> re.Pattern[str]:
    # Longest forms first so "vesica fellea" wins over any one-word form inside it.
    forms = sorted(table, key=len, reverse=True)
    return re.compile(r"(?<![a-z0-9])(" + "|".join(r"[\s_.-]+".join(map(re.escape, f.split())) for f in forms)
                      + r")(?![a-z0-9])", re.IGNORECASE)


_FORMS = {**ORGAN_WORDS, **ABBREVIATIONS, **BOTH_SIDES, **{k: v for k, v in SIDE_WORDS.items() if k != v}}
_FORM_RE = _pattern(_FORMS)


# Clinical shorthand with a slash, read before the sides: the "r" of "r/o" (rule out) is no right side, nor the
# "s" of "s/p" (status post) anything.
_SLASHED = {"r/o": "rule out", "s/p": "status post", "c/o": "complaining of", "h/o": "history of"}
_SLASHED_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, _SLASHED)) + r")(?![a-z0-9])", re.IGNORECASE)
# "RT" is radiotherapy, not the right side, where no organ follows it ("OAR for RT", "the RT plan", "RT dose").
_RADIOTHERAPY_RE = re.compile(r"(?<![a-z0-9])rt(?=\s+(?:plan|planning|plans|dose|doses|field|fields|boost|treatment|"
                              r"course|contour|contours|structure|structures)\b|\s*$|\s*[,.;:)])", re.IGNORECASE)


# A Couinaud segment is the liver's ("the mass in segment VII", "segments IVa and V"): the liver is named before it.
_COUINAUD_RE = re.compile(r"\b(in|of|at|to|the|between|involving|couinaud)\s+(segments?\s+(?:[2-8]|i{2,3}|iv|vi{0,3})"
                          r"[ab]?)(?![a-z0-9])", re.IGNORECASE)


def canonical(text: str) -> str:
    """``text`` with every medical word form replaced by its plain noun or side ('left renal organ'
    -> 'left kidney organ'); the text itself when it uses none."""
    text = _SLASHED_RE.sub(lambda m: _SLASHED[m.group(1).lower()], text)
    text = _COUINAUD_RE.sub(r"\1 liver \2", text)
    text = _RADIOTHERAPY_RE.sub("radiotherapy", text)
    return _FORM_RE.sub(lambda m: _FORMS[" ".join(re.sub(r"[_.-]", " ", m.group(1).lower()).split())], text)


def vocabulary() -> set[str]:
    """Every single word the table knows (forms and the words they mean): real words, never typos."""
    out: set[str] = set()
    for form, noun in (*ORGAN_WORDS.items(), *ABBREVIATIONS.items(), *BOTH_SIDES.items(), *SIDE_WORDS.items()):
        out.update(form.split())
        out.update(noun.split())
    return out
