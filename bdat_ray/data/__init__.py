"""Datasets as uint8 NCHW tensors on the training device, and batched augmentation."""

from bdat_ray.data.dataset import ImageData
from bdat_ray.data.sources import SOURCES, load_dataset

__all__ = ["SOURCES", "ImageData", "load_dataset"]
