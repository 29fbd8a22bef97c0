"""Free-text prompt resolution by text-embedding similarity to every phrase of every class.

A prompt's score for a class is its best cosine similarity to any of that class's phrases (name,
aliases, descriptions): one close description is evidence enough, and averaging would punish
classes described from several angles. Sides are decided by words, not by the embedding, which
barely separates "left kidney" from "right kidney": a sided class is eligible only when the prompt
names its side, and a class covering both sides (``kidneys``) wins when no side is named.
A class named after a spatial preposition ("the pouch *under the liver*", "*beneath the right lobe
of the liver*") is a landmark, not the target, and is set aside. A prompt is read twice, as written
and in plain nouns (``medprompt.synonyms``: "left renal organ" -> "left kidney organ"), and each
class keeps its better score; the classes' aliases are indexed in plain nouns too ("ventriculus",
Latin for the stomach, reads like the heart's ventricles). A prompt that lists classes ("liver and
spleen") is an error, not one of them. Embeddings of misspelt words are noise ("livr" reads like
the spleen), so a prompt whose spelling, corrected, names another class than its reading is an
error naming both, not a guess. Only a token that is no word is corrected: a word of the catalog,
of the synonym table, of the other-anatomy list or of the encoder's own vocabulary is never a typo
("renal" is not a misspelt "adrenal"). Anatomy that no class describes ("prostate") is refused by
comparing the prompt with a reference list of other anatomy (``OTHER_ANATOMY``), not drafted as
the nearest class: by a margin, unless the prompt spells such anatomy and no class word ("the heart
and its chambers"), when the nearer reading decides. Where the embedding cannot tell neighbours apart
(within ``WORD_TIE``), the words decide: the class whose own phrases hold the prompt's descriptive words.
What a prompt gives as a reason ("removed for stones", "; outline the mass") is not what it asks for.
What its first noun phrase names is: anatomy no class describes, or what is no anatomy at all
(``OTHER_CONTENT``: a catheter, the CT table, an artefact), spelt there is refused by name however near a
class the whole sentence reads ("the left renal vein crossing in front of the aorta" is not the left kidney).
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import numpy as np

from medprompt import synonyms
from medprompt.errors import PromptError
from medprompt.text.encoders import MINILM_KEY, TextEncoder, class_texts
from medprompt.wording import DRAWING_WORDS

if TYPE_CHECKING:
    from medprompt.catalog import PromptCatalog, PromptEntry

# Below this best similarity a prompt names nothing in the catalog. Per encoder, because each
# has its own similarity scale (other encoders have no floor until calibrated). MiniLM: just above
# the best similarity of every prompt in tests/data/paraphrases.yaml's `unrelated` list (max 0.41)
# and below all correct paraphrases but one (0.39; the next is 0.48); benchmarks/paraphrases.py.
SIMILARITY_FLOORS: dict[str, float] = {MINILM_KEY: 0.42}
SIDES = synonyms.SIDE_WORDS
NEAREST = 3
# Words after which a class name is a landmark ("the gland above the left kidney"): spatial only;
# "of"/"in" are left out because "wall of the stomach" and "tumour in the liver" name the target.
# Clinical wording says the same with a direction and "to" ("posterior to the pancreas", "superomedial to
# the upper pole": DIRECTIONS) or a side and "of" ("left of the IVC"); where an extent ends ("down to the iliac
# bifurcation", "from the splenic hilum to the porta hepatis") is not the target either. What a prompt excludes
# ("excluding the airways") is left out before it is read (``medprompt.negation``).
RELATIONS = tuple(r.split() for r in (
    "next to", "in front of", "on top of", "close to", "after", "before", "near", "under", "underneath",
    "beneath", "below", "above", "over", "behind", "beside", "alongside", "between", "around", "from",
    "into", "toward", "towards", "adjacent to", "abutting", "along", "down to", "up to", "out of", "stop at",
    "stopping at", "ending at", "until"))
# What a structure is said to take in with it ("the body outline including skin and subcutaneous fat"): other
# anatomy named so is part of the target, not the target (``_other_as_landmark``).
PART_RELATIONS = (["including"], ["with"], ["plus"])
DIRECTIONS = re.compile(r"(?:antero|postero|supero|infero)?(?:anterior|posterior|superior|inferior|lateral|medial"
                        r"|dorsal|ventral|cranial|caudal|deep|superficial)|(?:antero|postero|supero|infero)"
                        r"(?:medial|lateral)")
DETERMINERS = frozenset("the a an both each its their his her my your our patient s left right".split())
# How much closer to an OTHER_ANATOMY entry than to every class a prompt must be to be refused:
# just above the largest such lead among the correctly resolved development paraphrases (0.046,
# "HCC nodule" vs "pulmonary nodule"); benchmarks/paraphrases.py prints these leads.
OTHER_MARGIN = 0.05
# Below this lead of the nearest class over the next, a sentence embedding's order is noise on the verbs and
# adjectives that tell neighbours apart (MiniLM reads "the organ that makes bile" 0.82 like the gallbladder's
# "stores ... the bile made by the liver" and 0.80 like the liver's "makes bile"): the classes within it are
# then told apart by which one's own phrases share the prompt's descriptive words, rarer words weighing more
# (``word_evidence``; dense and word retrieval combined as search engines combine them). Set on the
# development paraphrases (71 -> 74 of 76 from 0.05 to 0.09, 73 at 0.12, where a correct one broke); five
# independently written sets peak at the same 0.05-0.09 (BENCHMARKS.md, "Paraphrases by writers who saw
# only the class list").
WORD_TIE = 0.07
# The direction each place word gives (``relation_words``); compounds ("superomedial") by their first part.
PLACE_WORDS = {
    **dict.fromkeys("above over top atop superior cranial superomedial superolateral capping".split(), "above"),
    **dict.fromkeys("below under underneath beneath inferior caudal inferomedial inferolateral".split(), "below"),
    **dict.fromkeys("behind posterior dorsal posteromedial posterolateral".split(), "behind"),
    **dict.fromkeys("front anterior ventral anteromedial anterolateral".split(), "front"),
}
# Words that say nothing of which structure is meant: function words, and how it was imaged ("on CT").
NOT_DESCRIPTIVE = frozenset(
    "up down out off on at by with without within inside outside onto through this these those there here it they "
    "them we you i me get gets got go goes going come comes can could may might will would should do does did have "
    "has had be been being is are was were very so such also just only often usually then than one two each every "
    "all any some other ct mr mri scan scans image images imaging ultrasound sonography radiograph x ray".split())
COVERED = 0.9  # similarity at which a class phrase is taken to describe an OTHER_ANATOMY entry
MISSPELLING = 0.8  # difflib ratio above which a non-word is taken as an attempt at a catalog word
MIN_TYPO_CHARS = 4  # shorter tokens (ivc, lt, ct) are abbreviations, too short to correct
# Anatomy and findings that the shipped prompt files do not describe. A prompt for one of these
# must be refused, not drafted as its nearest catalog class ("prostate" is not the bladder, "the
# colon" is not a colon tumour): such prompts pass the floor above, because anatomy reads like
# anatomy. A prompt closer to one of these than to every class is refused, naming what it read
# like. An entry that a prompt file covers (a user's own class) is dropped from the list.
OTHER_ANATOMY = (
    # head and neck
    "brain", "cerebrum", "cerebellum", "brainstem", "brain tumour", "brain metastasis", "pituitary gland",
    "eye", "orbit", "optic nerve", "inner ear", "nasal cavity", "paranasal sinus", "teeth", "tongue",
    "parotid gland", "submandibular gland", "thyroid gland", "larynx", "pharynx", "carotid artery",
    "jugular vein", "lymph node", "hippocampus", "thalamus", "basal ganglia", "corpus callosum",
    # chest
    "heart", "myocardium", "left ventricle", "atrium", "pericardium", "coronary artery",
    "pulmonary artery", "pulmonary trunk", "superior vena cava", "trachea", "bronchus", "thymus", "breast",
    "pulmonary nodule", "lung cancer", "pneumothorax", "pleural effusion", "diaphragm", "cardiac silhouette",
    # abdomen and pelvis, beyond the catalog
    "duodenum", "small bowel", "jejunum", "ileum", "colon", "sigmoid colon", "rectum", "appendix",
    "common bile duct", "ureter", "prostate", "prostate gland", "seminal vesicle", "uterus", "ovary", "vagina",
    "testis",
    "iliac artery", "iliac vein", "renal artery", "renal vein", "hepatic artery", "hepatic vein", "splenic artery",
    "femoral artery", "femoral vein", "popliteal vein", "deep vein thrombosis",
    "coeliac trunk", "superior mesenteric artery", "superior mesenteric vein", "mesentery", "peritoneum",
    "abdominal wall", "pancreatic tumour",
    "kidney tumour", "kidney cyst", "bladder tumour", "stomach cancer", "adrenal tumour", "splenic lesion",
    "gallbladder cancer", "free fluid", "free air",
    "urethra", "pancreatic duct", "cystic duct", "hepatic duct", "duct", "celiac trunk", "hepatic flexure",
    "splenic flexure",
    # muscles, nerves, fat
    "muscle", "skeletal muscle", "psoas muscle", "gluteal muscle", "paraspinal muscles", "quadriceps muscle",
    "spinal cord", "intervertebral disc", "cartilage", "fat", "subcutaneous fat", "visceral fat",
    "nerve", "sciatic nerve", "brachial plexus", "multiple sclerosis plaque", "inguinal canal",
)
# What else an image shows (devices, the scanner, artefacts, burnt-in text): annotators ask for it when they mean
# to hide or exclude it, and no class may be drafted in its place. Refused as other anatomy is, but its words
# ("tube", "line") stay evidence for the classes they also describe (``ClassIndex.other_words``).
OTHER_CONTENT = (
    "ct table", "scanner table", "couch", "catheter", "central line", "iv line", "cannula", "needle", "stent",
    "pacemaker", "surgical clip", "clip", "staples", "ivc filter", "hardware", "screw", "prosthesis", "implant",
    "nasogastric tube", "ng tube", "endotracheal tube", "breathing tube", "feeding tube", "surgical drain",
    "artefact", "artifact", "motion blur", "blurring", "ghosting", "image noise", "text annotation", "caliper",
    "ruler", "radiology report", "ecg electrode", "electrode", "ecg lead",
)

# What lay prompts say of common other anatomy instead of naming it ("the organ that pumps blood"): a
# bare name reads less like a function than a class's descriptions do, so without these such a prompt
# was drawn as the class nearest in meaning (the heart as the aorta). Each phrase is one more vector
# of its entry; the entry is refused by name.
OTHER_FUNCTIONS: dict[str, tuple[str, ...]] = {
    "brain": ("the organ that thinks, inside the skull",),
    "eye": ("the organ of sight",),
    "thyroid gland": ("the butterfly-shaped gland in the neck that makes thyroid hormone",),
    "heart": ("the organ that pumps blood around the body",),
    "trachea": ("the windpipe that carries air down to the lungs",),
    "breast": ("the gland of the chest that makes milk",),
    "small bowel": ("the long coiled tube between the stomach and the colon that absorbs nutrients from food",),
    "colon": ("the large bowel that absorbs water and forms stool",),
    "rectum": ("the last part of the bowel, where stool is held before it is passed",),
    "appendix": ("the small finger-shaped pouch at the start of the colon",),
    "ureter": ("the tube that carries urine down from a kidney to the bladder",),
    "prostate": ("the male gland that makes fluid for semen",
                 "the walnut-sized gland below the bladder in men, around the urethra"),
    "uterus": ("the womb, the organ where a baby grows during pregnancy",),
    "ovary": ("the female organ that makes eggs",),
    "testis": ("the male organ that makes sperm",),
    "spinal cord": ("the bundle of nerves running down inside the spine",),
}

# Words that ask for a finding in an organ, not the organ. A class is a finding when its name holds
# one (breast_tumor, liver_tumour, a user's kidney_cyst). A prompt that asks for a finding is never
# drawn as an organ ("a lesion of the spleen" is not the spleen) nor as another organ's finding
# ("tumour of the heart" is not breast_tumor): see ``finding_mismatch``.
FINDING_WORDS = frozenset(
    "tumour tumor tumours tumors cancer cancers carcinoma carcinomas lesion lesions mass masses nodule nodules "
    "metastasis metastases neoplasm neoplasms malignancy lump lumps cyst cysts polyp polyps abscess abscesses "
    "haematoma hematoma haematomas hematomas infarct infarcts infarction stone stones calculus calculi "
    "fracture fractures growth growths metastatic cancerous malignant neoplastic tumorous tumoural spot spots "
    "adenoma adenomas thrombus thrombi clot clots gallstone gallstones ascites ulcer ulcers pseudocyst "
    "pseudocysts dissection dissections adenocarcinoma adenocarcinomas haemorrhage hemorrhage haemorrhages "
    "hemorrhages plaque plaques pneumonia consolidation consolidations effusion effusions hernia hernias "
    "emphysema atelectasis embolus emboli embolism lymphadenopathy "
    "gtv".split())  # GTV: a radiotherapy structure's gross tumour volume

# The findings a tumour class draws, focal lesions (cysts too: breast lesion sets label them): a tumour class
# (brain_tumor, liver_tumour) is no haemorrhage, abscess, haematoma or stone of its organ (``finding_mismatch``).
TUMOUR_WORDS = frozenset(
    "tumour tumor tumours tumors cancer cancers carcinoma carcinomas adenocarcinoma adenocarcinomas lesion lesions "
    "mass masses nodule nodules metastasis metastases metastatic neoplasm neoplasms neoplastic malignancy malignant "
    "lump lumps growth growths cancerous tumorous tumoural spot spots adenoma adenomas polyp polyps cyst cysts".split())
# Other anatomy that is part of an organ some finding class is named by: a tumour of the sigmoid colon is a colon
# tumour, a mass in the cerebellum a brain tumour (``finding_class_of_other``).
PART_OF = {"sigmoid colon": "colon", "hepatic flexure": "colon", "splenic flexure": "colon", "cerebrum": "brain",
           "cerebellum": "brain", "brainstem": "brain"}

# Words after which a prompt says why a structure is asked or what it holds, not what it is (``asked_part``),
# and the words of a request itself ("look for lesions in the liver" asks for the lesions).
CLAUSE_WORDS = frozenset("for to where which that who whose when while harbouring harboring containing "
                         "query because so full".split())  # "the one full of stones", "the left adrenal, query adenoma"
ASKING_WORDS = DRAWING_WORDS | frozenset("look looking search check checking find identify detect locate please need "
                                         "needs want".split())

# Words that name a part of whatever the rest of the phrase names: "stomach wall" is the stomach's wall, and
# shares only "wall" with the abdominal wall that MiniLM reads it like (0.90). See ``part_of_class``.
PART_WORDS = frozenset("wall walls lining capsule surface cortex mucosa".split())


OPPOSITES = (("superior", "inferior"), ("upper", "lower"), ("anterior", "posterior"), ("left", "right"),
             ("internal", "external"))


def _opposed(wa: set[str], wb: set[str]) -> bool:
    """Whether two phrases' words name opposite ends of a pair ("superior" in one, "inferior" in the other)."""
    return any((x in wa and y in wb) or (y in wa and x in wb) for x, y in OPPOSITES)


