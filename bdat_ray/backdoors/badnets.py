"""BadNets (Gu et al. 2017): stamp a small patch in a corner, x' = (1 - m) ⊙ x + m ⊙ t.

Defaults and knobs (CAT paper §3–4): 3×3 checkerboard, 2×2 checkerboard or 2×2 random
trigger (``attack.trigger``), any side length (``attack.trigger_size``), bottom-right corner
or a random corner per image (``attack.position``). Dirty-label: ``attack.poison_rate`` of the
whole training set, drawn from non-target images and relabelled to the target (CAT §4: 1%).
Clean-label: the same fraction of the whole set, drawn from target-class images, labels
unchanged (CAT §3: 0.5%)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from bdat_ray.backdoors.base import Backdoor, PoisonContext
from bdat_ray.backdoors.triggers import (
    CORNERS,
    PATTERNS,
    POSITION_SCHEMES,
    corner_mask,
    draw_corners,
    make_pattern,
    stamp,
)
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError

if TYPE_CHECKING:
    from bdat_ray.config import AttackConfig


class BadNets(Backdoor):
    name = "badnets"
    paper = "Gu et al. 2017; CAT paper §3 (clean-label 0.5%), §4 (dirty-label 1%)"

    def __init__(self, cfg: AttackConfig, context: PoisonContext | None = None):
        super().__init__(cfg, context)
        self.size = cfg.trigger_size or PATTERNS[cfg.trigger][1]
        self._pattern_seed = cfg.seed

    def resolved_keys(self) -> dict[str, object]:
        return {**super().resolved_keys(), "attack.trigger_size": self.size}

    def corners(self) -> tuple[str, ...]:
        """Every place the patch may go."""
        return CORNERS if self.cfg.position in POSITION_SCHEMES else (self.cfg.position,)

    def trigger_region(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        offset = self.cfg.trigger_offset
        masks = [corner_mask(image_shape, self.size, c, offset) for c in self.corners()]
        return torch.stack(masks).any(0)

    def check_data(self, data: ImageData) -> None:
        _, h, w = data.image_shape
        if self.size + self.cfg.trigger_offset > min(h, w):
            raise ConfigError(
                "attack.trigger_size",
                f"a {self.size}×{self.size} trigger {self.cfg.trigger_offset} px from the border "
                f"does not fit {h}×{w} images of {data.name}",
            )
        super().check_data(data)

    def pattern(self, channels: int) -> torch.Tensor:
        """The trigger, a function of ``attack.seed`` only: identical for train and test."""
        generator = torch.Generator().manual_seed(self._pattern_seed)
        return make_pattern(self.cfg.trigger, self.size, channels, generator)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        corners = draw_corners(len(x), self.cfg.position, generator, train=train)
        return stamp(x, self.pattern(x.shape[1]), corners, self.cfg.trigger_offset)
