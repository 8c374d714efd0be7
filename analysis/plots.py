"""The report's figures, drawn with matplotlib's object API (no pyplot: no global state, no
display needed) and written as PNG.

- `pareto_plot`: every finished trial in the objective plane (ASR on x, ACC on y by default),
  one panel per environment group, the group's Pareto front ringed in black, joined by the
  boundary of the region it dominates, and labelled by threat model and budget.
- `hypervolume_plot`: dominated hypervolume (normalised, see `analysis.fronts`) per group
  after each finished trial.
- `budget_plot`: ACC and ASR against the perturbation budget, one panel per single threat
  model, one line per attack setting (the CAT paper's Figures 2–3), the same attack without
  AT at budget 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.fronts import FINISHED, front_mask, hypervolume_curve, reference_text
from analysis.load import NO_AT, defense_text
from bdat_ray.config import leaf
from bdat_ray.search_space import format_budget

METRIC_LABELS = {
    "acc": "clean accuracy ACC (%)",
    "asr": "attack success rate ASR (%)",
    "robust_acc": "robust accuracy (%)",
    "seconds": "wall time (s)",
    "gpu_seconds": "GPU time (s)",
    "images_per_s": "training throughput (images/s)",
}
PERCENT = ("acc", "asr", "robust_acc")
BUDGET_UNITS = {
    "linf": "L∞ budget ε (pixel units)",
    "l2": "L2 budget ε (pixel units)",
    "spatial": "spatial flow bound (normalised grid units)",
    "perceptual": "perceptual budget (LPIPS distance)",
    "noise": "Gaussian noise σ (pixel units)",
    "flow_noise": "random flow bound (normalised grid units)",
}
DPI = 110


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure label sizes with, without pyplot
    return fig


def panels(count: int) -> tuple[Any, Any, int]:
    """(figure, flat axes, columns) for ``count`` objective-plane panels sharing their axes,
    three per row."""
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = _figure(max(5.6 * cols, 8.0), 4.6 * rows + 0.9)  # one panel: room for the legend
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    return fig, axes, cols


def threat_colors() -> dict[str, Any]:
    """One fixed colour per threat model (the schema's order), the same in every figure."""
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    names = leaf("at.threat").allowed_choices() or []
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def _threat_name(threat: str) -> str:
    return threat.split("/")[0]  # composite/sum -> composite


def point_label(row: Mapping[str, Any], with_seed: bool) -> str:
    """What a front point trained with: ``no AT``, ``linf 16/255``, or for composites the
    threat and, on the next line, its budgets and weights."""
    label = defense_text(str(row["threat"]), str(row["budgets"]), "no AT", composite_sep="\n")
    extras = [str(row["variant"])] if row["variant"] else []
    if with_seed:
        extras.append(f"seed {row['train.seed']}")
    return label + (f" ({', '.join(extras)})" if extras else "")


def plane(objectives: Mapping[str, str]) -> tuple[str, str]:
    """(x, y) metrics: the first two objectives (asr or acc beside a single one), one to
    maximise on y where there is one."""
    names = list(objectives)
    if len(names) == 1:
        names.append("asr" if names[0] != "asr" else "acc")
    a, b = names[:2]
    return (a, b) if objectives.get(b) == "max" and objectives.get(a) != "max" else (b, a)


def _limits(values: pd.Series, metric: str) -> tuple[float, float]:
    if metric in PERCENT and metric != "acc":
        return -3.0, 103.0  # the whole percent scale: where the attack stands matters
    low, high = float(values.min()), float(values.max())
    pad = max((high - low) * 0.12, 1.0)
    upper = min(high + pad, 101.0) if metric in PERCENT else high + pad
    return max(low - pad, -1.0) if metric in PERCENT else low - pad, upper


def pareto_plot(
    trials: pd.DataFrame, objectives: Mapping[str, str], path: Path, title: str
) -> list[str]:
    """Write the Pareto figure; returns the run ids of the front points drawn."""
    x, y = plane(objectives)
    done = trials[trials["outcome"] == FINISHED].copy()
    done["front"] = front_mask(done, objectives)
    groups = list(dict.fromkeys(done["group"]))
    fig, axes, cols = panels(len(groups))
    colors = threat_colors()
    with_seed = done["train.seed"].nunique() > 1
    staircase = set(objectives) == {x, y} and objectives[x] == "min" and objectives[y] == "max"
    drawn: list[str] = []
    labels = []
    for ax, group in zip(axes, groups, strict=False):
        members = done[done["group"] == group]
        front = members[members["front"]].sort_values(x)
        ax.scatter(
            members[x],
            members[y],
            c=[colors[_threat_name(t)] for t in members["threat"]],
            s=45,
            alpha=0.85,
            zorder=3,
        )
        ax.scatter(
            front[x],
            front[y],
            c=[colors[_threat_name(t)] for t in front["threat"]],
            s=130,
            edgecolors="black",
            linewidths=1.6,
            zorder=4,
        )
        if staircase:
            # What the front dominates: everything right of and below some front point.
            xs = [*front[x], _limits(done[x], x)[1]]
            ys = [*front[y], front[y].iloc[-1]]
            ax.step(xs, ys, where="post", color="black", lw=1, ls="--", zorder=2)
            ax.fill_between(xs, ys, -1e9, step="post", color="0.5", alpha=0.08, lw=0, zorder=1)
        labels.append((ax, members, front))
        drawn += list(front["run_id"])
        ax.set_title(
            f"{members['setting'].iloc[0]}\n{len(members)} finished, {len(front)} on the front",
            fontsize=10,
        )
        ax.grid(alpha=0.3)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    for ax in axes[max(len(groups) - cols, 0) : len(groups)]:  # the lowest panel per column
        ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_xlabel(METRIC_LABELS.get(x, x) + (" ↓" if objectives.get(x) == "min" else ""))
    for ax in axes[::cols]:
        ax.set_ylabel(METRIC_LABELS.get(y, y) + (" ↑" if objectives.get(y) == "max" else ""))
    axes[0].set_xlim(*_limits(done[x], x))
    axes[0].set_ylim(*_limits(done[y], y))
    _threat_legend(fig, done, colors, staircase)
    goals = ", ".join(f"{m} {mode}" for m, mode in objectives.items())
    shown = "" if set(objectives) <= {x, y} else f" (front over {goals}, drawn in this plane)"
    fig.suptitle(f"{title}: Pareto front per attack setting{shown}", fontsize=12)
    fig.canvas.draw()  # settles the layout: labels are placed in final pixel positions
    for ax, members, front in labels:
        _place_labels(
            ax,
            [(r[x], r[y], point_label(r, with_seed)) for r in front.to_dict("records")],
            list(zip(members[x], members[y], strict=True)),
        )
    fig.savefig(path)
    return drawn


#: Where a label may sit relative to its point (offset in points, alignment), best first:
#: up and left of a front point no trial lies (it would dominate the point), so labels there
#: cover nothing.
LABEL_SPOTS = [
    ((-7, 7), "right", "bottom"),
    ((-10, 0), "right", "center"),
    ((0, 10), "center", "bottom"),
    ((7, 7), "left", "bottom"),
    ((10, 0), "left", "center"),
    ((-7, -7), "right", "top"),
    ((7, -7), "left", "top"),
    ((0, -10), "center", "top"),
]
MARKER_PX = 9  # half-size of the box a marker occupies, for label collisions


def _overlap(a: Any, b: Any) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0) * max(height, 0)


