"""Spatial threat model: a per-pixel flow field moves pixels instead of changing their values
(stAdv, Xiao et al. 2018), searched with first-order steps as in the CAT paper (§2.1, which
replaces stAdv's L-BFGS with gradient steps so it runs on GPUs).

Unit of the budget: the flow lives in ``grid_sample``'s normalised coordinates, where the
image spans [-1, 1] in each direction, so a bound ``eps`` lets a pixel move by at most
``eps·(W-1)/2`` pixels horizontally and ``eps·(H-1)/2`` vertically (0.025 on 32×32 images:
0.39 px). The CAT paper sweeps 0.025–0.1 and uses 0.025 in CAT.

Inner objective (CAT §2.1: "a sum of a classification loss and a spatial movement loss"), as
perceptual-advex's ``StAdvAttack`` trains it (``cassidylaidlaw/perceptual-advex:
perceptual_advex/attacks.py``, on mister_ed's ``FullSpatial``/``PGD``): the margin loss
(κ = ∞) minus ``τ·L_flow`` with τ = 0.0025/ε (``at.spatial.tau``, unset = that rule; 0 = no
movement loss), Adam steps of lr 0.01 (``at.spatial.optimizer``, ``at.spatial.step_size``)
from the identity flow (``at.spatial.start``), projected onto the L-inf bound after each step.
Gradient-sign steps (step 2.5·ε/steps), a random start and cross-entropy stay options.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from bdat_ray.options import at_least, option
from bdat_ray.threats.base import ThreatModel, budget_section, in_unit_box, uniform

#: perceptual-advex StAdvAttack: ``perturbation_norm_loss=0.0025 / bound`` and Adam lr 0.01
FLOW_LOSS_PER_BOUND = 0.0025
ADAM_LR = 0.01  # normalised grid units per step


@dataclass(frozen=True)
class SpatialSection(
    budget_section("spatial", "normalised grid units, L-inf", "0.025 (CAT paper)")
):
    tau: float | None = option(
        None,
        "weight τ of stAdv's flow loss subtracted from the inner objective; default 0.0025/ε "
        "(perceptual-advex StAdvAttack); 0 = no spatial movement loss",
        check=at_least(0),
    )
    optimizer: str = option(
        "adam",
        "flow update: adam (lr = step size, default 0.01, as StAdvAttack) or sign "
        "(gradient-sign steps of 2.5·ε/steps)",
        choices=("sign", "adam"),
    )
    start: str = option(
        "identity",
        "starting flow: identity (StAdvAttack) or random (uniform in the bound, when "
        "at.random_start is on)",
        choices=("identity", "random"),
    )
    loss: str = option(
        "margin",
        "classification loss maximised: margin (κ = ∞, StAdvAttack) or ce",
        choices=("margin", "ce"),
    )


def identity_grid(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(1, H, W, 2) sampling grid that reproduces the image (x, y order, normalised)."""
    from kornia.geometry import create_meshgrid

    return create_meshgrid(
        height, width, normalized_coordinates=True, device=like.device, dtype=like.dtype
    )


def warp(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of ``x`` at identity + ``flow`` ((N, 2, H, W), normalised units);
    border padding so edge pixels are repeated, never replaced by black."""
    grid = identity_grid(*x.shape[-2:], x) + flow.permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def flow_smoothness(flow: torch.Tensor) -> torch.Tensor:
    """stAdv's L_flow per sample as mister_ed's ``FullSpatial.stAdv_norm`` computes it: for
    every pixel and each of its four neighbours (left, right, up, down, wrapping around the
    border), sqrt(|Δu|² + |Δv|² + 1e-10), summed — each neighbouring pair counts twice."""
    total = flow.new_zeros(flow.shape[0])
    for shift, dim in ((1, 2), (-1, 2), (1, 3), (-1, 3)):
        diff = flow - flow.roll(shift, dims=dim)
        total = total + (diff.pow(2).sum(1) + 1e-10).sqrt().flatten(1).sum(1)
    return total


class SpatialFlow(ThreatModel):
    name = "spatial"
    section = SpatialSection
    unit = "normalised grid units, L-inf on the flow"
    default_eps = 0.025  # CAT paper: spatial AT and the spatial half of CAT

    def __init__(
        self,
        *budget: Any,
        tau: float | None = None,
        optimizer: str = "adam",
        start: str = "identity",
        loss: str = "margin",
        **budget_options: Any,
    ):
        self.optimizer = optimizer  # the default step size depends on it
        super().__init__(*budget, **budget_options)
        self.tau = FLOW_LOSS_PER_BOUND / self.eps if tau is None else tau
        self.start = start
        self.loss = loss

    def default_step_size(self) -> float:
        return ADAM_LR if self.optimizer == "adam" else super().default_step_size()

    @classmethod
    def knobs(cls, section) -> dict[str, Any]:
        return {
            "tau": section.tau,
            "optimizer": section.optimizer,
            "start": section.start,
            "loss": section.loss,
        }

    @property
    def starts_random(self) -> bool:
        return self.random_start and self.start == "random"

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shape = torch.Size((x.shape[0], 2, *x.shape[-2:]))
        if not self.starts_random:
            return torch.zeros(shape, device=x.device, dtype=x.dtype)
        return self.eps * uniform(shape, generator, x.device)

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return warp(x, delta)

    def ascend(self, x, delta, grad, memory: dict[str, Any]) -> torch.Tensor:
        if self.optimizer == "sign":
            return delta + self.step_size * grad.sign()
        # Adam (β = 0.9, 0.999, torch.optim.Adam's defaults, as mister_ed's PGD uses it)
        # ascent on the flow, moments kept for this attack only.
        t = memory["step"] + 1
        m = memory["adam_m"] = 0.9 * memory.get("adam_m", torch.zeros_like(grad)) + 0.1 * grad
        v = memory["adam_v"] = (
            0.999 * memory.get("adam_v", torch.zeros_like(grad)) + 0.001 * grad**2
        )
        m_hat, v_hat = m / (1 - 0.9**t), v / (1 - 0.999**t)
        return delta + self.step_size * m_hat / (v_hat.sqrt() + 1e-8)

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return delta.clamp(-self.eps, self.eps)

    def penalty(self, x, x_adv, delta, memory: dict[str, Any]) -> torch.Tensor | float:
        return self.tau * flow_smoothness(delta) if self.tau else 0.0

    def contains(self, x, x_adv, atol: float = 1e-5, model=None) -> torch.Tensor:
        """A flow bounded by ``eps`` samples each output pixel bilinearly from input pixels at
        most ``floor(eps·(side-1)/2) + 1`` pixels away, so every output value must lie between
        the min and max of the input over that window (per channel). A necessary condition —
        the flow itself is not recoverable from the image."""
        h, w = x.shape[-2:]
        ry, rx = (math.floor(self.eps * (side - 1) / 2 + 1e-9) + 1 for side in (h, w))
        kernel, pad = (2 * ry + 1, 2 * rx + 1), (ry, rx)
        hi = F.max_pool2d(x, kernel, stride=1, padding=pad)
        lo = -F.max_pool2d(-x, kernel, stride=1, padding=pad)
        inside = ((x_adv >= lo - atol) & (x_adv <= hi + atol)).flatten(1).all(1)
        return inside & in_unit_box(x_adv, atol)
