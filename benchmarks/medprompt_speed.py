"""Benchmark: MedPromptNet full-volume inference on a 512x512x200 CT (Synapse 8 prompts).

Same volume as prior_speed.py (the real ct_abdomen_a resampled to 512x512x200). Reports wall time
of the network's ``predict`` (its regions on the input grid, no LiteMedSAM boundary), the process's
peak RSS and, on a GPU, the peak GPU memory allocated by torch. The default is the shipped model
(on LiteMedSAM's features: the warm-up computes the slices' embeddings, so the timed calls read them
from the cache, as a re-prompted study does; its prior fallback is timed too); ``--checkpoint
models/medprompt_vit.pt`` times the ViT that reads pixels. benchmarks/sam_speed.py times whole drafts.

    .venv/bin/python benchmarks/medprompt_speed.py [--checkpoint models/medprompt_vit.pt] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from prior_speed import CASE, clinical_size_ct  # noqa: E402

from medprompt.catalog import SYNAPSE8, default_catalog  # noqa: E402
from medprompt.drafts import checkpoint_arch  # noqa: E402
from medprompt.model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from medprompt.model.predictor import load_checkpoint  # noqa: E402
from medprompt.model.sam_predictor import load_sam_predictor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image", type=Path, default=CASE, help="CT to resample (default: ../shared ct_abdomen_a)")
    p.add_argument("--shape", type=int, nargs=3, default=[512, 512, 200])
    args = p.parse_args()
    vol = clinical_size_ct(tuple(args.shape), args.image)
    path = args.checkpoint or DEFAULT_CHECKPOINT
    sam = checkpoint_arch(path) == "sam"
    predictor = (load_sam_predictor if sam else load_checkpoint)(path, device=args.device)
    entries = [default_catalog()[c] for c in SYNAPSE8]
    print(f"device {predictor.device} ({torch.cuda.get_device_name() if predictor.device.type == 'cuda' else 'cpu'}), "
          f"threads {torch.get_num_threads()}, model {path} ({'on LiteMedSAM features' if sam else 'ViT'})")
    print(f"volume {vol.data.shape} spacing {np.round(vol.spacing, 3)} mm")
    predictor.predict(vol, entries)  # warm-up (CUDA context, kernels; LiteMedSAM's embeddings into the cache)
    if predictor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        labels = predictor.predict(vol, entries)
        if predictor.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB" if predictor.device.type == "cuda" else ""
    print(f"predict (8 prompts): best {min(times):.2f} s, median {np.median(times):.2f} s over {args.repeats}")
    print(f"peak RSS {rss:.0f} MiB{gpu}; foreground voxels {int((labels > 0).sum())}")


if __name__ == "__main__":
    main()
