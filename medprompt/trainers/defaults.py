"""Each round's default steps, batch size and learning rate, per model kind (and the 2D weak model's).

One table, read by the CLI, the server's train tasks and the benchmarks, so that a round started from a
client runs the recipe that `medprompt train-finetune` runs and BENCHMARKS.md measures (the server's
rounds used to take 200 steps where the CLI took 300, and zero-shot 200 where the CLI took 600).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundDefaults:
    """What a round takes when its caller names nothing."""

    steps: int
    batch_size: int
    lr: float


# "sam": the head on LiteMedSAM's cached embeddings (0.08-0.2 s a step on a 2-core CPU);
# "vit": the older network trained from pixels (about 2.3 s a step there).
ZERO_SHOT = {"sam": RoundDefaults(steps=600, batch_size=16, lr=1e-3),
             "vit": RoundDefaults(steps=2000, batch_size=8, lr=3e-4)}
FINETUNE = {"sam": RoundDefaults(steps=300, batch_size=16, lr=3e-4),
            "vit": RoundDefaults(steps=500, batch_size=8, lr=1e-4)}
# The 2D weak-supervision U-Net (`train-weak`, task medprompt_weak2d): both passes together.
WEAK = RoundDefaults(steps=300, batch_size=4, lr=3e-3)
