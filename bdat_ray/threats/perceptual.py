"""Perceptual threat model: inputs within a bound of an LPIPS distance, searched with
Fast-LPA (Laidlaw et al. 2021, "Perceptual Adversarial Robustness"), as the CAT paper does
for perceptual AT.

Distance: d(x, x') = ‖φ̂(x) − φ̂(x')‖₂, where φ̂ concatenates a network's stage activations,
each channel-normalised at every position (``lpips.normalize_tensor``, LPIPS's own
normalisation) and divided by sqrt(H·W) of its stage — LPIPS with unit layer weights, square-
rooted, as in Laidlaw et al.'s code. ``at.perceptual.network=self`` (default, the CAT paper's
*self-bounded* perceptual AT) takes φ from the model being trained; it needs nothing from
the network and runs offline. ``alex``/``vgg`` take lpips' AlexNet/VGG feature stacks, whose
ImageNet weights torchvision must find in its hub cache: nothing is downloaded here, and a
missing file is a config error.

Fast-LPA: from a N(0, 0.01²) start, each of T steps maximises CE − λ_t·ReLU(d − ε) with a
normalised-gradient step whose pixel length is chosen (by a finite difference along the
gradient, h = 0.1) to move d by step_t, where step_t = ``step_size``·0.1^(t/T) decays and
λ_t = ``lagrange``·``lagrange_growth``^-(1 − t/T) rises to ``at.perceptual.lagrange``.
The loss maximised is the margin loss (κ = ∞, ``at.perceptual.loss``), and the result is
*not* projected (``at.perceptual.projection=none``): that is how perceptual-advex trains with
Fast-LPA (``cassidylaidlaw/perceptual-advex:perceptual_advex/perceptual_attacks.py``,
``FastLagrangePerceptualAttack(projection='none', kappa=inf)``), the Lagrangian relaxation the
CAT paper names, so the LPIPS bound is soft during training. ``projection=bisection`` pulls
the result back inside the bound by bisection on the segment [x, x'] (``projection_steps``,
Laidlaw et al.'s ``BisectionPerceptualProjection``), which evaluation may want; measured at
ε 0.1 it makes the training attack far weaker. Budget range in the CAT paper: 0.1–0.5
(default 0.5, step = ε).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from bdat_ray.options import ConfigError, above, at_least, option
from bdat_ray.threats.base import budget_section, in_unit_box, normal
from bdat_ray.threats.lp import PixelOffset, l2_norms


@dataclass(frozen=True)
class PerceptualSection(budget_section("perceptual", "LPIPS distance", "0.5")):
    network: str = option(
        "self",
        "feature network of the LPIPS distance: self = the model being trained (self-bounded, "
        "CAT paper; runs offline); alex/vgg = lpips' LPIPS nets, needing torchvision's "
        "ImageNet weights already in the torch hub cache",
        choices=("self", "alex", "vgg"),
    )
    lagrange: float = option(
        10.0,
        "Lagrange multiplier λ of Fast-LPA's penalty λ·ReLU(d − ε) at the last step "
        "(Laidlaw et al. 2021)",
        check=above(0),
    )
    lagrange_growth: float = option(
        10.0,
        "λ rises by this factor over the attack's steps (starts at lagrange/growth)",
        check=at_least(1),
    )
    projection: str = option(
        "none",
        "after the last step: none = the soft Lagrangian bound, as perceptual-advex trains "
        "with Fast-LPA; bisection = pull an out-of-bound result back inside (for evaluation)",
        choices=("none", "bisection"),
    )
    projection_steps: int = option(
        10, "bisection steps of at.perceptual.projection=bisection", check=at_least(1)
    )
    loss: str = option(
        "margin",
        "classification loss maximised: margin (κ = ∞, Fast-LPA as perceptual-advex trains) or ce",
        choices=("margin", "ce"),
    )


FINITE_DIFFERENCE = 0.1  # h of Laidlaw et al.'s step-length estimate
START_STD = 0.01  # std of the random start (pixel units)


def flat_features(stages: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """φ̂: channel-normalised stage activations, each scaled by 1/sqrt(H·W), flattened."""
    from lpips import normalize_tensor

    parts = []
    for stage in stages:
        stage = stage.float()
        scale = (stage.shape[2] * stage.shape[3]) ** 0.5
        parts.append((normalize_tensor(stage) / scale).flatten(1))
    return torch.cat(parts, dim=1)


def expected_sha256_prefix(path: Path) -> str:
    """The digest prefix torchvision writes into its weight file names (``…-7be5be79.pth``)."""
    match = re.search(r"-([0-9a-f]{6,})\.", path.name)
    if match is None:
        raise ConfigError("at.perceptual.network", f"{path.name} is not a torchvision weight file")
    return match[1]


def safe_weights(path: Path, sha256_prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a weight file whose SHA-256 starts with ``sha256_prefix``, read with
    ``weights_only=True`` (tensors and plain containers only; no code runs on loading)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(sha256_prefix):
        raise ConfigError(
            "at.perceptual.network",
            f"{path} is not torchvision's file (its SHA-256 does not start with "
            f"{sha256_prefix}); delete it and copy the original there",
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for anything beyond plain tensors
        raise ConfigError(
            "at.perceptual.network",
            f"{path} holds more than tensors; refused ({type(err).__name__})",
        ) from None
    if not isinstance(state, dict):
        raise ConfigError("at.perceptual.network", f"{path} is not a state dict")
    return state


class ImageNetFeatures(torch.nn.Module):
    """lpips' AlexNet / VGG-16 feature stack on [0, 1] images (LPIPS's input scaling)."""

    WEIGHTS: ClassVar[dict[str, str]] = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}

    def __init__(self, network: str):
        super().__init__()
        import lpips
        import torchvision.models as tvm

        weights = getattr(tvm, self.WEIGHTS[network]).IMAGENET1K_V1
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        if not path.is_file():
            raise ConfigError(
                "at.perceptual.network",
                f"{network} needs torchvision's ImageNet weights at {path} (they are never "
                "downloaded here); copy them there or use at.perceptual.network=self",
            )
        cls = lpips.pn.alexnet if network == "alex" else lpips.pn.vgg16
        self.scaling = lpips.ScalingLayer()
        # pretrained=True would have torchvision read the file through torch.hub with full
        # unpickling (weights_only=False: a planted file runs its code; the hash is checked
        # only on download). Built untrained, then filled from tensors read safely.
        self.net = cls(requires_grad=False, pretrained=False).eval()
        features = safe_weights(path, expected_sha256_prefix(path))
        own = self.net.state_dict()  # lpips' slices keep torchvision's indices: slice2.3.weight
        self.net.load_state_dict({k: features[f"features.{k.split('.', 1)[1]}"] for k in own})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(self.net(self.scaling(2 * x - 1)))


class PerceptualLPA(PixelOffset):
    name = "perceptual"
    section = PerceptualSection
    unit = "LPIPS distance (self-bounded by default)"
    default_eps = 0.5  # Laidlaw et al.; top of the CAT paper's 0.1–0.5 sweep

    def __init__(
        self,
        *budget: Any,
        network: str = "self",
        lagrange: float = 10.0,
        lagrange_growth: float = 10.0,
        projection: str = "none",
        projection_steps: int = 10,
        loss: str = "margin",
        **budget_options: Any,
    ):
        super().__init__(*budget, **budget_options)
        self.network = network
        self.lagrange = lagrange
        self.lagrange_growth = lagrange_growth
        self.projection = projection
        self.projection_steps = projection_steps
        self.loss = loss
        self.imagenet = ImageNetFeatures(network) if network != "self" else None

    def default_step_size(self) -> float:
        # Laidlaw et al.: the step is measured in LPIPS distance and starts at the bound.
        return self.eps

    @classmethod
    def knobs(cls, section) -> dict[str, Any]:
        return {
            "network": section.network,
            "lagrange": section.lagrange,
            "lagrange_growth": section.lagrange_growth,
            "projection": section.projection,
            "projection_steps": section.projection_steps,
            "loss": section.loss,
        }

    # -- distance ----------------------------------------------------------------------------

    def features(self, model, x: torch.Tensor) -> torch.Tensor:
        if self.imagenet is None:
            return flat_features(model.features(x))
        self.imagenet.to(x.device)
        return flat_features(self.imagenet(x))

    def distance(self, model, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self.features(model, x) - self.features(model, x_adv)).norm(dim=1)

    def _clean_features(self, model, x: torch.Tensor, memory: dict[str, Any]) -> torch.Tensor:
        if "clean_features" not in memory:
            with torch.no_grad():
                memory["clean_features"] = self.features(model, x)
        return memory["clean_features"]

    # -- Fast-LPA ----------------------------------------------------------------------------

    def init(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start:
            return torch.zeros_like(x)
        return self.clip_to_box(x, START_STD * normal(x.shape, generator, x.device))

    def logits(self, model, x_adv: torch.Tensor, memory: dict[str, Any]) -> torch.Tensor:
        if self.imagenet is None:  # self-bounded: one forward gives features and logits
            stages = model.features(x_adv)
            memory["adv_features"] = flat_features(stages)
            return model.head(stages[-1])
        memory["adv_features"] = self.features(model, x_adv)
        return model(x_adv)

    def _progress(self, memory: dict[str, Any]) -> float:
        return memory["step"] / self.steps

    def penalty(self, x, x_adv, delta, memory: dict[str, Any]) -> torch.Tensor:
        clean = self._clean_features(memory["model"], x, memory)
        dist = (memory["adv_features"] - clean).norm(dim=1)
        lam = self.lagrange * self.lagrange_growth ** -(1 - self._progress(memory))
        return lam * torch.relu(dist - self.eps)

    def ascend(self, x, delta, grad, memory: dict[str, Any]) -> torch.Tensor:
        direction = grad / l2_norms(grad).clamp_min(1e-12)
        with torch.no_grad():
            here = memory["adv_features"].detach()
            ahead = self.features(memory["model"], x + delta + FINITE_DIFFERENCE * direction)
            lpips_per_pixel_unit = (ahead - here).norm(dim=1) / FINITE_DIFFERENCE
        step = self.step_size * 0.1 ** self._progress(memory)
        length = step / (lpips_per_pixel_unit + 1e-4)
        return delta + direction * length.view(-1, *[1] * (x.dim() - 1))

    def project(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return self.clip_to_box(x, delta)  # the LPIPS bound is a Lagrangian penalty here

    def finalize(
        self, x: torch.Tensor, delta: torch.Tensor, memory: dict[str, Any]
    ) -> torch.Tensor:
        """Bisection on the segment [x, x + δ] for the samples outside the bound: the largest
        tried fraction of δ whose distance is within it (the zero fraction always is)."""
        if self.projection == "none":
            return delta
        model = memory["model"]
        clean = self._clean_features(model, x, memory)
        with torch.no_grad():
            outside = (self.features(model, x + delta) - clean).norm(dim=1) > self.eps
            idx = outside.nonzero().flatten()
            if len(idx) == 0:
                return delta
            xs, ds, cs = x[idx], delta[idx], clean[idx]
            shape = (-1, *[1] * (x.dim() - 1))
            lo = torch.zeros(len(idx), device=x.device)
            hi = torch.ones(len(idx), device=x.device)
            for _ in range(self.projection_steps):
                mid = (lo + hi) / 2
                dist = (self.features(model, xs + ds * mid.view(shape)) - cs).norm(dim=1)
                inside = dist <= self.eps
                lo = torch.where(inside, mid, lo)
                hi = torch.where(inside, hi, mid)
        projected = delta.clone()
        projected[idx] = ds * lo.view(shape)
        return projected

    def contains(self, x, x_adv, atol: float = 1e-5, model=None) -> torch.Tensor:
        """Inside the hard bound. Unprojected Fast-LPA (the training default) may end outside
        it: its bound is a Lagrangian penalty."""
        if model is None and self.imagenet is None:
            raise ValueError("the self-bounded perceptual distance needs the model")
        return (self.distance(model, x, x_adv) <= self.eps + atol) & in_unit_box(x_adv, atol)
