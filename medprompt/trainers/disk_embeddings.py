"""A round's LiteMedSAM embeddings on disk, read slice by slice as batches ask for them.

A finetune round trains on every study of the datastore, and each sampled slice's embedding is 2 MB
(256 x 64 x 64 float16) against about 100 KB for its targets: held in memory, 5 corrected + 20
unlabelled 128^3 volumes took 9.8 GB, and a datastore of a hundred CTs would not fit. So a study's
embeddings are written once to a raw file in the round's work folder and each batch reads the rows it
draws (explicit reads, not a memory map: the pages stay the kernel's file cache, reclaimable, instead
of growing the process).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import replace
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import torch

from medprompt.errors import MedPromptError, one_line

if TYPE_CHECKING:
    from medprompt.trainers.cells import CellStudy

PREFIX = "embeddings_"


class DiskEmbeddings:
    """Rows of a (K, 256, 64, 64) float16 file; indexed like the tensor it stands for (``emb[idx]`` with
    an index tensor of any shape gives a float16 tensor of shape idx.shape + (256, 64, 64))."""

    def __init__(self, path: Path, full_shape: tuple[int, ...], rows: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.full_shape = tuple(int(n) for n in full_shape)
        self.rows = list(range(self.full_shape[0])) if rows is None else [int(r) for r in rows]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.full_shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, idx) -> torch.Tensor:
        """Each distinct row is read once (a batch's neighbour indices repeat slices)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        distinct, where = np.unique(idx.reshape(-1).numpy(), return_inverse=True)
        row = self.full_shape[1:]
        out = np.empty((len(distinct), *row), np.float16)
        nbytes = prod(row) * 2
        with open(self.path, "rb") as f:
            for n, j in enumerate(distinct.tolist()):
                f.seek(self.rows[j] * nbytes)
                if f.readinto(memoryview(out[n]).cast("B")) != nbytes:
                    raise OSError(f"{self.path}: embedding file is shorter than its {self.full_shape[0]} slices")
        return torch.from_numpy(out[where.reshape(-1)]).reshape(*idx.shape, *row)

    def select(self, keep: Sequence[int]) -> "DiskEmbeddings":
        """The same file, rows ``keep`` only (no copy: a held-out split of a corrected study)."""
        return DiskEmbeddings(self.path, self.full_shape, [self.rows[int(j)] for j in keep])


@contextmanager
def spill_folder(work: Path) -> Iterator[Path]:
    """A folder of this process's own under ``work`` for one round, removed when the round ends (also on
    an error); folders of rounds whose process is gone (killed mid-round) are removed first."""
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob(f"{PREFIX}*"):
        pid = old.name[len(PREFIX):].split("_")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}_", dir=work))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def spilled(study: "CellStudy", folder: Path | None) -> "CellStudy":
    """``study`` with its embeddings moved to a file in ``folder`` (unchanged when ``folder`` is None or
    they already are on disk)."""
    if folder is None or isinstance(study.embeddings, DiskEmbeddings):
        return study
    emb = study.embeddings.to(torch.float16).contiguous()
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".f16")
    try:
        with os.fdopen(fd, "wb") as f:
            emb.numpy().tofile(f)
    except OSError as e:  # a full disk: say what the round needs, not a traceback
        Path(tmp).unlink(missing_ok=True)
        raise MedPromptError(f"cannot keep {study.name}'s LiteMedSAM embeddings ({emb.numel() * 2 >> 20} MB) in "
                             f"{folder}: {one_line(e)}; a training round needs free disk about the size of its "
                             f"studies' embeddings (2 MB per sampled slice)") from None
    return replace(study, embeddings=DiskEmbeddings(Path(tmp), tuple(emb.shape)))
