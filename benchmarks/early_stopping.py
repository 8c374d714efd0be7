"""MO-ASHA against the same sweep run to completion: ``python -m benchmarks.early_stopping``

The grid of ``benchmarks/early_stopping_space.yaml`` is trained to completion, epoch by epoch;
its MO-ASHA run is the same trials fed, in grid order, to `bdat_ray.schedulers.
MultiObjectiveASHA` — the scheduler the sweep runs — each trial stopping where the scheduler
says STOP. The space runs one trial at a time and training is deterministic on a CPU, so a
stopped trial's epochs are exactly those it would have trained in the sweep, and the
decisions are the sweep's (`tests/test_search_fit.py` checks that a real Ray sweep stops
exactly the trials this replay of its epochs stops). Prints, as Markdown: trial-epochs spent
(a stopped trial counts the epochs it trained), trials stopped, and the dominated
hypervolume (`analysis.fronts`, normalised, reference acc 0 % / asr 100 %) of the finished
trials' front, with the curve of hypervolume against trial-epochs spent.

    python -m benchmarks.early_stopping          # in process (engine.fit)
    python -m benchmarks.early_stopping --ray    # both sweeps through the sweep CLI

In process, every trained trial is appended to ``--out`` (JSON lines) and a rerun continues.
With ``--ray`` the two sweeps run through ``python -m bdat_ray.sweep`` into ``--storage``
(a sweep already there is reused) and the MO-ASHA row is the real run, beside the replay.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from analysis.fronts import dominated_volume, normalised_point
from bdat_ray.cli import main_guard, positive

HERE = Path(__file__).resolve().parent
GOALS = {"acc": "max", "asr": "min"}


def rung_rule(text: str) -> tuple[int, float]:
    """An argparse type: ``GRACE:FACTOR``, the grace period in epochs (an integer ≥ 1) and the
    reduction factor (> 1), the rule `bdat_ray.search_space` applies to a space's rungs."""
    grace, _, factor = text.partition(":")
    try:
        rule = int(grace), float(factor)
    except ValueError:
        rule = None
    if rule is None or rule[0] < 1 or not 1 < rule[1] < math.inf:
        raise argparse.ArgumentTypeError(
            f"takes GRACE:FACTOR, an integer >= 1 and a number > 1 (e.g. 3:3); got {text!r}"
        )
    return rule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.early_stopping", description=__doc__)
    p.add_argument("--space", type=Path, default=HERE / "early_stopping_space.yaml")
    p.add_argument("--out", type=Path, default=Path("bench_early_stopping.jsonl"))
    p.add_argument("--ray", action="store_true", help="run both sweeps through the sweep CLI")
    p.add_argument("--storage", type=Path, default=Path("bench_early_stopping"))
    p.add_argument(
        "--rules",
        nargs="+",
        type=rung_rule,
        default=[],
        metavar="GRACE:FACTOR",
        help="also replay MO-ASHA with these grace periods and reduction factors (e.g. 3:3)",
    )
    p.add_argument(
        "--jobs", type=positive, default=1, help="in process: trainings at once (one thread each)"
    )
    p.add_argument("--plot", type=Path, help="draw hypervolume against trial-epochs into this PNG")
    return p


# ---------------------------------------------------------------------------------------------
# A trial: its epoch results (epoch, acc, asr) and its final acc/asr.


def train_one(space_path: Path, index: int) -> dict[str, Any]:
    """Grid point ``index`` of the space trained to completion with `engine.fit` on one
    thread, with its epoch results."""
    import torch

    from bdat_ray.config import from_flat
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import fit
    from bdat_ray.search_space import load_space

    torch.set_num_threads(1)
    point = load_space(space_path).grid_points()[index]
    config = from_flat({**point, "device": "cpu"})
    epochs: list[dict[str, float]] = []

    def record(metrics: dict[str, float], _checkpoint: Any) -> None:
        epochs.append({k: metrics[k] for k in ("epoch", "acc", "asr", "epoch_seconds")})

    result = fit(config, data=load_dataset(config.data), on_epoch=record)
    trial = {"trial": f"{index:05d}", "point": repr(point), "epochs": epochs}
    return trial | {"acc": result.acc, "asr": result.asr, "seconds": result.seconds}


