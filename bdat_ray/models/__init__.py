"""Model registry: ``build_model(name, ...)``. Every model takes images in [0, 1] NCHW,
normalises inside, and offers ``features(x)`` (stage activations)."""

from __future__ import annotations

from collections.abc import Callable

from bdat_ray.models.common import FeatureClassifier
from bdat_ray.models.madry_resnet import MadryResNet
from bdat_ray.models.mnist_cnn import MadryMnistCNN
from bdat_ray.models.resnets import preact_resnet18, resnet18, resnet32
from bdat_ray.models.small_cnn import SmallCNN

MODELS: dict[str, Callable[..., FeatureClassifier]] = {
    "madry_mnist_cnn": MadryMnistCNN,
    "madry_resnet32": MadryResNet,  # Weng et al.'s CIFAR-10 reference model
    "preact_resnet18": preact_resnet18,
    "resnet18": resnet18,
    "resnet32": resnet32,
    "small_cnn": SmallCNN,
}


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    width: float = 1.0,
    norm: str = "batch",
    mean: list[float] | None = None,
    std: list[float] | None = None,
) -> FeatureClassifier:
    mean = mean if mean is not None else [0.5] * in_channels
    std = std if std is not None else [0.25] * in_channels
    return MODELS[name](
        num_classes=num_classes,
        in_channels=in_channels,
        width=width,
        norm=norm,
        mean=mean,
        std=std,
    )


__all__ = ["MODELS", "FeatureClassifier", "build_model"]