def sides(text: str) -> set[str]:
    """The body sides a text names ('left', 'right'), from whole words only."""
    from medprompt.catalog import words

    return {SIDES[w] for w in words(text.replace("_", " ")) if w in SIDES}


def stem(name: str) -> tuple[str, ...]:
    """A class name without its side, plural folded: kidney_left, kidneys -> ('kidney',)."""
    from medprompt.catalog import words

    return tuple(w for w in words(name.replace("_", " ")) if w not in SIDES)


@dataclass(frozen=True)
class ClassIndex:
    """Every phrase vector of every class of one catalog, and of the other anatomy, for one encoder."""

    names: tuple[str, ...]      # class of each row of ``vectors``
    vectors: np.ndarray         # (phrases, dim) unit vectors
    others: tuple[str, ...]     # OTHER_ANATOMY and OTHER_CONTENT entries the catalog does not cover
    other_vectors: np.ndarray   # (rows, dim) unit vectors: each entry's name and its OTHER_FUNCTIONS phrases
    other_rows: tuple[str, ...]  # the entry of each row of ``other_vectors``
    phrase_sides: tuple[frozenset[str], ...]  # body sides each row of ``vectors`` names (``scores``)
    words: frozenset[str] = frozenset()  # never misspellings (``known_words``)
    class_words: frozenset[str] = frozenset()  # content words of the class names and aliases (``names_other``)
    # each class phrase's (and keyword's) descriptive words and the sides it names (``described_words``)
    described: tuple[tuple[str, frozenset[str], frozenset[str]], ...] = ()
    stems: tuple[tuple[str, ...], ...] = ()  # every class name without its side (``relation_words``)
    # descriptive words of the other-anatomy names: a class's phrase that says one names a landmark, not the class
    other_words: frozenset[str] = frozenset()

    @classmethod
    def build(cls, entries: list[PromptEntry], encoder: TextEncoder) -> "ClassIndex":
        from medprompt.catalog import GENERIC_WORDS, normalise, tokens, words

        owners: list[str] = []
        texts: list[str] = []
        for entry in entries:
            # Aliases in plain nouns, as a prompt's second reading is: an embedding reads Latin
            # poorly, and "ventriculus" (stomach) sits beside the heart's ventricles.
            phrases = [synonyms.canonical(t) if t in entry.aliases else t for t in class_texts(entry)]
            texts += phrases
            owners += [entry.name] * len(phrases)
        vectors = encoder.encode(texts)
        spelt = {normalise(t) for e in entries for t in (e.name, *e.aliases)}
        others = [o for o in OTHER_ANATOMY + OTHER_CONTENT if normalise(o) not in spelt]
        other_vectors = encoder.encode(others) if others else np.zeros((0, vectors.shape[1]), np.float32)
        # A class phrase that says the same thing (a user's own "thyroid" file) covers the entry, unless
        # the two name opposite ends ("inferior vena cava" reads 0.91 like "superior vena cava").
        sims = other_vectors @ vectors.T
        phrase_words = [set(tokens(t)) for t in texts]
        for i, other in enumerate(others):
            other_words = set(tokens(other))
            for j, words_j in enumerate(phrase_words):
                if _opposed(other_words, words_j):
                    sims[i, j] = -1.0
        covered = sims.max(axis=1) >= COVERED if len(others) else np.zeros(0, bool)
        kept = [o for o, c in zip(others, covered) if not c]
        rows = [o for o in kept for _ in range(1 + len(OTHER_FUNCTIONS.get(o, ())))]
        phrases = [p for o in kept for p in OTHER_FUNCTIONS.get(o, ())]
        extra = encoder.encode(phrases) if phrases else np.zeros((0, vectors.shape[1]), np.float32)
        by_name = dict(zip(others, other_vectors))
        it = iter(extra)
        row_vectors = [v for o in kept for v in (by_name[o], *(next(it) for _ in OTHER_FUNCTIONS.get(o, ())))]
        class_words = {w for e in entries for t in (e.name.replace("_", " "), *e.aliases)
                       for w in words(t)} - set(SIDES) - GENERIC_WORDS
        stems = tuple(sorted({stem(e.name) for e in entries if stem(e.name)}))
        return cls(tuple(owners), vectors, tuple(kept),
                   np.stack(row_vectors) if row_vectors else np.zeros((0, vectors.shape[1]), np.float32),
                   tuple(rows), tuple(frozenset(sides(t)) for t in texts), known_words(entries, encoder),
                   frozenset(class_words),
                   tuple((e.name, frozenset(descriptive_words(t, class_words) | relation_words(t, stems)),
                          frozenset(sides(t))) for e in entries for t in (*class_texts(e), *e.keywords)),
                   stems, frozenset(descriptive_words(" ".join(o for o in others if o in OTHER_ANATOMY),
                                                      class_words)))

    def nearest_other(self, vector: np.ndarray, aside: Iterable[str] = ()) -> tuple[str, float] | None:
        """The other-anatomy entry closest to ``vector`` and its similarity, entries in ``aside`` left out."""
        aside = set(aside)
        keep = [i for i, o in enumerate(self.other_rows) if o not in aside]
        if not keep:
            return None
        sims = self.other_vectors[keep] @ vector
        i = int(np.argmax(sims))
        return self.other_rows[keep[i]], float(sims[i])

    def scores(self, vector: np.ndarray, named: set[str] | frozenset[str] = frozenset()) -> dict[str, float]:
        """Best cosine similarity of ``vector`` to each class's phrases. When the prompt names one side,
        a phrase that names only the other side does not count: "the ribs on the right" is not the spleen
        "under the ribs on the left side", however alike the two read."""
        sims = self.vectors @ vector
        best: dict[str, float] = {}
        opposite = set(SIDES.values()) - set(named) if len(named) == 1 else set()
        for name, s, own in zip(self.names, sims.tolist(), self.phrase_sides):
            if own and own <= opposite:
                continue
            if s > best.get(name, -2.0):
                best[name] = s
        return best


