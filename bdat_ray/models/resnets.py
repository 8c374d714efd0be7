"""CIFAR ResNets (3×3 stem, no max-pool): PreAct ResNet-18 (He et al. 2016b, as in the CAT
paper's code lineage), ResNet-18 and ResNet-32 (He et al. 2016a; Weng et al. use ResNet-32
with filters [16, 16, 32, 64], doubled in their Table 4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.models.common import FeatureClassifier, norm_layer, scaled


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def shortcut(cin: int, cout: int, stride: int, norm: str, with_norm: bool) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride, bias=False)]
    if with_norm:
        layers.append(norm_layer(norm, cout))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, cout, stride), norm_layer(norm, cout)
        self.conv2, self.bn2 = conv3x3(cout, cout), norm_layer(norm, cout)
        self.shortcut = shortcut(cin, cout, stride, norm, with_norm=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.bn1, self.conv1 = norm_layer(norm, cin), conv3x3(cin, cout, stride)
        self.bn2, self.conv2 = norm_layer(norm, cout), conv3x3(cout, cout)
        self.shortcut = shortcut(cin, cout, stride, norm, with_norm=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if isinstance(self.shortcut, nn.Identity) else self.shortcut(out)
        out = self.conv1(out)
        return self.conv2(F.relu(self.bn2(out))) + skip


class CifarResNet(FeatureClassifier):
    """Stem conv, then stages of blocks; stage i halves the resolution for i > 0."""

    def __init__(
        self,
        block: type[nn.Module],
        blocks_per_stage: list[int],
        stage_channels: list[int],
        stem_channels: int,
        *,
        num_classes: int,
        in_channels: int,
        width: float,
        norm: str,
        mean: list[float],
        std: list[float],
    ):
        super().__init__(mean, std)
        self.preact = block is PreActBlock
        cin = scaled(stem_channels, width)
        self.stem = conv3x3(in_channels, cin)
        self.stem_norm = nn.Identity() if self.preact else norm_layer(norm, cin)
        stages = []
        for i, (count, channels) in enumerate(zip(blocks_per_stage, stage_channels, strict=True)):
            cout = scaled(channels, width)
            layers = []
            for j in range(count):
                layers.append(block(cin, cout, 2 if (i > 0 and j == 0) else 1, norm))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        # PreAct nets end with a norm + ReLU before pooling.
        self.final_norm = norm_layer(norm, cin) if self.preact else nn.Identity()
        self.linear = nn.Linear(cin, num_classes)

    def stages_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.stem(x)
        if not self.preact:
            out = F.relu(self.stem_norm(out))
        feats = []
        for stage in self.stages:
            out = stage(out)
            feats.append(out)
        if self.preact:
            feats[-1] = F.relu(self.final_norm(feats[-1]))
        return feats

    def head(self, last: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(last, 1), 1))


def preact_resnet18(**kw) -> CifarResNet:
    return CifarResNet(PreActBlock, [2, 2, 2, 2], [64, 128, 256, 512], 64, **kw)


def resnet18(**kw) -> CifarResNet:
    return CifarResNet(BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], 64, **kw)


def resnet32(**kw) -> CifarResNet:
    return CifarResNet(BasicBlock, [5, 5, 5], [16, 32, 64], 16, **kw)
