"""Threat models of adversarial training, registered by name, and the one attack loop."""

from __future__ import annotations

from bdat_ray.threats.attack import attack_mode, perturb
from bdat_ray.threats.base import ThreatModel
from bdat_ray.threats.lp import L2PGD, LinfPGD

THREATS: dict[str, type[ThreatModel]] = {cls.name: cls for cls in (LinfPGD, L2PGD)}

__all__ = ["THREATS", "ThreatModel", "attack_mode", "perturb"]
