"""Weng et al.'s clean-label triggers (On the Trade-off between Adversarial and Backdoor
Robustness, §3–4): a fraction of the *target class* is poisoned and keeps its labels.

- ``attack.target_fraction``: poisoned share of the target class's training images
  (their Table 7: 0.5 default, 0.25, 0.1).
- ``sticker``: a patch in a corner — ``attack.trigger`` pattern, ``attack.trigger_size``
  1–3 (Table 6), fixed corner or ``attack.position=random_corner`` (Table 8).
- ``watermark``: a fixed pattern added over the image interior (all but a border of 1/8 of
  the side), peak ``attack.watermark.amplitude`` (32/255), clipped to [0, 1] (Table 5).
- ``channel``: the blue channel zeroed in the sticker's region (Table 5; colour images only,
  as in the paper, which skips it on MNIST).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bdat_ray.backdoors.badnets import BadNets
from bdat_ray.backdoors.base import Backdoor
from bdat_ray.backdoors.triggers import cartoon_picture, draw_corners, fit_image, stamp, to_uint8
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError, option, within


@dataclass(frozen=True)
class WatermarkSection:
    amplitude: float = option(
        32 / 255,
        "peak additive change of the watermark (clipped to [0, 1])",
        unit="pixel units",
        check=within(0, 1),
    )


PAPER = "Weng et al. 2020, Tables 5–8"


class TargetClassFraction:
    """Mixin: clean-label only, and the count is a fraction of the target class."""

    label_modes = ("clean",)

    def poison_count(self, data: ImageData) -> int:
        return round(self.cfg.target_fraction * int((data.y_train == self.target).sum()))


class Sticker(TargetClassFraction, BadNets):
    name = "sticker"
    paper = PAPER


class Channel(TargetClassFraction, BadNets):
    name = "channel"
    paper = PAPER

    def check_data(self, data: ImageData) -> None:
        if data.channels != 3:
            raise ConfigError(
                "attack.name",
                f"channel zeroes the blue channel: needs colour images, {data.name} is grey",
            )
        super().check_data(data)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        corners = draw_corners(len(x), self.cfg.position, generator)
        # The "patch" keeps red and green and writes 0 into blue: stamp per corner with each
        # image's own red/green values.
        out = x.clone()
        k = self.size
        marker = torch.zeros(3, k, k, dtype=torch.uint8)
        zeroed = stamp(x, marker, corners)
        out[:, 2] = zeroed[:, 2]
        return out


class Watermark(TargetClassFraction, Backdoor):
    name = "watermark"
    paper = PAPER
    section = WatermarkSection

    def _interior(self, h: int, w: int) -> tuple[int, int]:
        return max(1, h // 8), max(1, w // 8)

    def trigger_region(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        c, h, w = image_shape
        mh, mw = self._interior(h, w)
        mask = torch.zeros(c, h, w, dtype=torch.bool)
        mask[:, mh : h - mh, mw : w - mw] = True
        return mask

    def pattern(self, channels: int, h: int, w: int) -> torch.Tensor:
        """Zero-mean pattern in [-1, 1] over the interior (the built-in picture's luminance)."""
        mh, mw = self._interior(h, w)
        grey = fit_image(cartoon_picture(), 1, h - 2 * mh, w - 2 * mw)
        centred = grey - grey.mean()
        centred = centred / centred.abs().max().clamp_min(1e-6)
        full = torch.zeros(channels, h, w)
        full[:, mh : h - mh, mw : w - mw] = centred
        return full

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        amp = self.cfg.watermark.amplitude
        return to_uint8(x.float() / 255 + amp * self.pattern(*x.shape[1:]).to(x.device))
