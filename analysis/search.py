"""What the search itself shows: the feasible front of a constrained sweep, and for Optuna
sweeps the parameter importances, a parallel-coordinates view of the study, and how to open
it in optuna-dashboard.

- Feasibility is `bdat_ray.search_space.feasible`, the rule the sweep's table and Optuna's
  ``best_trials`` apply; the constraints come from the parent run's ``constraints`` param.
- Importances: `optuna.importance.get_param_importances` (fANOVA, Optuna's default), once per
  objective, over the study's COMPLETE trials. Optuna measures them on the parameters every
  complete trial has (its intersection search space): a conditional parameter (``when``) is
  left out unless it was drawn in every trial.
- Parallel coordinates: one line per COMPLETE study trial across its parameters (each axis
  scaled to its own range; log axes for log-uniform ones, categories spread evenly) and the
  objectives, coloured by the last objective; infeasible trials dashed grey.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.fronts import FINISHED
from analysis.load import Sweep
from analysis.page import Figure
from analysis.plots import METRIC_LABELS, _figure, plane
from bdat_ray.search_space import (
    Constraint,
    describe_constraints,
    feasible,
    pareto_front,
    parse_constraint,
)

log = logging.getLogger(__name__)


def sweep_constraints(sweep: Sweep) -> tuple[Constraint, ...]:
    """The constraints the sweep ran with (parent param ``constraints``, e.g. ``asr <= 10``)."""
    text = sweep.params.get("constraints")
    if not text or text == "None":
        return ()
    constraints = []
    for part in text.split(", "):
        metric, op, bound = part.split(" ")
        constraints.append(parse_constraint(metric, f"{op} {bound}"))
    return tuple(constraints)


def hypervolume_reference(sweep: Sweep) -> dict[str, float]:
    """The reference point the sweep's space set (``hypervolume_reference`` param), if any."""
    text = sweep.params.get("hypervolume_reference")
    if not text or text == "None":
        return {}
    return {k: float(v) for k, v in (part.split("=") for part in text.split(","))}


def feasible_mask(trials: pd.DataFrame, constraints: Sequence[Constraint]) -> pd.Series:
    """True for the finished trials that meet every constraint."""
    records = trials.to_dict("records")
    flags = [r["outcome"] == FINISHED and feasible(r, constraints) for r in records]
    return pd.Series(flags, index=trials.index)


