"""The backdoor-attack interface.

An attack chooses which training images to poison, applies its trigger (and, for dirty-label
attacks, relabels them to the target), and builds the triggered test set used for ASR:
the test images whose true label is *not* the target, with the trigger applied (both seed
papers and BackdoorBench count ASR this way). The poisoned indices are fixed at build time
from ``attack.seed`` and saved with every run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError

if TYPE_CHECKING:
    from torch import nn

    from bdat_ray.config import AttackConfig
    from bdat_ray.threats.objective import AdversarialTraining, StandardTraining

#: Trains an auxiliary model (an attack's surrogate) on clean ``data`` with the engine's own
#: loop: ``trainer(run-config overrides, data) -> model`` in eval mode. The engine hands it
#: over in `PoisonContext`, so an attack never imports the engine that imports it.
Trainer = Callable[[Mapping[str, Any], ImageData], "nn.Module"]


@dataclass(frozen=True)
class PoisonContext:
    """What an attack may need from the run besides its own knobs: LC and the adaptive attack
    train a surrogate model of the run's architecture on the run's device with ``trainer``;
    the adaptive attack also knows the victim's adversarial training — its ``at.*`` keys
    (``victim_at``, for the surrogate) and the training objective built from them."""

    device: str = "cpu"
    model_name: str = "small_cnn"
    model_width: float = 1.0
    trainer: Trainer | None = None
    victim_at: Mapping[str, Any] = field(default_factory=dict)
    objective: StandardTraining | AdversarialTraining | None = None

    def train_surrogate(self, overrides: Mapping[str, Any], data: ImageData) -> nn.Module:
        """A model of the run's architecture, on the run's device, trained on ``data``."""
        if self.trainer is None:
            raise RuntimeError("this attack trains a surrogate: PoisonContext needs a trainer")
        base = {"device": self.device, "model.name": self.model_name}
        return self.trainer({**base, "model.width": self.model_width, **overrides}, data)


@dataclass(frozen=True)
class PoisonedData:
    data: ImageData  # training split poisoned; test split untouched
    poison_indices: torch.Tensor  # int64 indices into the training split, sorted
    x_test_triggered: torch.Tensor  # uint8: triggered non-target test images
    y_test_triggered: torch.Tensor  # their true labels (never the target)
    target: int
    # images altered without being poisoned (WaNet's noise-mode samples keep true labels)
    cross_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    # the triggered TARGET-class test images: with x_test_triggered, every test image
    # triggered, for Weng et al.'s count (`bdat_ray.metrics.attack_success_rate_by_prediction`)
    x_test_triggered_target: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> PoisonedData:
        target_class = self.x_test_triggered_target
        return replace(
            self,
            data=self.data.to(device),
            x_test_triggered=self.x_test_triggered.to(device),
            y_test_triggered=self.y_test_triggered.to(device),
            x_test_triggered_target=target_class.to(device) if target_class is not None else None,
        )


class Backdoor:
    """Subclasses set ``name``/``paper`` and implement `apply`; most override nothing else."""

    name: ClassVar[str]
    paper: ClassVar[str]
    #: the attack's own config section ``attack.<name>.*`` (None: only the shared keys)
    section: ClassVar[type | None] = None
    #: which ``attack.label_mode`` values the attack supports
    label_modes: ClassVar[tuple[str, ...]] = ("dirty", "clean")

    def __init__(self, cfg: AttackConfig, context: PoisonContext | None = None):
        self.cfg = cfg
        self.target = cfg.target
        self.context = context or PoisonContext()

    # -- validation --------------------------------------------------------------------------

    @property
    def label_mode(self) -> str:
        """``attack.label_mode``, or the attack's own when unset."""
        return self.cfg.label_mode or self.label_modes[0]

    @classmethod
    def check_config(cls, cfg: AttackConfig) -> None:
        """Checks that need no dataset. Raise `ConfigError` naming the key."""
        if cfg.label_mode is not None and cfg.label_mode not in cls.label_modes:
            allowed = " or ".join(cls.label_modes)
            raise ConfigError("attack.label_mode", f"{cls.name} is {allowed}-label only")

    def check_data(self, data: ImageData) -> None:
        """Checks against the dataset (classes, image size, class counts)."""
        if not 0 <= self.target < data.num_classes:
            raise ConfigError(
                "attack.target",
                f"must be in [0, {data.num_classes - 1}] for {data.name}; got {self.target}",
            )
        pool = self.candidates(data)
        count = self.poison_count(data)
        if count > len(pool):
            what = "target-class" if self.label_mode == "clean" else "non-target"
            raise ConfigError(
                "attack.poison_rate",
                f"{count} poisoned images requested but {data.name} has only {len(pool)} "
                f"{what} training images (class {self.target})",
            )

    def resolved_keys(self) -> dict[str, object]:
        """Config keys whose defaults this attack resolved (reported with the run)."""
        return {"attack.label_mode": self.label_mode}

    def trigger_region(self, image_shape: tuple[int, int, int]) -> torch.Tensor | None:
        """Bool (C, H, W) mask of every pixel the trigger may touch; None for whole-image
        triggers. The contract tests check nothing outside it changes."""
        return None

    # -- which images ------------------------------------------------------------------------

    def candidates(self, data: ImageData) -> torch.Tensor:
        """Indices eligible for poisoning: target-class images for clean-label attacks
        (labels stay correct), the other classes for dirty-label ones."""
        is_target = data.y_train == self.target
        pool = is_target if self.label_mode == "clean" else ~is_target
        return pool.nonzero().flatten()

    def poison_count(self, data: ImageData) -> int:
        """``attack.poison_rate`` is a fraction of the whole training set."""
        return round(self.cfg.poison_rate * len(data.y_train))

    def select(self, data: ImageData, generator: torch.Generator) -> torch.Tensor:
        pool = self.candidates(data)
        pick = torch.randperm(len(pool), generator=generator)[: self.poison_count(data)]
        return pool[pick].sort().values

    # -- the trigger -------------------------------------------------------------------------

    def apply_train(
        self, data: ImageData, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Poisoned versions of the training images at ``indices`` (LC perturbs first)."""
        return self.apply(data.x_train[indices], generator, train=True)

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        """Triggered copy of uint8 batch ``x`` (``train`` tells training from test poisoning
        for attacks that differ, e.g. Blended's separate α or LC's adversarial step)."""
        raise NotImplementedError

    #: attacks defined with a fresh poisoned set per epoch override this (WaNet's knob)
    redraws_each_epoch: ClassVar[bool] = False

    def poison_batch(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Poison a training batch (uint8 images, labels) as the engine draws it, for attacks
        defined per batch (WaNet's original scheme). Most attacks poison once in `poison`
        and return the batch unchanged, drawing nothing from ``generator``."""
        return x, y

    def illustration(self, data: ImageData) -> PoisonedData:
        """Poisoned data to picture (gallery, ``trigger.png``): `poison`'s, unless the attack
        keeps no fixed poisoned set."""
        return self.poison(data)

    def draw_seed(self, epoch: int) -> int:
        """Seed of the poisoned-set draw: ``attack.seed`` at build time (epoch 0), a distinct
        reproducible one per later epoch for attacks that re-draw."""
        return self.cfg.seed if epoch == 0 else self.cfg.seed * 1_000_003 + epoch

    def poison(self, data: ImageData, epoch: int = 0) -> PoisonedData:
        self.check_data(data)
        generator = torch.Generator().manual_seed(self.draw_seed(epoch))
        indices = self.select(data, generator)
        x_train, y_train = data.x_train.clone(), data.y_train.clone()
        if len(indices):
            x_train[indices] = self.apply_train(data, indices, generator)
        if self.label_mode == "dirty":
            y_train[indices] = self.target
        keep = data.y_test != self.target
        x_triggered = self.apply(data.x_test[keep], generator, train=False)
        x_triggered_target = self.apply(data.x_test[~keep], generator, train=False)
        poisoned = replace(data, x_train=x_train, y_train=y_train)
        return PoisonedData(
            poisoned,
            indices,
            x_triggered,
            data.y_test[keep],
            self.target,
            x_test_triggered_target=x_triggered_target,
        )


class NoBackdoor(Backdoor):
    """Clean training data (``attack.name=none``); ASR is still measured with a BadNets
    3×3 trigger so a clean baseline has a comparable number."""

    name = "none"
    paper = "—"

    def poison_count(self, data: ImageData) -> int:
        return 0

    def resolved_keys(self) -> dict[str, object]:
        return {}

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        from bdat_ray.backdoors.triggers import make_pattern, stamp

        patch = make_pattern("checkerboard3", None, x.shape[1], generator)
        return stamp(x, patch, ["bottom_right"] * len(x))
