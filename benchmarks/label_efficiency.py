"""Benchmark: Dice vs number of labelled volumes on phantoms, semi-supervised vs supervised-only.

Every round starts from one base model, as in the app (a round starts from the model in service):
by default the shipped zero-shot checkpoint, or, with ``--zero-shot-steps N``, one trained here on
the pool's images. For each budget B a finetuning round runs twice: semi-supervised (B labelled +
the rest of the pool unlabelled, teacher + consistency) and supervised-only (the same B labelled
volumes alone). Both are scored on held-out phantoms (Synapse-8 mDice; budget 0 is the base
model). Writes a Markdown table and a PNG plot.

    .venv/bin/python benchmarks/label_efficiency.py --steps 500 --device cuda
    .venv/bin/python benchmarks/label_efficiency.py --steps 60 --device cpu      # ~40 min on 2 cores
    .venv/bin/python benchmarks/label_efficiency.py --config tiny --zero-shot-steps 20 --steps 20  # mechanics
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medprompt.catalog import SYNAPSE8, default_catalog  # noqa: E402
from medprompt.evaluation import evaluate  # noqa: E402
from medprompt.io.volume import load_labelmap, load_volume, sidecar_path  # noqa: E402
from medprompt.model.checkpoint import VIT_CHECKPOINT  # noqa: E402
from medprompt.model.predictor import load_checkpoint  # noqa: E402
from medprompt.phantoms import write_sample_data  # noqa: E402
from medprompt.trainers.finetune import train_finetune  # noqa: E402
from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot  # noqa: E402
from provenance import footer  # noqa: E402


def score(model: Path, test_dir: Path, device: str) -> float:
    predictor = load_checkpoint(model, device=device)
    entries = [default_catalog()[c] for c in SYNAPSE8]
    values = []
    for image in sorted(test_dir.glob("phantom_*.nii.gz")):
        volume = load_volume(image)
        labels = predictor.predict(volume, entries)
        ref, ref_affine, names = load_labelmap(test_dir / "reference" / image.name)
        ev = evaluate(labels, volume.affine, {c: i + 1 for i, c in enumerate(SYNAPSE8)}, ref, ref_affine, names)
        values.append(ev.mdice)
    return float(np.mean(values))


def save_corrections(root: Path, references: Path, names: list[str]) -> None:
    """Phantoms' reference masks (and their class-name sidecars) as a datastore's saved final labels."""
    final = root / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(references / name, final / name)
        shutil.copy(sidecar_path(references / name), sidecar_path(final / name))


def datastore(root: Path, pool: Path, labelled: list[str], unlabelled: list[str]) -> Path:
    root.mkdir(parents=True)
    for name in labelled + unlabelled:
        shutil.copy(pool / name, root / name)
    save_corrections(root, pool / "reference", labelled)
    return root


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="small")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    p.add_argument("--pool", type=int, default=12, help="training phantoms (labelled + unlabelled)")
    p.add_argument("--test", type=int, default=4, help="held-out phantoms")
    p.add_argument("--zero-shot-steps", type=int, default=0,
                   help="train the base model here for this many steps (default 0: the shipped checkpoint)")
    p.add_argument("--steps", type=int, default=500, help="steps per finetuning round")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pool, test = tmp / "pool", tmp / "test"
        write_sample_data(pool, n=args.pool, seed=100)
        write_sample_data(test, n=args.test, seed=900)
        names = sorted(p.name for p in pool.glob("phantom_*.nii.gz"))
        if args.zero_shot_steps:
            zs_dir = tmp / "zs"
            (zs_dir / "images").mkdir(parents=True)
            for n in names:
                shutil.copy(pool / n, zs_dir / "images" / n)
            t = time.perf_counter()
            base = train_zero_shot(ZeroShotConfig(studies=[zs_dir / "images"], out=zs_dir / "model.pt",
                                                  steps=args.zero_shot_steps, batch_size=args.batch_size,
                                                  model_config=args.config, device=args.device), progress=False).out
            print(f"zero-shot model: {time.perf_counter() - t:.0f} s")
        else:
            base = VIT_CHECKPOINT
        zero = score(base, test, args.device)
        print(f"base model {base.name}: held-out mDice {zero:.3f}")
        for budget in args.budgets:
            if budget == 0:
                rows.append({"labelled": 0, "semi": zero, "supervised": zero})
                continue
            labelled, unlabelled = names[:budget], names[budget:]
            result = {"labelled": budget}
            for method, unl in (("semi", unlabelled), ("supervised", [])):
                root = datastore(tmp / f"{method}_{budget}", pool, labelled, unl)
                served = root / "model" / "medprompt.pt"
                served.parent.mkdir()
                shutil.copy(base, served)
                t = time.perf_counter()
                outcome = train_finetune(root, served, steps=args.steps, batch_size=args.batch_size,
                                         device=args.device, progress=False)
                result[f"{method}_accepted"] = outcome.accepted  # else the base model stayed in service
                result[method] = score(served, test, args.device)
                result[f"{method}_s"] = round(time.perf_counter() - t)
            rows.append(result)
            print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    def cell(r: dict, method: str) -> str:
        kept = r.get(f"{method}_accepted", True)
        return f"{r[method]:.3f}" + ("" if kept else " (round rejected, base kept)")

    lines = ["| labelled volumes | semi-supervised mDice | supervised-only mDice |", "|---|---|---|"]
    lines += [f"| {r['labelled']} | {cell(r, 'semi')} | {cell(r, 'supervised')} |" for r in rows]
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".md").write_text(table + "\n\n" + footer() + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["labelled"] for r in rows]
    ax.plot(xs, [r["semi"] for r in rows], "o-", label="semi-supervised (labels + unlabelled)")
    ax.plot(xs, [r["supervised"] for r in rows], "s--", label="supervised-only (labels)")
    ax.set_xlabel("labelled phantoms")
    ax.set_ylabel("held-out mDice (Synapse 8)")
    ax.set_title(f"label efficiency ({base.name}, {args.steps} steps per round)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
