"""Benchmark: free-text prompts worded independently of prompts/ -> the right class, and how fast.

Reads ``tests/data/paraphrases.yaml`` (lay and clinical paraphrases of every class, none copied
from prompts/, none an exact name or alias; a development set and a held-out set) and resolves
each through the default catalog with the given text encoder (MiniLM by default), printing
accuracy, the misses, the keyword resolver's accuracy for comparison, timing (cold: empty
embedding cache, model load included; warm: cache filled) and a line for BENCHMARKS.md.

It also scores ``tests/data/paraphrases_independent.yaml``: prompts by writers who saw only the class
list (each set's accuracy), and prompts for what no class describes, which must be refused.

It also shows how the similarity floor is calibrated: the best similarity of every correctly
resolved paraphrase against that of the ``unrelated`` prompts (nothing in the catalog). The floor
in ``medprompt/text/similarity.py`` sits between the two. Prompts for anatomy that no prompt file
describes (``out_of_catalog``) must be refused rather than drafted as a neighbouring class; the
margin that decides it is calibrated on the development paraphrases only.

    .venv/bin/python benchmarks/paraphrases.py [--text-encoder minilm]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import PromptCatalog, default_catalog  # noqa: E402
from medprompt.errors import PromptError  # noqa: E402
from medprompt.text import get_text_encoder  # noqa: E402
from medprompt.text.similarity import OTHER_MARGIN, SIMILARITY_FLOORS, rank  # noqa: E402

DATA = REPO / "tests" / "data" / "paraphrases.yaml"
INDEPENDENT = REPO / "tests" / "data" / "paraphrases_independent.yaml"


def outcome(catalog: PromptCatalog, text: str, encoder) -> str:
    try:
        return catalog.resolve(text, encoder).name
    except PromptError as error:
        return f"error: {error}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text-encoder", default="minilm", help="encoder spec (default: minilm)")
    args = p.parse_args()
    doc = yaml.safe_load(DATA.read_text(encoding="utf-8"))
    sets = {name: [(c["text"], c["class"]) for c in doc[name]] for name in ("paraphrases", "heldout")}
    cases = [c for s in sets.values() for c in s]

    os.environ["MEDPROMPT_CACHE"] = tempfile.mkdtemp(prefix="medprompt-bench-")  # cold: nothing cached
    catalog = PromptCatalog(dict(default_catalog().entries))
    t0 = time.perf_counter()
    encoder = get_text_encoder(args.text_encoder)
    index = catalog.similarity_index(encoder)
    t_index = time.perf_counter() - t0
    floor = SIMILARITY_FLOORS.get(encoder.key)

    t0 = time.perf_counter()
    got = {text: outcome(catalog, text, encoder) for text, _ in cases}
    cold = (time.perf_counter() - t0) / len(cases)
    t0 = time.perf_counter()
    for text, _ in cases:
        outcome(catalog, text, encoder)
    warm = (time.perf_counter() - t0) / len(cases)

    keyword = PromptCatalog(dict(catalog.entries))  # no text encoder: the keyword resolver
    print(f"encoder {encoder.key} (dim {encoder.dim}); catalog of {len(catalog.names)} classes, "
          f"{len(index.names)} phrases; similarity floor {floor}")
    for name, items in sets.items():
        hits = sum(got[t] == w for t, w in items)
        kw = sum(outcome(keyword, t, None) == w for t, w in items)
        print(f"{name}: {hits}/{len(items)} = {hits / len(items):.1%} (keyword resolver {kw / len(items):.1%})")
    misses = [(t, w) for t, w in cases if got[t] != w]
    for text, want in misses:
        print(f"  miss: {text!r} -> {got[text]} (expected {want})")
    acc = 1 - len(misses) / len(cases)
    kw_all = sum(outcome(keyword, t, None) == w for t, w in cases) / len(cases)
    print(f"all: {len(cases) - len(misses)}/{len(cases)} = {acc:.1%}")

    right = [rank(catalog, t, encoder, index)[0][1] for t, w in cases if got[t] == w]
    unrelated = sorted((rank(catalog, t, encoder, index)[0][1], t) for t in doc["unrelated"])
    rejected = sum(outcome(catalog, t, encoder).startswith("error") for _, t in unrelated)
    print(f"floor calibration: correct matches' best similarity min {min(right):.3f}, 5th pct "
          f"{np.percentile(right, 5):.3f}, median {np.median(right):.3f}; unrelated prompts median "
          f"{np.median([s for s, _ in unrelated]):.3f}, max {unrelated[-1][0]:.3f} ({unrelated[-1][1]!r}); "
          f"{rejected}/{len(unrelated)} unrelated rejected")
    ooc = doc["out_of_catalog"]
    ooc_refused = [t for t in ooc if outcome(catalog, t, encoder).startswith("error")]
    leads = sorted((index.nearest_other(encoder.encode([t])[0])[1] - rank(catalog, t, encoder, index)[0][1], t)
                   for t, w in sets["paraphrases"] if got[t] == w)
    print(f"other anatomy: {len(ooc_refused)}/{len(ooc)} prompts for anatomy no prompt file describes refused; "
          f"drafted anyway: {', '.join(repr(t) + ' -> ' + outcome(catalog, t, encoder) for t in ooc if t not in ooc_refused)}")
    print(f"margin calibration: largest lead of an other-anatomy entry over the class among correctly resolved "
          f"development paraphrases {leads[-1][0]:.3f} ({leads[-1][1]!r}); OTHER_MARGIN {OTHER_MARGIN}")
    independent = yaml.safe_load(INDEPENDENT.read_text(encoding="utf-8"))
    writers = {k: v for k, v in independent.items() if not k.startswith("refusals")}
    hits_all = total = 0
    for name, items in writers.items():
        hits = sum(outcome(catalog, c["text"], encoder) == c["class"] for c in items)
        hits_all, total = hits_all + hits, total + len(items)
        print(f"{name} (independent writer): {hits}/{len(items)} = {hits / len(items):.1%}")
    print(f"independent writers: {hits_all}/{total} = {hits_all / total:.1%}")
    refusals = [c for k, v in independent.items() if k.startswith("refusals") for c in v]
    refused = {}
    for c in refusals:
        r = refused.setdefault(c["kind"], [0, 0])
        r[0] += outcome(catalog, c["text"], encoder).startswith("error")
        r[1] += 1
    n_refused = sum(a for a, _ in refused.values())
    print(f"refused (independent writer): {n_refused}/{len(refusals)} "
          f"({', '.join(f'{k} {a}/{b}' for k, (a, b) in refused.items())})")
    print(f"time: encoder load + {len(index.names)} class phrases {t_index:.2f} s (empty cache); "
          f"per prompt {cold * 1e3:.1f} ms (new text), {warm * 1e3:.2f} ms (cached)")
    print(f"BENCHMARKS.md: | {encoder.key} | {len(cases)} paraphrases ({len(sets['heldout'])} held out), "
          f"{len({w for _, w in cases})} classes | **{acc:.1%}** (held out "
          f"{sum(got[t] == w for t, w in sets['heldout']) / len(sets['heldout']):.1%}) | keywords {kw_all:.1%} | "
          f"{rejected}/{len(unrelated)} unrelated rejected | {len(ooc_refused)}/{len(ooc)} | independent writers "
          f"{hits_all / total:.1%}, {n_refused}/{len(refusals)} refused | load + index {t_index:.1f} s, "
          f"{cold * 1e3:.0f} ms/new prompt, {warm * 1e3:.1f} ms cached |")


if __name__ == "__main__":
    main()
