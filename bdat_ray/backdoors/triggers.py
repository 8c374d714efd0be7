"""Trigger patterns and where they go on the image.

Patterns are uint8 (C, k, k) patches; `stamp` writes a patch into a corner of a uint8 batch,
x' = (1 - m) ⊙ x + m ⊙ t with m the k×k corner mask (BadNets, Gu et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable

import torch

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")


def checkerboard(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """White at (i + j) even, black elsewhere: the 3×3 and 2×2 checkerboards of the CAT paper."""
    ij = torch.arange(size)
    board = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.uint8) * 255
    return board.expand(channels, size, size).clone()


def random_patch(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random grey levels per pixel and channel, fixed by ``attack.seed`` (the CAT
    paper's 2×2 random trigger)."""
    return torch.randint(0, 256, (channels, size, size), generator=generator, dtype=torch.uint8)


# name -> (pattern function, native side length)
PATTERNS: dict[str, tuple[Callable[[int, int, torch.Generator], torch.Tensor], int]] = {
    "checkerboard3": (checkerboard, 3),
    "checkerboard2": (checkerboard, 2),
    "random2": (random_patch, 2),
}


def make_pattern(
    name: str, size: int | None, channels: int, generator: torch.Generator
) -> torch.Tensor:
    fn, native = PATTERNS[name]
    return fn(size or native, channels, generator)


def corner_origin(corner: str, image_hw: tuple[int, int], size: int) -> tuple[int, int]:
    """Top-left (row, col) of a ``size``×``size`` patch flush with ``corner``."""
    h, w = image_hw
    row = h - size if corner.startswith("bottom") else 0
    col = w - size if corner.endswith("right") else 0
    return row, col


def draw_corners(n: int, position: str, generator: torch.Generator) -> list[str]:
    """One corner per image: the fixed one, or uniformly random ones (``random_corner``)."""
    if position != "random_corner":
        return [position] * n
    picks = torch.randint(0, len(CORNERS), (n,), generator=generator)
    return [CORNERS[i] for i in picks.tolist()]


def stamp(x: torch.Tensor, patch: torch.Tensor, corners: list[str]) -> torch.Tensor:
    """Copy of uint8 batch ``x`` with ``patch`` written at each image's corner (one indexed
    write per distinct corner, not per image)."""
    out = x.clone()
    k = patch.shape[-1]
    for corner in set(corners):
        rows = torch.tensor([i for i, c in enumerate(corners) if c == corner], dtype=torch.long)
        r, c = corner_origin(corner, tuple(x.shape[-2:]), k)
        out[rows, :, r : r + k, c : c + k] = patch.to(out.device)
    return out


def corner_mask(image_shape: tuple[int, int, int], size: int, corner: str) -> torch.Tensor:
    """Bool (C, H, W) mask of the trigger region (tests and the gallery use it)."""
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    r, col = corner_origin(corner, (h, w), size)
    mask[:, r : r + size, col : col + size] = True
    return mask
