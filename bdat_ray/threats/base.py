"""The threat-model interface (after MadryLab/robustness ``attack_steps.py``).

A threat model is a set B(x) of allowed inputs around x together with how to search it.
It holds a *perturbation variable* ``delta`` (a pixel offset for L-p balls, a flow field for
spatial attacks, ...), knows how to start it, turn it into an image, take an ascent step on
it, project it back into B(x), and test membership. `bdat_ray.threats.attack.perturb` is the
one loop that drives every threat model; nothing else loops over attack steps.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from bdat_ray.options import above, at_least, option


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample Carlini-Wagner margin with κ = ∞: the best other logit minus the true one
    (perceptual-advex's ``MarginLoss(kappa=inf)``, which its StAdv and Fast-LPA maximise)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    return others.amax(1) - true


def cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


#: the classification losses an attack may maximise (``at.<threat>.loss`` where offered)
ATTACK_LOSSES = {"ce": cross_entropy, "margin": margin_loss}


def budget_section(name: str, budget: str, paper_default: str, extra: str = "") -> type:
    """The threat's config section ``at.<name>.*``: budget, steps, step size and composite
    weight. A threat model with knobs of its own subclasses it beside its code."""

    @dataclass(frozen=True)
    class Section:
        eps: float | None = option(
            None,
            f"{name} budget [{budget}] when used as a component of at.threat=composite (or as the "
            f"single threat when at.eps is unset); default {paper_default}{extra}",
            check=above(0),
        )
        steps: int | None = option(
            None, f"{name} attack steps; default at.steps", check=at_least(1)
        )
        step_size: float | None = option(
            None, f"{name} step size; default the threat's rule", check=above(0)
        )
        weight: float | None = option(
            None,
            f"{name} weight in a composite (normalised to sum 1; unset weights share what the "
            "set ones leave, so one float sweeps a two-way mix)",
            check=at_least(0),
        )

    Section.__name__ = Section.__qualname__ = f"{name.title().replace('_', '')}Section"
    # Pickle finds the class by module and name: the module that binds it (as namedtuple does).
    Section.__module__ = sys._getframe(1).f_globals["__name__"]
    return Section


class ThreatModel:
    name: ClassVar[str]
    #: the ``at.<name>.*`` config section (`budget_section`, or a subclass with more knobs)
    section: ClassVar[type]
    #: unit of ``eps``, written into --help and the docs
    unit: ClassVar[str]
    #: budget used when ``at.eps`` is not given, with its source
    default_eps: ClassVar[float]
    #: False for the random-perturbation controls: no gradient steps at all
    maximizes: ClassVar[bool] = True
    #: the classification loss the attack maximises (a name of `ATTACK_LOSSES`); threat
    #: models whose reference attack uses another one offer ``at.<name>.loss``
    loss: str = "ce"

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
    ):
        if eps <= 0:
            raise ValueError(f"{self.name}: budget must be > 0, got {eps}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = float(step_size) if step_size is not None else self.default_step_size()
        self.random_start = random_start

    def default_step_size(self) -> float:
        # Madry et al. (2018): a step of 2.5·ε/k lets k steps reach the boundary from anywhere.
        return 2.5 * self.eps / self.steps

    @classmethod
    def from_config(cls, component: Any, section: Any, *, random_start: bool) -> ThreatModel:
        """Build from a resolved `bdat_ray.config.Component` (budget, steps, step size) and
        the threat's ``at.<name>`` section, whose extra knobs `knobs` picks out."""
        eps = component.eps if component.eps is not None else cls.default_eps
        return cls(eps, component.steps, component.step_size, random_start, **cls.knobs(section))

    @classmethod
    def knobs(cls, section: Any) -> dict[str, Any]:
        """Threat-specific constructor arguments from the ``at.<name>`` section."""
        return {}

    # -- the five operations the attack loop needs ---------------------------------------------

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Starting perturbation variable for the batch ``x`` (random if ``random_start``)."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The perturbed image, differentiable in ``delta``; always inside [0, 1]."""
        raise NotImplementedError

    def ascend(
        self, delta: torch.Tensor, grad: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor:
        """One ascent step of size ``step_size``. ``memory`` persists across the steps of one
        attack (e.g. Adam moments) and starts empty."""
        raise NotImplementedError

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Nearest (or a feasible) point of the threat model."""
        raise NotImplementedError

    def contains(
        self, x: torch.Tensor, x_adv: torch.Tensor, atol: float = 1e-5, model: Any = None
    ) -> torch.Tensor:
        """Per-sample bool: is ``x_adv`` in B(x) (and in [0, 1])? ``model`` is needed only by
        threat models measured with the model itself (self-bounded perceptual)."""
        raise NotImplementedError

    # -- optional ----------------------------------------------------------------------------

    @property
    def starts_random(self) -> bool:
        """Whether `init` draws from the generator (spatial starts at the identity instead)."""
        return self.random_start

    def attack_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample classification loss the attack loop maximises."""
        return ATTACK_LOSSES[self.loss](logits, y)

    def logits(self, model: Any, x_adv: torch.Tensor, memory: dict[str, Any]) -> torch.Tensor:
        """The model's logits on ``x_adv`` (perceptual threats keep the features of the same
        forward pass in ``memory``)."""
        return model(x_adv)

    def penalty(
        self, x: torch.Tensor, x_adv: torch.Tensor, delta: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor | float:
        """Per-sample term subtracted from the loss being maximised (e.g. a smoothness or
        Lagrangian penalty). Zero for plain PGD."""
        return 0.0

    def finalize(
        self, x: torch.Tensor, delta: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor:
        """After the last step (e.g. the perceptual projection back into the bound)."""
        return delta

    def describe(self) -> str:
        return (
            f"{self.name}(eps={self.eps:.4g} [{self.unit}], steps={self.steps}, "
            f"step={self.step_size:.4g})"
        )


def in_unit_box(x_adv: torch.Tensor, atol: float) -> torch.Tensor:
    flat = x_adv.flatten(1)
    return (flat.amin(1) >= -atol) & (flat.amax(1) <= 1 + atol)


def uniform(
    shape: torch.Size, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """U[-1, 1) noise drawn from ``generator`` (whose device must match)."""
    gen_device = generator.device if generator is not None else device
    return (torch.rand(shape, generator=generator, device=gen_device) * 2 - 1).to(device)


def normal(
    shape: torch.Size, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)
