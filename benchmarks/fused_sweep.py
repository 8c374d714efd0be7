"""Trials/hour of one sweep with and without fusion, side by side in one run:
``python -m benchmarks.fused_sweep``

Runs the space (default: the quickstart, `python -m bdat_ray.sweep` with no arguments)
through the sweep CLI once per ``--fuse`` value, one after the other, each into its own
fresh storage and MLflow store under ``--workdir``, and prints as Markdown: the Ray trials
each ran, its wall time from starting the CLI to its exit (Ray's start, every trial, MLflow
and the closing report — what a user waits for), the sweep's own "this run took" time, and
trials/hour from the wall time. Every trial must finish; a sweep that does not exits 1.

    python -m benchmarks.fused_sweep                   # quickstart, --fuse 1 and 2
    python -m benchmarks.fused_sweep --fuse 1 2 8 --space benchmarks/fused_seeds.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bdat_ray.sweep import DEFAULT_SPACE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_sweep", description=__doc__)
    p.add_argument("--space", type=Path, default=DEFAULT_SPACE)
    p.add_argument("--fuse", type=int, nargs="+", default=[1, 2], metavar="K")
    p.add_argument("--workdir", type=Path, default=Path("bench_fused_sweep"))
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pinned in every trial")
    return p


def run_sweep(space: Path, fuse: int, workdir: Path, overrides: list[str]) -> dict[str, float]:
    where = workdir / f"fuse{fuse}"
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    command = [
        *(sys.executable, "-m", "bdat_ray.sweep", "--space", str(space.resolve())),
        *("--fuse", str(fuse), "--storage", "out", "--mlflow-uri", "sqlite:///mlflow.db"),
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=where, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (where / "stdout.txt").write_text(proc.stdout)
    (where / "stderr.txt").write_text(proc.stderr)
    if proc.returncode == 2:  # the sweep refused its input: pass its one line on, exit 2
        sys.stderr.write(proc.stderr.strip().splitlines()[-1] + "\n")
        sys.exit(2)
    ended = re.search(r"(\d+) finished of (\d+) trials; this run took (\d+) s", proc.stdout)
    if proc.returncode != 0 or not ended or ended[1] != ended[2]:
        sys.exit(f"fuse {fuse}: the sweep did not finish every trial; see {where}/stdout.txt")
    packs = re.search(r"in (\d+) Ray trials", proc.stdout)
    trials = int(ended[2])
    return {
        "fuse": fuse,
        "trials": trials,
        "ray_trials": int(packs[1]) if packs else trials,
        "wall_s": wall,
        "sweep_s": float(ended[3]),
        "trials_per_h": 3600 * trials / wall,
    }


def main(argv: list[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if not args.space.is_file():  # before any sweep starts: exit 2 with one line
        cli.error(f"--space: no such space file: {args.space}")
    rows = [run_sweep(args.space, k, args.workdir, args.overrides) for k in args.fuse]
    base = rows[0]["trials_per_h"]
    print(f"space {args.space}\n")
    print("| `--fuse` | trials | Ray trials | wall s | sweep s | trials/hour | vs first |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['fuse']} | {r['trials']} | {r['ray_trials']} | {r['wall_s']:.0f} | "
            f"{r['sweep_s']:.0f} | {r['trials_per_h']:.0f} | {r['trials_per_h'] / base:.2f}× |"
        )
    (args.workdir / "results.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
