"""How waiting CPU threads behave when a draft and a training round share a small machine.

The server drafts in its own process while MONAI Label runs a training round in a subprocess, so on
a CPU the two compete for the same cores. torch's CPU threads come from the OpenMP runtime (libgomp
on Linux), whose threads spin for a while at every barrier before they sleep. Alone on a CPU that
saves wake-ups; beside another process it burns the time slices the other's threads need. On the
2-core CPU a CURVAS finetune round took 5.6x as long beside a two-thread torch job, which itself ran
at a fifth of its speed; with sleeping waits each ran at about half speed, as two jobs sharing two
cores should (BENCHMARKS.md, "A draft and a training round on one small CPU").
"""

from __future__ import annotations

import os
import sys

WAIT_POLICY = "OMP_WAIT_POLICY"


def share_cpu() -> bool:
    """Let waiting OpenMP threads sleep, in this process and in the processes it starts.

    The runtime reads ``OMP_WAIT_POLICY`` once, when torch loads it, so this reaches the calling
    process only if torch is not imported yet; children (training rounds, batch drafts) always
    inherit it. A value the user set is kept. Returns whether this process's threads sleep.
    """
    os.environ.setdefault(WAIT_POLICY, "PASSIVE")
    return shares_cpu() and "torch" not in sys.modules


def shares_cpu() -> bool:
    """Whether this process was started with sleeping waits (what ``share_cpu`` gives a server)."""
    return os.environ.get(WAIT_POLICY, "").strip().upper() == "PASSIVE"
