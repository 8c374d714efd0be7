"""Pieces every model shares: input normalisation inside the module, norm-layer choice,
width scaling, and the `features()` contract."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel; x in [0, 1]. Kept inside the model so attacks, triggers
    and budgets all live in pixel space and a reloaded model needs no preprocessing."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def norm_layer(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm (DPSGD needs per-sample independence, CAT paper §4)."""
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.BatchNorm2d(channels)


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class FeatureClassifier(nn.Module):
    """Base: ``features(x)`` returns the stage activations (LPIPS-style perceptual distance
    and activation-based defenses read them); ``forward`` classifies the last one."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.normalize = Normalize(mean, std)

    def stages_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def head(self, last: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.stages_forward(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])


@contextmanager
def batch_statistics_frozen(model: nn.Module) -> Iterator[None]:
    """Train-mode forward passes (BatchNorm normalises with the batch's own statistics) that
    leave the running statistics untouched: momentum 0 and the batch counter restored.
    Used to measure the clean training loss during AT without a second update."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    was_training = model.training
    model.train()
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)
        model.train(was_training)


class MemberAware(nn.Module):
    """A parameter-free op that mixes channels (a per-image standardisation over all of them,
    a zero-padding of the channel axis). Horizontal fusion (`bdat_ray.models.fused`) lays K
    members side by side along the channels and sets ``members`` = K, so the op treats each
    member's block of channels on its own; alone it is 1."""

    members = 1
