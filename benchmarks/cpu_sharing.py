"""Benchmark: a draft and a training round on one small CPU, as the server runs them, under each wait policy.

MONAI Label drafts in the server process while a round trains in a subprocess, so annotators who ask
for drafts during a round share the cores with it. torch's OpenMP threads spin for a while when they
wait (libgomp's default) or sleep at once (``OMP_WAIT_POLICY=PASSIVE``, what ``medprompt serve`` sets:
``medprompt/cpu_sharing.py``). For each policy this times, in fresh processes:
- a ``medprompt train-finetune`` round alone, and with a process drafting beside it the whole time;
- a draft (``draft`` with the medprompt model and LiteMedSAM, embeddings cached) alone, and beside the round.

The datastore is sample-data phantoms (one corrected, the rest unlabelled), so it runs anywhere;
a warm-up draft and round fill the embedding cache first.

    .venv/bin/python benchmarks/cpu_sharing.py [--steps N] [--studies 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from medprompt.trainers.defaults import FINETUNE  # noqa: E402  (no torch: this process's threads stay unset)

POLICIES = {"spin (OpenMP default)": None, "PASSIVE (medprompt serve)": "PASSIVE"}
PROMPTS = ["liver", "spleen", "kidney_left"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, help="steps per training pass (default: the round's own, as served)")
    p.add_argument("--studies", type=int, default=3, help="phantoms in the datastore, one of them corrected")
    p.add_argument("--quiet-drafts", type=int, default=3, help="drafts timed alone per policy")
    p.add_argument("--workdir", type=Path, help="keep the datastore and embedding cache here (default: a temp dir)")
    p.add_argument("--drafter", type=Path, help=argparse.SUPPRESS)  # internal: draft this study in a loop
    p.add_argument("--log", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.drafter is not None:
        return drafter(args.drafter, args.log, args.count)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        study, store = prepare(work, args.studies)
        base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        base["MEDPROMPT_CACHE"] = str(work / "cache")
        print("warm-up: a draft and a round fill the embedding cache", flush=True)
        draft_times(study, base, work / "warm.log", count=1)
        round_time(store, base, args.steps)
        rows = []
        for name, policy in POLICIES.items():
            env = dict(base, **({"OMP_WAIT_POLICY": policy} if policy else {}))
            quiet_round = round_time(store, env, args.steps)
            quiet_draft = statistics.median(draft_times(study, env, work / "quiet.log", count=args.quiet_drafts))
            shared_round, shared = side_by_side(study, store, env, args.steps, work / "shared.log")
            rows.append((name, quiet_round, shared_round, quiet_draft, shared))
            print(f"{name}: round {quiet_round:.0f} s alone, {shared_round:.0f} s beside drafts; draft "
                  f"{quiet_draft:.1f} s alone, {fmt(shared)} beside the round", flush=True)
    threads = os.environ.get("OMP_NUM_THREADS") or str(os.cpu_count())
    steps = args.steps or FINETUNE["sam"].steps
    print(f"\n{args.studies} phantoms (1 corrected), {steps} steps per pass, {threads} threads per process\n")
    print("| waiting threads | round alone | round beside drafts | draft alone | draft beside the round "
          "(median, drafts done) |")
    print("|---|---|---|---|---|")
    for name, quiet_round, shared_round, quiet_draft, shared in rows:
        beside = fmt(shared) + (f" ({statistics.median(shared) / quiet_draft:.1f}x, {len(shared)})" if shared else "")
        print(f"| {name} | {quiet_round:.0f} s | {shared_round:.0f} s ({shared_round / quiet_round:.1f}x) | "
              f"{quiet_draft:.1f} s | {beside} |")
    from provenance import footer

    print("\n" + footer())


def fmt(times: list[float]) -> str:
    return f"{statistics.median(times):.1f} s" if times else "no draft finished"


def prepare(work: Path, studies: int) -> tuple[Path, Path]:
    """A datastore of ``studies`` phantoms (the first corrected) and one more phantom to draft."""
    from label_efficiency import save_corrections

    from medprompt.phantoms import write_sample_data

    store, extra = work / "datastore", work / "draft"
    if not (store / "labels" / "final").is_dir():
        shutil.rmtree(store, ignore_errors=True)
        images = write_sample_data(store, n=studies, seed=500)
        save_corrections(store, store / "reference", [images[0].name])
        shutil.rmtree(store / "reference")
    if not (extra / "phantom_000.nii.gz").is_file():
        write_sample_data(extra, n=1, seed=600)
    return extra / "phantom_000.nii.gz", store


def round_time(store: Path, env: dict[str, str], steps: int | None) -> float:
    """Wall seconds of a datastore's first round (its model folder removed first), in a fresh process."""
    shutil.rmtree(store / "model", ignore_errors=True)
    start = time.perf_counter()
    command = [sys.executable, "-m", "medprompt", "train-finetune", "--studies", str(store)]
    done = subprocess.run(command + (["--steps", str(steps)] if steps else []), env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"error: the round failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def draft_times(study: Path, env: dict[str, str], log: Path, count: int) -> list[float]:
    log.unlink(missing_ok=True)
    with log.with_suffix(".err").open("w") as err:  # its library warnings, out of the table's way
        subprocess.run([sys.executable, __file__, "--drafter", str(study), "--log", str(log), "--count", str(count)],
                       env=env, check=True, stderr=err)
    return read_times(log)


def side_by_side(study: Path, store: Path, env: dict[str, str], steps: int | None,
                 log: Path) -> tuple[float, list[float]]:
    """A drafting loop runs for the whole round; returns the round's seconds and the drafts finished in it."""
    log.unlink(missing_ok=True)
    with log.with_suffix(".err").open("w") as err:
        loop = subprocess.Popen([sys.executable, __file__, "--drafter", str(study), "--log", str(log)], env=env,
                                stderr=err)
    try:
        while not log.is_file() or "ready" not in log.read_text():  # models loaded: drafting from now on
            if loop.poll() is not None:
                sys.exit("error: the drafting loop exited before it was ready")
            time.sleep(0.2)
        seconds = round_time(store, env, steps)
    finally:
        loop.terminate()
        loop.wait()
    return seconds, read_times(log)


def read_times(log: Path) -> list[float]:
    return [float(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("draft ")]


def drafter(study: Path, log: Path, count: int) -> None:
    """Draft ``study`` with the shipped medprompt model and LiteMedSAM, ``count`` times (0: until killed)."""
    from medprompt.drafts import draft
    from medprompt.io.volume import load_volume

    volume = load_volume(study)
    draft(volume, PROMPTS, model="medprompt")  # loads the models and the embeddings
    with log.open("a") as out:
        out.write("ready\n")
        out.flush()
        n = 0
        while count == 0 or n < count:
            start = time.perf_counter()
            draft(volume, PROMPTS, model="medprompt")
            out.write(f"draft {time.perf_counter() - start:.3f}\n")
            out.flush()
            n += 1


if __name__ == "__main__":
    main()
