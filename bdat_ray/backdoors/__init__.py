"""Backdoor attacks, registered by name. ``BACKDOORS[name](attack_cfg).poison(data)``."""

from __future__ import annotations

from bdat_ray.backdoors.badnets import BadNets
from bdat_ray.backdoors.base import Backdoor, NoBackdoor, PoisonedData

BACKDOORS: dict[str, type[Backdoor]] = {cls.name: cls for cls in (NoBackdoor, BadNets)}

__all__ = ["BACKDOORS", "Backdoor", "PoisonedData"]
