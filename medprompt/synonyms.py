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


# The organs' names in German, French, Spanish, Italian and Portuguese -> the English noun: annotators type
# their own language's word for an organ ("Milz", "le foie", "riñón izquierdo"), which an English sentence
# embedding reads as nothing and the spelling matcher as a typo. Written with their accents; the plain-letter
# spellings a keyboard without them gives ("hígado" as "higado", "Speiseröhre" as "Speiseroehre") are added
# below (``_plain_spellings``). Words that are also English ("rate", "os", "rim") or common German words
# ("sein") are left out, or given only in a phrase ("la rate").
FOREIGN_WORDS: dict[str, str] = {
    # German
    "leber": "liver", "niere": "kidney", "nieren": "kidneys", "milz": "spleen", "magen": "stomach",
    "bauchspeicheldrüse": "pancreas", "gallenblase": "gallbladder", "harnblase": "urinary bladder",
    "blase": "bladder", "nebenniere": "adrenal", "nebennieren": "adrenals", "lunge": "lung", "lungen": "lungs",
    "speiseröhre": "esophagus", "hauptschlagader": "aorta", "bauchaorta": "abdominal aorta",
    "untere hohlvene": "inferior vena cava", "hohlvene": "vena cava", "pfortader": "portal vein",
    "milzvene": "splenic vein", "knochen": "bone", "skelett": "skeleton", "körper": "body", "gehirn": "brain",
    "hirntumor": "brain tumour", "brustkrebs": "breast cancer", "lebertumor": "liver tumour",
    "dickdarm": "colon", "darmkrebs": "colorectal cancer", "beidseits": "both", "beidseitig": "both",
    # French ("l'estomac": the article's "l" is no left side, see _ELIDED_RE)
    "foie": "liver", "rein": "kidney", "reins": "kidneys", "la rate": "the spleen", "de la rate": "of the spleen",
    "estomac": "stomach", "vésicule biliaire": "gallbladder", "vessie": "urinary bladder",
    "surrénale": "adrenal", "surrénales": "adrenals", "poumon": "lung", "poumons": "lungs",
    "œsophage": "esophagus", "oesophage": "esophagus", "aorte": "aorta",
    "veine cave inférieure": "inferior vena cava",
    "veine porte": "portal vein", "veine splénique": "splenic vein", "squelette": "skeleton", "corps": "body",
    "cerveau": "brain", "du sein": "of the breast", "tumeur": "tumour", "côlon": "colon",
    # Spanish
    "hígado": "liver", "riñón": "kidney", "riñones": "kidneys", "bazo": "spleen", "estómago": "stomach",
    "vesícula biliar": "gallbladder", "vejiga": "urinary bladder", "suprarrenal": "adrenal",
    "suprarrenales": "adrenals", "pulmón": "lung", "esófago": "esophagus", "vena porta": "portal vein",
    "vena esplénica": "splenic vein", "hueso": "bone", "huesos": "bones", "esqueleto": "skeleton",
    "cuerpo": "body", "cerebro": "brain", "de mama": "of the breast", "cáncer": "cancer",
    # Italian
    "fegato": "liver", "rene": "kidney", "reni": "kidneys", "milza": "spleen", "stomaco": "stomach",
    "colecisti": "gallbladder", "cistifellea": "gallbladder", "vescica": "urinary bladder", "surrene": "adrenal",
    "surrenale": "adrenal", "surrenali": "adrenals", "polmone": "lung", "polmoni": "lungs", "esofago": "esophagus",
    "vena cava inferiore": "inferior vena cava", "osso": "bone", "ossa": "bones", "scheletro": "skeleton",
    "corpo": "body", "cervello": "brain", "mammella": "breast",
    # "dx"/"sx" (destro/sinistro) as Italian reports side an organ; only after the organ: "dx" alone is a diagnosis
    "rene dx": "right kidney", "rene sx": "left kidney", "surrene dx": "right adrenal", "surrene sx": "left adrenal",
    "surrenale dx": "right adrenal", "surrenale sx": "left adrenal",
    # Portuguese
    "fígado": "liver", "rins": "kidneys", "baço": "spleen", "bexiga": "urinary bladder", "pulmão": "lung",
    "pulmões": "lungs", "esôfago": "esophagus",
    # the sides ("Niere links", "rein gauche", "riñón izquierdo"); not "droit" (a right, in law), which only the
    # French feminine "droite" stands in for
    "links": "left", "linke": "left", "linken": "left", "linker": "left", "linkes": "left",
    "rechts": "right", "rechte": "right", "rechten": "right", "rechter": "right", "rechtes": "right",
    "gauche": "left", "droite": "right", "izquierdo": "left", "izquierda": "left", "derecho": "right",
    "derecha": "right", "sinistro": "left", "destro": "right", "destra": "right", "esquerdo": "left",
    "esquerda": "left", "direito": "right", "direita": "right",
}


