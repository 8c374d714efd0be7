"""Pareto fronts and dominated hypervolume of a sweep's trials.

The front is `bdat_ray.search_space.pareto_front`, applied as the sweep applies it: to the
finished trials only, one front per environment group (``group`` column, see
`analysis.load.trial_frame`). Early-stopped and failed trials never enter it.

Hypervolume is measured over the objectives in percent (acc, asr, robust_acc), each against
its worst possible value (0 % for a metric to maximise, 100 % for one to minimise) and
normalised to [0, 1]: with acc ↑ and asr ↓, the reference point is (acc 0 %, asr 100 %), and
1 would be a trial with 100 % clean accuracy and 0 % attack success. Objectives in other units
(seconds, images/s) have no natural worst value and are left out of the hypervolume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd

from bdat_ray.search_space import DEFAULT_OBJECTIVES, PERCENT_METRICS
from bdat_ray.search_space import pareto_front as front_indices

FINISHED = "finished"


def objectives_of(trials: pd.DataFrame, objectives: Mapping[str, str] | None) -> dict[str, str]:
    """The given objectives, else the sweep's (``trials.attrs``), else acc max / asr min."""
    return dict(objectives or trials.attrs.get("objectives") or DEFAULT_OBJECTIVES)


def front_mask(trials: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.Series:
    """True for the finished trials on their group's Pareto front (``trials`` as
    `analysis.load_sweep` returns them: ``outcome`` and ``group`` columns, metric columns)."""
    goals = objectives_of(trials, objectives)
    mask = pd.Series(False, index=trials.index)
    finished = trials[trials["outcome"] == FINISHED]
    for _, members in finished.groupby("group", sort=False):
        rows = members[list(goals)].to_dict("records")
        mask[members.index[front_indices(rows, goals)]] = True
    return mask


def pareto_front(trials: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The Pareto-optimal finished trials, one front per ``group``, ordered as the sweep
    prints them (by group, then best first in the first objective)."""
    goals = objectives_of(trials, objectives)
    first, mode = next(iter(goals.items()))
    front = trials[front_mask(trials, goals)]
    return front.sort_values(["group", first], ascending=[True, mode == "min"])


def dominated_volume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Volume of the region that the points dominate and the reference point bounds, all
    coordinates to be minimised. A point not better than the reference in every coordinate
    adds nothing. Exact (slicing along the last coordinate); O(n² ...) in the number of
    points, plenty for sweeps of hundreds of trials."""
    inside = [tuple(p) for p in points if all(x < r for x, r in zip(p, reference, strict=True))]
    if not inside:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in inside)
    inside.sort(key=lambda p: p[-1])
    volume = 0.0
    for i, point in enumerate(inside):
        upper = inside[i + 1][-1] if i + 1 < len(inside) else reference[-1]
        if upper > point[-1]:  # slab [point, upper) along the last coordinate
            slab = [p[:-1] for p in inside[: i + 1]]
            volume += (upper - point[-1]) * dominated_volume(slab, reference[:-1])
    return volume


def percent_objectives(objectives: Mapping[str, str]) -> dict[str, str]:
    """The objectives the hypervolume is measured over (those in percent)."""
    return {m: mode for m, mode in objectives.items() if m in PERCENT_METRICS}


def reference_text(
    objectives: Mapping[str, str],
    ideal: bool = False,
    reference: Mapping[str, float] | None = None,
) -> str:
    """The reference point, e.g. ``acc = 0 %, asr = 100 %`` (the worst values unless the
    space set ``reference``); or the ideal one."""
    worst = {**default_reference(objectives), **(reference or {})}
    return ", ".join(
        f"{m} = {(100 if mode == 'max' else 0) if ideal else worst[m]:g} %"
        for m, mode in percent_objectives(objectives).items()
    )


def default_reference(objectives: Mapping[str, str]) -> dict[str, float]:
    """The worst possible value of each percent objective: 0 % to maximise, 100 % to
    minimise (a space's ``hypervolume.reference`` may set a tighter one)."""
    goals = percent_objectives(objectives)
    return {m: 0.0 if mode == "max" else 100.0 for m, mode in goals.items()}


def normalised_point(
    row: Mapping[str, float],
    objectives: Mapping[str, str],
    reference: Mapping[str, float] | None = None,
) -> tuple[float, ...] | None:
    """A trial's percent objectives mapped so that 0 is the ideal (100 % to maximise, 0 % to
    minimise) and 1 the reference point (default: the worst value); a coordinate beyond the
    reference is > 1 and the trial then adds no volume. None for a missing or NaN metric."""
    worst = {**default_reference(objectives), **(reference or {})}
    values = []
    for metric, mode in objectives.items():
        value = row.get(metric)
        if value is None or not math.isfinite(value):
            return None
        ideal = 100.0 if mode == "max" else 0.0
        values.append((ideal - value) / (ideal - worst[metric]))
    return tuple(values)


def _badness(row: Mapping[str, float], objectives: Mapping[str, str]) -> tuple[float, ...] | None:
    """A trial's percent objectives mapped to [0, 1], 0 best and 1 the reference (worst)."""
    return normalised_point(row, objectives)


def _goals(trials: pd.DataFrame, objectives: Mapping[str, str] | None) -> dict[str, str]:
    goals = percent_objectives(objectives_of(trials, objectives))
    if not goals:
        raise ValueError(f"no objective in percent ({', '.join(PERCENT_METRICS)})")
    return goals


def hypervolume(trials: pd.DataFrame, objectives: Mapping[str, str] | None = None) -> float:
    """Normalised hypervolume (0..1) that the finished trials dominate in the percent
    objectives, all rows taken as one set (select a group first for a per-group value)."""
    goals = _goals(trials, objectives)
    finished = trials[trials["outcome"] == FINISHED]
    points = [_badness(r, goals) for r in finished[list(goals)].to_dict("records")]
    return dominated_volume([p for p in points if p is not None], [1.0] * len(goals))


def _covers(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True))


def hypervolume_curve(
    trials: pd.DataFrame,
    objectives: Mapping[str, str] | None = None,
    reference: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Hypervolume of each group after each finished trial, in the order the trials finished:
    columns ``finished`` (how many trials of the sweep had finished), ``group``,
    ``hypervolume``; one row per group per step from the group's first finished trial on.
    Each group keeps only its non-dominated points (they alone make the volume), so a long
    sweep costs little more than a short one. ``reference``: the space's reference point
    (`normalised_point`), default the worst values."""
    goals = _goals(trials, objectives)
    done = trials[trials["outcome"] == FINISHED].sort_values("end")
    groups = list(dict.fromkeys(done["group"]))
    fronts: dict[str, list[tuple[float, ...]]] = {g: [] for g in groups}
    volumes = dict.fromkeys(groups, 0.0)
    seen: set[str] = set()
    rows = []
    records = done[list(goals)].to_dict("records")
    for count, (group, row) in enumerate(zip(done["group"], records, strict=True), start=1):
        point = normalised_point(row, goals, reference)
        front = fronts[group]
        if point is not None and not any(_covers(p, point) for p in front):
            fronts[group] = [p for p in front if not _covers(point, p)] + [point]
            volumes[group] = dominated_volume(fronts[group], [1.0] * len(goals))
        seen.add(group)
        rows += [
            {"finished": count, "group": g, "hypervolume": volumes[g]} for g in groups if g in seen
        ]
    return pd.DataFrame(rows, columns=["finished", "group", "hypervolume"])
