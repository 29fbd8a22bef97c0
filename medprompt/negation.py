"""What a prompt says not to draw, left out before it is resolved.

"the liver without the tumour" asks for the liver, "kidneys but not the adrenals" for the kidneys and "the right
kidney, not the left one" for the right kidney; read whole, each had resolved to what it excludes (a sentence
embedding and word evidence read the words, not their negation). A negation runs from its cue ("not", "no",
"without", "excluding", "except", "don't include", ...) to the next punctuation or "but"; a "non-" word
("non-tumorous liver") is left out by itself. Its sides go with it: "right kidney mask, exclude the left" names
one side.
A negation may also follow what it negates ("L kidney, right side excluded", "the liver with the tumour left out",
"leave the left alone"): the phrase back to the punctuation, "with", "and" or "but" before it.
"""

from __future__ import annotations

import re

_CUES = ("but not", "and not", "not including", "not", "no", "don't include", "don't", "dont", "don’t", "do not",
         "without", "excluding", "exclude", "except for", "except", "apart from", "sparing", "other than",
         "rather than", "instead of", "minus", "leaving out", "leave out", "omitting")
_CUE = re.compile(r"\b(?:" + "|".join(re.escape(c).replace(r"\ ", r"\s+") for c in _CUES) + r")\b(?!-)", re.IGNORECASE)
_END = re.compile(r"[,;:.!?()\[\]]|\bbut\b", re.IGNORECASE)
# "right side excluded", "with the tumour left out", "leave the left alone": the cue after the phrase it negates
_AFTER = re.compile(r"(?:^|(?<=[,;:(])|\b(?:with|and|but)\b)\s*((?:(?![,;:()]|\b(?:with|and|but)\b).)+?\s+"
                    r"(?:excluded|omitted|left\s+out|not\s+included))\b(?=\s*(?:[,;:.!?()]|$))"
                    r"|\b(leave\s+(?:(?![,;:()]).){1,40}?\s+alone)\b", re.IGNORECASE)
_NON = re.compile(r"\bnon[-\s]+(?!the\b|a\b|an\b)[a-z]+", re.IGNORECASE)


def without_negated(text: str) -> tuple[str, list[str]]:
    """``text`` with each negated phrase left out, and the phrases left out (empty when there are none)."""
    removed = [m.group(m.lastindex).strip() for m in _AFTER.finditer(text)]
    text = _AFTER.sub(lambda m: m.group(0)[: m.start(m.lastindex) - m.start()], text)
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
    kept = re.sub(r"^[\s,;:]*(?:but\b)?[\s,;:]*|[\s,;:]*(?:\b(?:but|with|and))?[\s,;:.!?()]*$", "", kept,
                  flags=re.IGNORECASE)
    kept = re.sub(r"\s{2,}", " ", kept).strip()
    return (kept, removed) if removed else (text, [])
