"""Shared fixtures. Tests use real data: scikit-learn's bundled digits, and the real-image
CIFAR-10 / MNIST subsets in ../shared/data (skipped with a reason where a clone lacks them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (it sits beside the repo in CI and on dev machines)")
    return path


@pytest.fixture(scope="session")
def digits():
    from bdat_ray.config import DataConfig
    from bdat_ray.data import load_dataset

    return load_dataset(DataConfig())


@pytest.fixture(scope="session")
def cifar_subset():
    from bdat_ray.config import DataConfig
    from bdat_ray.data import load_dataset

    return load_dataset(DataConfig(name="npz", path=str(shared_file("cifar10-subset.npz"))))


@pytest.fixture(scope="session")
def mnist_subset_path():
    return shared_file("mnist-subset.npz")


def small_model(data, seed: int = 0):
    from bdat_ray.models import build_model

    torch.manual_seed(seed)
    mean, std = data.channel_stats()
    return build_model(
        "small_cnn", num_classes=data.num_classes, in_channels=data.channels, mean=mean, std=std
    )


@pytest.fixture(scope="session")
def trained_digits_model(digits):
    """A small CNN trained 3 epochs on clean digits: attacks need a model with real gradients."""
    from bdat_ray.config import from_flat
    from bdat_ray.engine import fit

    result = fit(from_flat({"attack.name": "none", "train.epochs": 3, "eval.robust_samples": 0}))
    return result.model.eval()
