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
from bdat_ray.config import Config, ConfigError, build_config
from bdat_ray.preflight import writable_dir, writable_file


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


def _check_resumable(checkpoint: Path, cfg: Config) -> None:
    """``--resume`` continues a checkpoint of this very config, or refuses; it never quietly
    trains from scratch."""
    from bdat_ray.engine import CHECKPOINT_FILE, load_state

    file = checkpoint / CHECKPOINT_FILE
    if not file.is_file():
        raise ConfigError(
            "--resume", f"no checkpoint at {file}; a run with --workdir writes one every epoch"
        )
    try:
        state = load_state(checkpoint)
        written_by = state["config_hash"]
    except Exception as err:  # truncated, empty, not a torch file, or not ours
        raise ConfigError(
            "--resume", f"{file} is not a readable checkpoint ({type(err).__name__})"
        ) from None
    if written_by != cfg.hash():
        raise ConfigError("--resume", f"{file} was written by a run with another config")


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cfg = build_config(args.config, args.overrides)
    if args.resume and not args.workdir:
        raise ConfigError("--resume", "needs --workdir DIR holding the interrupted run")
    if args.output:
        writable_file("--output", args.output)
    if args.workdir:
        writable_dir("--workdir", args.workdir)
    from bdat_ray.engine import TrainingDiverged, fit

    resume_from = args.workdir / "checkpoint" if args.resume else None
    if resume_from is not None:
        _check_resumable(resume_from, cfg)
    try:
        result = fit(cfg, workdir=args.workdir, resume_from=resume_from, progress=not args.quiet)
    except TrainingDiverged as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
