"""The baseline-defense interface.

A defense acts at one stage of a run (architecture.md; the papers' comparison tables):

- ``filter``: inspects the poisoned training set before training and removes what it
  flags (spectral signatures, activation clustering, the perfect and random reference
  filters); the run then trains on what is left;
- ``train``: changes how the model is trained (DPSGD, ABL, Lipschitz regularisation,
  feature-denoising layers);
- ``repair``: changes the trained model afterwards (Fine-Pruning, NAD, Neural Cleanse).

``none`` is standard training. A defense's knobs are its own config section
``defense.<name>.*`` (``section``), declared beside its code and collected from the registry.

The engine calls the hooks below at fixed points of every run; each default does nothing, so a
defense overrides only the hooks of its stage. A defense never imports the engine: what it
needs from the run (an auxiliary trainer, the clean share, the device) comes in
`DefenseContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.data.augment import shuffled_batches, to_float
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError, above, at_least, option

if TYPE_CHECKING:
    from bdat_ray.config import Config

STAGES = ("none", "filter", "train", "repair")

#: ``trainer(run-config overrides, training data) -> model`` in eval mode: a model of the
#: run's architecture and training settings (model.*, train.*, at.*), trained by the engine's
#: own loop on ``data`` with no further poisoning — SS/AC's auxiliary network.
Trainer = Callable[[Mapping[str, Any], ImageData], nn.Module]


@dataclass
class DefenseContext:
    """What a defense may use from the run besides its own knobs."""

    device: torch.device
    num_classes: int
    image_shape: tuple[int, int, int]
    target: int  # the attack's target class (Weng et al. §4.2 assume the defender knows it)
    #: the truly poisoned training indices: read only by the reference filters (an oracle)
    poison_indices: torch.Tensor
    batch_size: int  # the run's training batch size
    lr: float  # the run's learning rate
    epochs: int  # train.epochs
    seed: int  # train.seed
    trainer: Trainer | None = None
    #: clean training images the defender holds (``defense.<name>.clean_fraction`` of the
    #: clean training set, drawn by the engine); None for defenses that need none
    clean_share: ImageData | None = None

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator from ``train.seed`` (a defense's own draws are reproducible)."""
        return torch.Generator().manual_seed(self.seed * 7919 + 17 + offset)


@dataclass(frozen=True)
class CleanDataSection:
    """The knob every defense that reads clean data shares (the papers give the defender 5%)."""

    clean_fraction: float = option(
        0.05,
        "share of the clean training set the defender holds (CAT paper §4: 5%, as NAD)",
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    )


