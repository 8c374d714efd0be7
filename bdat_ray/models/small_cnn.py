"""A small CNN for digits / MNIST: three conv-norm-ReLU stages (32, 64, 128 filters × width),
two 2×2 max-pools, global average pooling and a linear head. Weng et al. use "a naive CNN" for
MNIST; this is ours, sized to train the quickstart in seconds on a laptop CPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.models.common import FeatureClassifier, norm_layer, scaled


class SmallCNN(FeatureClassifier):
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
        widths = [scaled(c, width) for c in (32, 64, 128)]
        stages, cin = [], in_channels
        for i, cout in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                norm_layer(norm, cout),
                nn.ReLU(inplace=True),
            ]
            if i > 0:
                layers.append(nn.MaxPool2d(2))
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.linear = nn.Linear(cin, num_classes)

    def stages_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats

    def head(self, last: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(last, 1), 1))