def fold(word: str) -> str:
    """A word without its inflection, so "makes" meets "make" and "filters" "filter" (no dictionary: the
    same crude rule on both sides is all a comparison of words needs)."""
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    elif len(word) > 4 and word.endswith("ed"):
        word = word[:-2]
    return word.rstrip("e") if len(word) > 3 else word


def descriptive_words(text: str, class_words: Iterable[str]) -> set[str]:
    """The folded words of ``text`` that describe rather than name: not stop, side or generic words, nor
    words of any class's name or alias (names are the embedding's and the landmark rules' to read), nor
    finding words ("lump" says a finding is asked, which the finding rules read, not whose), nor the words
    of a request ("outline", "checking")."""
    from medprompt.catalog import GENERIC_WORDS, REQUEST_WORDS, words

    skip = (set(class_words) | set(SIDES) | GENERIC_WORDS | FINDING_WORDS | DETERMINERS | NOT_DESCRIPTIVE
            | ASKING_WORDS | REQUEST_WORDS)
    return {fold(w) for reading in readings(text) for w in words(reading) if w not in skip}


def described_words(index: ClassIndex, text: str) -> dict[str, set[str]]:
    """Each class's descriptive words, from the phrases that do not name only the side opposite to the one the
    prompt names, as ``ClassIndex.scores`` reads them: "the curved organ in the upper left tucked against the
    ribs" does not share "tucked" and "ribs" with the liver's "tucked under the right ribs"."""
    named = sides(text)
    opposite = set(SIDES.values()) - named if len(named) == 1 else set()
    out: dict[str, set[str]] = {}
    for name, phrase_words, phrase_sides in index.described:
        bucket = out.setdefault(name, set())
        if not (phrase_sides and phrase_sides <= opposite):
            bucket |= phrase_words
    return out


def relation_words(text: str, stems: Iterable[tuple[str, ...]]) -> set[str]:
    """Where a text places something, as words ("above:kidney" for "on top of the left kidney", "superomedial
    to each kidney"): each class name, sides aside (``stems``), spelt as a landmark, with the direction of the
    nearest place word before it (``PLACE_WORDS``); "beside" when none says more."""
    from medprompt.catalog import tokens

    out = set()
    for reading in readings(text):
        prompt = tokens(reading)
        for stem_words in stems:
            target = list(stem_words)
            for i in spelt_indices(prompt, target):
                if _relation_before(prompt, i):
                    near = [PLACE_WORDS.get(w) for w in prompt[max(0, i - 7):i]]
                    direction = next((d for d in reversed(near) if d), "beside")
                    out.add(f"{direction}:{' '.join(target)}")
    return out


def word_weights(described: dict[str, set[str]], asked: Iterable[str]) -> dict[str, float]:
    """log(classes / classes whose phrases hold the word) of each asked word: a word every class uses weighs
    nothing, one that no class uses weighs as the rarest class word does."""
    import math

    n = len(described)
    return {w: math.log(n / max(1, sum(w in v for v in described.values()))) for w in asked}


