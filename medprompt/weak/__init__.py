"""Weak supervision in 2D (MedCLIP-SAM's third stage): a segmentation network trained on zero-shot masks.

The zero-shot path (:mod:`medprompt.drafts2d`: saliency -> boxes -> LiteMedSAM) drafts every image of an
unlabelled folder; a small MONAI U-Net learns from those drafts (:mod:`medprompt.weak.train`), keeping
snapshots along training whose averaged probabilities are its prediction and whose disagreement marks
the pixels it is unsure of (:mod:`medprompt.weak.model`). Its drafts then serve through ``medprompt infer
--model weak:MODEL.pt`` (:mod:`medprompt.weak.draft`).
"""
