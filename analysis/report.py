"""``python -m analysis.report``: a sweep's figures and tables from MLflow, as one page.

    python -m analysis.report                              # the latest sweep in ./mlflow.db
    python -m analysis.report --experiment quickstart --out reports/qs
    python -m analysis.report --mlflow-uri sqlite:///runs.db --sweep quickstart-20261122-040519

Writes into --out (default reports/<sweep id>/): pareto.png, hypervolume.png,
budget_curves.png (when a threat model was trained at two or more budgets), pareto_seeds.png
and seeds.csv (when a configuration ran with two or more seeds), table.md, table.csv,
trials.csv and index.html (docs/analysis.md explains each).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from analysis.fronts import percent_objectives, reference_text
from analysis.load import Sweep, read_sweep
from analysis.page import DEFAULT_UI, Figure, index_html
from analysis.plots import budget_plot, hypervolume_plot, pareto_plot
from analysis.search import hypervolume_reference, search_section
from analysis.seeds import has_repeats, seed_pareto_plot, seed_summary
from analysis.tables import tables, to_frame, to_markdown
from bdat_ray.cli import Parser, main_guard
from bdat_ray.config import ConfigError
from bdat_ray.preflight import check_tracking_uri, writable_dir
from bdat_ray.sweep import NAME_CHARS
from bdat_ray.tracking import redact, resolve_tracking_uri


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m analysis.report",
        description="Figures and tables of a bdat_ray sweep from MLflow (Pareto front, "
        "hypervolume, budget curves, the papers' tables) as one HTML page.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument("--experiment", metavar="NAME", help="sweep name (default: the latest sweep)")
    p.add_argument("--sweep", metavar="ID", help="sweep id NAME-YYYYmmdd-HHMMSS (default: latest)")
    p.add_argument("--out", type=Path, metavar="DIR", help="output folder (reports/<sweep id>)")
    p.add_argument(
        "--ui-url",
        default=DEFAULT_UI,
        metavar="URL",
        help=f"MLflow UI address the trial links point to (default {DEFAULT_UI})",
    )
    return p


def write_report(sweep: Sweep, out: Path, ui_url: str = DEFAULT_UI) -> list[Path]:
    """Every file of the report for a sweep with finished trials; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    trials, objectives = sweep.trials, sweep.objectives
    title = sweep.experiment
    written = [out / "pareto.png"]
    front = set(pareto_plot(trials, objectives, written[0], title))
    figures = [
        Figure(
            "pareto.png",
            "Pareto front",
            "Every finished trial, one panel per attack setting (the sweep draws one front per "
            "combination of swept attack/data keys: no defense chooses its attack). Colour: "
            "AT threat model; ringed: Pareto-optimal in "
            + ", ".join(f"{m} {mode}" for m, mode in objectives.items())
            + ", labelled with threat model and budget; dashed: the boundary of what the "
            "front dominates.",
        )
    ]
    if has_repeats(trials):
        written += _seed_files(sweep, out, figures)
    notes = []
    reference = hypervolume_reference(sweep)
    if percent_objectives(objectives):
        written.append(out / "hypervolume.png")
        hypervolume_plot(trials, objectives, written[-1], title, reference)
        figures.append(
            Figure(
                "hypervolume.png",
                "Hypervolume",
                "Dominated hypervolume of each attack setting's finished trials after each "
                "finished trial, normalised to [0, 1]; reference point "
                f"{reference_text(objectives, reference=reference)}"
                + (" (set by the space)" if reference else " (the worst values)")
                + "; 1 = the ideal trial "
                f"({reference_text(objectives, ideal=True)}).",
            )
        )
    else:
        notes.append("No hypervolume: no objective is in percent (acc, asr, robust_acc).")
    searched = search_section(sweep, out, title)
    written += searched[0]
    figures += searched[1]
    notes += searched[2]
    threats = budget_plot(trials, out / "budget_curves.png", title)
    if threats:
        written.append(out / "budget_curves.png")
        figures.append(
            Figure(
                "budget_curves.png",
                "ACC and ASR vs. budget",
                f"One panel per threat model trained at two or more budgets ({', '.join(threats)}"
                "), one line per attack; budget 0 is the same attack without AT; mean and "
                "standard deviation over seeds where there are several. Composite threat "
                "models (several budgets at once) are in the tables and the Pareto figure only.",
            )
        )
    else:
        notes.append(
            "No budget curves: no single threat model of this sweep was trained at two or "
            "more budgets (a curve needs two points; composites have no single budget axis)."
        )
    found = tables(trials)
    written += [out / "table.md", out / "table.csv", out / "trials.csv", out / "index.html"]
    (out / "table.md").write_text(
        f"## {sweep.experiment} — {sweep.sweep_id}\n\n" + "\n".join(map(to_markdown, found))
    )
    to_frame(found).to_csv(out / "table.csv", index=False)
    listing = trials.assign(on_front=trials["run_id"].isin(front))
    listing.to_csv(out / "trials.csv", index=False)
    (out / "index.html").write_text(
        index_html(sweep, figures=figures, tables=found, notes=notes, front=front, ui_url=ui_url)
    )
    return written


