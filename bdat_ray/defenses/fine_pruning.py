"""Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018), CAT paper §4, Table 2.

The channels of the last convolutional stage are ranked by their mean activation on the
defender's clean share; the ``ratio`` least active ones are pruned (their output is held at 0
by a fixed channel mask after the stage, as BackdoorBench's ``defense/FP/fineprune.py`` masks
``layer4``), then the pruned network is fine-tuned on the clean share. The CAT paper sweeps
the ratio from 5% to 95% in steps of 5% and reports the ratio whose clean accuracy is closest
to CAT's: a sweep dimension here (``defense.fine_pruning.ratio``), and the pick is a rule of the
analysis (`analysis.tables.pick_closest_accuracy`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense, FineTuneSection
from bdat_ray.options import option, within


@dataclass(frozen=True)
class FinePruningSection(FineTuneSection):
    ratio: float = option(
        0.2,
        "share of the last stage's channels pruned (CAT paper: swept 5%–95%, step 5%)",
        check=within(0, 1),
    )


class ChannelMask(nn.Module):
    """Multiplies channel c by ``mask[c]`` (0 = pruned)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.float().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


@torch.no_grad()
def mean_channel_activation(
    model: nn.Module, images: torch.Tensor, stage: nn.Module
) -> torch.Tensor:
    """Mean activation per channel of ``stage``'s output over ``images`` (eval mode)."""
    from bdat_ray.data.augment import to_float

    sums: list[torch.Tensor] = []
    hook = stage.register_forward_hook(
        lambda m, i, out: sums.append(out.float().mean((2, 3)).sum(0))
    )
    was_training = model.training
    model.eval()
    try:
        for chunk in images.split(512):
            model(to_float(chunk, False))
    finally:
        hook.remove()
        model.train(was_training)
    return torch.stack(sums).sum(0) / len(images)


class FinePruning(Defense):
    name = "fine_pruning"
    stage = "repair"
    section = FinePruningSection
    paper = "Liu et al. 2018; CAT paper §4, Table 2 (ratio 5–95%, closest clean accuracy to CAT)"

    def repair(self, model: nn.Module, train: ImageData) -> nn.Module:
        clean = self.ctx.clean_share
        last = model.stages[-1]
        activation = mean_channel_activation(model, clean.x_train, last)
        channels = len(activation)
        self.pruned = round(self.cfg.ratio * channels)
        mask = torch.ones(channels, device=activation.device)
        mask[activation.argsort()[: self.pruned]] = 0
        model.stages[-1] = nn.Sequential(last, ChannelMask(mask))
        self.channels = channels
        return self.fine_tune_on_clean_share(model, draw=2)

    def report(self) -> dict[str, float]:
        return {
            "pruned_channels": float(self.pruned),
            "pruned_fraction": self.pruned / self.channels,
        }
