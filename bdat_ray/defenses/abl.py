"""Anti-Backdoor Learning (Li et al., NeurIPS 2021), CAT paper §4, Table 2.

Followed: BackdoorBench's ``defense/ABL/ABL.py`` (the original ``bboylyg/ABL``):
1. isolation: for the first ``isolation_epochs`` epochs the batch loss ℓ is replaced by the
   local gradient ascent (LGA) loss sign(ℓ − γ)·ℓ, which keeps the loss of easily learnt
   (backdoor) samples near γ; γ = 0 in the CAT paper (Li et al.: 0.5), which makes LGA the
   plain loss;
2. after that epoch the ``isolation_ratio`` (1%) of training images with the lowest loss are
   isolated (scored against the poisoned ones like a filter: ``detect_*``);
3. training continues on the whole set (Li et al.'s fine-tuning stage) to ``train.epochs``;
4. unlearning: ``unlearning_epochs`` epochs of gradient *ascent* (loss −ℓ) on the isolated
   images at ``unlearning_lr`` (Li et al.: 5e-4, 20 epochs; BackdoorBench's config: 5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense, fine_tune, subset
from bdat_ray.options import ConfigError, above, at_least, option, within
from bdat_ray.threats.objective import BatchLoss

if TYPE_CHECKING:
    from bdat_ray.config import Config


@dataclass(frozen=True)
class ABLSection:
    isolation_ratio: float = option(
        0.01,
        "share of training images isolated as poison candidates (Li et al.: 1%)",
        check=within(0, 1),
    )
    gamma: float = option(
        0.0, "LGA loss threshold γ (CAT paper: 0; Li et al.: 0.5)", check=at_least(0)
    )
    isolation_epochs: int | None = option(
        None,
        "epochs trained with the LGA loss before isolating; default 20% of train.epochs (Li et "
        "al.: 20 of 100)",
        check=at_least(1),
    )
    unlearning_epochs: int = option(
        5, "gradient-ascent epochs on the isolated images", check=at_least(0)
    )
    unlearning_lr: float = option(
        5e-4, "unlearning learning rate (Li et al.: 5e-4)", check=above(0)
    )


def isolation_epochs(section: ABLSection, epochs: int) -> int:
    """``isolation_epochs``, or 20% of the run's epochs when unset (Li et al.: 20 of 100)."""
    own = section.isolation_epochs
    return own if own is not None else max(1, math.ceil(0.2 * epochs))


class LGAObjective:
    """Li et al.'s local gradient ascent: sign(ℓ − γ)·ℓ of the batch loss."""

    def __init__(self, inner, gamma: float):
        self.inner, self.gamma = inner, gamma
        self.adversarial = inner.adversarial

    def batch_loss(self, model, x, y, generator=None, amp_dtype=None) -> BatchLoss:
        out = self.inner.batch_loss(model, x, y, generator, amp_dtype)
        return BatchLoss(
            torch.sign(out.loss.detach() - self.gamma) * out.loss, out.correct, out.count
        )

    def describe(self) -> str:
        return f"LGA(γ={self.gamma:g}) of {self.inner.describe()}"


@torch.no_grad()
def per_sample_loss(model: nn.Module, data: ImageData, batch_size: int = 512) -> torch.Tensor:
    from bdat_ray.data.augment import to_float

    was_training = model.training
    model.eval()
    try:
        losses = [
            F.cross_entropy(model(to_float(xb, False)).float(), yb, reduction="none")
            for xb, yb in zip(
                data.x_train.split(batch_size), data.y_train.split(batch_size), strict=True
            )
        ]
        return torch.cat(losses).cpu()
    finally:
        model.train(was_training)


class ABL(Defense):
    name = "abl"
    stage = "train"
    section = ABLSection
    paper = "Li et al. 2021 (ABL); CAT paper §4, Table 2 (γ = 0)"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.isolate_after = isolation_epochs(cfg, ctx.epochs)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if isolation_epochs(cfg.defense.abl, cfg.train.epochs) > cfg.train.epochs:
            raise ConfigError(
                "defense.abl.isolation_epochs", f"must be ≤ train.epochs ({cfg.train.epochs})"
            )

    def resolved_keys(self) -> dict[str, int]:
        return {"defense.abl.isolation_epochs": self.isolate_after}

    def objective(self, objective, epoch: int):
        if epoch <= self.isolate_after:
            return LGAObjective(objective, self.cfg.gamma)
        return objective

    def after_epoch(self, epoch: int, model: nn.Module, train: ImageData) -> None:
        if epoch == self.isolate_after:
            losses = per_sample_loss(model, train)
            count = max(1, round(self.cfg.isolation_ratio * len(losses)))
            self.flagged = losses.topk(count, largest=False).indices.sort().values

    def repair(self, model: nn.Module, train: ImageData) -> nn.Module:
        if self.flagged is None or not self.cfg.unlearning_epochs:
            return model
        isolated = subset(train, self.flagged.to(train.x_train.device))
        return fine_tune(
            model,
            isolated,
            epochs=self.cfg.unlearning_epochs,
            lr=self.cfg.unlearning_lr,
            batch_size=self.ctx.batch_size,
            generator=self.ctx.generator(1),
            loss_fn=lambda m, x, y: -F.cross_entropy(m(x), y),  # gradient ascent
        )
