"""``python -m bdat_ray.run``: one poisoned-data training run, no Ray.

    python -m bdat_ray.run                                   # digits, BadNets, no AT
    python -m bdat_ray.run at.threat=linf at.eps=8/255       # L-inf PGD adversarial training
    python -m bdat_ray.run --config run.yaml train.epochs=3 --output result.json

Prints a progress bar per epoch, then the result (acc, asr, robust_acc in percent, seconds,
resolved config) as JSON on the last line of stdout and in ``--output``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bdat_ray.cli import config_parser, main_guard
from bdat_ray.config import build_config


def parser() -> argparse.ArgumentParser:
    p = config_parser(
        "python -m bdat_ray.run",
        "Train one model on backdoor-poisoned data, optionally adversarially, and report clean "
        "accuracy (acc), attack success rate (asr) and robust accuracy (robust_acc), all in "
        "percent.",
    )
    p.add_argument("--config", type=Path, help="YAML file of keys (nested or dotted)")
    p.add_argument("--output", type=Path, help="also write the result JSON here")
    p.add_argument(
        "--workdir", type=Path, help="keep checkpoints, poisoned indices and result here"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from --workdir's last checkpoint"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = build_config(args.config, args.overrides)
    if args.resume and not args.workdir:
        from bdat_ray.config import ConfigError

        raise ConfigError("--resume", "needs --workdir DIR holding the interrupted run")
    from bdat_ray.engine import fit

    resume_from = args.workdir / "checkpoint" if args.resume else None
    result = fit(cfg, workdir=args.workdir, resume_from=resume_from, progress=not args.quiet)
    summary = result.to_dict()
    text = json.dumps(summary)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(summary, indent=2))
    robust = "n/a" if result.robust_acc is None else f"{result.robust_acc:.2f}"
    print(
        f"acc {result.acc:.2f}%  asr {result.asr:.2f}%  robust_acc {robust}%  "
        f"({result.seconds:.1f} s, {result.poisoned_count} poisoned images)",
        file=sys.stderr,
    )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