def train_in_process(space_path: Path, out: Path, jobs: int) -> list[dict[str, Any]]:
    """Every grid point trained to completion, ``jobs`` at a time (each trial is
    deterministic on one thread, so the order they train in changes nothing), returned in
    grid order — the order the one-at-a-time sweep runs them in."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from bdat_ray.search_space import load_space

    total = len(load_space(space_path).grid_points())
    done = [json.loads(t) for t in out.read_text().splitlines()] if out.is_file() else []
    todo = sorted(set(range(total)) - {int(t["trial"]) for t in done})
    context = multiprocessing.get_context("spawn")  # torch and fork do not mix
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        running = [pool.submit(train_one, space_path, index) for index in todo]
        for future in as_completed(running):
            trial = future.result()
            with out.open("a") as f:
                f.write(json.dumps(trial) + "\n")
            done.append(trial)
            print(
                f"trial {trial['trial']} ({len(done)}/{total} done): acc {trial['acc']:.1f} "
                f"asr {trial['asr']:.1f} ({trial['seconds']:.0f} s)",
                flush=True,
            )
    return sorted(done, key=lambda t: int(t["trial"]))


def _sweep_dir(storage: Path, name: str) -> Path | None:
    found = sorted(p.parent for p in storage.glob(f"{name}-*/sweep.json"))
    return found[-1] if found else None


def run_sweep(space: Path, name: str, storage: Path) -> list[dict[str, Any]]:
    """A sweep through the CLI (unless one of ``name`` is in ``storage``); its trials in
    start order, read from Ray's progress files."""
    import pandas as pd

    if _sweep_dir(storage, name) is None:
        uri = f"sqlite:///{(storage / 'mlflow.db').resolve()}"
        command = [sys.executable, "-m", "bdat_ray.sweep", "--space", str(space), "--name", name]
        command += ["--storage", str(storage), "--mlflow-uri", uri]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    trials = []
    for progress in sorted(_sweep_dir(storage, name).glob("trial_*/progress.csv")):
        rows = pd.read_csv(progress)
        final = rows[rows["final"].astype(bool)]
        trials.append(
            {
                "trial": progress.parent.name,
                "epochs": rows[~rows["final"].astype(bool)][["epoch", "acc", "asr"]].to_dict(
                    "records"
                ),
                "acc": float(final["acc"].iloc[-1]) if len(final) else None,
                "asr": float(final["asr"].iloc[-1]) if len(final) else None,
                # Ray's own columns: when the trial's last result came, and its run time.
                "started": float((rows["timestamp"] - rows["time_total_s"]).min()),
                "ended": float(rows["timestamp"].max()),
            }
        )
    return trials


def wall_span(trials: list[dict[str, Any]]) -> float:
    """Seconds from the first trial's start to the last trial's last result (Ray start-up and
    the sweep's summary excluded)."""
    return max(t["ended"] for t in trials) - min(t["started"] for t in trials)


# ---------------------------------------------------------------------------------------------
# Outcomes: epochs spent and the hypervolume reached.


def outcome(trial: dict[str, Any], epochs_trained: int, epochs_total: int) -> dict[str, Any]:
    finished = epochs_trained == epochs_total and trial["acc"] is not None
    return {
        "trial": trial["trial"],
        "epochs": epochs_trained,
        "finished": finished,
        "acc": trial["acc"] if finished else None,
        "asr": trial["asr"] if finished else None,
    }


