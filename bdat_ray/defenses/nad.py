"""Neural Attention Distillation (Li et al., ICLR 2021), CAT paper §4, Table 2.

Followed: BackdoorBench's ``defense/NAD/nad.py`` (the original ``bboylyg/NAD``). A teacher — a
copy of the backdoored model — is fine-tuned on the defender's clean share (5%) for
``teacher_epochs`` (10); then the backdoored model (the student) is fine-tuned on the same
share for ``epochs`` (20) with cross-entropy plus attention distillation
Σ_k β_k · MSE(A(s_k), A(t_k)) over the last three stages, where A(f) = Σ_c |f_c|^p normalised
to unit L2 norm over space, p = 2 and β = 500, 1000, 1000 (BackdoorBench's CIFAR config).
The CAT paper sets the learning rate to 0.01 "for more stable results".
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import CleanDataSection, Defense, fine_tune
from bdat_ray.options import above, at_least, option

BETAS = (500.0, 1000.0, 1000.0)  # the last three stages, shallow to deep (BackdoorBench)


@dataclass(frozen=True)
class NADSection(CleanDataSection):
    teacher_epochs: int = option(
        10, "epochs fine-tuning the teacher on the clean share", check=at_least(0)
    )
    epochs: int = option(20, "epochs of attention distillation into the student", check=at_least(0))
    lr: float = option(0.01, "learning rate of both phases (CAT paper §4: 0.01)", check=above(0))
    power: float = option(2.0, "p of the attention map Σ|f|^p (Li et al.: 2)", check=above(0))


def attention_map(feature: torch.Tensor, power: float) -> torch.Tensor:
    am = feature.abs().pow(power).sum(1).flatten(1)
    return am / (am.norm(dim=1, keepdim=True) + 1e-6)


class NAD(Defense):
    name = "nad"
    stage = "repair"
    section = NADSection
    paper = "Li et al. 2021 (NAD); CAT paper §4, Table 2 (5% clean data, lr 0.01)"

    def repair(self, model: nn.Module, train: ImageData) -> nn.Module:
        clean = self.ctx.clean_share
        kw = {"lr": self.cfg.lr, "batch_size": self.ctx.batch_size}
        teacher = fine_tune(
            copy.deepcopy(model),
            clean,
            epochs=self.cfg.teacher_epochs,
            generator=self.ctx.generator(3),
            **kw,
        )
        for p in teacher.parameters():
            p.requires_grad_(False)

        def distillation_loss(student: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            feats = student.features(x)
            logits = student.head(feats[-1])
            with torch.no_grad():
                targets = teacher.features(x)
            loss = F.cross_entropy(logits, y)
            n = min(len(BETAS), len(feats))
            for beta, fs, ft in zip(BETAS[-n:], feats[-n:], targets[-n:], strict=True):
                loss = loss + beta * F.mse_loss(
                    attention_map(fs, self.cfg.power), attention_map(ft, self.cfg.power)
                )
            return loss

        return fine_tune(
            model,
            clean,
            epochs=self.cfg.epochs,
            generator=self.ctx.generator(4),
            loss_fn=distillation_loss,
            **kw,
        )
