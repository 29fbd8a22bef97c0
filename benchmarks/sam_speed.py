"""Benchmark: prior + LiteMedSAM drafts of a 512x512x200 CT (Synapse 8): cold, re-prompted, one click.

The volume is the real ``ct_abdomen_a`` resampled to 512x512x200 (as benchmarks/prior_speed.py).
The embedding cache is a fresh temporary folder and the per-study memory (medprompt.memo) is
emptied, so the first draft computes every embedding and all of the prior ("cold"); the second
draft of the same study in the same process, as a server makes it, reads the embeddings back and
reuses the prior's per-study work ("re-prompt"); a click then segments one slice whose embedding is
cached. Peak memory is the process's maximum RSS.

    .venv/bin/python benchmarks/sam_speed.py [--clicks 5]      # uses the GPU when there is one
    .venv/bin/python benchmarks/sam_speed.py --threads 1       # a busy machine: compare CPU seconds
    .venv/bin/python benchmarks/sam_speed.py --model medprompt # the shipped model, as drafted and adapted to the study

Each stage prints wall seconds and the process's CPU seconds: on a machine shared with other jobs
the wall time measures the others too, the CPU time (one thread) much less so.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from prior_speed import CASE, clinical_size_ct  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    p.add_argument("--clicks", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    p.add_argument("--model", default="prior", choices=["prior", "medprompt"],
                   help="medprompt: the shipped model's draft, as it is and adapted to the study (its extra cost)")
    args = p.parse_args()
    if not CASE.exists():
        sys.exit(f"error: {CASE} not found (../shared/data/real beside the checkout)")
    os.environ["MEDPROMPT_CACHE"] = tempfile.mkdtemp(prefix="medprompt_sam_speed_")

    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    import medprompt.sam as sam
    from medprompt.drafts import draft
    from medprompt.memo import clear_all
    from medprompt.sam.interactive import ClickRequest, click_segment
    from medprompt.sam.segmenter import precision_summary

    vol = clinical_size_ct(tuple(args.shape))
    make = sam.segmenter_factory()  # weights loaded (and hash-checked) once, as a server does; GPU when present
    device = sam.resolve_device("auto")
    print(f"volume {vol.data.shape} spacing {np.round(vol.spacing, 3)} mm; {precision_summary(device)}")

    t, c = time.perf_counter(), time.process_time()
    alone = draft(vol, refine="none")
    t_prior, c_prior = time.perf_counter() - t, time.process_time() - c
    clear_all()  # the prior's per-study work from the run above: a cold draft starts from nothing
    if args.model == "medprompt":
        return medprompt_times(vol, t_prior)
    t, c = time.perf_counter(), time.process_time()
    cold = draft(vol)
    t_cold, c_cold = time.perf_counter() - t, time.process_time() - c
    t, c = time.perf_counter(), time.process_time()
    again = draft(vol)
    t_again, c_again = time.perf_counter() - t, time.process_time() - c
    assert np.array_equal(cold.labels, again.labels), "cached embeddings must give the same draft"

    liver = cold.labels == cold.names["liver"]
    k = int(np.argmax(liver.sum(axis=(0, 1))))
    i, j = (int(v) for v in np.argwhere(liver[:, :, k]).mean(axis=0))
    request = ClickRequest.parse({"foreground": [[i, j, k]], "label": "liver"}, vol.data.shape)
    click_segment(vol.data, vol.affine, "CT", request, make)  # this slice's embedding, if the draft skipped it
    clicks = []
    for _ in range(args.clicks):
        t = time.perf_counter()
        click_segment(vol.data, vol.affine, "CT", request, make)
        clicks.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch threads {torch.get_num_threads()}")
    print(f"prior alone (refine none):           {t_prior:6.1f} s  (CPU {c_prior:.1f} s)")
    print(f"cold draft (prior + LiteMedSAM):     {t_cold:6.1f} s  (CPU {c_cold:.1f} s; {t_cold / t_prior:.1f}x the prior alone)")
    print(f"re-prompt, embeddings cached:        {t_again:6.1f} s  (CPU {c_again:.1f} s; {t_again / t_prior:.1f}x the prior alone)")
    print(f"one click on a cached slice:         {np.median(clicks):6.2f} s (median of {len(clicks)})")
    print(f"peak RSS {peak:.0f} MiB")
    print("stages:", cold.stages)
    print("voxels per class (alone -> refined):",
          {n: (int(np.sum(alone.labels == v)), int(np.sum(cold.labels == v))) for n, v in cold.names.items()})


def medprompt_times(vol, t_prior: float) -> None:
    """The shipped model's drafts: as it is (cold, then with the embeddings on disk) and adapted to the study
    (embeddings on disk: the difference is the adaptation), then a re-prompt of the adapted study."""
    import torch

    from medprompt.drafts import draft
    from medprompt.memo import clear_all

    def timed(**kw):
        t, c = time.perf_counter(), time.process_time()
        seg = draft(vol, model="medprompt", **kw)
        return seg, time.perf_counter() - t, time.process_time() - c

    clear_all()
    _, t_cold, c_cold = timed(adapt=False)
    clear_all()
    as_is, t_warm, c_warm = timed(adapt=False)
    clear_all()
    adapted, t_adapt, c_adapt = timed()
    again, t_again, c_again = timed()
    assert np.array_equal(adapted.labels, again.labels), "a re-prompt must reuse the adapted network"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch threads {torch.get_num_threads()}")
    print(f"prior alone (refine none):                 {t_prior:6.1f} s")
    print(f"cold draft, model as it is:                {t_cold:6.1f} s  (CPU {c_cold:.1f} s)")
    print(f"same, embeddings on disk:                  {t_warm:6.1f} s  (CPU {c_warm:.1f} s)")
    print(f"adapted to the study, embeddings on disk:  {t_adapt:6.1f} s  (CPU {c_adapt:.1f} s; "
          f"adaptation {t_adapt - t_warm:.1f} s)")
    print(f"re-prompt of the adapted study:            {t_again:6.1f} s  (CPU {c_again:.1f} s)")
    print(f"peak RSS {peak:.0f} MiB")
    print("stages:", adapted.stages)
    print("voxels per class (as it is -> adapted):",
          {n: (int(np.sum(as_is.labels == v)), int(np.sum(adapted.labels == v))) for n, v in adapted.names.items()})


if __name__ == "__main__":
    main()
