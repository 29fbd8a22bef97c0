"""What a localiser hands to a segmenter: where each class is, on the localiser's own working grid.

Localisers (the anatomy prior, the MedPrompt network, later saliency maps and the annotator's
clicks) are good at *where* and poor at boundaries; the segmenter (LiteMedSAM, medprompt.sam)
draws the boundary inside the region. This type is the whole contract between the two layers,
so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medprompt.prior.geometry import WorkFrame


@dataclass
class Localization:
    """A boolean mask per class name on a working grid, that grid's frame back to the input, and
    the modality the localiser decided on (it picks LiteMedSAM's intensity preprocessing)."""

    masks: dict[str, np.ndarray]
    frame: WorkFrame
    modality: str
    source: str  # the localiser's name, reported per class ("prior", "medprompt")
