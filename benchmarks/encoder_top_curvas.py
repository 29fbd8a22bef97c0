"""Benchmark (development): CURVAS k = 1 with LiteMedSAM's encoder frozen, against its last stage tuned.

Why: every k = 1 variant measured on LiteMedSAM's frozen embeddings stops near 0.75 (BENCHMARKS.md, issue 9),
and even four corrected patients reach only 0.79: one patient's 6-12 slices do not teach a per-cell head on
fixed features where another patient's kidney and pancreas are. This asks whether the features themselves
should move: the encoder's last stage (TinyViT ``layers[3]``, 2.5 M parameters at 64 x 64 tokens) and its
neck, finetuned on the corrected patient's slices and their image-space variants (trainers.augment2d).

Both arms train the same small per-cell head (two 1 x 1 convolutions over the 256-d embedding and the cell's
position, class-balanced soft cross-entropy on the cells' area fractions, 300 steps of 4 views) on one patient,
and draft every other patient's slices through the product's 2D path (``drafts2d.draft2d``: the map ->
boxes -> LiteMedSAM on the frozen embedding -> the mask kept if more probable than not), scored as
``label_efficiency_real.py`` scores (each organ on each slice; an empty draft of an absent organ is 1).
The head is not MedPromptNet (no text head, no shipped start, no semi-supervised pass): compare the arms
with each other, not with the product's figures.

    .venv/bin/python benchmarks/encoder_top_curvas.py [--arms frozen tuned neck] [--rotations 0 1 2 3 4]

The encoder's first three stages run once per image and variant (about 3 min for the 46 slices x 9 views);
each tuned round takes about 8 min on a 2-core CPU. Writes benchmarks/results/encoder_top_curvas.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from label_efficiency_real import ORGANS, REAL2D as DATA, RESULTS, dice  # noqa: E402  (the same slices, scored the same way)
from provenance import footer  # noqa: E402

TUNED = {"frozen": (), "tuned": ("layer3", "neck"), "neck": ("neck",)}


class CellHead(nn.Module):
    """Per cell: embedding (256) + position (3) -> background + one logit per organ."""

    def __init__(self, classes: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(256 + 3, 128, 1), nn.GELU(), nn.Conv2d(128, 128, 1), nn.GELU(),
                                 nn.Conv2d(128, 1 + classes, 1))

    def forward(self, emb: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([emb, coords.expand(emb.shape[0], -1, -1, -1)], 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="+", choices=list(TUNED), default=["frozen", "tuned"])
    p.add_argument("--rotations", nargs="+", type=int, default=[0, 1, 2, 3, 4],
                   help="which patient is corrected (index in sorted patient ids)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--encoder-lr", type=float, default=3e-5)
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"error: {DATA} not found (the CURVAS slices of ../shared/data/real2d)")

    from medprompt.catalog import default_catalog
    from medprompt.drafts2d import draft2d
    from medprompt.io.image2d import load_image2d, load_label2d
    from medprompt.model.sam_features import cell_coords, cells_to_slices, image_pixels, to_cells
    from medprompt.model.sam_predictor import perfect_map
    from medprompt.sam.preprocess import SliceGeometry, model_input
    from medprompt.trainers.augment2d import COPIES, variants
    from medprompt.sam.weights import load_sam
    from medprompt.trainers.finetune import catalog_with

    names = json.loads((DATA / "labels.json").read_text())["labels"]
    values = [names[o] for o in ORGANS]
    catalog = catalog_with(list(ORGANS), default_catalog())
    images = sorted((DATA / "images").glob("*.png"))
    patient = {q: q.stem.split("-")[1].split("_")[0] for q in images}
    patients = sorted(set(patient.values()))
    encoder = copy.deepcopy(load_sam(None, "cpu").net.image_encoder).float().eval()  # the shared one stays as it is

    @torch.no_grad()
    def stem(x: torch.Tensor) -> torch.Tensor:
        h = encoder.patch_embed(x)
        for layer in encoder.layers[:3]:
            h = layer(h)
        return h.half()

    def top(h: torch.Tensor, layer3: nn.Module, neck: nn.Module) -> torch.Tensor:
        h = layer3(h.float())
        b, n, c = h.shape
        side = int(round(n ** 0.5))
        return neck(h.view(b, side, side, c).permute(0, 3, 1, 2))

    t0 = time.perf_counter()
    data = {}
    for q in images:
        img = load_image2d(q)
        lab, _ = load_label2d(DATA / "labels" / q.name, img)
        px, mm, _ = image_pixels(img)
        g = SliceGeometry.for_slice(px.shape, mm)
        views = [(stem(model_input(vp[None], g)), to_cells(vl[None], g, values)[0])
                 for vp, vl in [(px, lab), *variants(px, lab, COPIES)]]
        data[q] = (img, lab, views, g)
    print(f"encoder stages 1-3 on {len(images)} slices x {1 + COPIES} views: {time.perf_counter() - t0:.0f} s",
          flush=True)

    rows = []
    for arm in args.arms:
        scores = {o: [] for o in ORGANS}
        held = {o: [] for o in ORGANS}
        per_rotation = []
        seconds = []
        for j in args.rotations:
            corrected = patients[j]
            train = [q for q in images if patient[q] == corrected]
            test = [q for q in images if patient[q] != corrected]
            torch.manual_seed(0)
            rng = np.random.default_rng(0)
            layer3, neck = copy.deepcopy(encoder.layers[3]), copy.deepcopy(encoder.neck)
            layer3.eval()  # BatchNorm keeps LiteMedSAM's statistics
            neck.eval()
            tuned = [m for n, m in (("layer3", layer3), ("neck", neck)) if n in TUNED[arm]]
            for m in (layer3, neck):
                m.requires_grad_(m in tuned)
            head = CellHead(len(ORGANS))
            coords = cell_coords(data[train[0]][3])[None]
            groups = [{"params": list(head.parameters()), "lr": 1e-3}]
            if tuned:
                groups.append({"params": [w for m in tuned for w in m.parameters()], "lr": args.encoder_lr})
            pool = [v for q in train for v in data[q][2]]
            share = torch.stack([t for _, t in pool]).mean((0, 2, 3)).clamp(min=1e-4)
            weight = share ** -0.5
            weight = (weight / weight.mean())[None, :, None, None]
            fixed = None
            if not tuned:
                with torch.no_grad():
                    fixed = [top(h, layer3, neck) for h, _ in pool]
            opt = torch.optim.AdamW(groups, weight_decay=0.01)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups],
                                                        total_steps=args.steps, pct_start=0.1)
            t1 = time.perf_counter()
            for _ in range(args.steps):
                pick = rng.choice(len(pool), 4, replace=False)
                emb = (torch.cat([fixed[i] for i in pick]) if fixed is not None
                       else top(torch.cat([pool[i][0] for i in pick]), layer3, neck))
                target = torch.stack([pool[i][1] for i in pick])
                loss = -(target * F.log_softmax(head(emb, coords), 1) * weight).sum(1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
            seconds.append(time.perf_counter() - t1)
            with torch.no_grad():
                maps = {str(q): cells_to_slices(F.softmax(head(top(data[q][2][0][0], layer3, neck), coords), 1),
                                                data[q][3])[0].numpy() for q in test}

            def saliency(image, entry) -> np.ndarray:
                return maps[image.source][1 + ORGANS.index(entry.name)]

            saliency.probability = True  # a softmax, read as drafts2d reads MedPromptNet's
            saliency.perfect = perfect_map
            rot = {o: [] for o in ORGANS}
            for q in test:
                img, lab = data[q][0], data[q][1]
                out = draft2d(img, list(ORGANS), saliency=saliency, catalog=catalog)
                for o in ORGANS:
                    drawn, truth = out.labels == out.names[out.resolved[o]], lab == names[o]
                    d = dice(drawn, truth)
                    rot[o].append(d)
                    scores[o].append(d)
                    if truth.any():
                        held[o].append(d)
            mean = float(np.mean([np.mean(v) for v in rot.values()]))
            per_rotation.append(mean)
            print(json.dumps({"arm": arm, "corrected": corrected, "train_s": round(seconds[-1]),
                              **{o: round(float(np.mean(v)), 3) for o, v in rot.items()}, "mean": round(mean, 3)}),
                  flush=True)
        row = {"arm": arm, **{o: float(np.mean(v)) for o, v in scores.items()},
               **{f"{o}_held": float(np.mean(v)) for o, v in held.items()}, "per_rotation": per_rotation,
               "train_s": float(np.mean(seconds))}
        row["mean"] = float(np.mean([row[o] for o in ORGANS]))
        rows.append(row)
    lines = ["| encoder | pancreas | kidney | liver | mean | per rotation | on the slices holding each organ "
             "(pancreas / kidney / liver) | training per round |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['arm']} ({', '.join(TUNED[r['arm']]) or 'nothing'} tuned) | {r['pancreas']:.3f} | "
              f"{r['kidney']:.3f} | {r['liver']:.3f} | **{r['mean']:.3f}** | "
              f"{' / '.join(f'{m:.3f}' for m in r['per_rotation'])} | "
              f"{r['pancreas_held']:.3f} / {r['kidney_held']:.3f} / {r['liver_held']:.3f} | {r['train_s']:.0f} s |"
              for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encoder_top_curvas.md").write_text("\n".join(lines) + "\n\n" + footer() + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