def word_evidence(index: ClassIndex, text: str, classes: Iterable[str]) -> dict[str, float]:
    """How much of the prompt's descriptive wording each of ``classes`` own phrases hold: the sum over the
    shared words of log(classes / classes whose phrases hold the word), so a word every class uses counts
    nothing; other anatomy's names count for no class ("the cardiac part of the stomach": the aorta's phrases
    say "heart" as where it starts)."""
    described = described_words(index, text)
    asked = (descriptive_words(text, index.class_words) | relation_words(text, index.stems)) - index.other_words
    weight = word_weights(described, asked)
    return {c: sum(weight[w] for w in asked if w in described.get(c, ())) for c in classes}


def words_favour_class(index: ClassIndex, text: str, name: str, other: str) -> bool:
    """Whether the class ``name``'s phrases hold more of the prompt's descriptive words than the other-anatomy
    entry's name and lay phrases (``OTHER_FUNCTIONS``) do: "the bean-shaped organ that filters blood" reads
    0.73 like "the organ that pumps blood", and only the kidney's phrases say "bean-shaped" and "filters".
    Never when the prompt spells the entry's own words outside a landmark: then it names that anatomy. A
    word no class uses counts for the other entry as the rarest class word would, and a word of any other
    anatomy's name counts for no class ("the chambers of the heart": the lungs' phrases say "heart" as a
    landmark)."""
    from medprompt.catalog import tokens

    own = set(tokens(other)) - index.class_words - set(SIDES)
    prompt = tokens(text)
    if any(w in own and not _in_landmark(prompt, i) for i, w in enumerate(prompt)):
        return False  # it names that anatomy ("the heart beside the aorta")
    asked = descriptive_words(text, index.class_words)
    described = described_words(index, text)
    theirs = descriptive_words(" ".join([other, *OTHER_FUNCTIONS.get(other, ())]), index.class_words)
    weight = word_weights(described, asked)
    ours = sum(weight[w] for w in asked - index.other_words if w in described.get(name, ()))
    return ours > sum(weight[w] for w in asked if w in theirs)


def word_tie_break(index: ClassIndex, text: str, ranked: list[tuple[str, float]],
                   preferred: Iterable[str] = ()) -> str:
    """The nearest class, or among those within ``WORD_TIE`` of it the one whose phrases share most of the
    prompt's descriptive words (the nearest when none shares more); ``preferred`` classes first (those that
    can draw the finding a prompt asks for)."""
    head = [n for n, s in ranked if s >= ranked[0][1] - WORD_TIE]
    if len(head) < 2:
        return ranked[0][0]
    evidence = word_evidence(index, text, head)
    preferred = set(preferred)
    return max(head, key=lambda n: (n in preferred, evidence[n], -head.index(n)))


def eligible(catalog: PromptCatalog, text: str) -> list[str]:
    """Classes the prompt's side words allow (see the module docstring)."""
    named = sides(text)
    bilateral = {stem(n) for n in catalog.names if not sides(n)}
    sided = {(stem(n), s) for n in catalog.names for s in sides(n)}
    out = []
    for name in catalog.names:
        own = sides(name)
        if own:
            # A sided class needs its side named alone; without it, it yields to a both-sides class.
            if named == own or (len(named) != 1 and stem(name) not in bilateral):
                out.append(name)
        elif not (len(named) == 1 and (stem(name), next(iter(named))) in sided):
            out.append(name)  # a both-sides class yields when one side is named and that side exists
    return out


def known_words(entries: Iterable[PromptEntry], encoder: TextEncoder | None = None) -> frozenset[str]:
    """Words that are never misspellings: every word of the classes' texts, the synonym table,
    the other-anatomy list and stop words, plus the whole words of the encoder's vocabulary."""
    from medprompt.catalog import STOP_WORDS, tokens

    texts = [t for e in entries for t in (e.name, *e.aliases, *e.keywords, *e.descriptions)]
    out = {w for t in (*texts, *OTHER_ANATOMY, *OTHER_CONTENT) for w in tokens(t.replace("_", " "))}
    out |= synonyms.vocabulary() | STOP_WORDS
    vocabulary = getattr(encoder, "vocabulary", None)
    return frozenset(out | (vocabulary() if callable(vocabulary) else frozenset()))


def spelling_fixes(catalog: PromptCatalog, text: str, known: frozenset[str]) -> dict[str, str]:
    """Tokens of ``text`` that are not in ``known`` but nearly spell a class's word: {token: correction}.

    Corrections are words of class names and aliases (joined ones too: 'leftkidney' -> 'left
    kidney') and of the synonym table; "splen" -> "spleen", never "renal" -> "adrenal".
    """
    from medprompt.catalog import tokens, words

    spellings: dict[str, str] = {}
    for entry in catalog.entries.values():
        for spelling in (entry.name.replace("_", " "), *entry.aliases):
            parts = tokens(spelling)
            spellings["".join(parts)] = " ".join(parts)
            spellings.update((w, w) for w in parts)
    spellings.update((w, w) for w in synonyms.vocabulary(foreign=False))
    candidates = [s for s in spellings if len(s) >= MIN_TYPO_CHARS]
    fixes: dict[str, str] = {}
    for token in tokens(text):
        if len(token) < MIN_TYPO_CHARS or not token.isalpha() or token in known or set(words(token)) <= known:
            continue
        hit = difflib.get_close_matches(token, candidates, n=1, cutoff=MISSPELLING)
        if hit:
            fixes[token] = spellings[hit[0]]
    return fixes


def corrected(text: str, fixes: dict[str, str]) -> str:
    """``text`` with each misspelt token replaced (whole tokens, any case)."""
    return re.sub(r"[A-Za-z0-9]+", lambda m: fixes.get(m.group(0).lower(), m.group(0)), text)


def readings(text: str) -> list[str]:
    """The prompt as written and, when it uses medical word forms, in plain nouns (see the docstring)."""
    plain = synonyms.canonical(text)
    return [text] if plain == text else [text, plain]


def says_where(text: str) -> bool:
    """Whether ``text`` places something: a spatial preposition (``RELATIONS``) or a direction ("lateral")."""
    from medprompt.catalog import tokens

    toks = tokens(text)
    return (any(toks[i:i + len(r)] == r for r in RELATIONS for i in range(len(toks)))
            or any(DIRECTIONS.fullmatch(w) for w in toks))


def landmarks(catalog: PromptCatalog, text: str) -> set[str]:
    """Classes the prompt names right after a spatial preposition (determiners and sides skipped), by name,
    alias or their name without its side ("above the kidney on the left": every kidney class is the place)."""
    return {entry.name for entry in catalog.entries.values()
            if any(_after_relation(text, spelling)
                   for spelling in (entry.name.replace("_", " "), " ".join(stem(entry.name)), *entry.aliases))}


def named_in(catalog: PromptCatalog, phrases: list[list[str]]) -> set[str]:
    """Classes whose name or an alias ``phrases`` (first noun phrases, ``heads``) spell: what a prompt asks for is
    no landmark, even when it names the class again as a place ("the whole patient outline, down to the skin")."""
    from medprompt.catalog import tokens

    return {entry.name for entry in catalog.entries.values()
            for spelling in (entry.name.replace("_", " "), *entry.aliases)
            if any(spelt_indices(head, tokens(spelling)) for head in phrases)}


def _after_relation(text: str, spelling: str, relations: tuple[list[str], ...] = RELATIONS) -> bool:
    """Whether ``text`` names ``spelling`` right after a spatial preposition ("... into the small bowel")."""
    from medprompt.catalog import tokens

    prompt, target = tokens(text), tokens(spelling)
    return any(_relation_before(prompt, i, relations=relations) for i in spelt_indices(prompt, target))