def _plain_spellings(table: dict[str, str]) -> dict[str, str]:
    """``table`` with each form also spelt without its accents ("hígado" -> "higado") and, for German, with
    umlauts written out ("Speiseröhre" -> "speiseroehre"), as keyboards without them type it."""
    import unicodedata

    out = dict(table)
    for form, noun in table.items():
        german = form.replace("ä", "ae").replace("ö", "oe").replace("ü", "ue").replace("ß", "ss")
        for plain in (german, form.replace("œ", "oe")):
            plain = "".join(c for c in unicodedata.normalize("NFKD", plain) if not unicodedata.combining(c))
            if plain != noun:  # "côlon" spelt plain is the English word itself: nothing to read
                out.setdefault(plain, noun)
    return out


FOREIGN_WORDS = _plain_spellings(FOREIGN_WORDS)
# Every word that says a side, in any language the table reads ("lt", "sinister", "links", "gauche").
SIDE_FORMS = frozenset(SIDE_WORDS) | {f for f, n in FOREIGN_WORDS.items() if n in ("left", "right", "both")}


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
    "dcis": "ductal carcinoma in situ", "gtv": "gross tumour volume", "pls": "please", "plz": "please",
}


def _pattern(table: dict[str, str]) -> re.Pattern[str]:
    # Longest forms first so "vesica fellea" wins over any one-word form inside it.
    forms = sorted(table, key=len, reverse=True)
    return re.compile(r"(?<![a-z0-9])(" + "|".join(r"[\s_.-]+".join(map(re.escape, f.split())) for f in forms)
                      + r")(?![a-z0-9])", re.IGNORECASE)


_FORMS = {**ORGAN_WORDS, **FOREIGN_WORDS, **ABBREVIATIONS, **BOTH_SIDES,
          **{k: v for k, v in SIDE_WORDS.items() if k != v}}
_FORM_RE = _pattern(_FORMS)


# Clinical shorthand with a slash, read before the sides: the "r" of "r/o" (rule out) is no right side, nor the
# "s" of "s/p" (status post) anything.
_SLASHED = {"r/o": "rule out", "s/p": "status post", "c/o": "complaining of", "h/o": "history of",
            "b/l": "bilateral"}  # "b/l kidneys": both, not the left ones
_SLASHED_RE = re.compile(r"(?<![a-z0-9])(" + "|".join(map(re.escape, _SLASHED)) + r")(?![a-z0-9])", re.IGNORECASE)
# French and Italian elide the article before a vowel ("l'estomac", "l'aorte", "dell'esofago"): its "l" is no side.
_ELIDED_RE = re.compile(r"(?<![a-z0-9])(?:l|d|dell|nell|all)['’](?=[a-zà-ÿœ])", re.IGNORECASE)
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
    text = _ELIDED_RE.sub("", text)
    text = _COUINAUD_RE.sub(r"\1 liver \2", text)
    text = _RADIOTHERAPY_RE.sub("radiotherapy", text)
    return _FORM_RE.sub(lambda m: _FORMS[" ".join(re.sub(r"[_.-]", " ", m.group(1).lower()).split())], text)


def vocabulary(foreign: bool = True) -> set[str]:
    """Every single word the table knows (forms and the words they mean): real words, never typos. Without
    ``foreign``, the words of other languages are left out: those are no spelling an English typo was meant to
    be ("nicer" is not "Niere")."""
    out: set[str] = set()
    for form, noun in (*ORGAN_WORDS.items(), *(FOREIGN_WORDS.items() if foreign else ()), *ABBREVIATIONS.items(),
                       *BOTH_SIDES.items(), *SIDE_WORDS.items()):
        out.update(form.split())
        out.update(noun.split())
    return out
