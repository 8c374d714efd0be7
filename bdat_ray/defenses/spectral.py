"""Spectral signatures (Tran, Li & Madry, NeurIPS 2018), as Weng et al. §4.2 run it.

An auxiliary network is trained on the whole poisoned training set (the run's architecture
and training settings, through the engine's trainer). For the images of a label, the
representations R (last hidden layer: the pooled activations the linear head reads) are
centred, the top right singular vector v of the centred matrix is taken, and each image scores
⟨R_i − mean, v⟩². The 1.5·ε·n highest-scoring images of the label (n of them in it) are
removed and the run retrains on the rest.

Defaults and sources:
- ``classes=target``: Weng et al. §4.2 assume the target label known and inspect only it;
  ``all`` inspects every label as Tran et al. do.
- ``eps``: the defender's upper bound on the poisoned share of an inspected label (Tran et
  al.'s ε); unset = the run's true share of poisons in the target label (Tran et al. set ε
  to the poisoning rate they used).
- the 1.5 factor is Tran et al.'s (Algorithm 1: "remove the examples with the top 1.5ε
  scores"). BackdoorBench's ``defense/spectral.py`` follows the same steps (per label, SVD of
  the centred activations, percentile cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense, pooled_features
from bdat_ray.options import option, within


@dataclass(frozen=True)
class AuxiliarySection:
    """The labels a detecting filter inspects and its auxiliary model's training."""

    classes: str = option(
        "target",
        "labels inspected: target (the attack's target label, known to the defender as in "
        "Weng et al. §4.2) or all",
        choices=("target", "all"),
    )
    epochs: int | None = option(
        None, "epochs of the auxiliary model trained on the poisoned set; default train.epochs"
    )


@dataclass(frozen=True)
class SpectralSection(AuxiliarySection):
    eps: float | None = option(
        None,
        "upper bound ε on the poisoned share of an inspected label; 1.5·ε·n images are removed "
        "(Tran et al. 2018); default: the run's true share of poisons in the target label",
        check=within(0, 1),
    )


def inspected_labels(classes: str, target: int, num_classes: int) -> list[int]:
    return [target] if classes == "target" else list(range(num_classes))


def auxiliary_model(defense: Defense, train: ImageData):
    """The auxiliary network: the run's settings, trained on the poisoned set as given."""
    overrides = {} if defense.cfg.epochs is None else {"train.epochs": defense.cfg.epochs}
    return defense.ctx.trainer(overrides, train)


def spectral_scores(representations: torch.Tensor) -> torch.Tensor:
    """Tran et al.'s outlier score: squared projection of the centred representations on
    their top right singular vector."""
    centred = representations - representations.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[0]) ** 2


class SpectralSignatures(Defense):
    name = "spectral"
    stage = "filter"
    section = SpectralSection
    paper = "Tran et al. 2018; Weng et al. §4.2, Table 9(a)"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.used_eps: float | None = None  # ε as resolved from the run in `filter`

    def eps(self, train: ImageData) -> float:
        if self.cfg.eps is not None:
            return self.cfg.eps
        poisons = self.ctx.poison_indices.to(train.y_train.device)
        in_target = (train.y_train[poisons] == self.ctx.target).sum().item()
        return in_target / max(1, (train.y_train == self.ctx.target).sum().item())

    def resolved_keys(self) -> dict[str, float]:
        return {} if self.used_eps is None else {"defense.spectral.eps": self.used_eps}

    def filter(self, train: ImageData) -> torch.Tensor:
        self.used_eps = eps = self.eps(train)
        model = auxiliary_model(self, train)
        labels = train.y_train.cpu()
        removed = []
        for label in inspected_labels(self.cfg.classes, self.ctx.target, self.ctx.num_classes):
            members = (labels == label).nonzero().flatten()
            if len(members) < 2:
                continue
            scores = spectral_scores(
                pooled_features(model, train.x_train[members.to(train.x_train.device)]).cpu()
            )
            count = min(len(members), math.ceil(1.5 * eps * len(members)))
            removed.append(members[scores.topk(count).indices])
        return torch.cat(removed).sort().values if removed else torch.empty(0, dtype=torch.long)
