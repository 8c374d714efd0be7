"""Madry et al.'s MNIST CNN, the "naive CNN" Weng et al. train on MNIST
(``nthu-datalab/On.the.Trade-off.between.Adversarial.and.Backdoor.Robustness:
mnist/classifier_mnist.py``, from MadryLab/mnist_challenge): 5×5 conv 32 + ReLU, 2×2
max-pool, 5×5 conv 64 + ReLU, 2×2 max-pool, a 1024-unit ReLU layer and a linear head. It has
no normalisation layers, so ``model.norm`` does not apply to it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.models.common import FeatureClassifier, scaled

GRID = 7  # side of the last feature map on 28×28 inputs


class MadryMnistCNN(FeatureClassifier):
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        width: float,
        norm: str,
        mean: list[float],
        std: list[float],
    ):
        super().__init__(mean, std)
        c1, c2, hidden = (scaled(c, width) for c in (32, 64, 1024))
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=2)
        self.conv2 = nn.Conv2d(c1, c2, 5, padding=2)
        self.hidden = nn.Linear(c2 * GRID * GRID, hidden)
        self.linear = nn.Linear(hidden, num_classes)

    def stages_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        # ceil_mode: TF's max-pool with padding='same'
        first = F.relu(self.conv1(x))
        second = F.relu(self.conv2(F.max_pool2d(first, 2, ceil_mode=True)))
        return [first, second, F.max_pool2d(second, 2, ceil_mode=True)]

    def head(self, last: torch.Tensor) -> torch.Tensor:
        # a no-op on 28×28 MNIST (two pools leave 7×7); other sizes are resampled to it
        last = F.adaptive_avg_pool2d(last, GRID)
        return self.linear(F.relu(self.hidden(torch.flatten(last, 1))))