def as_run(trials: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Trials as they ran (a sweep's own record)."""
    return [
        outcome(t, int(max((e["epoch"] for e in t["epochs"]), default=0)), total) for t in trials
    ]


def mo_asha_replay(
    trials: list[dict[str, Any]], grace_period: int, reduction_factor: float, total: int
) -> list[dict[str, Any]]:
    """The trials fed epoch by epoch, in order, to the sweep's MO-ASHA scheduler."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from bdat_ray.schedulers import MultiObjectiveASHA

    scheduler = MultiObjectiveASHA(
        GOALS, max_t=total, grace_period=grace_period, reduction_factor=reduction_factor
    )
    runs = []
    for trial in trials:
        stub = Trial("__fake", stub=True)  # a real Ray trial, as in Ray's scheduler tests
        trained = 0
        for epoch in trial["epochs"]:
            trained = int(epoch["epoch"])
            report = {**epoch, "epochs": total, "final": False}
            if scheduler.on_trial_result(None, stub, report) == TrialScheduler.STOP:
                break
        runs.append(outcome(trial, trained, total))
    return runs


def rank_agreement(trials: list[dict[str, Any]], total: int) -> list[tuple[int, float, float]]:
    """(epoch, Kendall's tau-b of acc, of asr) between the trials' results at that epoch and
    their final results: how well a rung at that epoch ranks the trials as they end (1: the
    same order; 0: no relation; nan: every trial had the same value)."""
    from scipy.stats import kendalltau

    finals = {goal: [t[goal] for t in trials] for goal in GOALS}
    rows = []
    for epoch in range(1, total + 1):
        at = [next(e for e in t["epochs"] if int(e["epoch"]) == epoch) for t in trials]
        tau = {goal: kendalltau([e[goal] for e in at], finals[goal]).statistic for goal in GOALS}
        rows.append((epoch, tau["acc"], tau["asr"]))
    return rows


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


def draw(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """Hypervolume against trial-epochs spent, one step line per run (matplotlib's object API,
    as `analysis.plots`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for label, points in curves.items():
        epochs, volumes = zip(*[(0, 0.0), *points], strict=True)
        # The two real runs bold; the replays thin and dashed (several coincide).
        real = label == "to completion" or "Ray" in label
        style = {"linewidth": 2.6, "color": "black" if label == "to completion" else "C1"}
        style = style if real else {"linewidth": 1.0, "linestyle": "--", "alpha": 0.8}
        ax.step(epochs, volumes, where="post", label=label, **style)
    ax.set_xlabel("trial-epochs spent (sum over trials of the epochs each trained)")
    ax.set_ylabel("hypervolume of the finished trials\n(acc ↑, asr ↓; normalised)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


@main_guard
def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.jobs > (os.cpu_count() or 1):
        p.error(f"--jobs: at most this machine's {os.cpu_count()} cores; got {args.jobs}")
    from bdat_ray.search_space import load_space

    space = load_space(args.space)
    total = int(space.value("train.epochs"))
    rule = space.early_stopping
    if args.ray:
        import yaml

        args.storage.mkdir(parents=True, exist_ok=True)
        content = yaml.safe_load(args.space.read_text())
        content.pop("early_stopping")
        full_space = args.storage / f"{args.space.stem}_full.yaml"
        full_space.write_text(yaml.safe_dump(content, sort_keys=False))
        full = run_sweep(full_space, "es_full", args.storage)
        real = run_sweep(args.space, "es_mo_asha", args.storage)
        results = {"to completion": as_run(full, total), "MO-ASHA (Ray sweep)": as_run(real, total)}
    else:
        full = train_in_process(args.space, args.out, args.jobs)
        results = {"to completion": as_run(full, total)}
    rules = [(rule.grace_period, rule.reduction_factor)]
    rules += args.rules
    for grace, factor in rules:
        label = f"MO-ASHA grace {grace}, factor {factor:g}"
        results[label] = mo_asha_replay(full, grace, factor, total)
    curves = {label: curve(records) for label, records in results.items()}
    full_epochs, full_hv = curves["to completion"][-1]
    print("\n| run | trials finished / stopped | stopped at epoch (trials) | trial-epochs | share "
          "| final HV | HV vs full |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for label, records in results.items():
        epochs, volume = curves[label][-1]
        done = sum(r["finished"] for r in records)
        at = Counter(r["epochs"] for r in records if not r["finished"])
        where = ", ".join(f"{e} ({n})" for e, n in sorted(at.items())) or "-"
        print(
            f"| {label} | {done} / {len(records) - done} | {where} | {epochs} | "
            f"{epochs / full_epochs:.0%} | {volume:.4f} | {volume / full_hv - 1:+.2%} |"
        )
    for label, points in curves.items():
        shown = ", ".join(f"{e}: {v:.4f}" for e, v in points)
        print(f"\n{label} — hypervolume after each trial (trial-epochs: HV): {shown}")
    print("\nHow well each epoch ranks the trials as they end (Kendall's tau-b, full run):")
    print("\n| epoch | acc | asr |\n|---|---|---|")
    for epoch, tau_acc, tau_asr in rank_agreement(full, total):
        print(f"| {epoch} | {tau_acc:.2f} | {tau_asr:.2f} |")
    if args.ray:
        print(f"\nwall-clock, first trial start to last result: to completion "
              f"{wall_span(full):.0f} s, MO-ASHA {wall_span(real):.0f} s")  # fmt: skip
    if args.plot:
        draw(curves, args.plot, f"{args.space.name}: {len(full)} trials × {total} epochs")
        print(f"\nfigure: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
