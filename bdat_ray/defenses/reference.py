"""Reference bounds for any data-filtering defense (no backdoor toolkit reports them beside
AT): the **perfect filter** removes exactly the poisoned training images — what the best
possible detector achieves — and the **random filter** removes as many images drawn at random
— what a detector no better than chance achieves. Both read the run's true poisoned indices
(an oracle no real defense has)."""

from __future__ import annotations

import torch

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense


class PerfectFilter(Defense):
    name = "perfect_filter"
    stage = "filter"
    paper = "reference bound (upper): removes exactly the poisoned images"

    def filter(self, train: ImageData) -> torch.Tensor:
        return self.ctx.poison_indices.cpu()


class RandomFilter(Defense):
    name = "random_filter"
    stage = "filter"
    paper = "reference bound (lower): removes as many images as are poisoned, at random"

    def filter(self, train: ImageData) -> torch.Tensor:
        count = len(self.ctx.poison_indices)
        order = torch.randperm(len(train.y_train), generator=self.ctx.generator())
        return order[:count].sort().values
