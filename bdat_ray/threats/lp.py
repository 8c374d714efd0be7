"""L-p ball threat models, PGD (Madry et al. 2018). ``eps`` is in pixel units of the [0, 1]
image: 8/255 means eight grey levels. The CAT paper sweeps L-inf 4/255–16/255 and L2
64/255–512/255 (advertorch-based PGD)."""

from __future__ import annotations

from typing import Any

import torch

from bdat_ray.threats.base import ThreatModel, budget_section, in_unit_box, normal, uniform

LinfSection = budget_section("linf", "pixel units, L-inf", "8/255", " (CAT uses 2/255)")
L2Section = budget_section("l2", "pixel units, L2", "128/255")


class PixelOffset(ThreatModel):
    """delta is an additive pixel offset; x + delta is kept in the [0, 1] box."""

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return x + delta

    def clip_to_box(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return (x + delta).clamp(0, 1) - x


class LinfPGD(PixelOffset):
    name = "linf"
    section = LinfSection
    unit = "pixel units, L-inf"
    default_eps = 8 / 255  # Madry et al.; Weng et al. CIFAR-10 setting

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        return self.clip_to_box(x, self.eps * uniform(x.shape, generator, x.device))

    def ascend(
        self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor:
        return delta + self.step_size * grad.sign()

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.clip_to_box(x, delta.clamp(-self.eps, self.eps))

    def contains(self, x, x_adv, atol: float = 1e-5, model=None) -> torch.Tensor:
        dist = (x_adv - x).flatten(1).abs().amax(1)
        return (dist <= self.eps + atol) & in_unit_box(x_adv, atol)


class L2PGD(PixelOffset):
    name = "l2"
    section = L2Section
    unit = "pixel units, L2 over all C·H·W values"
    default_eps = 128 / 255  # inside the CAT paper's 64/255–512/255 sweep

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        # Uniform in the L2 ball: Gaussian direction, radius eps·U^(1/d).
        direction = normal(x.shape, generator, x.device)
        direction = direction / l2_norms(direction).clamp_min(1e-12)
        d = x[0].numel()
        radius = self.eps * uniform((x.shape[0],), generator, x.device).abs() ** (1 / d)
        return self.clip_to_box(x, direction * radius.view(-1, *[1] * (x.dim() - 1)))

    def ascend(
        self, x: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor:
        return delta + self.step_size * grad / l2_norms(grad).clamp_min(1e-12)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        scale = (self.eps / l2_norms(delta).clamp_min(1e-12)).clamp(max=1.0)
        # Clipping to the box after the ball projection only moves x+delta toward x, so it
        # stays inside the ball.
        return self.clip_to_box(x, delta * scale)

    def contains(self, x, x_adv, atol: float = 1e-5, model=None) -> torch.Tensor:
        dist = (x_adv - x).flatten(1).norm(dim=1)
        return (dist <= self.eps + atol) & in_unit_box(x_adv, atol)


def l2_norms(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))
