"""MO-ASHA against the same sweep run to completion: ``python -m benchmarks.early_stopping``

Runs the grid of ``benchmarks/early_stopping_space.yaml`` twice through the real sweep CLI
(Ray Tune, MLflow): as written (MO-ASHA), and from a copy without its ``early_stopping``
section. For each it reads every trial's reports from Ray's results and prints, as Markdown:
the trial-epochs spent (an early-stopped trial counts the epochs it trained), the trials
stopped, and the dominated hypervolume (`analysis.fronts`, normalised, reference acc 0 % /
asr 100 %) of the finished trials' front, with the curve of hypervolume against
trial-epochs spent (trials in the order they ended).

    python -m benchmarks.early_stopping                      # both sweeps, then the table
    python -m benchmarks.early_stopping --storage DIR        # a sweep already in DIR is reused

Only finished trials count towards a front, in both runs, as in the sweep's own table.

The space runs one trial at a time and training is deterministic on a CPU, so the MO-ASHA
run's decisions follow from the full run's epoch results: the table adds that replay
(`replay`: the same `MultiObjectiveASHA` fed the full run's epochs in grid order), which
must agree with the real MO-ASHA run — and stands in for it when only ``--full-only`` ran.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from analysis.fronts import dominated_volume, normalised_point

HERE = Path(__file__).resolve().parent
GOALS = {"acc": "max", "asr": "min"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.early_stopping", description=__doc__)
    p.add_argument("--space", type=Path, default=HERE / "early_stopping_space.yaml")
    p.add_argument("--storage", type=Path, default=Path("bench_early_stopping"))
    p.add_argument(
        "--full-only", action="store_true", help="run only the full sweep (and the replay)"
    )
    return p


def _sweep_dir(storage: Path, name: str) -> Path | None:
    found = sorted(p.parent for p in storage.glob(f"{name}-*/sweep.json"))
    return found[-1] if found else None


def run_sweep(space: Path, name: str, storage: Path) -> Path:
    """The sweep's Ray directory; runs it through the CLI unless one of ``name`` exists."""
    existing = _sweep_dir(storage, name)
    if existing is not None:
        print(f"reusing {existing}", flush=True)
        return existing
    uri = f"sqlite:///{(storage / 'mlflow.db').resolve()}"
    command = [sys.executable, "-m", "bdat_ray.sweep", "--space", str(space), "--name", name]
    command += ["--storage", str(storage), "--mlflow-uri", uri]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    found = _sweep_dir(storage, name)
    assert found is not None
    return found


def trial_records(sweep_dir: Path) -> list[dict[str, Any]]:
    """Per trial: epochs trained, whether it finished, its final acc/asr, when it ended."""
    import pandas as pd

    records = []
    for progress in sorted(sweep_dir.glob("trial_*/progress.csv")):
        rows = pd.read_csv(progress)
        epochs = rows[~rows["final"].astype(bool)]
        final = rows[rows["final"].astype(bool)]
        records.append(
            {
                "trial": progress.parent.name,
                "epochs": int(epochs["epoch"].max()) if len(epochs) else 0,
                "finished": bool(len(final)),
                "acc": float(final["acc"].iloc[-1]) if len(final) else None,
                "asr": float(final["asr"].iloc[-1]) if len(final) else None,
                "ended": float(rows["timestamp"].max()),
            }
        )
    return sorted(records, key=lambda r: r["ended"])


def replay(sweep_dir: Path, space: Path) -> list[dict[str, Any]]:
    """The MO-ASHA run as it follows from the full run's epochs: trials in grid (start)
    order, each fed epoch by epoch to a fresh `MultiObjectiveASHA` until it stops."""
    from types import SimpleNamespace

    import pandas as pd
    from ray.tune.schedulers import TrialScheduler

    from bdat_ray.schedulers import MultiObjectiveASHA
    from bdat_ray.search_space import load_space

    rule = load_space(space).early_stopping
    scheduler = MultiObjectiveASHA(
        GOALS,
        max_t=int(load_space(space).value("train.epochs")),
        grace_period=rule.grace_period,
        reduction_factor=rule.reduction_factor,
    )
    records = []
    for order, progress in enumerate(sorted(sweep_dir.glob("trial_*/progress.csv"))):
        rows = pd.read_csv(progress)
        epochs = rows[~rows["final"].astype(bool)].to_dict("records")
        final = rows[rows["final"].astype(bool)].to_dict("records")
        trial = SimpleNamespace(trial_id=progress.parent.name)
        trained = 0
        for row in epochs:
            trained = int(row["epoch"])
            if scheduler.on_trial_result(None, trial, row) == TrialScheduler.STOP:
                break
        done = trained == len(epochs) and bool(final)
        records.append(
            {
                "trial": trial.trial_id,
                "epochs": trained,
                "finished": done,
                "acc": final[-1]["acc"] if done else None,
                "asr": final[-1]["asr"] if done else None,
                "ended": order,
            }
        )
    return records


def curve(records: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(trial-epochs spent so far, hypervolume of the finished trials so far) per trial end."""
    spent, points, out = 0, [], []
    for record in records:
        spent += record["epochs"]
        if record["finished"]:
            point = normalised_point(record, GOALS)
            if point is not None:
                points.append(point)
        out.append((spent, dominated_volume(points, [1.0, 1.0])))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.storage.mkdir(parents=True, exist_ok=True)
    content = yaml.safe_load(args.space.read_text())
    content.pop("early_stopping")
    full_space = args.storage / f"{args.space.stem}_full.yaml"
    full_space.write_text(yaml.safe_dump(content, sort_keys=False))
    runs = {"to completion": run_sweep(full_space, "es_full", args.storage)}
    if not args.full_only:
        runs["MO-ASHA"] = run_sweep(args.space, "es_mo_asha", args.storage)
    results = {label: trial_records(path) for label, path in runs.items()}
    results["MO-ASHA replayed on the full run"] = replay(runs["to completion"], args.space)
    curves = {label: curve(records) for label, records in results.items()}
    full_epochs, full_hv = curves["to completion"][-1]
    print("\n| run | trials finished / stopped | trial-epochs | share | final HV | HV vs full |")
    print("|---|---|---|---|---|---|")
    for label, records in results.items():
        epochs, volume = curves[label][-1]
        done = sum(r["finished"] for r in records)
        print(
            f"| {label} | {done} / {len(records) - done} | {epochs} | "
            f"{epochs / full_epochs:.0%} | {volume:.4f} | {volume / full_hv - 1:+.2%} |"
        )
    for label, points in curves.items():
        shown = ", ".join(f"{e}: {v:.4f}" for e, v in points)
        print(f"\n{label} — hypervolume after each trial end (trial-epochs: HV): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
