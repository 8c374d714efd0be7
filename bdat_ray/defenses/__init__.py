"""Baseline defenses, registered by name (``defense.name``); see `base` for the stages and
hooks, and docs/defenses.md for the table of defaults and sources.

| name | stage | paper |
|---|---|---|
| none | — | standard training (AT is configured in ``at.*``) |
| perfect_filter, random_filter | filter | reference bounds (oracle) |
| spectral | filter | Tran et al. 2018 (Weng Table 9) |
| activation_clustering | filter | Chen et al. 2018 (Weng Table 9) |
| dpsgd | train | Du et al. 2020, Opacus (CAT Table 2) |
| abl | train | Li et al. 2021 (CAT Table 2) |
| lipschitz | train | Hein & Andriushchenko 2017 (Weng Table 1) |
| denoise | train (model change) | Xie et al. 2019 (Weng Table 1) |
| fine_pruning | repair | Liu et al. 2018 (CAT Table 2) |
| nad | repair | Li et al. 2021 (CAT Table 2) |
| neural_cleanse | repair | Wang et al. 2019 (Weng Table 9) |
"""

from __future__ import annotations

from bdat_ray.defenses.abl import ABL
from bdat_ray.defenses.activation_clustering import ActivationClustering
from bdat_ray.defenses.base import STAGES, Defense, DefenseContext, NoDefense
from bdat_ray.defenses.denoise import Denoise
from bdat_ray.defenses.dpsgd import DPSGD
from bdat_ray.defenses.fine_pruning import FinePruning
from bdat_ray.defenses.lipschitz import Lipschitz
from bdat_ray.defenses.nad import NAD
from bdat_ray.defenses.neural_cleanse import NeuralCleanse
from bdat_ray.defenses.reference import PerfectFilter, RandomFilter
from bdat_ray.defenses.spectral import SpectralSignatures

DEFENSES: dict[str, type[Defense]] = {
    cls.name: cls
    for cls in (
        NoDefense,
        PerfectFilter,
        RandomFilter,
        SpectralSignatures,
        ActivationClustering,
        DPSGD,
        ABL,
        Lipschitz,
        Denoise,
        FinePruning,
        NAD,
        NeuralCleanse,
    )
}

__all__ = ["DEFENSES", "STAGES", "Defense", "DefenseContext"]