class Defense:
    name: ClassVar[str]
    stage: ClassVar[str]
    paper: ClassVar[str]
    #: the defense's own config section ``defense.<name>.*`` (None: no knobs)
    section: ClassVar[type | None] = None

    def __init__(self, cfg: Any, ctx: DefenseContext):
        self.cfg = cfg  # this defense's section (None without one)
        self.ctx = ctx
        #: training indices the defense flagged as poisoned (removed by a filter, isolated by
        #: ABL); the engine scores them against the truly poisoned ones (`detection_rates`)
        self.flagged: torch.Tensor | None = None

    @classmethod
    def needs_clean_data(cls) -> bool:
        return cls.section is not None and issubclass(cls.section, CleanDataSection)

    @classmethod
    def changes_training_step(cls) -> bool:
        """Whether the defense replaces the step's objective or optimiser (ABL's LGA loss, the
        Lipschitz penalty's double backward, DPSGD's per-sample gradient hooks): steps that
        ``train.compile`` does not compile (AOTAutograd has no double backward; Opacus' hooks
        are untested under Dynamo)."""
        return cls.objective is not Defense.objective or cls.wrap_optimizer is not (
            Defense.wrap_optimizer
        )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Cross-key checks before any data is loaded; raise `ConfigError`."""
        if cfg.train.compile == "on" and cls.changes_training_step():
            raise ConfigError(
                "train.compile",
                f"on cannot compile the training step of defense.name={cls.name}, which "
                "changes its objective or optimiser; use train.compile=off or auto",
            )
        if cls.stage == "filter" and cfg.attack.name == "none":
            raise ConfigError(
                "defense.name",
                f"{cls.name} filters poisoned training data; attack.name=none has none "
                "(choose an attack or defense.name=none)",
            )

    def resolved_keys(self) -> dict[str, Any]:
        """Defaults the defense resolved from the run, for the resolved config."""
        return {}

    # -- hooks, in the order the engine calls them -------------------------------------------

    def filter(self, train: ImageData) -> torch.Tensor | None:
        """filter stage: indices of the (poisoned) training images to remove."""
        return None

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """A changed model before training (denoising layers, DPSGD's GroupNorm)."""
        return model

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """The optimiser the steps go through (DPSGD's per-sample clipping and noise)."""
        return optimizer

    def objective(self, objective: Any, epoch: int) -> Any:
        """The training objective of ``epoch`` (Lipschitz penalty, ABL's LGA loss)."""
        return objective

    def after_epoch(self, epoch: int, model: nn.Module, train: ImageData) -> None:
        """After each training epoch (ABL isolates its candidates here)."""

    def repair(self, model: nn.Module, train: ImageData) -> nn.Module:
        """repair stage: the defended model from the trained one."""
        return model

    def report(self) -> dict[str, float]:
        """The defense's own metrics (numbers; they go to MLflow with the run)."""
        return {}

    def details(self) -> dict[str, Any]:
        """JSON-able findings that are not single numbers (e.g. Neural Cleanse's classes)."""
        return {}

    def fine_tune_on_clean_share(self, model: nn.Module, draw: int, **kw: Any) -> nn.Module:
        """`fine_tune` on the clean share with this defense's ``epochs`` and ``lr`` (a
        `FineTuneSection`); ``draw`` tells the defense's random streams apart."""
        return fine_tune(
            model,
            self.ctx.clean_share,
            epochs=self.cfg.epochs,
            lr=self.cfg.lr,
            batch_size=self.ctx.batch_size,
            generator=self.ctx.generator(draw),
            **kw,
        )

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.flagged = state.get("flagged")


class NoDefense(Defense):
    """Standard training on the (poisoned) data; AT, when configured, is not a defense here
    but the run's training objective (``at.*``)."""

    name = "none"
    stage = "none"
    paper = "—"


# ---------------------------------------------------------------------------------------------
# Helpers several defenses share.


def subset(data: ImageData, indices: torch.Tensor) -> ImageData:
    """The training images at ``indices`` (test split unchanged)."""
    return replace(data, x_train=data.x_train[indices], y_train=data.y_train[indices])


@torch.no_grad()
def pooled_features(
    model: nn.Module, images: torch.Tensor, *, stage: int = -1, batch_size: int = 512
) -> torch.Tensor:
    """Per-image activations of stage ``stage`` averaged over space, (N, channels) float32,
    in eval mode: the last hidden layer for ``stage=-1`` (the input of the linear head)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [
            F.adaptive_avg_pool2d(
                model.features(to_float(chunk.to(device), False))[stage], 1
            ).flatten(1)
            for chunk in images.split(batch_size)
        ]
        return torch.cat(out).float()
    finally:
        model.train(was_training)


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def fine_tune(
    model: nn.Module,
    data: ImageData,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    loss_fn: LossFn | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """A plain SGD loop (momentum 0.9, weight decay 5e-4, constant ``lr``) over ``data``'s
    training split — the repair defenses' fine-tuning on their clean share. ``loss_fn(model,
    x, y)`` replaces cross-entropy; ``batch_transform(x, y)`` edits a float batch (NC's
    unlearning stamps the reversed trigger on part of it)."""
    loss_fn = loss_fn or (lambda m, x, y: F.cross_entropy(m(x), y))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    device = data.x_train.device
    model.train()
    for _ in range(epochs):
        for idx in shuffled_batches(len(data.y_train), batch_size, generator, device):
            x, y = to_float(data.x_train[idx], False), data.y_train[idx]
            if batch_transform is not None:
                x = batch_transform(x, y)
            loss = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@dataclass(frozen=True)
class FineTuneSection(CleanDataSection):
    """Fine-tuning on the clean share after a repair (FP, NC's unlearning)."""

    epochs: int = option(10, "fine-tuning epochs over the clean share", check=at_least(0))
    lr: float = option(0.01, "fine-tuning learning rate", check=above(0))