def _other_as_landmark(index: ClassIndex, text: str, other: str) -> bool:
    """Whether ``text`` names the other-anatomy entry ``other`` only as a landmark: spelt whole after a
    spatial preposition, or each of its words that the prompt spells within a landmark's phrase (``_in_landmark``)
    — its own words (those no class name shares: "iliac" of "iliac vein") when it spells any ("venous channel
    from the iliac confluence to the right atrium"), else the words it shares with a class ("the vessel left of
    the inferior vena cava" reads like the superior vena cava through the landmark's "vena cava")."""
    from medprompt.catalog import STOP_WORDS, tokens

    if _after_relation(text, other, RELATIONS + PART_RELATIONS):
        return True
    prompt = tokens(text)
    named = [w for w in tokens(other) if w not in STOP_WORDS and w not in SIDES]
    own = [w for w in named if w not in index.class_words]
    at = [i for i, w in enumerate(prompt) if w in own] or [i for i, w in enumerate(prompt) if w in named]
    return bool(at) and all(_in_landmark(prompt, i) for i in at)


def _other_as_reason(text: str, other: str) -> bool:
    """Whether ``text`` names the other-anatomy entry ``other`` only after what it asks for, as the reason
    (``asked_part``): "the urine reservoir in the pelvis, OAR for prostate RT" asks for the bladder."""
    from medprompt.catalog import tokens

    prompt, target = tokens(text), tokens(other)
    head = asked_part(prompt)
    spelt = spelt_indices(prompt, target)
    return len(head) < len(prompt) and bool(spelt) and all(i >= len(head) for i in spelt)


def _in_landmark(prompt: list[str], i: int) -> bool:
    """Whether ``prompt[i]`` lies in a landmark's phrase: at most three words after a spatial preposition,
    with no clause between ("from the iliac confluence", "left of the inferior vena cava")."""
    for k in range(i, max(-1, i - 4), -1):
        if k < i and prompt[k] in CLAUSE_WORDS | {"and", "or"}:
            return False
        if _relation_before(prompt, k):
            return True
    return False


def _names_as_target(prompt: list[str], target: list[str]) -> bool:
    """Whether the prompt's tokens hold ``target`` somewhere not right after a spatial preposition."""
    return any(not _relation_before(prompt, i) for i in spelt_indices(prompt, target))


def spelt_indices(prompt: list[str], target: list[str]) -> list[int]:
    """Every index where ``prompt`` spells ``target`` (:func:`_spelt_at`): what each reading of a named
    thing (as the target, as a landmark, as the reason) starts from."""
    return [i for i in range(len(prompt) - len(target) + 1) if _spelt_at(prompt, i, target)]


def _spelt_at(prompt: list[str], i: int, target: list[str]) -> bool:
    """Whether ``prompt[i:]`` starts with ``target``, its last word also in the plural ("from the ureters",
    "renal arteries")."""
    n = len(target)
    if not n or i + n > len(prompt) or prompt[i:i + n - 1] != target[:-1]:
        return False
    last, word = prompt[i + n - 1], target[-1]
    return last in (word, word + "s", word + "es") or (word.endswith("y") and last == word[:-1] + "ies")


def _relation_before(prompt: list[str], i: int, listed: bool = True,
                     relations: tuple[list[str], ...] = RELATIONS) -> bool:
    """Whether the words before ``prompt[i]`` end in a spatial preposition, determiners and sides aside;
    a part of a landmark is a landmark ("under the right lobe of the liver"), and so is the next item of a
    list of landmarks ("posterior to the pancreas and splenic vessels", "near the left kidney and stomach":
    up to three words back)."""
    ends = [_skip(prompt, i)]
    if ends[0] >= 2 and prompt[ends[0] - 1] == "of":
        if prompt[ends[0] - 2] in SIDES or DIRECTIONS.fullmatch(prompt[ends[0] - 2]):
            return True  # "left of the IVC", "anterior of the spine"
        ends.append(_skip(prompt, ends[0] - 2))  # "under the right lobe of the liver"
        if ends[0] >= 3:
            ends.append(_skip(prompt, ends[0] - 3))  # "anteromedial to the upper pole of the left kidney"
    for j in ends:
        if any(prompt[max(0, j - len(r)):j] == r for r in relations):
            return True
        if j >= 2 and prompt[j - 1] == "to" and (DIRECTIONS.fullmatch(prompt[j - 2]) or "from" in prompt[:j - 1]):
            return True  # "posterior to the pancreas"; the end of "from the hilum to the porta hepatis"
    j = ends[0]
    if listed and j >= 2 and prompt[j - 1] in ("and", "or"):
        # An item with a determiner of its own may start a phrase of its own ("the fat around the kidneys
        # and the liver"), unless the preposition takes two ("between the throat and the stomach").
        if j == i or "between" in prompt[max(0, j - 6):j - 1]:
            return any(_relation_before(prompt, k, False, relations) for k in range(max(0, j - 4), j - 1))
    return False


def _skip(prompt: list[str], j: int) -> int:
    """Index before which ``prompt[j:]`` starts, once the determiners and sides before it are skipped."""
    while j > 0 and prompt[j - 1] in DETERMINERS:
        j -= 1
    return j


# What may stand between two class names that a prompt lists ("liver and spleen", "kidneys, liver").
LIST_GAP = re.compile(r"(?:[\s,;/&+]|\band\b|\bor\b|\bplus\b|\bthe\b|\bboth\b|\bas well as\b)+")
LIST_SEPARATOR = re.compile(r"[,;/&+]|\band\b|\bor\b|\bplus\b|\bas well as\b")  # "gastric body" is no list


def listed_classes(catalog: PromptCatalog, text: str) -> list[str]:
    """The classes a prompt lists by name or alias, joined by "and", "or", commas or slashes ("the liver
    and the spleen"), in order; empty when it lists fewer than two. One prompt draws one class, and
    an embedding of a list reads like one of its items, so a list is an error, not a silent pick.
    A name inside a longer one ("liver" in "liver tumour") and a landmark ("near the liver") do not count."""
    from medprompt.catalog import tokens

    for reading in readings(text):
        low = reading.lower()
        spans: list[tuple[int, int, str]] = []
        for entry in catalog.entries.values():
            # Each spelling also in plain nouns, as the second reading is: "splenic vein" is "spleen vein" there.
            spellings = (entry.name.replace("_", " "), *entry.aliases)
            for spelling in dict.fromkeys((*spellings, *map(synonyms.canonical, spellings))):
                parts = tokens(spelling)
                if not parts or set(parts) <= DETERMINERS:
                    continue  # "patient" (the body's alias) in "the gallbladder, patient has gallstones" is no item
                pattern = r"\b" + r"[\s_-]+".join(map(re.escape, parts)) + r"(?:e?s)?\b"
                for m in re.finditer(pattern, low):
                    before = tokens(low[:m.start()])
                    if not _relation_before(before, len(before)):
                        spans.append((m.start(), m.end(), entry.name))
        # A name inside a longer one is part of it: "liver" in "liver tumour".
        spans = sorted({sp for sp in spans
                        if not any(o[0] <= sp[0] and sp[1] <= o[1] and o[1] - o[0] > sp[1] - sp[0] for o in spans)})
        listed = [spans[0][2]] if spans else []
        for before, after in zip(spans, spans[1:]):
            gap = low[before[1]:after[0]]
            if after[2] != before[2] and LIST_GAP.fullmatch(gap) and LIST_SEPARATOR.search(gap):
                listed += [n for n in (before[2], after[2]) if n not in listed]
        if len(listed) >= 2:
            return listed
    return []


def names_other(index: ClassIndex, texts: list[str]) -> bool:
    """Whether a reading spells an other-anatomy entry (not as a landmark) and no other word of any
    class's name or alias: then the prompt itself says it asks for anatomy that no prompt file
    describes. Words inside the entry do not count for a class: "superior vena cava" is not the
    inferior one's "vena cava". A word a class shares with other anatomy elsewhere in the prompt
    ("gland", "breast") keeps the margin: the class may be meant."""
    from medprompt.catalog import words

    for text in texts:
        prompt = words(text)
        covered: set[int] = set()
        for other in index.others:
            target = words(other)
            for i in range(len(prompt) - len(target) + 1):
                if prompt[i:i + len(target)] == target and not _after_relation(text, other):
                    covered.update(range(i, i + len(target)))
        if covered and not index.class_words & {w for i, w in enumerate(prompt) if i not in covered}:
            return True
    return False


