"""Cross-Lipschitz regularisation (Hein & Andriushchenko 2017), Weng et al. Table 1.

Weng et al.'s reference code (``cifar10/classifier_cifar10_lipschitz_regularized.py`` of
nthu-datalab/On.the.Trade-off.between.Adversarial.and.Backdoor.Robustness) adds to the loss

    λ · Σ_i Σ_{l,m} ‖∇_x f_l(x_i) − ∇_x f_m(x_i)‖² / (K² · B)

over the B images of a batch and the K logits, with λ = 1e-4 and gradients with respect to the
input image (pixels in [0, 1]). Here Σ_{l,m} ‖g_l − g_m‖² = 2K Σ_l ‖g_l‖² − 2‖Σ_l g_l‖² is
computed from K input gradients with double back-propagation. Under AT the penalty is taken at
the clean batch (the reference adds it to the loss of the batch it trains on); the extra
forward pass leaves BatchNorm's running statistics alone. Composes with AT ("Lipschitz Reg. +
Adv. Training").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bdat_ray.defenses.base import Defense
from bdat_ray.models.common import batch_statistics_frozen
from bdat_ray.options import above, at_least, option
from bdat_ray.threats.objective import BatchLoss


@dataclass(frozen=True)
class LipschitzSection:
    weight: float = option(
        1e-4, "λ of the cross-Lipschitz penalty (Weng et al.'s code: 1e-4)", check=above(0)
    )
    samples: int | None = option(
        None,
        "images of each batch the penalty is taken on (its K double-backward passes cost ~25 "
        "plain steps on a CPU); default: the whole batch, as Weng et al.",
        check=at_least(1),
    )


def cross_lipschitz(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of Σ_{l,m} ‖∇f_l − ∇f_m‖² / K², differentiable in the weights."""
    x = x.detach().requires_grad_(True)
    with batch_statistics_frozen(model):
        logits = model(x).float()
    k = logits.shape[1]
    grads = [
        torch.autograd.grad(logits[:, c].sum(), x, create_graph=True)[0].flatten(1)
        for c in range(k)
    ]
    stacked = torch.stack(grads)  # (K, B, D)
    pairwise = 2 * k * stacked.pow(2).sum((0, 2)) - 2 * stacked.sum(0).pow(2).sum(1)
    return pairwise.mean() / k**2


class LipschitzObjective:
    """The run's objective plus the cross-Lipschitz penalty at the clean batch."""

    def __init__(self, inner, weight: float, samples: int | None = None):
        self.inner = inner
        self.weight = weight
        self.samples = samples
        self.adversarial = inner.adversarial

    def batch_loss(self, model, x, y, generator=None, amp_dtype=None) -> BatchLoss:
        out = self.inner.batch_loss(model, x, y, generator, amp_dtype)
        penalty = cross_lipschitz(model, x[: self.samples])
        return BatchLoss(out.loss + self.weight * penalty, out.correct, out.count)

    def describe(self) -> str:
        return f"{self.inner.describe()} + {self.weight:g}·cross-Lipschitz"


class Lipschitz(Defense):
    name = "lipschitz"
    stage = "train"
    section = LipschitzSection
    paper = "Hein & Andriushchenko 2017; Weng et al. Table 1 (alone and + AT)"

    def objective(self, objective, epoch: int):
        return LipschitzObjective(objective, self.cfg.weight, self.cfg.samples)
