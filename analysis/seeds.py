"""Repeated seeds: every configuration's mean ± standard deviation over its seeds, and the
Pareto front drawn from those means.

A grid sweep with ``num_samples`` > 1 trains every combination with ``train.seed`` + 0..N-1.
A configuration is one (attack setting, variant, threat model, budgets) — trials that differ
only in `analysis.load.REPEAT_KEYS`. Its point is the mean over its finished seeds, its spread
the sample standard deviation (n - 1; none for a single seed), and the front is computed from
the means, per environment group, as the sweep computes it from single trials. A defense that
removes a backdoor on one seed and not on the next shows as a long ASR error bar.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from analysis.fronts import FINISHED, objectives_of
from bdat_ray.search_space import pareto_front as front_indices

#: The columns that name a configuration (everything but the seed).
CONFIGURATION = ["group", "setting", "variant", "threat", "budgets"]
METRICS = ("acc", "asr", "robust_acc")


def has_repeats(trials: pd.DataFrame) -> bool:
    """Whether some configuration finished with two or more seeds."""
    done = trials[trials["outcome"] == FINISHED]
    return bool(len(done)) and int(done.groupby(CONFIGURATION, sort=False).size().max()) > 1


def seed_summary(trials: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per configuration of finished trials: the `CONFIGURATION` columns, ``n``
    (finished seeds), ``seeds`` (their ``train.seed`` values), ``<metric>_mean`` and
    ``<metric>_std`` for acc, asr, robust_acc and the objectives, and ``front`` (the mean is
    on its group's Pareto front of means)."""
    goals = objectives_of(trials, objectives)
    metrics = list(dict.fromkeys([*METRICS, *goals]))
    done = trials[trials["outcome"] == FINISHED]
    rows = []
    for key, members in done.groupby(CONFIGURATION, sort=False):
        row = dict(zip(CONFIGURATION, key, strict=True))
        row["n"] = len(members)
        row["seeds"] = ",".join(str(s) for s in sorted(members["train.seed"]))
        for metric in metrics:
            row[f"{metric}_mean"] = float(members[metric].mean())
            row[f"{metric}_std"] = float(members[metric].std(ddof=1))  # NaN for one seed
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary["front"] = False
    means = {f"{m}_mean": mode for m, mode in goals.items()}
    for _, members in summary.groupby("group", sort=False):
        records = members[list(means)].to_dict("records")
        summary.loc[members.index[front_indices(records, means)], "front"] = True
    return summary


def seed_pareto_plot(
    trials: pd.DataFrame, objectives: Mapping[str, str], path: Path, title: str
) -> int:
    """Write the front of means: one point per configuration at its mean, error bars ± one
    standard deviation in both objectives, the front of means ringed and joined; one panel
    per environment group. Returns the number of configurations on a front."""
    from analysis.plots import (
        METRIC_LABELS,
        _limits,
        _place_labels,
        _threat_legend,
        _threat_name,
        panels,
        plane,
        point_label,
        threat_colors,
    )

    x, y = plane(objectives)
    summary = seed_summary(trials, objectives)
    groups = list(dict.fromkeys(summary["group"]))
    fig, axes, cols = panels(len(groups))
    colors = threat_colors()
    staircase = set(objectives) == {x, y} and objectives[x] == "min" and objectives[y] == "max"
    labelled = []
    for ax, group in zip(axes, groups, strict=False):
        members = summary[summary["group"] == group]
        for record in members.to_dict("records"):
            color = colors[_threat_name(record["threat"])]
            ax.errorbar(
                record[f"{x}_mean"],
                record[f"{y}_mean"],
                xerr=_spread(record[f"{x}_std"]),
                yerr=_spread(record[f"{y}_std"]),
                fmt="o",
                ms=11 if record["front"] else 7,
                color=color,
                mec="black" if record["front"] else color,
                mew=1.6 if record["front"] else 0,
                ecolor=color,
                elinewidth=1.2,
                capsize=3,
                zorder=4 if record["front"] else 3,
            )
        front = members[members["front"]].sort_values(f"{x}_mean")
        if staircase and len(front):
            xs = [*front[f"{x}_mean"], _limits(summary[f"{x}_mean"], x)[1]]
            ys = [*front[f"{y}_mean"], front[f"{y}_mean"].iloc[-1]]
            ax.step(xs, ys, where="post", color="black", lw=1, ls="--", zorder=2)
        seeds = int(members["n"].max())
        ax.set_title(
            f"{members['setting'].iloc[0]}\n{len(members)} configurations × up to {seeds} "
            f"seeds, {len(front)} on the front of means",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
        labelled.append((ax, members))
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[max(len(groups) - cols, 0) : len(groups)]:
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel(
            "mean " + METRIC_LABELS.get(x, x) + (" ↓" if objectives.get(x) == "min" else "")
        )
    for ax in axes[::cols]:
        ax.set_ylabel(
            "mean " + METRIC_LABELS.get(y, y) + (" ↑" if objectives.get(y) == "max" else "")
        )
    axes[0].set_xlim(*_limits(_whole_bars(summary, x), x))
    axes[0].set_ylim(*_limits(_whole_bars(summary, y), y))
    _threat_legend(fig, summary, colors, staircase)
    fig.suptitle(f"{title}: Pareto front of the means over seeds (bars: ± 1 std)", fontsize=12)
    fig.canvas.draw()  # final pixel positions, for labels that avoid the markers
    for ax, members in labelled:
        means = list(zip(members[f"{x}_mean"], members[f"{y}_mean"], strict=True))
        texts = [
            f"{point_label(r, with_seed=False)}, n={r['n']}" for r in members.to_dict("records")
        ]
        _place_labels(ax, [(mx, my, t) for (mx, my), t in zip(means, texts, strict=True)], means)
    fig.savefig(path)
    return int(summary["front"].sum())


def _whole_bars(summary: pd.DataFrame, metric: str) -> pd.Series:
    """Both ends of every error bar, so the axis limits show the bars whole."""
    mean, std = summary[f"{metric}_mean"], summary[f"{metric}_std"].fillna(0)
    return pd.concat([mean - std, mean + std])


def _spread(std: float) -> float | None:
    return None if pd.isna(std) else std
