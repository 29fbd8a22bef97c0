"""Benchmark: gScoreCAM and M2IB per image on a BiomedCLIP-sized image tower (random weights).

BiomedCLIP's weights are not on this machine, so the tower is timm's ``vit_base_patch16_224`` at
224 px (BiomedCLIP's architecture) with random weights and a small text tower: the work per image
is the same as BiomedCLIP's (the text is encoded once per prompt and cached). Reports the mean wall
time per image of each method at MedCLIP-SAM's settings and the number of torch threads.

    .venv/bin/python benchmarks/clip_saliency_speed.py [--images 2] [--threads 2] [--top-k 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.clip import saliency  # noqa: E402
from medprompt.clip.model import load_clip, write_model_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--top-k", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = {"embed_dim": 512,
           "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                          "timm_pool": "", "timm_proj": "linear", "image_size": 224},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        folder = write_model_folder(Path(tmp) / "vitb16", open_clip.CLIP(**cfg).eval(), cfg,
                                    OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        clip = load_clip(str(folder))
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 255, (512, 512)).astype(np.uint8) for _ in range(args.images)]
        clip.text_vector("breast tumour")  # once per prompt in use: not part of the per-image cost
        runs = {"gscorecam": lambda im: saliency.gscorecam(clip, im, "breast tumour", top_k=args.top_k),
                "m2ib": lambda im: saliency.m2ib(clip, im, "breast tumour")}
        for name, run in runs.items():
            t0 = time.perf_counter()
            for im in images:
                run(im)
            per = (time.perf_counter() - t0) / len(images)
            print(f"{name:10s} {per:6.2f} s/image  (ViT-B/16 224 px, {args.threads} threads, "
                  f"{'top_k=' + str(args.top_k) if name == 'gscorecam' else '10 steps x 10 samples'})")


if __name__ == "__main__":
    main()
