"""Threat models of adversarial training, registered by name, and the one attack loop.

| name | budget (``eps``) unit | default | source |
|---|---|---|---|
| linf | pixel units, L-inf | 8/255 | Madry et al.; CAT sweeps 4/255–16/255, CAT uses 2/255 |
| l2 | pixel units, L2 | 128/255 | CAT sweeps 64/255–512/255 |
| spatial | normalised grid units, L-inf on the flow | 0.025 | stAdv, first-order; CAT 0.025–0.1 |
| perceptual | LPIPS distance (self-bounded) | 0.5 | Laidlaw et al. Fast-LPA; CAT 0.1–0.5 |
| noise | pixel units, Gaussian σ | 0.1 | CAT Table 1 control (no maximisation) |
| flow_noise | normalised grid units, L-inf | 0.025 | CAT Table 1 control (no maximisation) |
"""

from __future__ import annotations

from bdat_ray.threats.attack import attack_mode, perturb
from bdat_ray.threats.base import ThreatModel
from bdat_ray.threats.lp import L2PGD, LinfPGD
from bdat_ray.threats.perceptual import PerceptualLPA
from bdat_ray.threats.random import GaussianNoise, RandomFlow
from bdat_ray.threats.spatial import SpatialFlow

THREATS: dict[str, type[ThreatModel]] = {
    cls.name: cls for cls in (LinfPGD, L2PGD, SpatialFlow, PerceptualLPA, GaussianNoise, RandomFlow)
}

__all__ = ["THREATS", "ThreatModel", "attack_mode", "perturb"]
