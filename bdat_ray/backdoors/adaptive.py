"""The CAT paper's adaptive attack (Gao et al., Appendix B, Algorithm 1, Table 4): a hidden-
trigger, clean-label backdoor crafted by gradient matching against a surrogate trained with
the *victim's* adversarial training, so that AT itself would learn the backdoor.

Bi-level problem (CAT eq. 2): find bounded perturbations δ of the poisons such that a model
adversarially trained on the poisoned set classifies triggered source images as the target.
It is solved, as in Sleeper Agent (Souri et al. 2021, the paper's [42]) and Witches' Brew
(Geiping et al. 2021, [40]), through the alignment loss

    A = 1 − ⟨∇θ ℓ(poisons), ∇θ ℓ(triggered sources → target)⟩ / (‖∇θ ℓ(poisons)‖ ‖∇θ ℓ(…)‖)

(the paper prints the denominator as ‖ℓ(θ)·ℓ(τ)‖; Witches' Brew's ``similarity`` loss, which
it cites, normalises by the two gradient norms). The difference the paper makes to Sleeper
Agent: the poison gradient is taken on the *adversarial* poisons z ∈ B(x + δ) of the victim's
threat model ("adversarial data rather than original data in the lower-level problem") and
the surrogate is retrained *adversarially*.

Algorithm 1, as implemented (``attack.adaptive.*``):

1. Train the surrogate with the victim's AT (the run's ``at.*`` keys: threat model, budget,
   steps — "the same ε values when optimizing δ and training the victim") or, with
   ``surrogate=standard``, normally; ``surrogate_epochs`` epochs, through the engine
   (`PoisonContext.train_surrogate`, cached).
2. Poison selection: the ``poison_rate`` × training set target-class images with the largest
   per-sample gradient norm ‖∇θ ℓ(f(x), y)‖ under the surrogate (Sleeper Agent's
   ``max_gradient``); labels never change (clean-label).
3. Random start inside the L-inf ball of ``delta_max`` (pixel units).
4. ``steps`` (R = 250) signed-Adam steps on δ minimising A, learning rate ``step_size``
   divided by 10 at R/2.667, R/1.6 and R/1.142 (Witches' Brew's schedule), each followed by
   the L-inf threat model's projection (`bdat_ray.threats.LinfPGD.project`: the ball and the
   [0, 1] box).
5. Every ⌊R / (T + 1)⌋ steps (T = ``retrain_factor`` = 4) except the last: retrain the
   surrogate from scratch on the poisoned training set, with the same AT, and recompute the
   source gradient (Sleeper Agent's ``retrain_scenario=from-scratch``).

Where the paper is silent, Sleeper Agent's defaults (``hsouri/Sleeper-Agent:forest/
options.py``, ``forest/witchcoven/witch_base.py``, ``witch_matching.py``) are followed:

- Trigger: a Bernoulli(½) black/white patch (its ``_create_patch``), side ``patch_size``
  (default a quarter of the image side: Sleeper Agent's 8 px on 32 × 32 CIFAR), pasted at a
  random position of each source image while crafting and of each test image at test time
  (``random_patch=True``). The poisons themselves carry no trigger.
- Sources: every non-target training image (the platform's ASR counts every non-target test
  image, as the CAT paper does); ``source_class`` restricts sources and the ASR test set to
  one class — Sleeper Agent's single-class threat model.
- Poison batches of 512 (its ``pbatch``), each with its own alignment loss; no
  differentiable augmentation while crafting (its ``paugment``: the platform's augmentation
  is not differentiable in δ), one restart.
- The adversarial poisons z are found by the platform's one attack loop (`perturb`) and
  re-attached to δ as z = (x + δ) + (z − (x + δ)).detach() — Witches' Brew's
  reparametrisation for its adversarial-poisoning variant (``padversarial``).

The crafted poisons (and the alignment loss of every step, for tests and plots) are cached
under ``$BDAT_RAY_CACHE/adaptive`` by a hash of the data, architecture, victim AT and these
settings, so a sweep crafts once per setting; the surrogates are cached by the engine.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.backdoors.base import Backdoor, PoisonContext, PoisonedData
from bdat_ray.backdoors.triggers import to_uint8
from bdat_ray.cache import cached_tensors, content_key
from bdat_ray.data.dataset import ImageData
from bdat_ray.options import ConfigError, above, at_least, option, within
from bdat_ray.threats import perturb
from bdat_ray.threats.lp import LinfPGD
from bdat_ray.threats.objective import AdversarialTraining, StandardTraining

if TYPE_CHECKING:
    from bdat_ray.config import AttackConfig

log = logging.getLogger(__name__)

#: Witches' Brew / Sleeper Agent ``--scheduling``: lr ÷ 10 at these fractions of R.
LR_DROPS = (1 / 2.667, 1 / 1.6, 1 / 1.142)
POISON_BATCH = 512  # Sleeper Agent's --pbatch
SOURCE_BATCH = 256  # images per forward pass of the source gradient


@dataclass(frozen=True)
class AdaptiveSection:
    delta_max: float = option(
        16 / 255,
        "L-inf bound of the poisons' perturbations δ (CAT Table 4: 4/255, 8/255, 16/255)",
        unit="pixel units",
        check=within(0, 1),
    )
    steps: int = option(250, "optimisation steps R on δ (CAT Appendix B: 250)", check=at_least(1))
    retrain_factor: int = option(
        4,
        "retraining factor T: the surrogate is retrained every floor(R/(T+1)) steps (CAT: 4); "
        "0 = never",
        check=at_least(0),
    )
    step_size: float = option(
        0.025,
        "signed-Adam learning rate on δ (Witches' Brew tau 0.1 in normalised units ≈ 0.025 "
        "pixel units on CIFAR-10)",
        unit="pixel units",
        check=above(0),
    )
    surrogate: str = option(
        "victim",
        "surrogate training: victim = the run's own at.* (the adaptive attacker knows the "
        "defense), standard = no AT (Sleeper Agent)",
        choices=("victim", "standard"),
    )
    surrogate_epochs: int = option(
        10, "epochs of each surrogate training (initial and every retraining)", check=at_least(1)
    )
    patch_size: int | None = option(
        None,
        "side of the Bernoulli black/white trigger patch; default a quarter of the image side "
        "(Sleeper Agent: 8 px on 32x32)",
        unit="px",
        check=at_least(1),
    )
    source_class: int | None = option(
        None,
        "source class of the triggered images (Sleeper Agent's single-class setting; ASR is "
        "then measured on that class); default every non-target class",
        check=at_least(0),
    )


class AdaptiveAttack(Backdoor):
    name = "adaptive"
    section = AdaptiveSection
    paper = "CAT paper Appendix B (Table 4); Souri et al. 2021; Geiping et al. 2021"
    label_modes = ("clean",)

    def __init__(self, cfg: AttackConfig, context: PoisonContext | None = None):
        super().__init__(cfg, context)
        self._crafted: dict[str, torch.Tensor] | None = None

    # -- settings ------------------------------------------------------------------------------

    def patch_side(self, image_shape: tuple[int, int, int]) -> int:
        return self.cfg.adaptive.patch_size or max(1, min(image_shape[1:]) // 4)

    def check_data(self, data: ImageData) -> None:
        a = self.cfg.adaptive
        if self.patch_side(data.image_shape) > min(data.image_shape[1:]):
            raise ConfigError(
                "attack.adaptive.patch_size",
                f"a {a.patch_size}-px patch does not fit {data.name}'s images",
            )
        if a.source_class is not None and (
            a.source_class >= data.num_classes or a.source_class == self.target
        ):
            raise ConfigError(
                "attack.adaptive.source_class",
                f"must be a class of {data.name} in [0, {data.num_classes - 1}] other than the "
                f"target {self.target}; got {a.source_class}",
            )
        super().check_data(data)

    def surrogate_overrides(self) -> dict[str, Any]:
        """Run keys of every surrogate training: the victim's AT unless ``standard``."""
        a = self.cfg.adaptive
        at = dict(self.context.victim_at) if a.surrogate == "victim" else {"at.threat": "none"}
        return {"train.epochs": a.surrogate_epochs, "train.seed": self.cfg.seed, **at}

    def lower_level(self) -> StandardTraining | AdversarialTraining:
        """The training objective the poisons' gradient is taken under (CAT eq. 2's lower
        level): the victim's AT, or standard training for a standard surrogate."""
        victim = self.context.objective
        if self.cfg.adaptive.surrogate == "standard" or victim is None:
            return StandardTraining()
        return victim

    # -- the trigger ---------------------------------------------------------------------------

    def pattern(self, channels: int, side: int) -> torch.Tensor:
        """Sleeper Agent's Bernoulli(½) patch (uint8, black or white), fixed by attack.seed."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        bits = torch.rand((channels, side, side), generator=generator) < 0.5
        return bits.to(torch.uint8) * 255

    def apply(self, x: torch.Tensor, generator: torch.Generator, *, train: bool) -> torch.Tensor:
        """The patch at a uniformly random position of each image (Sleeper Agent's
        ``random_patch``)."""
        side = self.patch_side(tuple(x.shape[1:]))
        patch = self.pattern(x.shape[1], side).to(x.device)
        h, w = x.shape[-2:]
        rows = torch.randint(0, h - side + 1, (len(x),), generator=generator).tolist()
        cols = torch.randint(0, w - side + 1, (len(x),), generator=generator).tolist()
        out = x.clone()
        for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
            out[i, :, r : r + side, c : c + side] = patch
        return out

    # -- poisoning -----------------------------------------------------------------------------

    def crafted(self, data: ImageData) -> dict[str, torch.Tensor]:
        """``indices`` (sorted), ``images`` (uint8 poisons, same order), ``alignment`` (A
        after every step) — crafted once per setting and cached."""
        if self._crafted is None and self.poison_count(data) == 0:  # the clean baseline
            self._crafted = {
                "indices": torch.empty(0, dtype=torch.long),
                "images": data.x_train[:0].clone(),
                "alignment": torch.empty(0),
            }
        if self._crafted is None:
            ctx = self.context
            settings = {
                "model": ctx.model_name,
                "width": ctx.model_width,
                "attack": {"poison_rate": self.cfg.poison_rate, "target": self.target},
                "adaptive": asdict(self.cfg.adaptive),
                "surrogate": self.surrogate_overrides(),
                "lower_level": self.lower_level().describe(),
                "seed": self.cfg.seed,
            }
            key = content_key(settings, data.x_train, data.y_train)
            self._crafted = cached_tensors("adaptive", key, lambda: self._craft(data))
        return self._crafted

    def select(self, data: ImageData, generator: torch.Generator) -> torch.Tensor:
        return self.crafted(data)["indices"]

    def apply_train(
        self, data: ImageData, indices: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return self.crafted(data)["images"]

    def poison(self, data: ImageData, epoch: int = 0) -> PoisonedData:
        out = super().poison(data, epoch)
        source = self.cfg.adaptive.source_class
        if source is None:
            return out
        keep = out.y_test_triggered == source
        return replace(
            out,
            x_test_triggered=out.x_test_triggered[keep],
            y_test_triggered=out.y_test_triggered[keep],
        )

    # -- crafting (Algorithm 1) ----------------------------------------------------------------

    def _craft(self, data: ImageData) -> dict[str, torch.Tensor]:
        a, ctx = self.cfg.adaptive, self.context
        started = time.perf_counter()
        overrides = self.surrogate_overrides()
        lower = self.lower_level()
        log.info(
            "adaptive: training the surrogate (%s, %s, %d epochs)",
            ctx.model_name,
            lower.describe(),
            a.surrogate_epochs,
        )
        surrogate = ctx.train_surrogate(overrides, data)
        device = next(surrogate.parameters()).device
        generator = torch.Generator().manual_seed(self.cfg.seed)
        attack_generator = torch.Generator(device).manual_seed(self.cfg.seed + 1)

        # Triggered sources with the target label: the gradient the poisons should imitate.
        is_source = (
            data.y_train != self.target
            if a.source_class is None
            else data.y_train == a.source_class
        )
        sources = self.apply(data.x_train[is_source], generator, train=True)
        source_grad = self._mean_gradient(surrogate, sources, self.target, device)

        indices = self._select_poisons(surrogate, data, device)
        x = data.x_train[indices].to(device).float() / 255
        y = data.y_train[indices].to(device)
        ball = LinfPGD(a.delta_max, a.steps, a.step_size, random_start=True)
        delta = ball.init(x, attack_generator).requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=a.step_size)
        milestones = sorted({max(1, math.floor(a.steps * f)) for f in LR_DROPS})
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
        retrain_every = a.steps // (a.retrain_factor + 1) if a.retrain_factor else 0
        alignment = []
        report_every = max(1, a.steps // 25)
        for step in range(1, a.steps + 1):
            optimizer.zero_grad(set_to_none=True)
            loss = self._alignment_step(
                surrogate, lower, x, delta, y, source_grad, attack_generator
            )
            delta.grad.sign_()  # signed Adam (Witches' Brew's signAdam)
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                delta.copy_(ball.project(x, delta))
            alignment.append(loss)
            if step % report_every == 0 or step == a.steps:
                log.info(
                    "adaptive: step %d/%d  alignment loss %.4f  (%.0f s)",
                    step,
                    a.steps,
                    loss,
                    time.perf_counter() - started,
                )
            if retrain_every and step % retrain_every == 0 and step != a.steps:
                log.info("adaptive: retraining the surrogate on the poisoned set (step %d)", step)
                poisoned = data.x_train.clone()
                poisoned[indices] = self._to_images(x, delta).cpu()
                surrogate = ctx.train_surrogate(overrides, replace(data, x_train=poisoned))
                source_grad = self._mean_gradient(surrogate, sources, self.target, device)
        log.info(
            "adaptive: crafted %d poisons in %.0f s (alignment %.4f -> %.4f)",
            len(indices),
            time.perf_counter() - started,
            alignment[0],
            alignment[-1],
        )
        return {
            "indices": indices,
            "images": self._to_images(x, delta).cpu(),
            "alignment": torch.tensor(alignment),
        }

    @staticmethod
    def _to_images(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """uint8 poisons. δ is rounded toward zero in grey levels, so x + δ stays on the
        pixel grid, inside the ball and inside [0, 1] (x is on the grid already)."""
        levels = torch.trunc(delta.detach() * 255)
        return to_uint8(x + levels / 255)

    def _alignment_step(
        self,
        model: nn.Module,
        lower: StandardTraining | AdversarialTraining,
        x: torch.Tensor,
        delta: torch.Tensor,
        y: torch.Tensor,
        source_grad: list[torch.Tensor],
        generator: torch.Generator,
    ) -> float:
        """Back-propagates A into ``delta.grad`` batch by batch; returns the mean A."""
        params = [p for p in model.parameters() if p.requires_grad]
        source_norm = torch.sqrt(sum((g * g).sum() for g in source_grad))
        losses = []
        for batch in torch.arange(len(x), device=x.device).split(POISON_BATCH):
            inputs = lower_level_inputs(model, lower, x[batch] + delta[batch], y[batch], generator)
            poison_loss = sum(weight * F.cross_entropy(model(z), y[batch]) for z, weight in inputs)
            poison_grad = torch.autograd.grad(poison_loss, params, create_graph=True)
            dot = sum((p * s).sum() for p, s in zip(poison_grad, source_grad, strict=True))
            poison_norm = torch.sqrt(sum((p * p).sum() for p in poison_grad))
            loss = 1 - dot / (poison_norm * source_norm)
            loss.backward()
            losses.append(loss.item())
        return sum(losses) / len(losses)

    @staticmethod
    def _mean_gradient(
        model: nn.Module, images: torch.Tensor, label: int, device: torch.device
    ) -> list[torch.Tensor]:
        """∇θ of the mean cross-entropy of uint8 ``images`` toward ``label``."""
        params = [p for p in model.parameters() if p.requires_grad]
        total = [torch.zeros_like(p) for p in params]
        for chunk in images.split(SOURCE_BATCH):
            x = chunk.to(device).float() / 255
            target = torch.full((len(x),), label, device=device)
            loss = F.cross_entropy(model(x), target, reduction="sum")
            for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                acc += g
        return [g / len(images) for g in total]

    def _select_poisons(
        self, model: nn.Module, data: ImageData, device: torch.device
    ) -> torch.Tensor:
        """The target-class images with the largest per-sample gradient norms (Sleeper
        Agent's ``poison_selection_strategy=max_gradient``), sorted by index."""
        pool = self.candidates(data)
        params = [p for p in model.parameters() if p.requires_grad]
        norms = []
        for i in pool.tolist():
            x = data.x_train[i : i + 1].to(device).float() / 255
            y = data.y_train[i : i + 1].to(device)
            grads = torch.autograd.grad(F.cross_entropy(model(x), y), params)
            norms.append(torch.sqrt(sum((g * g).sum() for g in grads)).item())
        top = torch.tensor(norms).argsort(descending=True)[: self.poison_count(data)]
        return pool[top].sort().values


def lower_level_inputs(
    model: nn.Module,
    objective: StandardTraining | AdversarialTraining,
    x: torch.Tensor,
    y: torch.Tensor,
    generator: torch.Generator,
) -> list[tuple[torch.Tensor, float]]:
    """The inputs (with weights) the lower-level training loss is taken on, differentiable in
    ``x``: ``x`` itself for standard training; for AT each threat model's adversarial input,
    found by the one attack loop on the detached ``x`` and re-attached as
    x + (x_adv − x).detach() (Witches' Brew's reparametrisation)."""
    if not isinstance(objective, AdversarialTraining):
        return [(x, 1.0)]
    base = x.detach()
    out = []
    for threat, weight in zip(objective.threats, objective.weights, strict=True):
        x_adv = perturb(model, base, y, threat, generator=generator, bn_mode=objective.bn_mode)
        out.append((x + (x_adv - base), weight))
    return out