# Words that end the first noun phrase of a request: prepositions and conjunctions, negation, and the verbs and
# adverbs that start what is said of it ("the heart *sitting just above* the liver", ``head_phrase``).
HEAD_ENDS = frozenset("of in on at by with within inside and or but not no without versus vs just as "
                      "i we you he she they".split())  # a pronoun starts a clause: "the sac I take out"
HEAD_FILLERS = frozenset("just only can could you i we please kindly help now also if so then".split())
MASK_NOUNS = frozenset("label labels mask masks contour contours segmentation".split())
POINTING_WORDS = frozenset("it them that this those these one ones there where is are".split())
ING_NOUNS = frozenset("imaging lining opening bleeding swelling thickening filling ghosting blurring".split())


def head_phrase(prompt: list[str], class_words: frozenset[str] = frozenset()) -> list[str]:
    """The first noun phrase of what ``prompt`` asks for, request and determiners skipped: "segment the duodenum
    wrapping around the pancreatic head" -> [duodenum]. It ends where a preposition, a spatial relation, a
    clause, a pronoun or a verb ending in -ing starts (one that comes first, or before a class or finding word,
    describes: "the breathing tube", "an enhancing tumour"); after a possessive ("the heart's big artery") it
    starts again. Everything after it says where or why, which the landmark and reason rules read."""
    from medprompt.catalog import REQUEST_WORDS, words

    i = 0
    while i < len(prompt) and (prompt[i] in ASKING_WORDS | REQUEST_WORDS | DETERMINERS | HEAD_FILLERS
                               or (i and prompt[i] in ("of", "on", "for") and prompt[i - 1] in REQUEST_WORDS)):
        i += 1  # "mask on the kidney ...", "segmentation of the spleen": what follows is asked
    head: list[str] = []
    for j in range(i, len(prompt)):
        w, after = prompt[j], prompt[j + 1] if j + 1 < len(prompt) else ""
        if w in HEAD_ENDS | CLAUSE_WORDS or any(prompt[j:j + len(r)] == r for r in RELATIONS + PART_RELATIONS):
            break
        if head and head[-1] in MASK_NOUNS and w not in DETERMINERS:
            break  # "aorta label stops at the hiatus", "IVC label merges with ...": a correction names its label;
            # not "could someone contour the L suprarenal", where the noun is the request's verb
        if (w.endswith("ing") and len(w) > 5 and head and w not in ING_NOUNS and after not in FINDING_WORDS
                and not set(words(after)) & class_words):
            break  # "the heart sitting above", not "the breast imaging lesion" nor "the brain enhancing tumour"
        if DIRECTIONS.fullmatch(w) and after == "to":
            break
        head = [] if w == "s" and head else head + [w]  # "the heart's big artery": the artery is asked
    return head


def heads(index: ClassIndex, texts: list[str]) -> list[list[str]]:
    """Each reading's first noun phrase (``head_phrase`` of its ``asked_sentence``), found once per prompt for
    ``asked_other`` and ``content_not_asked``."""
    from medprompt.catalog import tokens

    return [head_phrase(tokens(asked_sentence(t)), index.class_words) for t in texts]


def asked_other(index: ClassIndex, heads: list[list[str]]) -> str | None:
    """The other-anatomy entry (or non-anatomical content: a catheter, the CT table) that a reading's first noun
    phrase (``heads``) spells, when it ends that phrase (its noun) or no other word of the phrase names a
    class or a finding: the prompt then says in words that it asks for something no prompt file describes,
    however near a class its whole sentence reads ("the left renal vein crossing in front of the aorta" reads
    0.77 like the left kidney)."""
    from medprompt.catalog import GENERIC_WORDS, HEAD_NOISE, tokens, words

    targets = [(o, tokens(o)) for o in index.others]
    for head in heads:
        found = [(len(target), i, o) for o, target in targets for i in spelt_indices(head, target)]
        if not found:
            continue
        n, i, other = max(found)
        rest = head[:i] + head[i + n:]
        if i + n == len(head):
            if any(w in FINDING_WORDS for w in head[:i]):
                continue  # "mass left breast", telegraphic for the mass in it: what the finding rules read
            return other  # its last word is the phrase's noun: "the bladder catheter" is a catheter
        if head[-1] in (GENERIC_WORDS - {"parenchyma", "tissue"}) | PART_WORDS:
            continue  # "the heart part of the stomach" (read from "cardiac part"): a part of what follows; but
            # "the brain parenchyma" is the brain's own tissue
        # a request's own words name no class: "heart contour" is the heart, though the body's outline is a contour
        if not any(w in FINDING_WORDS or set(words(w)) & index.class_words for w in rest if w not in HEAD_NOISE):
            return other
    return None


def content_not_asked(index: ClassIndex, texts: list[str], heads: list[list[str]]) -> list[str]:
    """The ``OTHER_CONTENT`` entries the readings spell outside their first noun phrase (``heads``, one per
    reading): a device named as the reason or the means ("the lesion where we might place a stent", "targeting
    for a core needle biopsy") is not what is asked, however much of the sentence's embedding it takes."""
    from medprompt.catalog import tokens

    read = [(tokens(t), head) for t, head in zip(texts, heads)]
    return [other for other in index.others if other in OTHER_CONTENT
            and any(spelt_indices(prompt, tokens(other)) and not spelt_indices(head, tokens(other))
                    for prompt, head in read)]


def part_of_class(entry: PromptEntry, other: str, texts: list[str]) -> bool:
    """Whether the readings name a part (``PART_WORDS``) of ``entry``, spelt by its name or an alias and not
    as a landmark, and share no other word with the other-anatomy entry ``other``: then ``other`` is the
    same part of something else, not what is asked ("gastric wall" is not the abdominal wall)."""
    from medprompt.catalog import tokens

    spellings = [tokens(t) for t in (entry.name.replace("_", " "), *entry.aliases)]
    for t in texts:
        prompt = tokens(t)
        shared = set(prompt) & set(tokens(other))
        if not shared or not shared <= PART_WORDS:
            continue
        if any(_names_as_target(prompt, target) for target in spellings):
            return True
    return False


def asked_part(prompt: list[str]) -> list[str]:
    """The tokens of the phrase that names what is asked: up to the first ``CLAUSE_WORDS`` when what comes
    before names something; what follows says why it is asked or what it holds ("the organ removed in
    cholecystectomy for stones", "the skeleton, to check for metastases", "the pouch where stones form")."""
    from medprompt.catalog import REQUEST_WORDS

    for i, w in enumerate(prompt):
        # not "a fluid-filled lesion" nor "the mass with calcification", but "the one with the stone"
        if (w in CLAUSE_WORDS or prompt[i:i + 2] == ["filled", "with"]
                or (i and w in ("with", "has") and prompt[i - 1] in ("one", "it", "patient", "pt"))):
            # "pt with suspected adenoma", "patient has gallstones"; not "my son has a tumour in his brain"
            if i == 0 and w == "where":
                if prompt[1:2] in (["is"], ["are"], ["s"]):
                    continue  # "where is the tumour in my dad's brain" asks for the tumour
                return []  # "where gallstones form" asks for the place
            if any(x not in ASKING_WORDS and x not in REQUEST_WORDS and x not in DETERMINERS for x in prompt[:i]):
                return prompt[:i]
            break  # "look for lesions in the liver": the request comes first, the rest is what is asked
    return prompt


@functools.lru_cache(maxsize=1)
def _naming_words() -> frozenset[str]:
    """Words that name anatomy or a finding in any prompt, whatever the catalog: the synonym table's forms and
    nouns, the findings and what no class describes (``OTHER_ANATOMY``, ``OTHER_CONTENT``); not a request's own
    words, sides or fillers."""
    from medprompt.catalog import REQUEST_WORDS, STOP_WORDS, tokens, words

    found = {w for t in (*OTHER_ANATOMY, *OTHER_CONTENT) for w in tokens(t)} | FINDING_WORDS
    found |= synonyms.vocabulary()
    found |= {w for t in found for w in words(t)}
    return frozenset(found - REQUEST_WORDS - STOP_WORDS - DETERMINERS - HEAD_FILLERS - synonyms.SIDE_FORMS
                     - {"both", "patient", "sides"})