def feasible_plot(
    trials: pd.DataFrame,
    objectives: Mapping[str, str],
    constraints: Sequence[Constraint],
    path: Path,
    title: str,
) -> list[str]:
    """Every finished trial in the objective plane, infeasible ones grey, the feasible front
    of each group ringed, the constraint bounds dashed. Returns the run ids on the feasible
    fronts (empty when no trial is feasible)."""
    x, y = plane(objectives)
    done = trials[trials["outcome"] == FINISHED]
    ok = feasible_mask(done, constraints)
    groups = list(dict.fromkeys(done["group"]))
    fig = _figure(4.8 * max(len(groups), 1), 4.4)
    axes = fig.subplots(1, max(len(groups), 1), squeeze=False)[0]
    front_ids: list[str] = []
    for ax, group in zip(axes, groups, strict=False):
        members = done[done["group"] == group]
        good = members[ok[members.index]]
        bad = members[~ok[members.index]]
        ax.scatter(bad[x], bad[y], c="0.75", s=22, label="infeasible")
        ax.scatter(good[x], good[y], c="tab:blue", s=26, label="feasible")
        front = good.iloc[pareto_front(good[list(objectives)].to_dict("records"), objectives)]
        front_ids += list(front["run_id"])
        ax.scatter(front[x], front[y], s=90, facecolors="none", edgecolors="k", label="front")
        for c in constraints:
            draw = ax.axvline if c.metric == x else ax.axhline if c.metric == y else None
            if draw is not None:
                draw(c.bound, ls="--", c="tab:red", lw=1)
        ax.set_xlabel(METRIC_LABELS.get(x, x))
        ax.set_ylabel(METRIC_LABELS.get(y, y))
        ax.set_title(members["setting"].iloc[0] if group else "all trials", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    verdict = "" if front_ids else " — no finished trial is feasible"
    fig.suptitle(f"{title}: feasible front ({describe_constraints(constraints)}){verdict}")
    fig.savefig(path)
    return front_ids


# ---------------------------------------------------------------------------------------------
# The Optuna study.


def load_study(sweep: Sweep) -> Any | None:
    """The sweep's Optuna study (parent tags ``bdat_ray.optuna_storage`` / ``_study``), or
    None for a grid sweep or where the file is not reachable from here."""
    import optuna

    where = sweep.tags.get("bdat_ray.optuna_storage")
    name = sweep.tags.get("bdat_ray.optuna_study")
    if not where or not name:
        return None
    if "://" not in where and not Path(where).is_file():
        log.warning("Optuna study %s not found at %s", name, where)
        return None
    from bdat_ray.sweep import optuna_storage  # the journal (or an older sweep's SQLite)

    storage = where if "://" in where else optuna_storage(where)
    return optuna.load_study(study_name=name, storage=storage)


def dashboard_hint(sweep: Sweep) -> str | None:
    """The command that opens the study in optuna-dashboard (a separate install)."""
    where = sweep.tags.get("bdat_ray.optuna_storage")
    if not where:
        return None
    # optuna-dashboard opens a journal file by its path, a SQLite study by its URL
    storage = f"sqlite:///{where}" if where.endswith(".db") else where
    return f"pip install optuna-dashboard && optuna-dashboard {storage}"


def importance_plot(study: Any, objectives: Mapping[str, str], path: Path, title: str) -> bool:
    """fANOVA importances per objective as bars; False when Optuna cannot compute them
    (fewer than two complete trials, or no parameter that every complete trial has)."""
    import optuna

    names = list(objectives)
    importances = {}
    for i, metric in enumerate(names):
        try:
            importances[metric] = optuna.importance.get_param_importances(
                study, target=lambda t, i=i: t.values[i]
            )
        except (ValueError, RuntimeError) as err:
            log.warning("no parameter importances: %s", err)
            return False
        if not importances[metric]:
            return False
    fig = _figure(4.2 * len(names), 0.5 + 0.45 * max(len(v) for v in importances.values()))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, metric in zip(axes, names, strict=True):
        params = list(importances[metric])[::-1]
        ax.barh(params, [importances[metric][p] for p in params], color="tab:blue")
        ax.set_xlabel(f"importance for {metric} (fANOVA, sums to 1)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{title}: parameter importances")
    fig.savefig(path)
    return True


def _axis_values(trials: list[Any], param: str) -> list[float]:
    """One parameter of each trial scaled to [0, 1] (NaN where the trial did not draw it)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    values: list[float] = []
    dist = next(t.distributions[param] for t in trials if param in t.distributions)
    drawn = [t.params[param] for t in trials if param in t.params]
    if isinstance(dist, CategoricalDistribution):
        choices = list(dist.choices)
        spread = max(len(choices) - 1, 1)
        return [
            choices.index(t.params[param]) / spread if param in t.params else math.nan
            for t in trials
        ]
    log_scale = isinstance(dist, FloatDistribution) and dist.log
    scale = math.log if log_scale else float
    low, high = scale(min(drawn)), scale(max(drawn))
    for t in trials:
        if param not in t.params:
            values.append(math.nan)
        else:
            values.append((scale(t.params[param]) - low) / (high - low) if high > low else 0.5)
    return values


def parallel_plot(
    study: Any,
    objectives: Mapping[str, str],
    constraints: Sequence[Constraint],
    path: Path,
    title: str,
) -> bool:
    """Parallel coordinates of the COMPLETE study trials; False with fewer than two."""
    from matplotlib import colormaps

    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    if len(trials) < 2:
        return False
    params = list(dict.fromkeys(p for t in trials for p in t.params))
    names = list(objectives)
    columns = [_axis_values(trials, p) for p in params]
    for i in range(len(names)):  # objectives on their own range, in percent
        raw = [t.values[i] for t in trials]
        low, high = min(raw), max(raw)
        columns.append([(v - low) / (high - low) if high > low else 0.5 for v in raw])
    fig = _figure(1.5 * len(columns) + 2, 4.8)
    ax = fig.subplots()
    colour_by = [t.values[-1] for t in trials]
    low, high = min(colour_by), max(colour_by)
    cmap = colormaps["viridis"]
    for k, trial in enumerate(trials):
        ys = [column[k] for column in columns]
        ok = feasible(dict(zip(names, trial.values, strict=True)), constraints)
        shade = (colour_by[k] - low) / (high - low) if high > low else 0.5
        ax.plot(
            range(len(columns)),
            ys,
            c=cmap(shade) if ok else "0.6",
            ls="-" if ok else "--",
            lw=1.2,
            alpha=0.8,
        )
    labels = [p.replace("at.", "") for p in params] + [f"{m} ({objectives[m]})" for m in names]
    ax.set_xticks(range(len(columns)), labels, rotation=20, ha="right", fontsize=8.5)
    ax.set_yticks([0, 1], ["low", "high"])
    for i in range(len(columns)):
        ax.axvline(i, c="0.3", lw=0.8)
    ax.set_title(
        f"{title}: {len(trials)} complete Optuna trials, colour = {names[-1]}"
        + ("; dashed grey = infeasible" if constraints else ""),
        fontsize=11,
    )
    fig.savefig(path)
    return True


def search_section(
    sweep: Sweep, out: Path, title: str
) -> tuple[list[Path], list[Figure], list[str]]:
    """The report's search figures (files written, figures for the page, notes)."""
    objectives = sweep.objectives
    constraints = sweep_constraints(sweep)
    written: list[Path] = []
    figures: list[Figure] = []
    notes: list[str] = []
    if constraints:
        written.append(out / "feasible.png")
        front = feasible_plot(sweep.trials, objectives, constraints, written[-1], title)
        what = describe_constraints(constraints)
        figures.append(
            Figure(
                "feasible.png",
                "Feasible front",
                f"Finished trials that meet {what} (blue) and those that do not (grey); "
                "ringed: the Pareto front of the feasible trials of each attack setting (the "
                "sweep's table and Optuna's best_trials apply the same rule); dashed red: "
                "the constraint bounds.",
            )
        )
        if not front:
            notes.append(f"No finished trial meets {what}: the feasible front is empty.")
    study = load_study(sweep)
    if study is None:
        return written, figures, notes
    if importance_plot(study, objectives, out / "importance.png", title):
        written.append(out / "importance.png")
        figures.append(
            Figure(
                "importance.png",
                "Parameter importances",
                "fANOVA importance (optuna.importance) of each sampled parameter for each "
                "objective over the study's complete trials; parameters drawn only in some "
                "trials (conditional) are left out by Optuna.",
            )
        )
    else:
        notes.append("No parameter importances: Optuna needs two complete trials that share "
                     "a sampled parameter.")  # fmt: skip
    if parallel_plot(study, objectives, constraints, out / "parallel.png", title):
        written.append(out / "parallel.png")
        figures.append(
            Figure(
                "parallel.png",
                "Parallel coordinates",
                "One line per complete Optuna trial through its sampled parameters (each axis "
                "its own range; categories evenly spaced) and the objectives.",
            )
        )
    hint = dashboard_hint(sweep)
    if hint:
        notes.append(f"Interactive study view: {hint}")
    return written, figures, notes
