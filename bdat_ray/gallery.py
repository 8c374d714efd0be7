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
from pathlib import Path

import numpy as np

from bdat_ray.backdoors.pictures import attack_mosaic, panel_title, save_gallery
from bdat_ray.cli import config_parser, main_guard
from bdat_ray.config import ConfigError
from bdat_ray.preflight import writable_file

MAX_IMAGES = 64
#: Keys every attack shares: an error in one of them is bad input, not an attack's "n/a".
SHARED_KEYS = ("attack.target",)


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
            poisoned = attack.illustration(clean)
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
