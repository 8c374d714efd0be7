"""The in-memory dataset every part of the engine works on.

Images are uint8 NCHW tensors (pixel value / 255 gives the [0, 1] range the models and
attacks use); labels are int64. Holding uint8 keeps a whole CIFAR-10 at 150 MB, so it stays
on the training device and batches are sliced from it with no loader processes
(airbench-style). Backdoors poison these tensors once, at build time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class ImageData:
    x_train: torch.Tensor  # uint8 (N, C, H, W)
    y_train: torch.Tensor  # int64 (N,)
    x_test: torch.Tensor  # uint8 (M, C, H, W)
    y_test: torch.Tensor  # int64 (M,)
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"x_{split} must be uint8 NCHW, got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"y_{split} must be int64 with one label per image")

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

    @property
    def channels(self) -> int:
        return self.image_shape[0]

    def to(self, device: torch.device | str) -> ImageData:
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images in [0, 1] (models normalise with
        them, so every dataset is handled alike without a table of constants)."""
        x = self.x_train.float().div_(255)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean.tolist(), std.tolist()


def to_nchw_uint8(array, *, key: str) -> torch.Tensor:
    """Accept N×H×W (grey), N×C×H×W or N×H×W×C uint8 arrays; return a uint8 NCHW tensor."""
    x = torch.as_tensor(array)
    if x.dtype != torch.uint8:
        raise ValueError(f"{key} must be uint8 (0-255), got {x.dtype}")
    if x.dim() == 3:
        return x.unsqueeze(1).contiguous()
    if x.dim() != 4:
        raise ValueError(f"{key} must have 3 or 4 dimensions, got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"{key} must have 1 or 3 channels (NCHW or NHWC), got {tuple(x.shape)}")
    return x.contiguous()
