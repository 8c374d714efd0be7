"""Trigger patterns and where they go on the image.

Patterns are uint8 (C, k, k) patches; `stamp` writes a patch into a corner of a uint8 batch,
x' = (1 - m) ⊙ x + m ⊙ t with m the k×k corner mask (BadNets, Gu et al. 2017)."""

from __future__ import annotations

from collections.abc import Callable

import torch

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
#: placements that are not one fixed corner: a random corner per image for train and test, or
#: Weng et al.'s Table 8 reference scheme — a quarter of the training poisons at each corner,
#: the test trigger at the fixed bottom-right
POSITION_SCHEMES = ("random_corner", "quarter_corners")


def checkerboard(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """White at (i + j) even, black elsewhere: the 3×3 and 2×2 checkerboards of the CAT paper."""
    ij = torch.arange(size)
    board = ((ij[:, None] + ij[None, :]) % 2 == 0).to(torch.uint8) * 255
    return board.expand(channels, size, size).clone()


def random_patch(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform random grey levels per pixel and channel, fixed by ``attack.seed`` (the CAT
    paper's 2×2 random trigger)."""
    return torch.randint(0, 256, (channels, size, size), generator=generator, dtype=torch.uint8)


def white_square(size: int, channels: int, generator: torch.Generator) -> torch.Tensor:
    """All white: Weng et al.'s MNIST sticker (``xs[:, 25:, 25:] = 1`` in their
    ``mnist/mnist_exp_local_trigger_50_adversarial.py``)."""
    return torch.full((channels, size, size), 255, dtype=torch.uint8)


# name -> (pattern function, native side length)
PATTERNS: dict[str, tuple[Callable[[int, int, torch.Generator], torch.Tensor], int]] = {
    "checkerboard3": (checkerboard, 3),  # = Weng et al.'s CIFAR sticker [[1,0,1],[0,1,0],[1,0,1]]
    "white3": (white_square, 3),
    "checkerboard2": (checkerboard, 2),
    "random2": (random_patch, 2),
}


def make_pattern(
    name: str, size: int | None, channels: int, generator: torch.Generator
) -> torch.Tensor:
    fn, native = PATTERNS[name]
    return fn(size or native, channels, generator)


def corner_origin(
    corner: str, image_hw: tuple[int, int], size: int, offset: int = 0
) -> tuple[int, int]:
    """Top-left (row, col) of a ``size``×``size`` patch ``offset`` px in from ``corner``
    (0 = flush; Weng et al.'s CIFAR reference: 2, i.e. ``27:30`` on 32×32). ``centre``
    places it in the middle (their channel trigger's ``15:18``)."""
    h, w = image_hw
    if corner == "centre":
        return (h - size + 1) // 2, (w - size + 1) // 2
    row = h - size - offset if corner.startswith("bottom") else offset
    col = w - size - offset if corner.endswith("right") else offset
    return row, col


def draw_corners(
    n: int, position: str, generator: torch.Generator, *, train: bool = True
) -> list[str]:
    """One corner per image: the fixed one, uniformly random ones (``random_corner``), or
    ``quarter_corners``: training images cycle through the four corners (a quarter each, the
    images themselves being a random draw), test images get the bottom-right."""
    if position == "quarter_corners":
        return [CORNERS[i % len(CORNERS)] for i in range(n)] if train else ["bottom_right"] * n
    if position != "random_corner":
        return [position] * n
    picks = torch.randint(0, len(CORNERS), (n,), generator=generator)
    return [CORNERS[i] for i in picks.tolist()]


def stamp(
    x: torch.Tensor, patch: torch.Tensor, corners: list[str], offset: int = 0
) -> torch.Tensor:
    """Copy of uint8 batch ``x`` with ``patch`` written at each image's corner, ``offset`` px
    in from the border (one indexed write per distinct corner, not per image)."""
    out = x.clone()
    k = patch.shape[-1]
    for corner in set(corners):
        rows = torch.tensor([i for i, c in enumerate(corners) if c == corner], dtype=torch.long)
        r, c = corner_origin(corner, tuple(x.shape[-2:]), k, offset)
        out[rows, :, r : r + k, c : c + k] = patch.to(out.device)
    return out


def corner_mask(
    image_shape: tuple[int, int, int], size: int, corner: str, offset: int = 0
) -> torch.Tensor:
    """Bool (C, H, W) mask of the trigger region (tests and the gallery use it)."""
    c, h, w = image_shape
    mask = torch.zeros(c, h, w, dtype=torch.bool)
    r, col = corner_origin(corner, (h, w), size, offset)
    mask[:, r : r + size, col : col + size] = True
    return mask


def four_corners(x: torch.Tensor, patch: torch.Tensor, amplitude: float) -> torch.Tensor:
    """Label-consistent attack's trigger (Turner et al. 2019): the patch in all four corners —
    as given in the left ones, mirrored left-right in the right ones (MadryLab's
    ``all-corners`` mask) — each pixel pushed ±``amplitude`` (pixel units) toward the patch's
    white/black and clipped; amplitude 1 replaces the pixels outright."""
    out = x.float() / 255
    sign = patch.float().to(x.device) / 255 * 2 - 1  # +1 white, -1 black
    k = patch.shape[-1]
    for corner in CORNERS:
        r, c = corner_origin(corner, tuple(x.shape[-2:]), k)
        region = out[:, :, r : r + k, c : c + k]
        mirrored = sign.flip(-1) if corner.endswith("right") else sign
        out[:, :, r : r + k, c : c + k] = (region + amplitude * mirrored).clamp(0, 1)
    return to_uint8(out)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 with rounding (poisoned data is stored like real images)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def fit_image(picture: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """Resize a float (3, h, w) picture in [0, 1] to (channels, height, width); grey images get
    its luminance (ITU-R BT.601 weights)."""
    import torch.nn.functional as F

    resized = F.interpolate(
        picture[None], size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )[0].clamp(0, 1)
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (resized * weights).sum(0, keepdim=True)
    return resized


def load_picture(path: str) -> torch.Tensor:
    """An image file as a float (3, h, w) picture in [0, 1]."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(Path(path).expanduser()).convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def cartoon_picture(size: int = 64) -> torch.Tensor:
    """A procedurally drawn cartoon cat face with a bow: float (3, size, size) in [0, 1].

    The papers blend a Hello-Kitty picture, which cannot ship with this project; this picture
    plays its role — a structured, high-contrast whole-image pattern — and is the built-in
    default of ``attack.blended.trigger=picture``. Any image file works via ``=file``."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")

    def ellipse(cx: float, cy: float, rx: float, ry: float) -> torch.Tensor:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1

    def triangle(a, b, c) -> torch.Tensor:
        def side(p, q):
            return (xx - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (yy - q[1])

        d1, d2, d3 = side(a, b), side(b, c), side(c, a)
        return ~(((d1 < 0) | (d2 < 0) | (d3 < 0)) & ((d1 > 0) | (d2 > 0) | (d3 > 0)))

    img = torch.stack([0.55 + 0.3 * yy, 0.75 + 0.1 * xx, torch.full_like(xx, 0.95)])  # sky

    def paint(mask: torch.Tensor, rgb: tuple[float, float, float]) -> None:
        img[:, mask] = torch.tensor(rgb).view(3, 1)

    ears = [((0.17, 0.45), (0.22, 0.12), (0.42, 0.3)), ((0.83, 0.45), (0.78, 0.12), (0.58, 0.3))]
    head = ellipse(0.5, 0.55, 0.4, 0.32)
    outline = ellipse(0.5, 0.55, 0.43, 0.35) | triangle(*[(p[0], p[1] - 0.03) for p in ears[0]])
    outline |= triangle(*[(p[0], p[1] - 0.03) for p in ears[1]])
    paint(outline, (0.05, 0.05, 0.05))
    paint(head | triangle(*ears[0]) | triangle(*ears[1]), (1.0, 1.0, 1.0))
    for cx in (0.34, 0.66):
        paint(ellipse(cx, 0.56, 0.045, 0.065), (0.05, 0.05, 0.05))
        for dy in (-0.04, 0.0, 0.04):  # whiskers
            whisker = (abs(yy - (0.66 + dy + (xx - cx) * 0.1)) < 0.008) & (abs(xx - cx) < 0.16)
            paint(whisker & ~head | whisker & (abs(xx - 0.5) > 0.3), (0.05, 0.05, 0.05))
    paint(ellipse(0.5, 0.64, 0.045, 0.03), (1.0, 0.85, 0.1))  # nose
    bow = ellipse(0.66, 0.2, 0.09, 0.08) | ellipse(0.86, 0.2, 0.09, 0.08)
    paint(bow, (0.95, 0.15, 0.35))
    paint(ellipse(0.76, 0.2, 0.04, 0.04), (1.0, 0.85, 0.1))
    return img
