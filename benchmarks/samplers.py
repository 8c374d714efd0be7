"""Which Optuna sampler reaches the acc/asr front fastest? ``python -m benchmarks.samplers``

Runs each candidate sampler on the same real problem (``benchmarks/sampler_space.yaml``:
composite AT on digits) for ``--trials`` trials with each of ``--seeds`` sampler seeds, in
process: Optuna's ask/tell drives `bdat_ray.engine.fit` directly (no Ray, no MLflow), so
trials cost only their training. After every trial it records the dominated hypervolume
(`analysis.fronts`, normalised, reference acc 0 % / asr 100 %) of the trials so far.

    python -m benchmarks.samplers                          # 4 candidates x 3 seeds x 40 trials
    python -m benchmarks.samplers --trials 10 --seeds 1 --candidates tpe gp   # a quick look

Every trial is appended to ``--out`` (JSON lines) as it ends, and a rerun skips what the
file already holds, so an interrupted run continues. The summary (mean ± std over seeds of
the hypervolume after 10, 20, ... trials, and seconds per trial) is printed as Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from analysis.fronts import dominated_volume, normalised_point
from bdat_ray.samplers import SamplerSpec, build_sampler
from bdat_ray.search_space import OptunaSpace, load_space

HERE = Path(__file__).resolve().parent
#: Candidates: label -> sampler spec (as a space file would write it); None: random search,
#: the baseline, which a space cannot choose.
CANDIDATES: dict[str, SamplerSpec | None] = {
    "tpe": SamplerSpec("tpe"),
    "tpe_multivariate": SamplerSpec("tpe", (("multivariate", True),)),
    "nsga2": SamplerSpec("nsga2", (("population_size", 10),)),
    "gp": SamplerSpec("gp"),
    "random": None,
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.samplers", description=__doc__)
    p.add_argument("--space", type=Path, default=HERE / "sampler_space.yaml")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..N-1")
    p.add_argument(
        "--first-seed", type=int, default=0, help="start at this seed (split a run in parts)"
    )
    p.add_argument(
        "--candidates",
        nargs="+",
        default=["tpe", "tpe_multivariate", "nsga2", "gp"],
        choices=list(CANDIDATES),
    )
    p.add_argument("--out", type=Path, default=Path("bench_samplers.jsonl"))
    return p


def _sampler(label: str, seed: int) -> Any:
    spec = CANDIDATES[label]
    if spec is None:
        import optuna

        return optuna.samplers.RandomSampler(seed=seed)
    return build_sampler(spec, seed)


def run_candidate(label: str, seed: int, space: Any, trials: int, data: Any, out: Path) -> None:
    """One study of ``trials`` trials; each ends as one JSON line in ``out``."""
    import optuna
    import torch

    from bdat_ray.config import from_flat
    from bdat_ray.engine import fit

    torch.set_num_threads(1)
    study = optuna.create_study(
        directions=["maximize" if m == "max" else "minimize" for m in space.objectives.values()],
        sampler=_sampler(label, seed),
    )
    define = OptunaSpace(space)
    points: list[tuple[float, ...]] = []
    for number in range(trials):
        trial = study.ask()
        constants = define(trial)
        started = time.perf_counter()
        result = fit(from_flat({**constants, **trial.params, "device": "cpu"}), data=data)
        seconds = time.perf_counter() - started
        metrics = {"acc": result.acc, "asr": result.asr}
        study.tell(trial, [metrics[m] for m in space.objectives])
        point = normalised_point(metrics, space.objectives)
        if point is not None:
            points.append(point)
        volume = dominated_volume(points, [1.0] * len(space.objectives))
        line = {
            "candidate": label,
            "seed": seed,
            "trial": number + 1,
            "params": trial.params,
            **metrics,
            "hypervolume": volume,
            "seconds": seconds,
        }
        with out.open("a") as f:
            f.write(json.dumps(line) + "\n")
        print(
            f"{label:17s} seed {seed} trial {number + 1:3d}: acc {result.acc:5.1f} "
            f"asr {result.asr:5.1f}  hv {volume:.4f}  ({seconds:.1f} s)",
            flush=True,
        )


def summary(lines: list[dict[str, Any]], trials: int) -> str:
    """Markdown: per candidate, mean ± std over seeds of the hypervolume after k trials."""
    marks = [k for k in range(10, trials + 1, 10)] or [trials]
    header = "| sampler | " + " | ".join(f"HV after {k}" for k in marks) + " | s/trial | seeds |"
    rows = [header, "|" + "---|" * (len(marks) + 3)]
    for label in dict.fromkeys(line["candidate"] for line in lines):
        mine = [line for line in lines if line["candidate"] == label]
        seeds = sorted({line["seed"] for line in mine})
        cells = []
        for k in marks:
            at_k = [line["hypervolume"] for line in mine if line["trial"] == k]
            partial = f" (n={len(at_k)})" if len(at_k) < len(seeds) else ""
            if len(at_k) > 1:
                mean, std = statistics.mean(at_k), statistics.stdev(at_k)
                cells.append(f"{mean:.4f} ± {std:.4f}{partial}")
            else:
                cells.append(f"{at_k[0]:.4f}{partial}" if at_k else "–")
        per_trial = statistics.mean(line["seconds"] for line in mine)
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {per_trial:.1f} | {len(seeds)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import optuna

    from bdat_ray.config import from_flat
    from bdat_ray.data import load_dataset

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = load_space(args.space)
    data_keys = {k: v for k, v in space.fixed.items() if k.startswith("data.")}
    data = load_dataset(from_flat(data_keys).data)
    done = set()
    if args.out.is_file():
        lines = [json.loads(t) for t in args.out.read_text().splitlines() if t.strip()]
        counts: dict[tuple[str, int], int] = {}
        for line in lines:
            key = (line["candidate"], line["seed"])
            counts[key] = counts.get(key, 0) + 1
        done = {key for key, n in counts.items() if n >= args.trials}
    # Seed-major order: an interrupted run still compares every candidate on the same seeds.
    for seed in range(args.first_seed, args.seeds):
        for label in args.candidates:
            if (label, seed) in done:
                continue
            if args.out.is_file():  # drop a partial study of this pair: it restarts whole
                kept = [
                    t
                    for t in args.out.read_text().splitlines()
                    if (json.loads(t)["candidate"], json.loads(t)["seed"]) != (label, seed)
                ]
                args.out.write_text("".join(t + "\n" for t in kept))
            run_candidate(label, seed, space, args.trials, data, args.out)
    lines = [json.loads(t) for t in args.out.read_text().splitlines() if t.strip()]
    print(summary([line for line in lines if line["candidate"] in args.candidates], args.trials))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