def _heading_left_out(text: str) -> str:
    """What follows a heading that names nothing ("BraTS-style label: whole tumour region in the brain", "Neoadjuvant
    trial: the target breast lesion", "Task 3: segment the spleen"): a label of the request, not what it asks for;
    or a heading followed by a request that names an organ ("emphysema quantification: need the lungs"). Any other
    heading that names anything ("liver: the large organ ...", "OAR for breast RT: ...", "Liver: outline the
    tumour") stays."""
    from medprompt.catalog import REQUEST_WORDS, tokens, words

    head, colon, body = text.partition(":")
    naming = _naming_words()
    if colon and set(words(body)) & naming and not set(words(head)) & naming:
        return body
    asks = [w for w in tokens(body) if w not in HEAD_FILLERS | DETERMINERS | REQUEST_WORDS][:1]
    if colon and asks and asks[0] in ASKING_WORDS and set(words(body)) & naming - FINDING_WORDS:
        return body  # "emphysema quantification: need the lungs": a request that names an organ says what is asked
    return text


def asked_sentence(text: str) -> str:
    """Of a prompt of several sentences, the one that asks for a drawing ("Lumpectomy planning for carcinoma;
    outline the mass"), else the first ("The vessel in front of the spine; checking for an aneurysm"); the one
    before it when the request only points back ("... on my spleen? Please highlight it."). A purpose before a comma
    is left out of the drawing sentence ("For a metastatic survey, delineate the whole skeletal system"), and a
    heading that names nothing before a colon (``_heading_left_out``)."""
    from medprompt.catalog import REQUEST_WORDS, tokens

    text = _heading_left_out(text)
    parts = [p for p in re.split(r"[;:!?]+|\.(?!\d)", text) if tokens(p)]  # not "section 6.1" nor "2.5 cm"
    drawing = [i for i, p in enumerate(parts) if set(tokens(p)) & DRAWING_WORDS]
    if not drawing:  # a purpose says why: "for the RF ablation: the hepatic tumour", "OAR for breast RT: ..."
        def purpose(part: list[str]) -> bool:
            return "for" in part and set(part[:part.index("for")]) <= REQUEST_WORDS | DETERMINERS
        return next((p for p in parts if not purpose(tokens(p))), (parts or [text])[0])
    i = drawing[0]
    # "Is there a cyst on my spleen? Please highlight it.": a request that names nothing points back, or, first,
    # forward ("Label: primary colorectal adenocarcinoma, ...")
    if set(tokens(parts[i])) <= ASKING_WORDS | REQUEST_WORDS | DETERMINERS | HEAD_FILLERS | POINTING_WORDS:
        if i:
            return parts[i - 1]
        if len(parts) > 1:
            return parts[1]
    lead, _, rest = parts[i].partition(",")
    if tokens(lead)[:1] == ["for"] and set(tokens(rest)) & DRAWING_WORDS:
        return rest
    return parts[i]


def finding_words(texts: Iterable[str]) -> set[str]:
    """The finding words (``FINDING_WORDS``) the readings ask for, leaving out landmarks ("the kidney
    beside the mass") and reasons ("the organ removed for stones": ``asked_sentence``, ``asked_part``)."""
    from medprompt.catalog import tokens

    out = set()
    for t in texts:
        prompt = tokens(asked_sentence(t))
        head = asked_part(prompt)
        out |= {w for i, w in enumerate(head) if w in FINDING_WORDS and not _relation_before(prompt, i)}
    return out


def findings_only_as_landmarks(texts: list[str]) -> bool:
    """Whether the readings name findings, all of them as landmarks: "the kidney near the cyst" reads like
    "kidney cyst" (and like a tumour class), but asks for the kidney; findings are then set aside."""
    from medprompt.catalog import tokens

    return not finding_words(texts) and any(w in FINDING_WORDS for t in texts for w in tokens(t))


def is_finding(name: str) -> bool:
    """Whether a class or other-anatomy name is a finding (its words hold one of ``FINDING_WORDS``)."""
    from medprompt.catalog import words

    return bool(FINDING_WORDS & set(words(name.replace("_", " "))))


def finding_of_organ(entry: PromptEntry, texts: list[str]) -> str | None:
    """Why ``entry`` cannot be what the readings ask for, or None: they ask for a finding and the class is
    an organ (any resolver: text similarity or keywords)."""
    asked = finding_words(texts)
    if asked and not is_finding(entry.name):
        return f"it asks for a finding ({sorted(asked)[0]}), and {entry.name} would draw the whole organ"
    return None


def organ_asked_of_finding(entry: PromptEntry, texts: list[str]) -> str | None:
    """Why ``entry``, a finding class, cannot be what the readings ask for, or None: they name its organ and
    no finding ("the colon" is not colon_tumour). The keywords resolver's check; text similarity refuses such
    a prompt as the organ's OTHER_ANATOMY entry."""
    from medprompt.catalog import words

    if not is_finding(entry.name) or finding_words(texts):
        return None
    organ = [w for w in words(entry.name.replace("_", " ")) if w not in FINDING_WORDS]
    if organ and any(set(organ) <= set(words(t)) for t in texts):
        return f"it names the {' '.join(organ)} and no finding, and {entry.name} would draw only the finding"
    return None


def findable(catalog: PromptCatalog, texts: list[str], names: Iterable[str]) -> set[str]:
    """Of ``names``, those that can draw the finding the readings ask for in the organ they spell: the organ's
    finding class and the organ that has one ("the hypodense lesions in the liver on portal venous phase" is
    not the portal vein, which reads as near)."""
    from medprompt.catalog import tokens

    if not finding_words(texts):
        return set()
    out = set()
    for name in names:
        organ = [w for w in stem(name) if w not in FINDING_WORDS]  # liver_tumour -> liver
        if not organ or not (is_finding(name) or _finding_class(catalog, name)):
            continue
        if any(_names_as_target(tokens(t), organ) for t in texts):
            out.add(name)
    return out


def _finding_class(catalog: PromptCatalog, name: str) -> PromptEntry | None:
    """The catalog's one finding class of the organ class ``name`` (liver -> liver_tumour), or None."""
    from medprompt.catalog import words

    organ = set(stem(name))
    found = [c for c in catalog.entries.values() if is_finding(c.name)
             and {w for w in words(c.name.replace("_", " ")) if w not in FINDING_WORDS} == organ]
    return found[0] if len(found) == 1 else None


def finding_of_named_organ(catalog: PromptCatalog, entry: PromptEntry, texts: list[str]) -> PromptEntry | None:
    """The catalog's one finding class of ``entry``'s organ when the readings ask for a finding and read
    closest to the organ itself: "a hypodense hepatic lesion" reads like the liver and asks for liver_tumour
    (the reverse of ``organ_of_finding``)."""
    if is_finding(entry.name) or not finding_words(texts):
        return None
    return _finding_class(catalog, entry.name)


def organ_of_finding(catalog: PromptCatalog, entry: PromptEntry, texts: list[str]) -> PromptEntry | None:
    """The organ class the readings name when ``entry`` is that organ's finding class and they ask for no
    finding: "an abnormal liver", "steatosis of the liver" are the liver, not liver_tumour. The organ
    counts when its name or an alias is spelt (not as a landmark) and its name's words, sides aside, are
    in the finding's name."""
    from medprompt.catalog import tokens, words

    own = set(words(entry.name.replace("_", " ")))
    if not is_finding(entry.name) or finding_words(texts):
        return None
    for organ in catalog.entries.values():
        if is_finding(organ.name) or not set(stem(organ.name)) <= own:
            continue
        spellings = [tokens(t) for t in (organ.name.replace("_", " "), *organ.aliases)]
        if any(_names_as_target(tokens(t), target) for t in texts for target in spellings):
            return organ
    return None


