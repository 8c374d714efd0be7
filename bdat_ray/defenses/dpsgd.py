"""DP-SGD (Abadi et al. 2016) as a backdoor defense (Du et al. 2020; CAT paper §4, Table 2):
every per-sample gradient is clipped to L2 norm ``max_grad_norm`` and Gaussian noise of
standard deviation σ·``max_grad_norm`` is added to their sum before the step.

The field's maintained library does the work: Opacus (``opacus.GradSampleModule`` computes the
per-sample gradients with hooks on the model's layers, ``opacus.optimizers.DPOptimizer`` clips,
noises and averages them around the run's own SGD). BatchNorm mixes the samples of a batch,
so per-sample gradients need another normalisation: the CAT paper replaces it with GroupNorm,
done here by Opacus' ``ModuleValidator.fix`` (the run's ``model.norm=group`` gives the same
layers). Defaults: σ = 0.1 (CAT paper §4), clipping norm 1.0 (Opacus' tutorials; the paper
does not state it). DPSGD trains by standard SGD in the paper, so it does not combine with AT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from bdat_ray.defenses.base import Defense
from bdat_ray.options import ConfigError, above, at_least, option

if TYPE_CHECKING:
    from bdat_ray.config import Config


@dataclass(frozen=True)
class DPSGDSection:
    noise_multiplier: float = option(
        0.1, "noise σ, as a multiple of the clipping norm (CAT paper §4: 0.1)", check=at_least(0)
    )
    max_grad_norm: float = option(
        1.0,
        "per-sample gradient clipping norm C (L2; the CAT paper does not state it)",
        check=above(0),
    )


class DPSGD(Defense):
    name = "dpsgd"
    stage = "train"
    section = DPSGDSection
    paper = "Abadi et al. 2016 / Du et al. 2020; CAT paper §4, Table 2 (GroupNorm, σ 0.1)"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.at.threat != "none":
            raise ConfigError(
                "defense.name",
                "dpsgd trains by standard (noised) SGD as in the CAT paper; set at.threat=none",
            )

    def adapt_model(self, model: nn.Module) -> nn.Module:
        from opacus.validators import ModuleValidator

        fixed = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm, as the CAT paper does
        for module in fixed.modules():
            # Opacus' backward hooks hand on views that an in-place ReLU may not overwrite
            if isinstance(module, nn.ReLU):
                module.inplace = False
        problems = ModuleValidator.validate(fixed, strict=False)
        if problems:
            raise ConfigError("defense.name", f"dpsgd cannot train this model: {problems[0]}")
        return fixed

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        # The hooks live on the model's own layers, so the engine keeps calling `model`
        # itself; the wrapper is held only so its hooks stay attached.
        # loss_reduction="mean": the engine's loss is the batch mean, so the per-sample
        # gradients are rescaled to those of each sample's own loss before clipping.
        self.grad_sample_module = GradSampleModule(model, loss_reduction="mean")
        return DPOptimizer(
            optimizer,
            noise_multiplier=self.cfg.noise_multiplier,
            max_grad_norm=self.cfg.max_grad_norm,
            expected_batch_size=self.ctx.batch_size,
            loss_reduction="mean",
        )