def _seed_files(sweep: Sweep, out: Path, figures: list[Figure]) -> list[Path]:
    """Repeated seeds: the Pareto front of the configurations' means with ± std bars
    (``pareto_seeds.png``, shown first) and one line per configuration (``seeds.csv``)."""
    trials, objectives = sweep.trials, sweep.objectives
    seed_pareto_plot(trials, objectives, out / "pareto_seeds.png", sweep.experiment)
    seed_summary(trials, objectives).to_csv(out / "seeds.csv", index=False)
    figures.insert(
        0,
        Figure(
            "pareto_seeds.png",
            "Pareto front over seeds",
            "One point per configuration (attack setting × defense) at its mean over the "
            "finished seeds, bars ± one sample standard deviation in both objectives, n = "
            "its seeds; ringed and joined: the front of the means per attack setting. The "
            "figure below draws every single trial (seeds separately); seeds.csv lists the "
            "means, spreads and counts.",
        ),
    )
    return [out / "pareto_seeds.png", out / "seeds.csv"]


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.sweep is not None and not set(args.sweep) <= NAME_CHARS:
        raise ConfigError("--sweep", f"sweep ids are NAME-YYYYmmdd-HHMMSS; got {args.sweep!r}")
    if args.out is not None:
        writable_dir("--out", args.out)
    key = "--mlflow-uri" if args.mlflow_uri else "MLFLOW_TRACKING_URI"
    check_tracking_uri(key, resolve_tracking_uri(args.mlflow_uri), reach=False)
    # A report is interactive: an unreachable server should fail in seconds, not retry for
    # minutes (MLflow's default backs off 7 times).
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stdout is ours
    started = time.perf_counter()
    from mlflow.exceptions import MlflowException

    try:
        sweep = read_sweep(args.mlflow_uri, args.experiment, args.sweep)
    except MlflowException as err:
        key = "--mlflow-uri" if args.mlflow_uri else "MLFLOW_TRACKING_URI"
        uri = redact(args.mlflow_uri or os.environ.get(key, ""))
        raise ConfigError(key, f"cannot read {uri}: {str(err).splitlines()[0]}") from None
    outcomes = sweep.outcomes()
    if not outcomes.get("finished"):
        counts = ", ".join(f"{n} {o}" for o, n in outcomes.items()) or "no trial runs"
        raise ConfigError(
            "--sweep" if args.sweep or not args.experiment else "--experiment",
            f"sweep {sweep.sweep_id} (experiment {sweep.experiment}) has no finished trials "
            f"({counts}); nothing to plot — pick another with --sweep or --experiment",
        )
    out = writable_dir("--out", args.out or Path("reports") / sweep.sweep_id)
    print(
        f"report     {sweep.sweep_id} (experiment {sweep.experiment}): "
        + ", ".join(f"{n} {o}" for o, n in outcomes.items())
        + f" of {len(sweep.trials)} trials",
        flush=True,
    )
    written = write_report(sweep, out, args.ui_url)
    for i, path in enumerate(written):
        print(f"{'wrote' if i == 0 else '':<10} {path}")
    print(f"open       {(out / 'index.html').resolve().as_uri()}")
    print(f"took       {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
