"""WaNet (Nguyen & Tran 2021): an imperceptible, smooth warp of the whole image.

The warping field: a k×k grid of uniform noise in [-1, 1], normalised by its mean absolute
value, upsampled bicubically to the image size; the poisoned image is
``grid_sample(x, clamp((identity + s·field/H)·grid_rescale, -1, 1))``. Defaults k = 4,
s = 0.5, grid_rescale = 1 (``attack.wanet.*``), dirty-label, ``attack.poison_rate`` 5% of the
whole training set (CAT paper: 5%; WaNet's own 10%).

Noise mode: ``attack.wanet.cross_ratio`` (2) × the poisoned count of other training images are
warped with the same field plus per-image random noise and *keep their true labels*, so the
model learns that only the exact warp means "target" (they are the run's ``cross_indices``).

When (``attack.wanet.scheme``): ``per_batch`` (default) as the original and BackdoorBench
(``VinAIResearch/Warping-based_Backdoor_Attack-release:train.py``): the training set stays
clean, and in every batch the first ⌊``poison_rate``·batch⌋ images of the shuffled order —
any label — are warped and relabelled, the next ⌊``cross_ratio``·that⌋ get the noise-mode
warp, before augmentation. The engine calls `WaNet.poison_batch` with its seeded data
generator, so a run (and a resumed run) poisons the same images; no fixed index set exists,
so ``poisoned_indices.npy`` is empty and the run's trigger picture shows the fixed scheme's
first images. ``fixed``: the poisoned and noise sets are drawn once from ``attack.seed`` and
saved with the run, like every other attack's (BackdoorBox); ``per_epoch``: fresh fixed sets
every epoch, seeded by ``attack.seed`` and the epoch."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from kornia.geometry import create_meshgrid

from bdat_ray.backdoors.base import Backdoor, PoisonedData
from bdat_ray.backdoors.triggers import to_uint8
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import above, at_least, option


@dataclass(frozen=True)
class WaNetSection:
    k: int = option(
        4, "control grid size k×k of the warping field (Nguyen & Tran 2021)", check=at_least(2)
    )
    s: float = option(0.5, "warping strength", check=above(0))
    grid_rescale: float = option(1.0, "scale of the warped grid before clipping", check=above(0))
    cross_ratio: float = option(
        2.0,
        "noise-mode ('cross') images per poisoned image: warped with a random extra field, "
        "keeping their true labels",
        check=at_least(0),
    )
    scheme: str = option(
        "per_batch",
        "per_batch: a share of every batch is warped+relabelled and a share gets noise mode "
        "(the original WaNet and BackdoorBench); fixed: sets drawn once at build time and "
        "saved (BackdoorBox); per_epoch: fresh fixed sets every epoch",
        choices=("per_batch", "fixed", "per_epoch"),
    )


class WaNet(Backdoor):
    name = "wanet"
    section = WaNetSection
    paper = "Nguyen & Tran 2021; CAT paper §3 (5%)"
    label_modes = ("dirty",)

    @property
    def redraws_each_epoch(self) -> bool:  # type: ignore[override]
        return self.cfg.wanet.scheme == "per_epoch"

    @property
    def per_batch(self) -> bool:
        return self.cfg.wanet.scheme == "per_batch"

    def warp_grid(self, height: int, width: int) -> torch.Tensor:
        """The backdoor's sampling grid (1, H, W, 2), a function of ``attack.seed`` only."""
        w = self.cfg.wanet
        generator = torch.Generator().manual_seed(self.cfg.seed)
        field = torch.rand(1, 2, w.k, w.k, generator=generator) * 2 - 1
        field = field / field.abs().mean()
        field = F.interpolate(field, size=(height, width), mode="bicubic", align_corners=True)
        field = field.permute(0, 2, 3, 1)
        # (1, H, W, 2) in grid_sample's (x, y) order, corners at ±1 (align_corners=True)
        identity = create_meshgrid(height, width, normalized_coordinates=True)
        return ((identity + w.s * field / height) * w.grid_rescale).clamp(-1, 1)

    def _warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        warped = F.grid_sample(x.float() / 255, grid.to(x.device), align_corners=True)
        return to_uint8(warped)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        grid = self.warp_grid(*x.shape[-2:])
        return self._warp(x, grid.expand(len(x), -1, -1, -1))

    def apply_cross(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Noise mode: the backdoor warp plus per-image random noise of up to one pixel."""
        n, _, h, w = x.shape
        grid = self.warp_grid(h, w).expand(n, -1, -1, -1).to(x.device)
        noise = torch.rand(n, h, w, 2, generator=generator, device=generator.device) * 2 - 1
        return self._warp(x, (grid + noise.to(x.device) / h).clamp(-1, 1))

    def poison_batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The original's per-batch poisoning (its ``train``: ``num_bd = int(bs · pc)``,
        ``num_cross = int(num_bd · cross_ratio)``, on the head of the shuffled batch)."""
        if not self.per_batch:
            return x, y
        n_bd = int(len(y) * self.cfg.poison_rate)
        n_cross = min(int(n_bd * self.cfg.wanet.cross_ratio), len(y) - n_bd)
        x, y = x.clone(), y.clone()
        if n_bd:
            x[:n_bd] = self.apply(x[:n_bd], generator, train=True)
            y[:n_bd] = self.target
        if n_cross:
            x[n_bd : n_bd + n_cross] = self.apply_cross(x[n_bd : n_bd + n_cross], generator)
        return x, y

    def poison_count(self, data: ImageData) -> int:
        return 0 if self.per_batch else super().poison_count(data)

    def illustration(self, data: ImageData) -> PoisonedData:
        """Per-batch poisoning keeps no fixed set: picture the fixed scheme's instead."""
        if not self.per_batch:
            return self.poison(data)
        fixed = replace(self.cfg, wanet=replace(self.cfg.wanet, scheme="fixed"))
        return WaNet(fixed, self.context).poison(data)

    def poison(self, data: ImageData, epoch: int = 0) -> PoisonedData:
        poisoned = super().poison(data, epoch)
        generator = torch.Generator().manual_seed(self.draw_seed(epoch) + 7)
        free = torch.ones(len(data.y_train), dtype=torch.bool)
        free[poisoned.poison_indices] = False
        free = free.nonzero().flatten()
        n_cross = min(round(self.cfg.wanet.cross_ratio * len(poisoned.poison_indices)), len(free))
        cross = free[torch.randperm(len(free), generator=generator)[:n_cross]].sort().values
        if n_cross:
            poisoned.data.x_train[cross] = self.apply_cross(data.x_train[cross], generator)
        return replace(poisoned, cross_indices=cross)
