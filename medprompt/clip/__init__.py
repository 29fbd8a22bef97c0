"""CLIP models for text-grounded 2D saliency (MedCLIP-SAM): DHN-NCE finetuning, gScoreCAM and M2IB maps.

Light on import: torch and open_clip are imported by the modules that need them.
"""
