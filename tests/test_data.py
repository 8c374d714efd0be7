"""Data sources in their real formats, and the batched augmentation."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bdat_ray.config import ConfigError, DataConfig
from bdat_ray.data import load_dataset
from bdat_ray.data.augment import random_crop, random_flip
from tests.conftest import shared_file


def test_digits_is_real_fixed_and_upsampled(digits):
    assert digits.image_shape == (1, 16, 16)
    assert (len(digits.y_train), len(digits.y_test)) == (1400, 397)
    assert set(digits.y_train.unique().tolist()) == set(range(10))
    again = load_dataset(DataConfig())
    assert torch.equal(again.x_test, digits.x_test)  # fixed split
    assert digits.x_train.max() == 255 and digits.x_train.min() == 0


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    shape = {"nchw": (6, 3, 8, 8), "nhwc": (6, 8, 8, 3), "nhw": (6, 8, 8)}[layout]
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    y = np.arange(6) % 3
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    data = load_dataset(DataConfig(name="npz", path=str(tmp_path / "d.npz")))
    channels = 1 if layout == "nhw" else 3
    assert data.image_shape == (channels, 8, 8) and data.num_classes == 3
    back = data.x_train.permute(0, 2, 3, 1).numpy() if layout == "nhwc" else data.x_train.numpy()
    assert np.array_equal(back.reshape(x.shape), x)


def test_npz_errors_name_data_path(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as err:
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "missing.npz")))
    assert err.value.key == "data.path"
    np.savez(
        tmp_path / "f.npz",
        x_train=np.zeros((2, 4, 4), np.float32),
        y_train=np.zeros(2),
        x_test=np.zeros((2, 4, 4), np.uint8),
        y_test=np.zeros(2),
    )
    with pytest.raises(ConfigError, match="uint8"):
        load_dataset(DataConfig(name="npz", path=str(tmp_path / "f.npz")))
    with pytest.raises(ConfigError, match="needs data\\.path"):
        load_dataset(DataConfig(name="npz"))


def test_shared_subsets_load(cifar_subset, mnist_subset_path):
    assert cifar_subset.image_shape == (3, 32, 32)
    assert (len(cifar_subset.y_train), len(cifar_subset.y_test)) == (5085, 1017)
    mnist = load_dataset(DataConfig(name="npz", path=str(mnist_subset_path)))
    assert mnist.image_shape == (1, 28, 28) and len(mnist.y_test) == 10000


def _write_idx(path, array: np.ndarray) -> None:
    """MNIST's IDX format: magic (0, 0, uint8 type 8, ndim), big-endian dims, raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_its_raw_idx_files(tmp_path):
    subset = np.load(shared_file("mnist-subset.npz"))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    n = 300
    _write_idx(raw / "train-images-idx3-ubyte", subset["x_train"][:n])
    _write_idx(raw / "train-labels-idx1-ubyte", subset["y_train"][:n])
    _write_idx(raw / "t10k-images-idx3-ubyte", subset["x_test"][:n])
    _write_idx(raw / "t10k-labels-idx1-ubyte", subset["y_test"][:n])
    data = load_dataset(DataConfig(name="mnist", path=str(tmp_path)))
    assert data.image_shape == (1, 28, 28)
    assert np.array_equal(data.x_train[:, 0].numpy(), subset["x_train"][:n])
    assert np.array_equal(data.y_test.numpy(), subset["y_test"][:n])


def test_cifar10_from_its_python_pickle_batches(tmp_path, monkeypatch):
    """The real CIFAR-10 python layout (data_batch_1..5, test_batch, batches.meta) written from
    the real-image subset. torchvision also checks each file's MD5 against the full dataset's,
    which a subset cannot match; only that check is bypassed, the parsing is torchvision's."""
    import torchvision.datasets.cifar as tv_cifar

    subset = np.load(shared_file("cifar10-subset.npz"))
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    per = 20
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        src = ("x_test", "y_test") if name == "test_batch" else ("x_train", "y_train")
        lo = 0 if name == "test_batch" else i * per
        x = subset[src[0]][lo : lo + per].reshape(per, -1)
        with open(base / name, "wb") as f:
            pickle.dump({"data": x, "labels": subset[src[1]][lo : lo + per].tolist()}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(k) for k in range(10)]}, f)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    data = load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert data.image_shape == (3, 32, 32) and len(data.y_train) == 5 * per
    assert np.array_equal(data.x_train[:per].numpy(), subset["x_train"][:per])


def test_missing_torchvision_dataset_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.download=true") as err:
        load_dataset(DataConfig(name="cifar10", path=str(tmp_path)))
    assert err.value.key == "data.path"


def test_imagefolder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(img).save(tmp_path / split / cls / f"{i}.png")
    data = load_dataset(DataConfig(name="imagefolder", path=str(tmp_path), image_size=12))
    assert data.image_shape == (3, 12, 12) and data.num_classes == 2
    assert len(data.y_train) == 6 and len(data.y_test) == 6


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.uint8).view(2, 1, 6, 6)
    gen = torch.Generator().manual_seed(0)
    out = random_crop(x, 2, gen)
    padded = torch.nn.functional.pad(x, (2,) * 4)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(2):
        windows = [padded[i, :, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)


def test_random_flip_mirrors_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out != x).flatten(1).any(1)
    assert torch.equal(out[flipped], x[flipped].flip(3))
    assert 400 < int(flipped.sum()) < 600
