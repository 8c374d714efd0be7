"""Dataset sources, registered by name: each turns a `DataConfig` into an `ImageData` on CPU.

Every source decodes its files once into uint8 tensors; nothing here runs per training step.
A missing file is a `ConfigError` on ``data.path`` (exit 2), never a traceback.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from bdat_ray.data.dataset import ImageData, to_nchw_uint8
from bdat_ray.options import ConfigError

if TYPE_CHECKING:
    from bdat_ray.config import DataConfig

DEFAULT_ROOT = Path("~/.cache/bdat_ray").expanduser()

# The digits split is fixed (not tied to train.seed) so every run sees the same test set.
DIGITS_TEST_SIZE = 397
DIGITS_SPLIT_SEED = 20240


def load_digits(cfg: DataConfig) -> ImageData:
    """scikit-learn's bundled 8×8 handwritten digits (1797 real images, grey levels 0–16),
    upsampled bilinearly to ``data.image_size`` and split 1400 / 397 with a fixed seed.
    Installed with scikit-learn, so the quickstart needs no download."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=cfg.image_size, mode="bilinear", align_corners=False)
    x = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return ImageData(x[train], y[train], x[test], y[test], num_classes=10, name="digits")


def _torchvision_source(dataset_name: str, num_classes: int) -> Callable[[DataConfig], ImageData]:
    def load(cfg: DataConfig) -> ImageData:
        import torchvision.datasets as tvd

        root = Path(cfg.path).expanduser() if cfg.path else DEFAULT_ROOT
        cls = getattr(tvd, dataset_name)
        try:
            train = cls(str(root), train=True, download=cfg.download)
            test = cls(str(root), train=False, download=cfg.download)
        except RuntimeError as err:  # torchvision raises RuntimeError for missing files
            hint = "" if cfg.download else " (set data.download=true to fetch it)"
            raise ConfigError("data.path", f"no {dataset_name} under {root}{hint}: {err}") from None
        # .data holds the decoded uint8 arrays: no per-sample PIL decoding.
        return ImageData(
            to_nchw_uint8(np.asarray(train.data), key="data"),
            torch.as_tensor(np.asarray(train.targets), dtype=torch.int64),
            to_nchw_uint8(np.asarray(test.data), key="data"),
            torch.as_tensor(np.asarray(test.targets), dtype=torch.int64),
            num_classes=num_classes,
            name=dataset_name.lower(),
        )

    load.__doc__ = f"torchvision's {dataset_name} in its standard on-disk format under data.path."
    return load


def load_npz(cfg: DataConfig) -> ImageData:
    """A ``.npz`` with ``x_train, y_train, x_test, y_test``; images uint8 N×H×W, NCHW or NHWC."""
    if not cfg.path:
        raise ConfigError("data.path", "data.name=npz needs data.path=FILE.npz")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError("data.path", f"no such file: {path}")
    try:
        # allow_pickle=False: an .npz holding pickled objects is refused, never unpickled.
        with np.load(path, allow_pickle=False) as arrays:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays.files)
            if missing:
                raise ConfigError("data.path", f"{path} lacks arrays {sorted(missing)}")
            try:
                x_train = to_nchw_uint8(arrays["x_train"], key="x_train")
                x_test = to_nchw_uint8(arrays["x_test"], key="x_test")
            except ValueError as err:
                raise ConfigError("data.path", f"{path}: {err}") from None
            y_train = torch.as_tensor(arrays["y_train"].astype(np.int64)).flatten()
            y_test = torch.as_tensor(arrays["y_test"].astype(np.int64)).flatten()
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError(
            "data.path", f"{path} is not an .npz archive of numeric arrays ({type(err).__name__})"
        ) from None
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return ImageData(x_train, y_train, x_test, y_test, num_classes, name=path.stem)


def load_imagefolder(cfg: DataConfig) -> ImageData:
    """An ImageFolder tree ``DIR/train/<class>/*`` and ``DIR/test/<class>/*`` (``val`` is
    accepted for ``test``), e.g. an ImageNet subset; images are decoded once and resized to
    ``data.image_size`` squared."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    if not cfg.path:
        raise ConfigError("data.path", "data.name=imagefolder needs data.path=DIR")
    root = Path(cfg.path).expanduser()
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise ConfigError("data.path", f"{root} needs train/ and test/ (or val/) class folders")

    def decode(folder: Path, classes: list[str] | None) -> tuple[torch.Tensor, torch.Tensor, list]:
        tree = ImageFolder(str(folder))
        if classes is not None and tree.classes != classes:
            raise ConfigError("data.path", f"{folder} has other classes than train/")
        size = (cfg.image_size, cfg.image_size)
        images = [
            np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR))
            for p, _ in tree.samples
        ]
        x = to_nchw_uint8(np.stack(images), key=str(folder))
        return x, torch.tensor(tree.targets, dtype=torch.int64), tree.classes

    x_train, y_train, classes = decode(root / "train", None)
    x_test, y_test, _ = decode(test_dir, classes)
    return ImageData(x_train, y_train, x_test, y_test, len(classes), name=root.name)


SOURCES: dict[str, Callable[[DataConfig], ImageData]] = {
    "digits": load_digits,
    "mnist": _torchvision_source("MNIST", 10),
    "cifar10": _torchvision_source("CIFAR10", 10),
    "cifar100": _torchvision_source("CIFAR100", 100),
    "npz": load_npz,
    "imagefolder": load_imagefolder,
}


def load_dataset(cfg: DataConfig) -> ImageData:
    return SOURCES[cfg.name](cfg)
