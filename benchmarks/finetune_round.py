"""Benchmark: wall time of one finetuning round on 5 labelled + 20 unlabelled 128^3 volumes.

What an annotation team waits for between correcting and getting better drafts. The volumes are
sample-data phantoms at 128^3 (their reference masks as the "corrections" of five); the round is
the server's default (``medprompt_finetune``: 200 steps x 8 tiles, from the shipped model).
Prints the three parts of the round: preparation (to the end of the first step: reading the
volumes, the teacher's targets for the unlabelled ones, text vectors), training, and validation
on the held-out corrected volume plus the safe swap.

    .venv/bin/python benchmarks/finetune_round.py [--device cpu|cuda] [--steps 200]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from label_efficiency import save_corrections  # noqa: E402

from medprompt.model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from medprompt.phantoms import write_sample_data  # noqa: E402
from medprompt.trainers.finetune import train_finetune  # noqa: E402
from medprompt.trainers.finetune_task import DEFAULT_STEPS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", type=int, default=5)
    p.add_argument("--unlabelled", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "datastore"
        t = time.perf_counter()
        write_sample_data(root, n=args.labelled + args.unlabelled, seed=300, shape=(args.size,) * 3)
        images = sorted(p.name for p in root.glob("phantom_*.nii.gz"))
        save_corrections(root, root / "reference", images[: args.labelled])
        shutil.rmtree(root / "reference")
        print(f"{args.labelled} labelled + {args.unlabelled} unlabelled phantoms of {args.size}^3 "
              f"written in {time.perf_counter() - t:.0f} s")
        served = root / "model" / "medprompt.pt"
        served.parent.mkdir()
        shutil.copy(DEFAULT_CHECKPOINT, served)

        marks: dict[str, float] = {}

        def on_step(step: int, _losses: dict) -> None:
            marks.setdefault("first", time.perf_counter())
            marks["last"] = time.perf_counter()

        start = time.perf_counter()
        result = train_finetune(root, served, steps=args.steps, batch_size=args.batch_size, device=args.device,
                                progress=True, on_step=on_step)
        end = time.perf_counter()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
        f"cpu ({torch.get_num_threads()} threads)"
    train_s = marks["last"] - marks["first"]
    print(f"device: {device}")
    print(f"round: {end - start:.0f} s = preparation {marks['first'] - start:.0f} s + training {train_s:.0f} s "
          f"({args.steps} steps x {args.batch_size} tiles, {args.steps * args.batch_size / max(train_s, 1e-9):.1f} "
          f"tiles/s) + validation and swap {end - marks['last']:.0f} s")
    print(f"validation mDice {result.previous_score:.3f} -> {result.candidate_score:.3f}, accepted {result.accepted}; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
