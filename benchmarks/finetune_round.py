"""Benchmark: wall time of one finetuning round on 5 labelled + 20 unlabelled 128^3 volumes.

What an annotation team waits for between correcting and getting better drafts. The volumes are
sample-data phantoms at 128^3 (their reference masks as the "corrections" of five); the round is
the server's default (``medprompt_finetune`` with the defaults of ``trainers/defaults.py``: 300 steps
for a model on LiteMedSAM features, from the shipped model).
Prints the three parts of the round: preparation (to the end of the first step: reading the
volumes, the teacher's targets for the unlabelled ones, text vectors), training, and validation
on the held-out corrected volume plus the safe swap.

    .venv/bin/python benchmarks/finetune_round.py [--device cpu|cuda] [--steps N]
    .venv/bin/python benchmarks/finetune_round.py --model models/medprompt_sam.pt   # the network on LiteMedSAM features
    ... --model models/medprompt_sam.pt --rounds 2   # and the round after it, as annotators ask for it next
    ... --model models/medprompt_sam.pt --workdir /tmp/round   # keep the datastore and embeddings for the next run

With a model on LiteMedSAM features the volumes' embeddings are computed before the clock starts,
as a server's prefetch has them by the time annotators ask for a round (``--cold`` times them too).
"""

from __future__ import annotations

import argparse
import os
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

from medprompt.drafts import checkpoint_arch  # noqa: E402
from medprompt.model.checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from medprompt.phantoms import write_sample_data  # noqa: E402
from medprompt.trainers.finetune import train_finetune  # noqa: E402
from medprompt.trainers.defaults import FINETUNE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--labelled", type=int, default=5)
    p.add_argument("--unlabelled", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=None,
                   help="default: the round's own for the model's kind (trainers.defaults.FINETUNE: "
                        f"{FINETUNE['sam'].steps} for a model on LiteMedSAM features)")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per step (the ViT model)")
    p.add_argument("--device", default="auto")
    p.add_argument("--model", type=Path, default=DEFAULT_CHECKPOINT,
                   help="the served model the round starts from (default: the shipped default model)")
    p.add_argument("--cold", action="store_true", help="LiteMedSAM embeddings not computed beforehand")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds in a row on the same datastore, each from the model the last one left in service; "
                        "later rounds find the teacher's drafts of the unlabelled volumes in the round's cache")
    p.add_argument("--workdir", type=Path, help="keep the datastore and the embedding cache here and reuse them "
                   "on the next run (the warm-up takes about half an hour on a 2-core CPU); every run is still "
                   "the datastore's first round")
    args = p.parse_args()
    if not args.model.is_file():
        sys.exit(f"error: {args.model}: no such model file")
    arch = checkpoint_arch(args.model)
    sam = arch == "sam"
    args.steps = args.steps or FINETUNE[arch].steps
    with tempfile.TemporaryDirectory() as tmp:
        base = args.workdir or Path(tmp)
        warm_mark = base / "warm.done"  # written once the datastore and its embeddings are complete
        kept = args.workdir is not None and warm_mark.is_file()
        if sam:
            os.environ.setdefault("MEDPROMPT_CACHE", str(base / "cache"))
        root = base / "datastore"
        if kept:
            print(f"datastore and embeddings reused from {args.workdir}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            write_sample_data(root, n=args.labelled + args.unlabelled, seed=300, shape=(args.size,) * 3)
            images = sorted(p.name for p in root.glob("phantom_*.nii.gz"))
            save_corrections(root, root / "reference", images[: args.labelled])
            shutil.rmtree(root / "reference")
            print(f"{args.labelled} labelled + {args.unlabelled} unlabelled phantoms of {args.size}^3 "
                  f"written in {time.perf_counter() - t:.0f} s")
        served = root / "model" / "medprompt.pt"
        shutil.rmtree(served.parent, ignore_errors=True)  # the round's own work too: every run is a first round
        served.parent.mkdir()
        shutil.copy(args.model, served)
        if sam and not args.cold and not kept:
            t = time.perf_counter()
            warm_embeddings(root, served, args.device)
            print(f"LiteMedSAM embeddings of the {args.labelled + args.unlabelled} volumes computed in "
                  f"{time.perf_counter() - t:.0f} s (before the round, as the server's prefetch does)")
        if not args.cold:
            warm_mark.write_text("done\n")

        device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.device != "cpu" else \
            f"cpu ({torch.get_num_threads()} threads)"
        print(f"device: {device}")
        for number in range(1, args.rounds + 1):
            marks: dict[str, float] = {}

            def on_step(step: int, _losses: dict) -> None:
                marks.setdefault("first", time.perf_counter())
                marks["last"] = time.perf_counter()

            start = time.perf_counter()
            result = train_finetune(root, served, steps=args.steps, batch_size=None if sam else args.batch_size,
                                    device=args.device, progress=True, on_step=on_step)
            end = time.perf_counter()
            train_s = marks["last"] - marks["first"]
            print(f"round {number}: {end - start:.0f} s = preparation {marks['first'] - start:.0f} s + training "
                  f"{train_s:.0f} s ({args.steps} steps per pass; with unlabelled studies a second, self-training "
                  f"pass follows the first's drafts of them) + validation and swap {end - marks['last']:.0f} s")
            print(f"round {number}: validation mDice {result.previous_score:.3f} -> {result.candidate_score:.3f}, "
                  f"accepted {result.accepted}; peak RSS so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


def warm_embeddings(root: Path, served: Path, device: str) -> None:
    """Every volume's LiteMedSAM embeddings into the embedding cache: a draft of the round's classes
    (the served model's and the corrections'), as a server has made them by the time annotators ask
    for a round; classes with their own window (lungs, bone) need embeddings of their own."""
    import json

    from tqdm import tqdm

    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume
    from medprompt.model.sam_checkpoint import load_net
    from medprompt.model.sam_features import study_stack
    from medprompt.sam import segmenter_factory

    classes = list(load_net(served)[1].get("classes", []))
    for sidecar in (root / "labels" / "final").glob("*.json"):
        classes += [c for c in json.loads(sidecar.read_text()).get("labels", {}) if c not in classes]
    make = segmenter_factory(None, device)
    # minutes a volume on a CPU without bf16: say how far it is
    for path in tqdm(sorted(root.glob("phantom_*.nii.gz")), desc="embeddings before the round", unit="volume"):
        volume = load_volume(path)
        study_stack(volume, make)
        draft(volume, classes, refine="sam")


if __name__ == "__main__":
    main()
