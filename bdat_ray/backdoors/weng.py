"""Weng et al.'s clean-label triggers (On the Trade-off between Adversarial and Backdoor
Robustness, §3–4): a fraction of the *target class* is poisoned and keeps its labels.
Geometry and amplitudes follow their reference code
(``nthu-datalab/On.the.Trade-off.between.Adversarial.and.Backdoor.Robustness``, e.g.
``cifar10/cifar10_exp_local_trigger_adversarial.py``); docs/fidelity.md lists each setting.

- ``attack.target_fraction``: poisoned share of the target class's training images
  (their Table 7: 0.5 default, 0.25, 0.1).
- ``sticker``: a patch in a corner — ``attack.trigger`` pattern (their CIFAR pattern is
  ``checkerboard3``, their MNIST one ``white3``), ``attack.trigger_size`` 1–3 (Table 6),
  ``attack.trigger_offset`` px from the border (CIFAR reference: 2, pixels ``27:30``),
  a fixed corner, ``random_corner`` or ``quarter_corners`` (Table 8; the reference's).
- ``watermark``: ``x[b:-b, b:-b] = clip(x + amplitude·t)`` with a non-negative 0/1 pattern
  ``t`` — border b = 2 px and amplitude 64/255 as the reference (Table 5). The built-in
  pattern is the procedural cartoon picture thresholded at its median luminance (half the
  pixels 1, like the reference's logo); ``attack.watermark.file`` takes any image (its
  luminance in [0, 1]).
- ``channel``: the blue channel zeroed in a ``trigger_size`` square (Table 5; colour images
  only, as in the paper, which skips it on MNIST). ``attack.channel.region=centre`` (default)
  is the reference code's ``15:18`` on 32×32; ``sticker`` is the Figure 4 caption's "same
  position as the sticker".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from bdat_ray.backdoors.badnets import BadNets
from bdat_ray.backdoors.base import Backdoor
from bdat_ray.backdoors.triggers import (
    cartoon_picture,
    draw_corners,
    fit_image,
    load_picture,
    stamp,
    to_uint8,
)
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError, at_least, option, within


@dataclass(frozen=True)
class WatermarkSection:
    amplitude: float = option(
        64 / 255,
        "additive change where the 0/1 pattern is 1, clipped to [0, 1] (reference: 64/255)",
        unit="pixel units",
        check=within(0, 1),
    )
    border: int = option(
        2,
        "untouched border around the pattern (reference: x[2:-2, 2:-2])",
        unit="px",
        check=at_least(0),
    )
    file: str | None = option(
        None, "image file whose luminance in [0, 1] is the pattern; default the built-in 0/1 one"
    )


@dataclass(frozen=True)
class ChannelSection:
    region: str = option(
        "centre",
        "where the blue channel is zeroed: centre (reference code, 15:18 on 32×32) or sticker "
        "(the paper's Figure 4 caption: attack.position / trigger_offset like the sticker)",
        choices=("centre", "sticker"),
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
    section = ChannelSection

    def corners(self) -> tuple[str, ...]:
        return ("centre",) if self.cfg.channel.region == "centre" else super().corners()

    def check_data(self, data: ImageData) -> None:
        if data.channels != 3:
            raise ConfigError(
                "attack.name",
                f"channel zeroes the blue channel: needs colour images, {data.name} is grey",
            )
        super().check_data(data)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        if self.cfg.channel.region == "centre":
            corners = ["centre"] * len(x)
        else:
            corners = draw_corners(len(x), self.cfg.position, generator, train=train)
        # The "patch" keeps red and green and writes 0 into blue: stamp per corner with each
        # image's own red/green values.
        out = x.clone()
        k = self.size
        marker = torch.zeros(3, k, k, dtype=torch.uint8)
        zeroed = stamp(x, marker, corners, self.cfg.trigger_offset)
        out[:, 2] = zeroed[:, 2]
        return out


class Watermark(TargetClassFraction, Backdoor):
    name = "watermark"
    paper = PAPER
    section = WatermarkSection

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        file = cfg.watermark.file
        if file and not Path(file).expanduser().is_file():
            raise ConfigError("attack.watermark.file", f"no such image file: {file}")

    def check_data(self, data: ImageData) -> None:
        _, h, w = data.image_shape
        if 2 * self.cfg.watermark.border >= min(h, w):
            raise ConfigError(
                "attack.watermark.border",
                f"leaves no interior on {h}×{w} images; got {self.cfg.watermark.border}",
            )
        super().check_data(data)

    def trigger_region(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        c, h, w = image_shape
        b = self.cfg.watermark.border
        mask = torch.zeros(c, h, w, dtype=torch.bool)
        mask[:, b : h - b, b : w - b] = True
        return mask

    def pattern(self, channels: int, h: int, w: int) -> torch.Tensor:
        """Non-negative pattern t in [0, 1] over the interior (0 on the border)."""
        b = self.cfg.watermark.border
        file = self.cfg.watermark.file
        grey = fit_image(load_picture(file) if file else cartoon_picture(), 1, h - 2 * b, w - 2 * b)
        t = grey if file else (grey > grey.median()).float()
        full = torch.zeros(channels, h, w)
        full[:, b : h - b, b : w - b] = t
        return full

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        amp = self.cfg.watermark.amplitude
        return to_uint8(x.float() / 255 + amp * self.pattern(*x.shape[1:]).to(x.device))