def finding_mismatch(index: ClassIndex, entry: PromptEntry, texts: list[str]) -> str | None:
    """Why ``entry`` cannot be what the readings ask for, or None: a finding asked of a class that is an
    organ (``finding_of_organ``), a finding other than a tumour asked of a tumour class, or a finding of anatomy
    (an OTHER_ANATOMY entry or a catalog organ spelt in the prompt) that the finding class's own phrases never
    mention."""
    from medprompt.catalog import tokens, words

    asked = finding_words(texts)
    if not asked:
        return None
    organ = finding_of_organ(entry, texts)
    if organ is not None:
        return organ
    finding = sorted(asked)[0]
    if set(words(entry.name.replace("_", " "))) & TUMOUR_WORDS and not asked & TUMOUR_WORDS:
        return f"it asks for a finding ({finding}) that is no tumour, and {entry.name} draws a tumour"
    vocabulary = {w for t in class_texts(entry) for w in tokens(t)}
    # Other anatomy ("thyroid nodule" names the gland: "gland" is left out; a finding is of anatomy, not of a
    # needle), then the catalog's organs ("the cyst on my spleen" read 0.001 nearer breast_tumor).
    anatomy = [(o, [w for w in tokens(o) if w != "gland"] or tokens(o)) for o in index.others if o not in OTHER_CONTENT]
    anatomy += [(" ".join(organ), list(organ)) for organ in index.stems]
    own = {w for w in words(entry.name.replace("_", " ")) if w not in FINDING_WORDS}
    for name, target in anatomy:
        if FINDING_WORDS & set(target) or set(target) <= vocabulary or set(words(PART_OF.get(name, ""))) == own:
            continue
        if any(_names_as_target(tokens(t), target) for t in texts):
            return f"it asks for a finding ({finding}) of the {name}, and {entry.name} is another organ's"
    return None


def finding_class_of_other(catalog: PromptCatalog, other: str, texts: list[str]) -> PromptEntry | None:
    """The catalog's finding class of the organ that the other-anatomy entry ``other`` is or is part of
    (``PART_OF``), when the readings ask for a tumour there: "the sigmoid cancer" reads like the sigmoid colon, and
    asks for colon_tumour. None otherwise."""
    if not finding_words(texts) & TUMOUR_WORDS:
        return None
    return _finding_class(catalog, PART_OF.get(other, other))


def rank(catalog: PromptCatalog, text: str, encoder: TextEncoder, index: ClassIndex,
         vectors: np.ndarray | None = None, findings_aside: bool = True) -> list[tuple[str, float]]:
    """Eligible classes that are not landmarks, with their similarity to ``text``, best first.

    ``vectors`` are the embeddings of ``readings(text)``; a class scores its best over them. Finding classes are
    left out when the prompt names findings only as landmarks or reasons, unless ``findings_aside`` is False.
    """
    texts = readings(text)
    vectors = encoder.encode(texts) if vectors is None else vectors
    scores: dict[str, float] = {}
    named = sides(texts[-1])
    for vector in vectors:
        for name, s in index.scores(vector, named).items():
            scores[name] = max(s, scores.get(name, -2.0))
    allowed = eligible(catalog, texts[-1])
    aside = set().union(*(landmarks(catalog, t) for t in texts)) - named_in(catalog, heads(index, texts))
    if findings_aside and findings_only_as_landmarks(texts):
        aside |= {n for n in allowed if is_finding(n)}
    allowed = [n for n in allowed if n not in aside] or allowed
    return sorted(((n, scores[n]) for n in allowed), key=lambda kv: (-kv[1], kv[0]))


def resolve(catalog: PromptCatalog, text: str, encoder: TextEncoder, index: ClassIndex,
            floor: float | None = None) -> PromptEntry:
    """The class whose phrases are closest to ``text``; PromptError below the floor or when a side is missing."""
    floor = SIMILARITY_FLOORS.get(encoder.key) if floor is None else floor
    fixes = spelling_fixes(catalog, text, index.words)
    if fixes:
        # A token that is no word but one slip from a class's word ("right kidny") was meant as that word: the
        # prompt is read as corrected (the encoder reads the slip as noise, often as another class). When the
        # corrected prompt is refused, it is read as written.
        try:  # the corrected text has no typos left: this recursion ends at once
            return catalog.resolve(corrected(text, fixes), encoder)
        except PromptError:
            pass
    texts = readings(text)
    vectors = encoder.encode(texts)
    ranked = rank(catalog, text, encoder, index, vectors)
    if not ranked:
        raise PromptError(f"prompt '{text}' matches no class in the catalog")
    score = ranked[0][1]  # the floor and the other-anatomy margin read the nearest similarity
    if findings_only_as_landmarks(texts):  # a finding named as the reason still says the prompt is about anatomy
        floor_score = rank(catalog, text, encoder, index, vectors, findings_aside=False)[0][1]
    else:
        floor_score = score
    best = word_tie_break(index, text, ranked, findable(catalog, texts, [n for n, _ in ranked]))
    nearest = ", ".join(f"{n} ({s:.2f})" for n, s in ranked[:NEAREST])
    aside = [o for o in index.others if is_finding(o)] if findings_only_as_landmarks(texts) else []
    first_phrases = heads(index, texts)
    aside += content_not_asked(index, texts, first_phrases)
    nearest_others = [o for o in (index.nearest_other(v, aside) for v in vectors) if o is not None]
    other = max(nearest_others, key=lambda o: o[1]) if nearest_others else None
    above_floor = floor is None or floor_score >= floor  # below it, nothing is close: said as such below
    # The margin guards against embedding noise; a prompt that spells other anatomy and no class
    # word ("the chambers of the heart") says in words what it is, so the nearer reading decides.
    margin = 0.0 if names_other(index, texts) else OTHER_MARGIN
    home = finding_class_of_other(catalog, other[0], texts) if other is not None else None
    if home is not None and other[1] > score and (floor is None or max(floor_score, other[1]) >= floor):
        # A tumour of a part of the organ its finding class is named by, or of a kind the class draws ("the tumor
        # in my dad's brain" reads 0.48 like a brain metastasis, 0.33 like any class): as close as that reading.
        best, floor_score = home.name, max(floor_score, other[1])
    elif (above_floor and other is not None and other[1] > score + margin
            and not (other[1] - score <= WORD_TIE and words_favour_class(index, text, best, other[0]))
            and not any(_other_as_landmark(index, t, other[0]) or _other_as_reason(t, other[0]) for t in texts)
            and not part_of_class(catalog[best], other[0], texts)):
        raise PromptError(f"unknown prompt '{text}': it reads like {other[0]} ({other[1]:.2f}), which no prompt file "
                          f"describes; closest known classes: {nearest}. To segment it, add a prompt file "
                          f"(see 'Prompts: the class catalog' in README.md)")
    named = asked_other(index, first_phrases)
    if named is not None:
        raise PromptError(f"unknown prompt '{text}': it asks for the {named}, which no prompt file describes; "
                          f"closest known classes: {nearest}. To segment it, add a prompt file (see 'Prompts: "
                          f"the class catalog' in README.md)")
    if floor is not None and floor_score < floor:
        raise PromptError(f"unknown prompt '{text}': no class is similar enough (best {floor_score:.2f} < {floor:.2f} "
                          f"with {encoder.key}); closest known classes: {nearest}")
    finding = finding_of_named_organ(catalog, catalog[best], texts)
    if finding is not None:
        best = finding.name
    mismatch = finding_mismatch(index, catalog[best], texts)
    if mismatch is not None:
        raise PromptError(f"unknown prompt '{text}': {mismatch}; no prompt file describes this finding (closest "
                          f"known classes: {nearest}). To segment it, add a prompt file (see 'Prompts: the class "
                          f"catalog' in README.md)")
    organ = organ_of_finding(catalog, catalog[best], texts)
    if organ is not None:
        best = organ.name
    if sides(best) and len(sides(texts[-1])) != 1:  # in plain nouns: "LK" names the left
        twins = [n for n in catalog.names if stem(n) == stem(best) and sides(n)]
        raise PromptError(f"prompt '{text}' matches {' and '.join(twins)}: say 'left' or 'right'")
    return catalog[best]
