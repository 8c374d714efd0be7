"""Baseline defenses, registered by name (``defense.name``); see `base` for the stages.

| name | stage | paper |
|---|---|---|
| none | — | standard training (AT is configured in ``at.*``) |
"""

from __future__ import annotations

from bdat_ray.defenses.base import STAGES, Defense, NoDefense

DEFENSES: dict[str, type[Defense]] = {cls.name: cls for cls in (NoDefense,)}

__all__ = ["DEFENSES", "STAGES", "Defense"]
