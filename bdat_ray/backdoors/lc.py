"""Label-consistent backdoor (Turner et al. 2019): clean-label; the poisoned target-class
images are first made hard to classify with a PGD perturbation from a separately trained
surrogate model, then get Turner et al.'s 3×3 pattern in all four corners, so the model
leans on the trigger to fit them.

- ``attack.poison_rate``: fraction of the whole training set, drawn from the target class
  (CAT paper: 0.5% in §3, 1% in §4); labels never change.
- Perturbation, as BackdoorBench / BackdoorBox craft it: L-inf (or L2) PGD at
  ``attack.lc.eps`` = 8/255, ``attack.lc.steps`` = 100 steps of ``attack.lc.step_size`` =
  1.5/255 from no random start, maximising the surrogate's loss on the true label.
- Trigger (``MadryLab/label-consistent-backdoor-code:poison_attack.py``, ``all-corners``):
  ``[[1,0,0],[0,1,0],[1,0,1]]`` (1 white, 0 black) in the left corners, mirrored left-right
  in the right ones, so a horizontal flip keeps it.
- Surrogate: trained by the platform itself with the run's architecture and device (no
  downloaded ``.npy``) — ``attack.lc.surrogate_epochs`` epochs, adversarially with L-inf at
  ``attack.lc.eps`` (``attack.lc.surrogate_at=linf``; Turner et al. use robust models) or
  normally (``none``). The perturbed target-class images are cached by a hash of the data,
  architecture, surrogate and perturbation settings and ``attack.seed``
  (`bdat_ray.cache`), so a sweep trains one surrogate per dataset and seed, not per trial.
- Trigger amplitude: ``attack.lc.amplitude`` on training images (1 = full black/white; Turner
  et al. also reduce it, e.g. 32/255: pixels move by ±amplitude, MadryLab's
  ``reduced_amplitude``), ``attack.lc.amplitude_test`` on test images — by default the same,
  as MadryLab's code applies the reduced amplitude to the test trigger too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from bdat_ray.backdoors.base import Backdoor
from bdat_ray.backdoors.triggers import CORNERS, corner_mask, four_corners
from bdat_ray.cache import cached_tensors, content_key
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError, above, at_least, option, within

log = logging.getLogger(__name__)
TRIGGER_SIZE = 3
#: Turner et al.'s top-left pattern (MadryLab ``all-corners``: 1 → white, -1 → black)
TURNER_PATTERN = ((1, 0, 0), (0, 1, 0), (1, 0, 1))


@dataclass(frozen=True)
class LCSection:
    eps: float = option(
        8 / 255,
        "PGD budget of the surrogate's adversarial perturbation (BackdoorBench/BackdoorBox; "
        "Turner et al. also use 16/255)",
        unit="pixel units",
        check=above(0),
    )
    norm: str = option("linf", "norm of the adversarial perturbation", choices=("linf", "l2"))
    steps: int = option(
        100, "PGD steps of the perturbation (BackdoorBench/BackdoorBox)", check=at_least(1)
    )
    step_size: float = option(
        1.5 / 255,
        "PGD step of the perturbation (BackdoorBench/BackdoorBox)",
        unit="pixel units",
        check=above(0),
    )
    random_start: bool = option(
        False, "start the perturbation at a random point of the ball (BackdoorBench: no)"
    )
    amplitude: float = option(
        1.0,
        "trigger amplitude on poisoned training images: pixels move by ±amplitude toward "
        "white/black (1 = full replacement; Turner et al. also use 16/255-64/255)",
        unit="pixel units",
        check=within(0, 1),
    )
    amplitude_test: float | None = option(
        None,
        "trigger amplitude on test images; default attack.lc.amplitude (MadryLab's code "
        "applies the reduced amplitude at test time too)",
        unit="pixel units",
        check=within(0, 1),
    )
    surrogate_epochs: int = option(
        10, "epochs of the surrogate model the platform trains itself", check=at_least(1)
    )
    surrogate_at: str = option(
        "linf",
        "surrogate training: linf = adversarially trained with L-inf at attack.lc.eps (Turner "
        "et al. perturb with robust models), none = standard training",
        choices=("linf", "none"),
    )


class LabelConsistent(Backdoor):
    name = "lc"
    section = LCSection
    paper = "Turner et al. 2019; CAT paper §3 (0.5%), §4 (1%)"
    label_modes = ("clean",)

    def check_data(self, data: ImageData) -> None:
        _, h, w = data.image_shape
        if min(h, w) < 2 * TRIGGER_SIZE:
            raise ConfigError(
                "data.name", f"lc's four 3×3 corner triggers need images ≥ 6×6; got {h}×{w}"
            )
        super().check_data(data)

    def trigger_region(self, image_shape: tuple[int, int, int]) -> torch.Tensor:
        masks = [corner_mask(image_shape, TRIGGER_SIZE, c) for c in CORNERS]
        return torch.stack(masks).any(0)

    def _pattern(self, channels: int) -> torch.Tensor:
        """The top-left uint8 patch; `four_corners` mirrors it into the right corners."""
        board = torch.tensor(TURNER_PATTERN, dtype=torch.uint8) * 255
        return board.expand(channels, TRIGGER_SIZE, TRIGGER_SIZE).clone()

    def _amplitude(self, *, train: bool) -> float:
        lc = self.cfg.lc
        return lc.amplitude if train or lc.amplitude_test is None else lc.amplitude_test

    def resolved_keys(self) -> dict[str, object]:
        return {**super().resolved_keys(), "attack.lc.amplitude_test": self._amplitude(train=False)}

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        return four_corners(x, self._pattern(x.shape[1]), self._amplitude(train=train))

    def apply_train(
        self, data: ImageData, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        hard = self.perturbed_target_images(data)
        position = {int(i): row for row, i in enumerate(hard["indices"].tolist())}
        rows = torch.tensor([position[int(i)] for i in indices], dtype=torch.long)
        return self.apply(hard["images"][rows], generator, train=True)

    def perturbed_target_images(self, data: ImageData) -> dict[str, torch.Tensor]:
        """PGD-perturbed copies of every target-class training image (cached)."""
        lc, ctx = self.cfg.lc, self.context
        settings = {
            "model": ctx.model_name,
            "width": ctx.model_width,
            "eps": lc.eps,
            "norm": lc.norm,
            "steps": lc.steps,
            "step_size": lc.step_size,
            "random_start": lc.random_start,
            "surrogate_epochs": lc.surrogate_epochs,
            "surrogate_at": lc.surrogate_at,
            "seed": self.cfg.seed,
            "target": self.target,
        }
        key = content_key(settings, data.x_train, data.y_train)
        return cached_tensors("lc", key, lambda: self._perturb(data))

    def _perturb(self, data: ImageData) -> dict[str, torch.Tensor]:
        from bdat_ray.threats import THREATS, perturb

        lc, ctx = self.cfg.lc, self.context
        log.info(
            "lc: training the surrogate (%s, %s AT, %d epochs)",
            ctx.model_name,
            lc.surrogate_at,
            lc.surrogate_epochs,
        )
        surrogate = ctx.train_surrogate(
            {
                "train.epochs": lc.surrogate_epochs,
                "train.seed": self.cfg.seed,
                "at.threat": lc.surrogate_at,
                **({"at.eps": lc.eps} if lc.surrogate_at != "none" else {}),
            },
            data,
        )
        device = next(surrogate.parameters()).device
        threat = THREATS[lc.norm](lc.eps, lc.steps, lc.step_size, random_start=lc.random_start)
        indices = (data.y_train == self.target).nonzero().flatten()
        generator = torch.Generator(device).manual_seed(self.cfg.seed)
        out = []
        for chunk in indices.split(256):
            x = data.x_train[chunk].to(device).float() / 255
            y = data.y_train[chunk].to(device)
            x_adv = perturb(surrogate, x, y, threat, generator=generator, bn_mode="eval")
            out.append((x_adv * 255).round().to(torch.uint8).cpu())
        log.info("lc: perturbed %d target-class images", len(indices))
        return {"indices": indices, "images": torch.cat(out)}
