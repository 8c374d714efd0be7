"""How a training batch becomes a loss: the inner maximisation of adversarial training,
min_θ Σ max_{x'∈B(x)} ℓ(f_θ(x'), y) (CAT paper eq. 1), over one threat model or a weighted
composite of several (CAT paper §4). Every component is searched by the one loop, `perturb`.

Mixing rules for composites:
- ``sum``: weighted sum of the components' mean losses (each adversarial batch is a separate
  forward pass, so BatchNorm sees each threat model's batch on its own);
- ``random``: one component per batch, drawn with probability proportional to its weight;
- ``max``: per sample, the component with the highest loss (Tramèr & Boneh 2019, "MAX").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.threats.attack import attack_mode, perturb
from bdat_ray.threats.base import ThreatModel

MIX_RULES = ("sum", "random", "max")


@dataclass
class BatchLoss:
    loss: torch.Tensor  # scalar, with graph, to back-propagate
    correct: torch.Tensor  # number of the trained-on inputs classified correctly (no graph)
    count: int  # number of trained-on inputs
    # Per batch row (no graph): the row's share of ``loss`` and of ``correct``, so that fused
    # training (`bdat_ray.fused`) can book each member's rows separately.
    row_loss: torch.Tensor | None = None
    row_correct: torch.Tensor | None = None


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None)


def _loss_on(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp_dtype) -> BatchLoss:
    with _autocast(x.device, amp_dtype):
        logits = model(x)
    rows = F.cross_entropy(logits.float(), y, reduction="none")
    hits = logits.detach().argmax(1) == y
    return BatchLoss(rows.mean(), hits.sum(), len(y), rows.detach(), hits.float())


class StandardTraining:
    """No perturbation: the plain training loss."""

    adversarial = False

    def batch_loss(self, model, x, y, generator=None, amp_dtype=None) -> BatchLoss:
        return _loss_on(model, x, y, amp_dtype)

    def describe(self) -> str:
        return "standard training"


class AdversarialTraining:
    adversarial = True

    def __init__(
        self, components: list[tuple[ThreatModel, float]], mix: str = "sum", bn_mode: str = "eval"
    ):
        if not components:
            raise ValueError("adversarial training needs at least one threat model")
        total = sum(w for _, w in components)
        if total <= 0:
            raise ValueError("composite weights must sum to a positive number")
        self.threats = [t for t, _ in components]
        self.weights = [w / total for _, w in components]
        self.mix = mix
        self.bn_mode = bn_mode

    def _adversarial(self, model, threat, x, y, generator, amp_dtype) -> torch.Tensor:
        return perturb(
            model, x, y, threat, generator=generator, bn_mode=self.bn_mode, amp_dtype=amp_dtype
        )

    def pick(self, generator: torch.Generator | None) -> int:
        """Index of the component for this batch under ``mix=random`` (∝ weight)."""
        device = generator.device if generator is not None else "cpu"
        probs = torch.tensor(self.weights, device=device)
        return int(torch.multinomial(probs, 1, generator=generator))

    def batch_loss(self, model, x, y, generator=None, amp_dtype=None) -> BatchLoss:
        if len(self.threats) == 1 or self.mix == "random":
            k = self.pick(generator) if len(self.threats) > 1 else 0
            x_adv = self._adversarial(model, self.threats[k], x, y, generator, amp_dtype)
            return _loss_on(model, x_adv, y, amp_dtype)
        advs = [self._adversarial(model, t, x, y, generator, amp_dtype) for t in self.threats]
        if self.mix == "max":
            return _loss_on(model, self.hardest(model, advs, y, amp_dtype), y, amp_dtype)
        parts = [_loss_on(model, xa, y, amp_dtype) for xa in advs]
        pairs = list(zip(self.weights, parts, strict=True))
        return BatchLoss(
            sum(w * p.loss for w, p in pairs),
            sum(p.correct for p in parts),
            sum(p.count for p in parts),
            sum(w * p.row_loss for w, p in pairs),
            sum(p.row_correct for p in parts),
        )

    def hardest(self, model, advs: list[torch.Tensor], y, amp_dtype) -> torch.Tensor:
        """Per sample, the adversarial input with the highest loss (chosen without gradients,
        under the attack's BatchNorm mode)."""
        with torch.no_grad(), attack_mode(model, self.bn_mode), _autocast(y.device, amp_dtype):
            losses = torch.stack(
                [F.cross_entropy(model(xa).float(), y, reduction="none") for xa in advs]
            )
        pick = losses.argmax(0)
        stacked = torch.stack(advs)  # (K, B, C, H, W)
        return stacked[pick, torch.arange(len(y), device=y.device)]

    def describe(self) -> str:
        parts = [f"{w:.2f}·{t.describe()}" for t, w in zip(self.threats, self.weights, strict=True)]
        rule = f" [{self.mix}]" if len(parts) > 1 else ""
        return " + ".join(parts) + rule
