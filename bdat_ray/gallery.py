"""``python -m bdat_ray.gallery``: look at the triggers.

    python -m bdat_ray.gallery                                   # every attack on digits
    python -m bdat_ray.gallery data.name=npz data.path=../shared/data/cifar10-subset.npz \\
        --attacks badnets,blended,wanet --out cifar_triggers.png

Writes one PNG with a block per attack: clean training images, the same images poisoned,
triggered test images, and the poisoned-minus-clean difference amplified ×4 (subtle triggers
such as WaNet's warp or LC's perturbation become visible), upscaled with nearest-neighbour
pixels. KEY=VALUE overrides apply to every attack (e.g. ``attack.blended.trigger=noise``).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch

from bdat_ray.backdoors import PoisonedData
from bdat_ray.cli import config_parser, main_guard
from bdat_ray.config import ConfigError
from bdat_ray.data.dataset import ImageData
from bdat_ray.preflight import writable_file

MAX_IMAGES = 64
#: Keys every attack shares: an error in one of them is bad input, not an attack's "n/a".
SHARED_KEYS = ("attack.target",)
ROWS = ("clean", "poisoned (train)", "triggered (test)", "|difference| ×4")
DIFF_GAIN = 4


def attack_mosaic(clean: ImageData, poisoned: PoisonedData, n: int = 6, gap: int = 1) -> np.ndarray:
    """An (H', W', 3) uint8 mosaic: the four ROWS for ``n`` poisoned images of one attack."""
    idx = poisoned.poison_indices[:n].cpu()
    before = clean.x_train[idx].cpu()
    after = poisoned.data.x_train[idx].cpu()
    test = poisoned.x_test_triggered[:n].cpu()
    diff = ((after.float() - before.float()).abs() * DIFF_GAIN).clamp(0, 255).to(torch.uint8)
    rows = [before, after, test, diff]
    c, h, w = clean.image_shape
    cols = max(1, len(idx))
    canvas = np.full(((h + gap) * len(rows) - gap, (w + gap) * cols - gap, 3), 255, np.uint8)
    for r, images in enumerate(rows):
        for j, img in enumerate(images[:cols]):
            rgb = img.permute(1, 2, 0).numpy()
            canvas[r * (h + gap) : r * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = (
                np.repeat(rgb, 3, axis=2) if c == 1 else rgb
            )
    return canvas


def save_gallery(panels: list[tuple[str, np.ndarray | str]], path: Path, columns: int = 2) -> Path:
    """Draw ``(title, mosaic-or-reason)`` panels into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(columns, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, content) in zip(axes.flat, panels, strict=False):
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xticks([])
        if isinstance(content, str):
            ax.text(0.5, 0.5, textwrap.fill(content, 60), ha="center", va="center", fontsize=9)
            ax.set_yticks([])
            continue
        ax.imshow(content, interpolation="nearest")
        height = content.shape[0] / len(ROWS)
        ax.set_yticks([height * (i + 0.5) for i in range(len(ROWS))], ROWS, fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def panel_title(cfg_flat: dict, poisoned: PoisonedData, n_train: int) -> str:
    name = cfg_flat["attack.name"]
    rate = 100 * len(poisoned.poison_indices) / n_train
    mode = cfg_flat.get("attack.label_mode") or ""
    return f"{name} ({mode}-label, {len(poisoned.poison_indices)} images = {rate:.1f}% of train)"


def parser() -> argparse.ArgumentParser:
    p = config_parser("python -m bdat_ray.gallery", __doc__.split("\n\n")[0])
    p.add_argument("--attacks", help="comma-separated attack names (default: all)")
    p.add_argument("--out", type=Path, default=Path("gallery.png"))
    p.add_argument("--n", type=int, default=6, help="images per attack")
    return p


@main_guard
def main(argv: list[str] | None = None) -> int:
    from bdat_ray.backdoors import BACKDOORS
    from bdat_ray.config import build_config
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import poison_context, resolve_device

    args = parser().parse_args(argv)
    names = args.attacks.split(",") if args.attacks else [n for n in BACKDOORS if n != "none"]
    unknown = sorted(set(names) - set(BACKDOORS))
    if unknown:
        raise ConfigError("--attacks", f"unknown {unknown}; choose from {', '.join(BACKDOORS)}")
    if not 1 <= args.n <= MAX_IMAGES:
        raise ConfigError("--n", f"images per attack must be in [1, {MAX_IMAGES}]; got {args.n}")
    writable_file("--out", args.out)
    base = build_config(None, args.overrides)
    clean = load_dataset(base.data)
    context = poison_context(base, resolve_device(base.device))
    panels: list[tuple[str, np.ndarray | str]] = []
    for name in names:
        try:
            cfg = base.replace({"attack.name": name})
            attack = BACKDOORS[name](cfg.attack, context)
            poisoned = attack.poison(clean)
        except ConfigError as err:
            if err.key in SHARED_KEYS:  # wrong for every attack: the user's mistake
                raise
            panels.append((name, f"n/a on {clean.name}: {err}"))
            continue
        flat = {**cfg.to_flat(), **attack.resolved_keys()}
        panels.append(
            (
                panel_title(flat, poisoned, len(clean.y_train)),
                attack_mosaic(clean, poisoned, args.n),
            )
        )
        print(f"{name}: {len(poisoned.poison_indices)} poisoned", file=sys.stderr)
    save_gallery(panels, args.out)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
