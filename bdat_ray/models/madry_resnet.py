"""Madry et al.'s CIFAR-10 ResNet as Weng et al. train it (``nthu-datalab/
On.the.Trade-off.between.Adversarial.and.Backdoor.Robustness:cifar10/classifier_cifar10.py``,
from MadryLab/cifar10_challenge): a pre-activation ResNet-32 — a 3×3 stem of 16 filters, three
stages of 5 residual units with 16, 32, 64 filters (×width), leaky ReLU 0.1, shortcuts that
average-pool and zero-pad the channels instead of a 1×1 convolution, a final norm + leaky
ReLU and global average pooling. Inputs are standardised per image (TF's
``per_image_standardization``: mean 0, std max(σ, 1/sqrt(#values))), so the training-set
channel statistics every model carries are not used by this one. BatchNorm ε is TF's 1e-3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.models.common import FeatureClassifier, MemberAware, norm_layer, scaled

LEAK = 0.1  # leaky ReLU slope of the reference


class ImageStandardization(MemberAware):
    """TF's ``per_image_standardization``: each image to mean 0 and std max(σ, 1/sqrt(#values))
    over all its values (each member's channels on their own when fused)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(x.shape[0] * self.members, -1)
        floor = flat.shape[1] ** -0.5
        std = flat.std(1, unbiased=False).clamp_min(floor)
        mean = flat.mean(1)
        return ((flat - mean[:, None]) / std[:, None]).view_as(x)


class ChannelZeroPad(MemberAware):
    """The reference's shortcut padding: ``pad`` zero channels before and after (per member
    when fused)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        per_member = x.view(b, self.members, c // self.members, h, w)
        padded = F.pad(per_member, (0, 0, 0, 0, self.pad, self.pad))
        return padded.view(b, -1, h, w)


def tf_norm(kind: str, channels: int) -> nn.Module:
    layer = norm_layer(kind, channels)
    if isinstance(layer, nn.BatchNorm2d):
        layer.eps = 1e-3  # tf.contrib.layers.batch_norm's default epsilon
    return layer


class MadryUnit(nn.Module):
    """The reference's ``_residual``: norm-act first (before the shortcut when
    ``activate_before_residual``), conv, norm-act, conv, plus the pooled/padded shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, activate_before: bool, norm: str):
        super().__init__()
        self.activate_before = activate_before
        self.bn1, self.conv1 = tf_norm(norm, cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = tf_norm(norm, cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.stride, self.pad = stride, ChannelZeroPad((cout - cin) // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.leaky_relu(self.bn1(x), LEAK)
        skip = act if self.activate_before else x
        out = self.conv1(act)
        out = self.conv2(F.leaky_relu(self.bn2(out), LEAK))
        if self.pad.pad or self.stride > 1:
            skip = self.pad(F.avg_pool2d(skip, self.stride, self.stride))
        return out + skip


class MadryResNet(FeatureClassifier):
    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int,
        width: float,
        norm: str,
        mean: list[float],
        std: list[float],
        units: int = 5,
    ):
        super().__init__(mean, std)
        self.standardize = ImageStandardization()
        stem, *filters = (scaled(c, width) for c in (16, 16, 32, 64))
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        stages, cin = [], stem
        for i, cout in enumerate(filters):
            blocks = [MadryUnit(cin, cout, 1 if i == 0 else 2, i == 0, norm)]
            blocks += [MadryUnit(cout, cout, 1, False, norm) for _ in range(units - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.final_norm = tf_norm(norm, cin)
        self.linear = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stages_forward(self.standardize(x))

    def stages_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, feats = self.stem(x), []
        for stage in self.stages:
            out = stage(out)
            feats.append(out)
        feats[-1] = F.leaky_relu(self.final_norm(feats[-1]), LEAK)
        return feats

    def head(self, last: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(last, 1), 1))