def _place_labels(
    ax: Any, points: list[tuple[float, float, str]], markers: list[tuple[float, float]]
) -> None:
    """Label each point at the first spot of `LABEL_SPOTS` that covers no marker, no earlier
    label and stays inside the axes (else at the spot that covers least)."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    taken = [
        Bbox.from_extents(px - MARKER_PX, py - MARKER_PX, px + MARKER_PX, py + MARKER_PX)
        for px, py in ax.transData.transform(markers)
    ]
    for x, y, text in points:
        best = None
        for offset, ha, va in LABEL_SPOTS:
            label = ax.annotate(
                text,
                (x, y),
                xytext=offset,
                textcoords="offset points",
                ha=ha,
                va=va,
                fontsize=8.5,
                zorder=5,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.8},
            )
            box = label.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, frame)
            cost = 10 * outside + sum(_overlap(box, other) for other in taken)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[2])


def _threat_legend(fig: Any, done: pd.DataFrame, colors: dict[str, Any], line: bool) -> None:
    from matplotlib.lines import Line2D

    present = {_threat_name(t) for t in done["threat"]}
    threats = [t for t in colors if t in present]  # the schema's order: no AT first
    handles = [
        Line2D([], [], ls="", marker="o", ms=7, color=colors[t], label="no AT" if t == NO_AT else t)
        for t in threats
    ]
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            ms=9,
            mfc="white",
            mec="black",
            mew=1.6,
            label="Pareto-optimal",
        )
    )
    if line:
        handles.append(Line2D([], [], color="black", ls="--", lw=1, label="dominated region"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=9)


def hypervolume_plot(
    trials: pd.DataFrame,
    objectives: Mapping[str, str],
    path: Path,
    title: str,
    reference: Mapping[str, float] | None = None,
) -> None:
    curve = hypervolume_curve(trials, objectives, reference)
    labels = trials.drop_duplicates("group").set_index("group")["setting"]
    fig = _figure(7.5, 4.6)
    ax = fig.subplots()
    for group, points in curve.groupby("group", sort=False):
        label = labels[group] if group else "all trials"
        ax.step(
            points["finished"], points["hypervolume"], where="post", marker="o", ms=4, label=label
        )
    ax.set_xlabel("finished trials (in the order they finished)")
    ax.set_ylabel("dominated hypervolume (normalised)")
    ax.set_ylim(0, 1)
    ax.set_xlim(0.5, max(curve["finished"].max(), 1) + 0.5)
    ax.grid(alpha=0.3)
    ax.text(
        0.99,
        0.03,
        f"reference point: {reference_text(objectives, reference=reference)}\n"
        f"1 = the ideal trial: {reference_text(objectives, ideal=True)}",
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8.5,
        bbox={"fc": "white", "ec": "0.7"},
    )
    ax.legend(loc="upper left", fontsize=9, title="attack setting", title_fontsize=9)
    ax.set_title(f"{title}: hypervolume per attack setting", fontsize=12)
    fig.savefig(path)


def budget_threats(trials: pd.DataFrame) -> list[str]:
    """Single threat models trained at two or more budgets (panels of `budget_plot`)."""
    done = trials[(trials["outcome"] == FINISHED) & (trials["budget"] > 0)]
    counts = done.groupby("threat")["budget"].nunique()
    return [t for t in dict.fromkeys(done["threat"]) if counts[t] >= 2]


def budget_plot(trials: pd.DataFrame, path: Path, title: str) -> list[str]:
    """ACC and ASR against the budget; returns the threat models drawn ([] draws nothing:
    a curve needs two budgets of one threat model)."""
    threats = budget_threats(trials)
    if not threats:
        return []
    done = trials[trials["outcome"] == FINISHED].copy()
    done["line"] = [
        ", ".join(p for p in (s, v) if p)
        for s, v in zip(done["setting"], done["variant"], strict=True)
    ]
    fig = _figure(max(4.6 * len(threats), 7.0), 7.4)
    axes = fig.subplots(2, len(threats), squeeze=False, sharey="row")
    lines = list(dict.fromkeys(done["line"]))
    palette = [f"C{i}" for i in range(10)]
    for col, threat in enumerate(threats):
        points = done[(done["threat"] == threat) | (done["threat"] == NO_AT)]
        for i, line in enumerate(lines):
            series = points[points["line"] == line].groupby("budget")[["acc", "asr"]]
            mean, std = series.mean(), series.std(ddof=1)
            if (mean.index > 0).sum() == 0:
                continue
            for row, metric in enumerate(("acc", "asr")):
                axes[row, col].errorbar(
                    mean.index,
                    mean[metric],
                    yerr=std[metric].fillna(0),
                    marker="o",
                    color=palette[i % 10],
                    capsize=3,
                    label=line,
                )
        budgets = sorted(points["budget"].unique())
        for row, metric in enumerate(("acc", "asr")):
            ax = axes[row, col]
            ax.set_xticks(budgets, [_budget_tick(threat, b) for b in budgets], fontsize=8.5)
            ax.grid(alpha=0.3)
            if col == 0:
                ax.set_ylabel(METRIC_LABELS[metric])
        axes[0, col].set_ylim(*_limits(done["acc"], "acc"))
        axes[1, col].set_ylim(*_limits(done["asr"], "asr"))
        axes[0, col].set_title(f"{threat} AT", fontsize=11)
        axes[1, col].set_xlabel(BUDGET_UNITS.get(threat, "budget"))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 4),
        title="attack",
        fontsize=9,
    )
    fig.suptitle(f"{title}: ACC and ASR vs. budget", fontsize=12)
    fig.savefig(path)
    return threats


def _budget_tick(threat: str, budget: float) -> str:
    return "0\n(no AT)" if budget == 0 else format_budget(threat, budget)
