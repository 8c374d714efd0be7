"""Blended (Chen et al. 2017): x' = (1 - α)·x + α·t over the whole image.

Defaults (CAT paper §3–4): α = 0.2 for training and test images (``attack.blended.alpha``,
``attack.blended.alpha_test``), dirty-label, ``attack.poison_rate`` 5% of the whole training
set. Triggers (``attack.blended.trigger``): ``picture`` — a built-in procedurally drawn
cartoon standing in for the papers' Hello-Kitty, which cannot ship; ``noise`` — a uniform
random image fixed by ``attack.seed`` (the papers' "random" trigger); ``file`` — any image at
``attack.blended.file``, resized to the data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bdat_ray.backdoors.base import Backdoor
from bdat_ray.backdoors.triggers import cartoon_picture, fit_image, load_picture, to_uint8
from bdat_ray.options import ConfigError, option

if TYPE_CHECKING:
    from bdat_ray.config import AttackConfig


@dataclass(frozen=True)
class BlendedSection:
    alpha: float = option(
        0.2,
        "blend weight in x' = (1-α)x + α·t for training images (Chen et al. 2017)",
        check=lambda v: None if 0 < v < 1 else "must be in (0, 1)",
    )
    alpha_test: float | None = option(
        None,
        "blend weight for triggered test images; default: alpha",
        check=lambda v: None if v is None or 0 < v < 1 else "must be in (0, 1)",
    )
    trigger: str = option(
        "picture",
        "picture: built-in procedurally drawn picture (stand-in for the papers' Hello-Kitty); "
        "noise: uniform random image seeded by attack.seed; file: attack.blended.file",
        choices=("picture", "noise", "file"),
    )
    file: str | None = option(None, "image file used when attack.blended.trigger=file (resized)")


class Blended(Backdoor):
    name = "blended"
    section = BlendedSection
    paper = "Chen et al. 2017; CAT paper §3 (Hello-Kitty, 5%), Table 2 (Hello-Kitty and random)"

    @classmethod
    def check_config(cls, cfg: AttackConfig) -> None:
        super().check_config(cfg)
        b = cfg.blended
        if b.trigger == "file":
            if not b.file:
                raise ConfigError("attack.blended.file", "attack.blended.trigger=file needs a path")
            if not Path(b.file).expanduser().is_file():
                raise ConfigError("attack.blended.file", f"no such image file: {b.file}")
            from PIL import Image, UnidentifiedImageError

            try:
                with Image.open(Path(b.file).expanduser()) as picture:
                    picture.verify()  # reads the whole file: a truncated image fails here
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                raise ConfigError(
                    "attack.blended.file", f"{b.file} is not a readable image ({err})"
                ) from None

    def resolved_keys(self) -> dict[str, object]:
        return {**super().resolved_keys(), "attack.blended.alpha_test": self._alpha(train=False)}

    def _alpha(self, *, train: bool) -> float:
        b = self.cfg.blended
        return b.alpha if train or b.alpha_test is None else b.alpha_test

    def pattern(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The trigger t as floats in [0, 1], shape (channels, height, width)."""
        b = self.cfg.blended
        if b.trigger == "noise":
            generator = torch.Generator().manual_seed(self.cfg.seed)
            return torch.rand(channels, height, width, generator=generator)
        picture = load_picture(b.file) if b.trigger == "file" else cartoon_picture()
        return fit_image(picture, channels, height, width)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        alpha = self._alpha(train=train)
        t = self.pattern(*x.shape[1:]).to(x.device)
        return to_uint8((1 - alpha) * x.float() / 255 + alpha * t)
