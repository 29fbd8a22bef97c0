"""Resuming a training run: a run continues only its own partial state, and says what it did.

A run's optimiser state sits beside its model file (``OUT.pt.state``, written by
distributed.end_of_step). Its ``run`` entry records what the run depends on: the settings, the
network's architecture, the file it started from, and a digest of what it learns from (the studies'
names and the teacher's targets). A second command with the same ``--out`` resumes only when all of
that is the same; other studies, settings or a teacher that changed start over and say why, rather
than finish someone else's run. A state that says the run is complete makes the command a no-op, and
:func:`describe` tells the user so instead of claiming a model was written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

# Settings that say where or for how long a run goes, not what it learns: a resumed run may change them.
NOT_THE_RUN = ("out", "device", "save_every", "resume", "time_limit_s")


@dataclass(frozen=True)
class TrainingRun:
    """What one training call did: ``out`` holds the model at ``step`` of ``steps``; the call began at
    ``start`` (0, or the step a partial run had reached)."""

    out: Path
    start: int
    step: int
    steps: int
    round: int = 1  # of ``rounds`` (train-zero-shot --rounds): each round is a run of its own
    rounds: int = 1

    @property
    def complete(self) -> bool:
        return self.step >= self.steps

    @property
    def trained(self) -> int:
        """Steps this call trained (0: the run was already complete)."""
        return self.step - self.start


def digest(arrays: Iterable[np.ndarray | torch.Tensor]) -> str:
    """A short content hash of arrays (the training targets): two runs on the same studies with the same
    teacher hash alike; a study swapped, or a teacher that draws differently, does not."""
    h = hashlib.sha1()
    for a in arrays:
        raw = a.detach().cpu().contiguous().numpy() if isinstance(a, torch.Tensor) else np.ascontiguousarray(a)
        h.update(str((raw.dtype.str, raw.shape)).encode())
        h.update(raw.tobytes())
    return h.hexdigest()[:16]


def file_stamp(path: Path | str | None) -> str | None:
    """A starting model file by path, size and modification time: the same path rewritten is another start."""
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def run_identity(**fields: Any) -> dict[str, Any]:
    """The ``run`` entry of a state: ``fields`` as plain JSON values, so a saved and a new one compare equal."""
    return json.loads(json.dumps(fields, sort_keys=True, default=str))


def resumable_state(state_path: Path, out: Path | None, run: dict[str, Any], resume: bool,
                    announce: bool = True) -> dict[str, Any] | None:
    """The partial state to continue from, or None to start at step 0.

    ``out``: the model file, which a loop that saves it beside every state needs to exist too (None: the
    state alone holds the run). A state whose ``run`` differs from this run's is not continued; with
    ``announce`` one line names what differs (the studies, the steps, ...) so the user knows the earlier
    run's progress was set aside."""
    if not resume or not state_path.exists() or (out is not None and not out.exists()):
        return None
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    saved = state.get("run")
    if saved == run:
        return state
    if announce:
        if saved is None:
            why = "was written by an older version of this trainer"
        else:
            keys = sorted(k for k in set(saved) | set(run) if saved.get(k) != run.get(k))
            why = f"belongs to a run with other {', '.join(keys)}"
        print(f"{state_path} {why}; starting over at step 0")
    return None


def resume_into(state_path: Path, out: Path | None, run: dict[str, Any], resume: bool, announce: bool,
                model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                model_key: str = "net") -> int:
    """Load this run's partial state (``resumable_state``) into the model, optimiser and schedule; returns the
    step to continue from (0: nothing to resume)."""
    state = resumable_state(state_path, out, run, resume, announce)
    if state is None:
        return 0
    model.load_state_dict(state[model_key])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])


def describe(run: TrainingRun) -> str:
    """The CLI's closing line for a training command."""
    of = f" of round {run.round} of {run.rounds}" if run.rounds > 1 else ""
    if not run.complete:
        return f"{run.out} holds step {run.step} of {run.steps}{of}; run the same command again to resume"
    steps = f"{run.rounds} rounds of {run.steps} steps" if run.rounds > 1 else f"{run.steps} steps"
    if run.trained == 0:
        return (f"{run.out} is already trained: {steps} of this run (the same inputs and settings); nothing was "
                f"trained. --no-resume trains it again")
    resumed = f", resumed at step {run.start}{of}" if run.start else ""
    return f"wrote {run.out} ({steps}{resumed})"
