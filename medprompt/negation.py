"""What a prompt says not to draw, left out before it is resolved.

"the liver without the tumour" asks for the liver, "kidneys but not the adrenals" for the kidneys and "the right
kidney, not the left one" for the right kidney; read whole, each had resolved to what it excludes (a sentence
embedding and word evidence read the words, not their negation). A negation runs from its cue ("not", "no",
"without", "excluding", "except", "don't include", ...) to the next punctuation or "but"; a "non-" word
("non-tumorous liver") is left out by itself. Its sides go with it: "right kidney mask, exclude the left" names
one side.
"""

from __future__ import annotations

import re

_CUES = ("but not", "and not", "not including", "not", "no", "don't include", "don't", "do not", "without",
         "excluding", "exclude", "except for", "except", "apart from", "sparing", "other than", "rather than",
         "instead of", "minus", "leaving out", "omitting")
_CUE = re.compile(r"\b(?:" + "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in _CUES) + r")\b(?!-)", re.IGNORECASE)
_END = re.compile(r"[,;:.!?()\[\]]|\bbut\b", re.IGNORECASE)
_NON = re.compile(r"\bnon[-\s]+(?!the\b|a\b|an\b)[a-z]+", re.IGNORECASE)


def without_negated(text: str) -> tuple[str, list[str]]:
    """``text`` with each negated phrase left out, and the phrases left out (empty when there are none)."""
    removed: list[str] = []
    out, pos = [], 0
    for m in _CUE.finditer(text):
        if m.start() < pos:
            continue
        end = _END.search(text, m.end())
        stop = end.start() if end is not None else len(text)
        out.append(text[pos:m.start()])
        removed.append(text[m.start():stop].strip())
        pos = stop
    out.append(text[pos:])
    kept = "".join(out)
    removed += [m.group(0) for m in _NON.finditer(kept)]
    kept = _NON.sub(" ", kept)
    # Leftover joins and separators at either end: "kidneys, but" -> "kidneys".
    kept = re.sub(r"^[\s,;:]*(?:but\b)?[\s,;:]*|[\s,;:]*(?:\bbut)?[\s,;:.!?()]*$", "", kept, flags=re.IGNORECASE)
    kept = re.sub(r"\s{2,}", " ", kept).strip()
    return (kept, removed) if removed else (text, [])
