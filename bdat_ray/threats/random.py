"""The CAT paper's random-perturbation controls (Table 1): the same training loop with a
random draw in place of the inner maximisation, to tell "adversarial" from "just perturbed".

- ``noise``: zero-mean Gaussian pixel noise, σ = ``eps`` in pixel units (paper: 0.05–0.2;
  its controls for Blended), clipped to [0, 1].
- ``flow_noise``: a uniformly random flow field with the spatial threat's L-inf bound
  ``eps`` in normalised grid units (its controls for BadNets).
"""

from __future__ import annotations

from typing import Any

import torch

from bdat_ray.threats.base import budget_section, in_unit_box, normal, uniform
from bdat_ray.threats.lp import PixelOffset
from bdat_ray.threats.spatial import SpatialFlow

NoiseSection = budget_section("noise", "pixel units, Gaussian σ", "0.1")
FlowNoiseSection = budget_section("flow_noise", "normalised grid units, L-inf", "0.025")

GAUSSIAN_SUPPORT = 6.0  # |noise| ≤ 6σ counts as inside (P(|N(0,1)| > 6) ≈ 2e-9 per value)


class GaussianNoise(PixelOffset):
    name = "noise"
    section = NoiseSection
    unit = "pixel units, Gaussian σ"
    default_eps = 0.1  # CAT paper Table 1: σ ∈ {0.05, 0.1, 0.15, 0.2}
    maximizes = False

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.clip_to_box(x, self.eps * normal(x.shape, generator, x.device))

    def contains(self, x, x_adv, atol: float = 1e-5, model=None) -> torch.Tensor:
        reach = (x_adv - x).flatten(1).abs().amax(1)
        return (reach <= GAUSSIAN_SUPPORT * self.eps + atol) & in_unit_box(x_adv, atol)


class RandomFlow(SpatialFlow):
    name = "flow_noise"
    section = FlowNoiseSection
    unit = "normalised grid units, L-inf on the flow"
    default_eps = 0.025  # the spatial threat's CAT budget
    maximizes = False

    @classmethod
    def knobs(cls, section) -> dict[str, Any]:
        return {}  # no search, so none of spatial's smoothness or optimiser knobs

    @property
    def starts_random(self) -> bool:
        return True  # the random draw is the whole perturbation

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        shape = torch.Size((x.shape[0], 2, *x.shape[-2:]))
        return self.eps * uniform(shape, generator, x.device)
