"""MedPrompt Label: text-prompted 3D segmentation drafts for MONAI Label.

The package is the design card's ``lib/`` under an importable, unambiguous name: the
``monailabel`` launcher puts the repository root on ``PYTHONPATH``, where a package called
``lib`` would shadow (or be shadowed by) the app-local ``lib`` convention.
"""

__version__ = "0.1.0"
