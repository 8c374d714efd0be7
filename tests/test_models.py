"""Every registered model: shapes, features, width, norm choice, normalisation inside."""

from __future__ import annotations

import pytest
import torch

from bdat_ray.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_and_features(name, channels):
    model = build_model(name, num_classes=7, in_channels=channels, width=0.5).eval()
    x = torch.rand(2, channels, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
    assert logits.shape == (2, 7)
    assert len(feats) >= 3 and all(f.shape[0] == 2 for f in feats)
    assert torch.allclose(model.head(feats[-1]), logits, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_width_multiplier_scales_parameters(name):
    narrow = build_model(name, num_classes=10, in_channels=3, width=1.0)
    wide = build_model(name, num_classes=10, in_channels=3, width=2.0)
    n = sum(p.numel() for p in narrow.parameters())
    assert sum(p.numel() for p in wide.parameters()) > 3 * n


@pytest.mark.parametrize("name", sorted(MODELS))
def test_group_norm_replaces_batch_norm(name):
    model = build_model(name, num_classes=10, in_channels=3, norm="group")
    kinds = {type(m).__name__ for m in model.modules()}
    if name == "madry_mnist_cnn":  # Madry et al.'s MNIST CNN has no normalisation layers
        assert not {"GroupNorm", "BatchNorm2d"} & kinds
        return
    assert "GroupNorm" in kinds and "BatchNorm2d" not in kinds


def test_madry_mnist_cnn_has_the_reference_layers():
    """MadryLab mnist_challenge / Weng et al. mnist/classifier_mnist.py: conv 5×5 32, conv
    5×5 64, dense 3136→1024, dense 1024→10 (with biases) on 28×28 inputs."""
    model = build_model("madry_mnist_cnn", num_classes=10, in_channels=1)
    shapes = [tuple(p.shape) for n, p in model.named_parameters()]
    assert shapes == [
        (32, 1, 5, 5),
        (32,),
        (64, 32, 5, 5),
        (64,),
        (1024, 3136),
        (1024,),
        (10, 1024),
        (10,),
    ]
    assert [f.shape[-1] for f in model.features(torch.rand(1, 1, 28, 28))] == [28, 14, 7]


def test_resnet32_has_weng_filters():
    model = build_model("resnet32", num_classes=10, in_channels=3)
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert len(convs) == 1 + 3 * 5 * 2  # stem + 3 stages × 5 blocks × 2 convs = 31 (+ fc = 32)
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]


def test_madry_resnet32_is_wengs_reference_network():
    """cifar10/classifier_cifar10.py: 31 3×3 convs (16-16-32-64), leaky ReLU 0.1, no 1×1
    shortcut convs, per-image standardisation (a brightness shift changes nothing)."""
    model = build_model("madry_resnet32", num_classes=10, in_channels=3).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 31 and all(c.kernel_size == (3, 3) for c in convs)
    assert sorted({c.out_channels for c in convs}) == [16, 32, 64]
    x = torch.rand(2, 3, 32, 32) * 0.5
    with torch.no_grad():
        assert torch.allclose(model(x), model(x + 0.3), atol=1e-4)


def test_normalisation_is_inside_the_model():
    model = build_model("small_cnn", num_classes=10, in_channels=1, mean=[0.3], std=[0.2])
    assert torch.allclose(model.normalize(torch.full((1, 1, 2, 2), 0.5)), torch.ones(1, 1, 2, 2))
    assert "normalize.mean" in model.state_dict()


def test_batch_statistics_frozen_leaves_running_stats_alone():
    from bdat_ray.models.common import batch_statistics_frozen

    model = build_model("small_cnn", num_classes=10, in_channels=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(8, 1, 16, 16) * 3
    with torch.no_grad(), batch_statistics_frozen(model):
        assert model.training
        in_batch_mode = model(x)
    assert not model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with torch.no_grad():
        assert not torch.allclose(model(x), in_batch_mode)  # eval mode uses running stats
