"""The baseline-defense interface.

A defense acts at one stage of a run (architecture.md; the papers' comparison tables):

- ``filter``: inspects the poisoned training set before training and removes what it
  flags (spectral signatures, activation clustering, the perfect and random reference
  filters); the run then trains on what is left;
- ``train``: changes how the model is trained (DPSGD, ABL, Lipschitz regularisation,
  feature-denoising layers);
- ``repair``: changes the trained model afterwards (Fine-Pruning, NAD, Neural Cleanse).

``none`` is standard training. A defense's knobs are its own config section
``defense.<name>.*`` (``section``), declared beside its code and collected from the registry.
"""

from __future__ import annotations

from typing import ClassVar

STAGES = ("none", "filter", "train", "repair")


class Defense:
    name: ClassVar[str]
    stage: ClassVar[str]
    paper: ClassVar[str]
    #: the defense's own config section ``defense.<name>.*`` (None: no knobs)
    section: ClassVar[type | None] = None


class NoDefense(Defense):
    """Standard training on the (poisoned) data; AT, when configured, is not a defense here
    but the run's training objective (``at.*``)."""

    name = "none"
    stage = "none"
    paper = "—"
