"""Search spaces as data: parse, validate and expand ``search_spaces/*.yaml``.

A space file is plain YAML — nothing in it is evaluated. Its sections::

    description: free text shown by --dry-run
    fixed:                       # run-config keys set for every trial (nested or dotted)
      data.name: digits
      train.epochs: 10
    dimensions:                  # swept keys, in order; each takes exactly one kind
      attack.name: {grid: [badnets, blended]}          # every value (Tune grid search)
      at.threat:   {choice: [none, linf, spatial]}     # categorical (Optuna)
      at.eps:      {uniform: ["2/255", "16/255"], when: {at.threat: [linf]}}
      train.lr:    {loguniform: [0.01, 0.2]}           # log-uniform in [low, high]
      at.steps:    {int: [1, 10]}                      # integer in [low, high], inclusive
    objectives: {acc: max, asr: min}   # default; metrics: acc asr robust_acc seconds ...
    num_samples: 24              # Optuna: trials; grid: repeats (train.seed + r)
    max_concurrent: 2            # trials in flight at once (default: grid no limit, Optuna 4)
    fuse: 4                      # up to 4 trials as one network (grid: compatible ones)
    resources: {cpu: 1, gpu: 0.25}   # per trial; fractional GPUs share one device
    early_stopping: {metric: acc, mode: max, grace_period: 2, reduction_factor: 3}  # ASHA
    # early_stopping: {method: mo_asha, grace_period: 3, reduction_factor: 3}  # on objectives
    constraints: {asr: "<= 10"}  # feasible trials only: in the front, Optuna's best_trials
    sampler: {name: tpe, multivariate: true}   # Optuna: tpe | nsga2 | gp | auto (bdat_ray.samplers)
    hypervolume: {reference: {acc: 0, asr: 100}}   # the worst point (default as shown)
    seed: 0                      # Optuna sampler seed
    variants:                    # grid only: a union of sub-grids sharing everything above
      - name: wide               # e.g. one factor changed at a time, as papers' tables do
        fixed: {model.width: 2}  # pins (a pinned key stops being swept in this variant)
      - name: triggers
        dimensions: {attack.name: {grid: [watermark, channel]}}  # adds or replaces dimensions

Values are checked against the run-config schema (`bdat_ray.config.parse_value`), so
fractions like ``"8/255"`` work and bad values fail with the key named. ``when`` makes a
dimension conditional: it is drawn only when every listed key (a fixed key, a key left at its
default, or an *earlier* grid/choice dimension) has one of the listed values; a conditional
dimension may also name a fixed key, whose value it then replaces where it applies. A space
whose dimensions are all ``grid`` runs as Tune's grid search (every combination, no Optuna);
any other kind makes it an Optuna search, and then ``grid`` and ``variants`` may not appear.
Trials that several variants share (typically the baseline) run once.

Everything here is pure Python (no Ray, no MLflow): `load_space` fails with a `ConfigError`
naming the file and the key before anything starts.
"""

from __future__ import annotations

import itertools
import math
import random
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bdat_ray.config import INT64, ConfigError, flatten, from_flat, leaf, parse_value
from bdat_ray.samplers import SamplerSpec, parse_sampler

#: Metrics a trial reports at the end (percent, seconds, images/s); objectives pick from these.
METRICS = (
    "acc",
    "asr",
    "asr_pred",
    "robust_acc",
    "seconds",
    "gpu_seconds",
    "images_per_s",
    "craft_seconds",
)
#: a defense's final metrics (bdat_ray.engine.defense_metrics); absent on undefended runs
DEFENSE_METRICS = (
    "detect_tpr",
    "detect_fpr",
    "detect_precision",
    "removed",
    "clean_fraction",
    "defense_seconds",
)
#: Metrics every epoch reports (percent): what multi-objective early stopping can judge.
EPOCH_METRICS = ("acc", "asr")
PERCENT_METRICS = ("acc", "asr", "robust_acc")
GRID, CHOICE, UNIFORM, LOGUNIFORM, INT = "grid", "choice", "uniform", "loguniform", "int"
KINDS = (GRID, CHOICE, UNIFORM, LOGUNIFORM, INT)
SECTIONS = (
    "description",
    "fixed",
    "dimensions",
    "objectives",
    "num_samples",
    "max_concurrent",
    "fuse",
    "resources",
    "early_stopping",
    "constraints",
    "sampler",
    "hypervolume",
    "seed",
    "variants",
)
VARIANT_SECTIONS = ("name", "fixed", "dimensions")
DEFAULT_OBJECTIVES = {"acc": "max", "asr": "min"}
#: Optuna's TPE learns only from finished trials: too many in flight makes it random search.
DEFAULT_OPTUNA_CONCURRENCY = 4
INT64_MAX = INT64[1]
#: Optuna's samplers seed numpy, which takes 32-bit seeds.
SAMPLER_SEED_MAX = 2**32 - 1
#: Cross-key validation checks at most this many representative trial configs.
VALIDATION_LIMIT = 2000


@dataclass(frozen=True)
class Dimension:
    """One swept key. ``values`` for grid/choice; ``low``/``high`` (inclusive) otherwise.
    ``when``: (key, allowed values) pairs that must all hold for the key to be drawn."""

    key: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float | int | None = None
    high: float | int | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    @property
    def discrete(self) -> bool:
        return self.kind in (GRID, CHOICE)

    def applies(self, lookup: Callable[[str], Any]) -> bool:
        return all(lookup(key) in allowed for key, allowed in self.when)

    def representatives(self) -> tuple[Any, ...]:
        """Values that stand for the dimension in validation: all of them, or both bounds."""
        return self.values if self.discrete else (self.low, self.high)

    def describe(self) -> str:
        values = self.values if self.discrete else (self.low, self.high)
        body = f"{self.kind} [{', '.join(map(show_value, values))}]"
        if self.when:
            body += "  when " + ", ".join(
                f"{k} in [{', '.join(map(show_value, v))}]" for k, v in self.when
            )
        return body


def show_value(value: Any) -> str:
    """A value for people: floats to 4 significant digits, or as ``k/255`` where that is the
    exact value and 4 digits are not (pixel budgets such as 16/255)."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:.4g}"
    grey_levels = value * 255
    if float(short) != value and abs(grey_levels - round(grey_levels)) < 1e-9:
        return f"{round(grey_levels)}/255"
    return short


@dataclass(frozen=True)
class EarlyStopping:
    """ASHA on one metric. Trials it stops never enter the Pareto front (they lack ``final``)."""

    metric: str = "acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: float = 3.0


@dataclass(frozen=True)
class MultiObjectiveEarlyStopping:
    """MO-ASHA (Schmucker et al., 2021) on the space's objectives: at each rung
    (``grace_period`` × ``reduction_factor``^k epochs) a trial goes on if it is on the
    non-dominated front of the rung's results so far or in their top 1/``reduction_factor``
    (`mo_rung_keeps`); otherwise it stops, and never enters a front. Defaults grace 3, factor
    3: the cheapest rule measured within 2 % of the full sweep's hypervolume (BENCHMARKS.md:
    64 % of the trial-epochs); earlier rungs judge ASR before the backdoor is learned."""

    grace_period: int = 3
    reduction_factor: float = 3.0
    method: str = "mo_asha"


CONSTRAINT_OPS = ("<=", ">=")


@dataclass(frozen=True)
class Constraint:
    """``metric <= bound`` or ``metric >= bound`` on a trial's final result, in the metric's
    unit (percent for acc/asr/robust_acc, seconds, images/s)."""

    metric: str
    op: str
    bound: float

    def violation(self, value: float | None) -> float:
        """Optuna's convention: ≤ 0 when the constraint holds, else by how much it misses
        (metric units). A missing or NaN value misses by infinity."""
        if value is None or not math.isfinite(value):
            return math.inf
        return value - self.bound if self.op == "<=" else self.bound - value

    def describe(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def feasible(row: Mapping[str, Any], constraints: Sequence[Constraint]) -> bool:
    """The one feasibility rule (sweep table, Optuna, report): every constraint holds on the
    row's metrics; a row missing a constrained metric is infeasible."""
    return all(c.violation(row.get(c.metric)) <= 0 for c in constraints)


def describe_constraints(constraints: Sequence[Constraint]) -> str:
    return ", ".join(c.describe() for c in constraints)


@dataclass(frozen=True)
class Variant:
    """A sub-grid: the space's settings with ``fixed`` pinned and ``dimensions`` added (a
    dimension of the same key as one of the space's replaces it)."""

    name: str
    fixed: dict[str, Any] = field(default_factory=dict)
    dimensions: tuple[Dimension, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    path: str
    description: str = ""
    fixed: dict[str, Any] = field(default_factory=dict)
    dimensions: tuple[Dimension, ...] = ()
    objectives: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_OBJECTIVES))
    num_samples: int | None = None
    max_concurrent: int | None = None
    #: Trials trained as one fused network (`bdat_ray.fused`), at most this many per Ray
    #: trial (grid: compatible trials; Optuna: points asked together); 1: each on its own.
    fuse: int = 1
    cpus: float = 1.0
    gpus: float = 0.0
    early_stopping: EarlyStopping | MultiObjectiveEarlyStopping | None = None
    constraints: tuple[Constraint, ...] = ()
    sampler: SamplerSpec | None = None  # None: the default (`search_sampler`)
    #: The hypervolume's reference (worst) point per percent objective; unset ones take
    #: the worst value (0 % to maximise, 100 % to minimise).
    hypervolume_reference: dict[str, float] = field(default_factory=dict)
    seed: int = 0
    variants: tuple[Variant, ...] = ()
    overrides: dict[str, Any] = field(default_factory=dict)  # KEY=VALUE pins from the CLI

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def mode(self) -> str:
        """``grid`` (Tune grid search, no Optuna) or ``optuna``."""
        kinds = {d.kind for branch in self.branches() for d in branch.dimensions}
        return GRID if kinds <= {GRID} else "optuna"

    def branches(self) -> list[SearchSpace]:
        """The spaces trials are drawn from: this one, or one per variant."""
        return [self.branch(v) for v in self.variants] if self.variants else [self]

    def branch(self, variant: Variant) -> SearchSpace:
        added = {d.key: d for d in variant.dimensions}
        kept = [d for d in self.dimensions if d.key not in variant.fixed and d.key not in added]
        return replace(
            self,
            fixed={**self.fixed, **variant.fixed},
            dimensions=(*kept, *variant.dimensions),
            variants=(),
        )

    @property
    def search_sampler(self) -> SamplerSpec:
        """The Optuna sampler to run: the space's, else ``auto``."""
        return self.sampler or SamplerSpec()

    @property
    def samples(self) -> int:
        return self.num_samples or 1

    @property
    def concurrency(self) -> int | None:
        if self.max_concurrent is not None:
            return self.max_concurrent
        return None if self.mode == GRID else DEFAULT_OPTUNA_CONCURRENCY

    def value(self, key: str, point: Mapping[str, Any] | None = None) -> Any:
        """A key's value for a trial: the point's, else fixed, else the schema default."""
        if point is not None and key in point:
            return point[key]
        return self.fixed[key] if key in self.fixed else leaf(key).default

    def grid_points(self) -> list[dict[str, Any]]:
        """Every trial of a grid space as flat overrides (fixed keys included). With
        ``num_samples`` r > 1 each combination runs r times with ``train.seed`` + 0..r-1.
        A trial that several variants produce is listed once."""
        points: dict[str, dict[str, Any]] = {}
        for branch in self.branches():
            combos = list(_expand(branch, lambda d: d.values))
            base_seed = branch.value("train.seed")
            for repeat in range(self.samples):
                for combo in combos:
                    seed = {"train.seed": base_seed + repeat} if self.samples > 1 else {}
                    point = {**branch.fixed, **combo, **seed}
                    points.setdefault(repr(sorted(point.items())), point)
        return list(points.values())

    @property
    def trial_count(self) -> int:
        return len(self.grid_points()) if self.mode == GRID else self.samples

    def with_settings(
        self,
        *,
        num_samples: int | None = None,
        max_concurrent: int | None = None,
        cpus: float | None = None,
        gpus: float | None = None,
        fuse: int | None = None,
    ) -> SearchSpace:
        """A copy with command-line settings applied (None keeps the file's value)."""
        changes: dict[str, Any] = {}
        if fuse is not None:
            changes["fuse"] = _positive_int("--fuse", fuse)
        if num_samples is not None:
            changes["num_samples"] = _positive_int("--num-samples", num_samples)
        if max_concurrent is not None:
            changes["max_concurrent"] = _positive_int("--max-concurrent", max_concurrent)
        if cpus is not None:
            changes["cpus"] = _resource("--cpus-per-trial", cpus, allow_zero=False)
        if gpus is not None:
            changes["gpus"] = _resource("--gpus-per-trial", gpus, allow_zero=True)
        space = replace(self, **changes)
        _check_settings(space, self.path)
        return space

    def with_overrides(self, overrides: Mapping[str, Any]) -> SearchSpace:
        """Pin keys from ``KEY=VALUE`` arguments: a pinned dimension stops being swept, and
        ``when`` conditions on it read the pinned value. Re-validates the space."""
        pinned = {key: parse_value(key, raw) for key, raw in overrides.items()}

        def unpinned(dims: tuple[Dimension, ...]) -> tuple[Dimension, ...]:
            return tuple(d for d in dims if d.key not in pinned)

        space = replace(
            self,
            fixed={**self.fixed, **pinned},
            dimensions=unpinned(self.dimensions),
            variants=tuple(
                replace(v, fixed={**v.fixed, **pinned}, dimensions=unpinned(v.dimensions))
                for v in self.variants
            ),
            overrides={**self.overrides, **pinned},
        )
        _check_settings(space, self.path)
        _check_configs(space)
        return space


# ---------------------------------------------------------------------------------------------
# Expansion: grid points, validation corners and Optuna's define-by-run share one walk.


def _expand(
    space: SearchSpace, values_of: Callable[[Dimension], Sequence[Any]]
) -> Iterator[dict[str, Any]]:
    """Depth-first over the dimensions in file order; a dimension whose ``when`` fails for
    the values chosen so far is skipped in that branch."""

    def walk(index: int, point: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if index == len(space.dimensions):
            yield dict(point)
            return
        dim = space.dimensions[index]
        if not dim.applies(lambda key: space.value(key, point)):
            yield from walk(index + 1, point)
            return
        for value in values_of(dim):
            point[dim.key] = value
            yield from walk(index + 1, point)
            del point[dim.key]

    yield from walk(0, {})


@dataclass(frozen=True)
class OptunaSpace:
    """Optuna's define-by-run function for a sampled space: suggests each dimension whose
    ``when`` holds (conditional parameters stay out of the study where they do not apply)
    and returns the fixed keys as constants. A module-level class, so Ray can pickle it."""

    space: SearchSpace

    def __call__(self, trial: Any) -> dict[str, Any]:
        drawn: dict[str, Any] = {}
        for dim in self.space.dimensions:
            if not dim.applies(lambda key: self.space.value(key, drawn)):
                continue
            if dim.kind == CHOICE:
                drawn[dim.key] = trial.suggest_categorical(dim.key, list(dim.values))
            elif dim.kind == INT:
                drawn[dim.key] = trial.suggest_int(dim.key, dim.low, dim.high)
            else:
                drawn[dim.key] = trial.suggest_float(
                    dim.key, dim.low, dim.high, log=dim.kind == LOGUNIFORM
                )
        # Ray merges these constants over the suggestions: leave out what was drawn.
        return {k: v for k, v in self.space.fixed.items() if k not in drawn}


# ---------------------------------------------------------------------------------------------
# Loading and validation.


def load_space(path: str | Path) -> SearchSpace:
    """Parse and validate a space file; raises `ConfigError` naming the file and the key."""
    from bdat_ray.safe_yaml import read_yaml

    where = str(path)
    content = read_yaml(path, "--space")
    if not isinstance(content, Mapping):
        raise ConfigError(where, "a search space is a mapping of sections: " + ", ".join(SECTIONS))
    unknown = [k for k in content if k not in SECTIONS]
    if unknown:
        raise ConfigError(
            f"{where}: {unknown[0]}", f"unknown section; allowed: {', '.join(SECTIONS)}"
        )
    space = SearchSpace(
        path=where,
        description=_parse_description(where, content.get("description")),
        fixed=_parse_fixed(where, content.get("fixed") or {}),
        objectives=_parse_objectives(where, content.get("objectives", DEFAULT_OBJECTIVES)),
        num_samples=_optional_int(where, "num_samples", content.get("num_samples")),
        max_concurrent=_optional_int(where, "max_concurrent", content.get("max_concurrent")),
        fuse=_optional_int(where, "fuse", content.get("fuse")) or 1,
        early_stopping=_parse_early_stopping(where, content.get("early_stopping")),
        **_parse_search_sections(where, content),
        seed=_optional_int(where, "seed", content.get("seed"), minimum=0, maximum=SAMPLER_SEED_MAX)
        or 0,
        **_parse_resources(where, content.get("resources") or {}),
    )
    dims = _parse_dimensions(where, "dimensions", space.fixed, content.get("dimensions"), [])
    space = replace(space, dimensions=dims)
    space = replace(space, variants=_parse_variants(where, space, content.get("variants")))
    _check_settings(space, where)
    _check_configs(space)
    return space


def _parse_description(where: str, raw: Any) -> str:
    if raw is not None and not isinstance(raw, str):
        raise ConfigError(f"{where}: description", f"must be text; got {type(raw).__name__}")
    return (raw or "").strip()


def _parse_fixed(where: str, raw: Any, section: str = "fixed") -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: {section}", "must map run-config keys to values")
    return {
        key: _checked(where, f"{section}.{key}", key, value) for key, value in flatten(raw).items()
    }


def _checked(where: str, path: str, key: str, raw: Any) -> Any:
    """``parse_value`` with the error re-addressed to the file and the place in it."""
    try:
        return parse_value(key, raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {path}", err.message) from None


def _known(where: str, path: str, key: str) -> None:
    try:
        leaf(key)
    except ConfigError as err:
        raise ConfigError(f"{where}: {path}", err.message) from None


def _parse_dimensions(
    where: str, section: str, fixed: dict[str, Any], raw: Any, earlier: list[Dimension]
) -> tuple[Dimension, ...]:
    """Parse a ``dimensions`` mapping. ``earlier``: dimensions declared before it (a
    variant's come after the space's), which ``when`` may name."""
    if raw is None:
        return ()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: {section}", "must map run-config keys to {kind: values}")
    dims: list[Dimension] = []
    for key, spec in raw.items():
        path = f"{section}.{key}"
        _known(where, path, key)
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where}: {path}", f"must be a mapping with one of {', '.join(KINDS)}"
            )
        if key in fixed and "when" not in spec:
            raise ConfigError(
                f"{where}: {path}",
                "is also set in fixed; only a conditional dimension (with when) may replace "
                "a fixed value",
            )
        extra = [k for k in spec if k not in (*KINDS, "when")]
        kinds = [k for k in spec if k in KINDS]
        if extra or len(kinds) != 1:
            got = extra[0] if extra else ", ".join(kinds) or "nothing"
            raise ConfigError(
                f"{where}: {path}",
                f"takes exactly one of {', '.join(KINDS)} (plus optional when); got {got}",
            )
        dim = _parse_values(where, path, key, kinds[0], spec[kinds[0]])
        before = [*earlier, *dims]
        when = _parse_when(where, f"{path}.when", spec.get("when"), set(raw), before)
        dims.append(replace(dim, when=when))
    return tuple(dims)


def _parse_variants(where: str, space: SearchSpace, raw: Any) -> tuple[Variant, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: variants", "must be a non-empty list of sub-grids")
    variants: list[Variant] = []
    for i, item in enumerate(raw):
        at = f"variants[{i}]"
        if not isinstance(item, Mapping) or any(k not in VARIANT_SECTIONS for k in item):
            raise ConfigError(f"{where}: {at}", f"takes {', '.join(VARIANT_SECTIONS)}")
        name = str(item.get("name") or "")
        if not name or name in {v.name for v in variants}:
            raise ConfigError(f"{where}: {at}.name", f"needs a unique name; got {name!r}")
        fixed = _parse_fixed(where, item.get("fixed") or {}, f"{at}.fixed")
        kept = [d for d in space.dimensions if d.key not in fixed]
        raw_dims = item.get("dimensions")
        replaced = set(raw_dims) if isinstance(raw_dims, Mapping) else set()
        earlier = [d for d in kept if d.key not in replaced]
        dims = _parse_dimensions(where, f"{at}.dimensions", fixed, raw_dims, earlier)
        variant = Variant(name, fixed, dims)
        _check_order(where, at, space.branch(variant).dimensions)
        variants.append(variant)
    return tuple(variants)


def _check_order(where: str, at: str, dims: tuple[Dimension, ...]) -> None:
    """A ``when`` must name dimensions drawn before it; a variant moves the dimensions it
    replaces to its end, which may break that for dimensions of the space depending on them."""
    seen: set[str] = set()
    swept = {d.key for d in dims}
    for dim in dims:
        late = [k for k, _ in dim.when if k in swept and k not in seen]
        if late:
            raise ConfigError(
                f"{where}: {at}.dimensions.{late[0]}",
                f"{dim.key} depends on it (when) but it is now drawn after {dim.key}; "
                f"replace {dim.key} in this variant too",
            )
        seen.add(dim.key)


def _base_type(key: str) -> type:
    tp = leaf(key).type
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def _parse_values(where: str, path: str, key: str, kind: str, raw: Any) -> Dimension:
    at = f"{where}: {path}.{kind}"
    ranged = kind in (UNIFORM, LOGUNIFORM, INT)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(at, "must be [low, high]" if ranged else "must be a non-empty list")
    if not ranged:
        values = tuple(_checked(where, f"{path}.{kind}", key, v) for v in raw)
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(at, "lists a value twice")
        return Dimension(key, kind, values=values)
    base, wanted = _base_type(key), (int if kind == INT else float)
    if base is not wanted:
        hint = {int: "int", float: "uniform or loguniform"}.get(base, "grid or choice")
        raise ConfigError(at, f"{key} takes {base.__name__} values; use {hint}")
    if len(raw) != 2:
        raise ConfigError(at, f"must be [low, high]; got {raw!r}")
    low, high = (_checked(where, f"{path}.{kind}", key, v) for v in raw)
    if low is None or high is None or not low < high:
        raise ConfigError(at, f"needs low < high; got {raw!r}")
    if kind == LOGUNIFORM and low <= 0:
        raise ConfigError(at, f"needs low > 0; got {raw!r}")
    return Dimension(key, kind, low=low, high=high)


def _parse_when(
    where: str, path: str, raw: Any, all_keys: set[str], earlier: list[Dimension]
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: {path}", "must map keys to the values that enable it")
    before = {d.key: d for d in earlier}
    conditions = []
    for key, allowed_raw in raw.items():
        at = f"{where}: {path}.{key}"
        _known(where, f"{path}.{key}", key)
        if key in all_keys and key not in before:
            raise ConfigError(at, "conditions may name fixed keys or dimensions declared earlier")
        allowed_list = allowed_raw if isinstance(allowed_raw, list) else [allowed_raw]
        allowed = tuple(_checked(where, f"{path}.{key}", key, v) for v in allowed_list)
        if key in before:
            cond = before[key]
            if not cond.discrete:
                raise ConfigError(at, "conditions must name a grid or choice dimension")
            never = [v for v in allowed if v not in cond.values]
            if never:
                taken = ", ".join(map(str, cond.values))
                raise ConfigError(at, f"{never[0]!r} is never drawn; {key} takes {taken}")
        conditions.append((key, allowed))
    return tuple(conditions)


def _parse_objectives(where: str, raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: objectives", "must map metrics to max or min")
    for metric, mode in raw.items():
        if metric not in METRICS:
            raise ConfigError(
                f"{where}: objectives.{metric}", f"unknown metric; one of {', '.join(METRICS)}"
            )
        if mode not in ("max", "min"):
            raise ConfigError(f"{where}: objectives.{metric}", f"must be max or min; got {mode!r}")
    return dict(raw)


def _parse_early_stopping(where: str, raw: Any) -> EarlyStopping | None:
    if raw is None:
        return None
    at = f"{where}: early_stopping"
    allowed = ("metric", "mode", "grace_period", "reduction_factor")
    if isinstance(raw, Mapping) and raw.get("method", "asha") != "asha":
        return _parse_mo_early_stopping(at, raw)
    if not isinstance(raw, Mapping) or any(k not in (*allowed, "method") for k in raw):
        raise ConfigError(at, f"takes method, {', '.join(allowed)}")
    rule = EarlyStopping(**{k: v for k, v in raw.items() if k != "method"})
    if rule.metric not in METRICS or rule.mode not in ("max", "min"):
        raise ConfigError(at, f"metric is one of {', '.join(METRICS)} and mode max or min")
    _check_rungs(at, rule)
    return rule


def _check_rungs(at: str, rule: EarlyStopping | MultiObjectiveEarlyStopping) -> None:
    grace = rule.grace_period
    if isinstance(grace, bool) or not isinstance(grace, int) or not 1 <= grace <= INT64_MAX:
        raise ConfigError(f"{at}.grace_period", "must be an integer ≥ 1 (epochs)")
    factor = rule.reduction_factor
    if isinstance(factor, bool) or not isinstance(factor, int | float) or not 1 < factor < math.inf:
        raise ConfigError(f"{at}.reduction_factor", "must be a number > 1")


# ---------------------------------------------------------------------------------------------
# What to search for and how: multi-objective early stopping, constraints, the sampler, the
# hypervolume's reference point.

EARLY_STOPPING_METHODS = ("asha", "mo_asha")


def _parse_mo_early_stopping(at: str, raw: Mapping[str, Any]) -> MultiObjectiveEarlyStopping:
    method = raw.get("method")
    if method not in EARLY_STOPPING_METHODS:
        raise ConfigError(
            f"{at}.method", f"unknown method {method!r}; one of {', '.join(EARLY_STOPPING_METHODS)}"
        )
    allowed = ("method", "grace_period", "reduction_factor")
    extra = [k for k in raw if k not in allowed]
    if extra:
        hint = " (mo_asha judges the space's objectives)" if extra[0] in ("metric", "mode") else ""
        raise ConfigError(f"{at}.{extra[0]}", f"mo_asha takes {', '.join(allowed)}{hint}")
    rule = MultiObjectiveEarlyStopping(**{k: v for k, v in raw.items() if k != "method"})
    _check_rungs(at, rule)
    return rule


def _parse_search_sections(where: str, content: Mapping[str, Any]) -> dict[str, Any]:
    """The ``constraints``, ``sampler`` and ``hypervolume`` sections as `SearchSpace`
    fields; checked against the objectives and the early-stopping rule."""
    objectives = _parse_objectives(where, content.get("objectives", DEFAULT_OBJECTIVES))
    rule = content.get("early_stopping")
    if isinstance(rule, Mapping) and rule.get("method") == "mo_asha":
        per_epoch_not = [m for m in objectives if m not in EPOCH_METRICS]
        if per_epoch_not:
            raise ConfigError(
                f"{where}: early_stopping.method",
                f"mo_asha judges the objectives at every epoch, but {per_epoch_not[0]} is "
                f"measured only at the end; epoch metrics: {', '.join(EPOCH_METRICS)}",
            )
    try:
        raw = content.get("sampler")
        sampler = None if raw is None else parse_sampler(raw)
    except ValueError as err:
        key, message = err.args
        raise ConfigError(f"{where}: sampler" + (f".{key}" if key else ""), message) from None
    return {
        "constraints": _parse_constraints(where, content.get("constraints")),
        "sampler": sampler,
        "hypervolume_reference": _parse_hypervolume(where, content.get("hypervolume"), objectives),
    }


def parse_constraint(metric: str, text: Any) -> Constraint:
    """``"<= 10"`` or ``">= 90"`` (a comparison and a number; nothing is evaluated) for a
    metric of `METRICS`. Raises ValueError with the reason."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric; one of {', '.join(METRICS)}")
    body = str(text).strip()
    op = next((o for o in CONSTRAINT_OPS if body.startswith(o)), None)
    try:
        bound = float(body[len(op) :]) if op else math.nan
    except ValueError:
        bound = math.nan
    if op is None or not math.isfinite(bound):
        raise ValueError(f'must be "<= NUMBER" or ">= NUMBER" (quoted); got {text!r}')
    return Constraint(metric, op, bound)


def _parse_constraints(where: str, raw: Any) -> tuple[Constraint, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{where}: constraints", 'must map metrics to "<= N" or ">= N"')
    constraints = []
    for metric, text in raw.items():
        try:
            constraints.append(parse_constraint(metric, text))
        except ValueError as err:
            raise ConfigError(f"{where}: constraints.{metric}", str(err)) from None
    return tuple(constraints)


def _parse_hypervolume(where: str, raw: Any, objectives: Mapping[str, str]) -> dict[str, float]:
    if raw is None:
        return {}
    at = f"{where}: hypervolume"
    if not isinstance(raw, Mapping) or set(raw) != {"reference"}:
        raise ConfigError(at, "takes reference: {OBJECTIVE: worst value, ...}")
    reference = raw["reference"]
    if not isinstance(reference, Mapping):
        raise ConfigError(f"{at}.reference", "must map objectives to numbers (percent)")
    percent = [m for m in objectives if m in PERCENT_METRICS]
    point = {}
    for metric, value in reference.items():
        key = f"{at}.reference.{metric}"
        if metric not in percent:
            raise ConfigError(key, f"not an objective in percent; one of {', '.join(percent)}")
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ideal = 100 if objectives[metric] == "max" else 0
        if not ok or not 0 <= value <= 100 or value == ideal:
            raise ConfigError(
                key, f"must be a percentage other than the ideal {ideal}; got {value!r}"
            )
        point[metric] = float(value)
    return point


def _parse_resources(where: str, raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping) or any(k not in ("cpu", "gpu") for k in raw):
        raise ConfigError(f"{where}: resources", "takes cpu and gpu (per trial)")
    return {
        "cpus": _resource(f"{where}: resources.cpu", raw.get("cpu", 1), allow_zero=False),
        "gpus": _resource(f"{where}: resources.gpu", raw.get("gpu", 0), allow_zero=True),
    }


def _resource(key: str, value: Any, *, allow_zero: bool) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be a number {'≥' if allow_zero else '>'} 0; got {value!r}")
    if value > 1 and value != int(value):
        raise ConfigError(key, f"above 1 must be a whole number (Ray's rule); got {value!r}")
    return float(value)


def _optional_int(
    where: str, key: str, value: Any, minimum: int = 1, maximum: int | None = None
) -> int | None:
    if value is None:
        return None
    maximum = MAX_TRIALS if maximum is None else maximum
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ConfigError(
            f"{where}: {key}", f"must be an integer ≥ {minimum} and ≤ {maximum}; got {value!r}"
        )
    return value


def _positive_int(key: str, value: int) -> int:
    if not 1 <= value <= MAX_TRIALS:
        raise ConfigError(key, f"must be ≥ 1 and ≤ {MAX_TRIALS}; got {value}")
    return value


#: Trials one sweep may plan: beyond it, listing the grid alone exhausts memory.
MAX_TRIALS = 100_000


def _check_size(space: SearchSpace, where: str) -> None:
    """Refuse a space whose grid (or ``num_samples``) is larger than `MAX_TRIALS` before
    anything expands it: the product of the grid sizes bounds the number of grid points."""
    if space.samples > MAX_TRIALS:
        raise ConfigError(f"{where}: num_samples", f"must be ≤ {MAX_TRIALS}; got {space.samples}")
    if space.mode != GRID:
        return
    bound = space.samples * sum(
        math.prod(len(d.values) for d in branch.dimensions) for branch in space.branches()
    )
    if bound > MAX_TRIALS:
        raise ConfigError(
            f"{where}: dimensions",
            f"the grid has up to {bound} trials; at most {MAX_TRIALS} (sample it with Optuna)",
        )


def _check_settings(space: SearchSpace, where: str) -> None:
    _check_size(space, where)
    if space.fuse > 1 and space.early_stopping is not None:
        raise ConfigError(
            f"{where}: fuse",
            "a scheduler stops whole Ray trials, and a fused trial's members would stop "
            "together; drop early_stopping or use fuse: 1",
        )
    for branch in space.branches():
        kinds = {d.kind for d in branch.dimensions}
        if GRID in kinds and kinds != {GRID}:
            key = next(d.key for d in branch.dimensions if d.kind == GRID)
            raise ConfigError(
                f"{where}: dimensions.{key}",
                "grid cannot be mixed with sampled dimensions (Optuna); use choice",
            )
        if (
            space.mode == GRID
            and space.samples > 1
            and "train.seed" in {d.key for d in branch.dimensions}
        ):
            raise ConfigError(
                f"{where}: num_samples",
                "grid repeats vary train.seed, which is already a dimension; use num_samples: 1",
            )
        if "robust_acc" in space.objectives and branch.value("eval.robust_samples") == 0:
            raise ConfigError(
                f"{where}: objectives.robust_acc", "needs eval.robust_samples > 0 (it is 0)"
            )
        if "robust_acc" in {c.metric for c in space.constraints} and (
            branch.value("eval.robust_samples") == 0
        ):
            raise ConfigError(
                f"{where}: constraints.robust_acc", "needs eval.robust_samples > 0 (it is 0)"
            )
    if space.sampler is not None and space.mode == GRID:
        raise ConfigError(
            f"{where}: sampler", "is for sampled (Optuna) spaces; a grid space runs every trial"
        )
    if space.variants and space.mode != GRID:
        raise ConfigError(f"{where}: variants", "are for grid spaces; Optuna samples one space")
    if space.mode == "optuna" and space.num_samples is None:
        raise ConfigError(f"{where}: num_samples", "a sampled (Optuna) space needs num_samples")


def _check_configs(space: SearchSpace) -> None:
    """Cross-key validation (`from_flat`) of representative trial configs: every grid point,
    or for sampled spaces every combination of choices with each range at both bounds. Spaces
    with more than `VALIDATION_LIMIT` combinations are checked on a fixed-seed sample of them
    (of the first 50 000 in file order); every single value was already checked on parsing."""
    check_points(space, from_flat)


def representative_points(space: SearchSpace) -> Iterator[tuple[SearchSpace, dict[str, Any]]]:
    """(branch, swept values) of the trial configs that stand for the space in validation:
    every grid point, or every combination of choices with each range at both bounds; a
    fixed-seed sample of `VALIDATION_LIMIT` of them (of the first 50 000) when there are more."""
    for branch in space.branches():
        combos = list(itertools.islice(_expand(branch, Dimension.representatives), 50_000))
        if len(combos) > VALIDATION_LIMIT:
            combos = random.Random(0).sample(combos, VALIDATION_LIMIT)
        for combo in combos:
            yield branch, combo


def check_points(space: SearchSpace, check: Callable[[dict[str, Any]], Any]) -> None:
    """Run ``check(flat config)`` on every representative trial; a `ConfigError` comes back
    naming the file, the key and the trial it was found in."""
    for branch, combo in representative_points(space):
        try:
            check({**branch.fixed, **combo})
        except ConfigError as err:
            pins = {k: v for k, v in branch.fixed.items() if k not in space.fixed}
            trial = ", ".join(f"{k}={show_value(v)}" for k, v in {**pins, **combo}.items())
            raise ConfigError(
                f"{space.path}: {err.key}", f"{err.message} (for {trial or 'fixed keys'})"
            ) from None


# ---------------------------------------------------------------------------------------------
# Pareto front, drawn per environment group.

#: Keys that describe the attacker's data rather than a defence choice: the Pareto front is
#: drawn separately for each of their combinations (no defence can choose the attack).
ENVIRONMENT_PREFIXES = ("attack.", "data.")


def varying_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Keys whose value differs between some of the configs (missing counts as a value)."""
    keys = dict.fromkeys(k for c in configs for k in c)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def environment_keys(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """The ``attack.*``/``data.*`` keys that vary between a sweep's trial configs: one
    Pareto front per combination of their values. The sweep records them on its parent run
    (tag ``bdat_ray.environment_keys``) so that the analysis groups exactly as it did."""
    return [k for k in varying_keys(configs) if k.startswith(ENVIRONMENT_PREFIXES)]


def environment_group(flat: Mapping[str, Any], keys: Sequence[str]) -> str:
    """The group name of one trial, e.g. ``attack.name=badnets``; empty with no keys."""
    return ", ".join(f"{k}={flat.get(k)}" for k in keys)


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> list[int]:
    """Indices of the rows no other row dominates (at least as good in every objective and
    better in one). Rows missing an objective or holding NaN never enter the front."""

    def score(row: Mapping[str, Any]) -> tuple[float, ...] | None:
        values = []
        for metric, mode in objectives.items():
            value = row.get(metric)
            if value is None or not math.isfinite(value):
                return None
            values.append(value if mode == "max" else -value)
        return tuple(values)

    scores = [score(r) for r in rows]
    front = []
    for i, a in enumerate(scores):
        if a is None:
            continue
        dominated = any(
            b is not None and all(x >= y for x, y in zip(b, a, strict=True)) and b != a
            for b in scores
        )
        if not dominated:
            front.append(i)
    return front


def nondominated_fronts(
    rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]
) -> list[list[int]]:
    """Non-dominated sorting (Deb et al., 2002, NSGA-II): front 0 is `pareto_front` of the
    rows, front 1 that of the rest, and so on. Rows missing an objective are in no front."""
    remaining = list(range(len(rows)))
    fronts: list[list[int]] = []
    while remaining:
        front = [remaining[i] for i in pareto_front([rows[j] for j in remaining], objectives)]
        if not front:
            break
        fronts.append(front)
        taken = set(front)
        remaining = [i for i in remaining if i not in taken]
    return fronts


def crowding_distances(
    rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]
) -> list[float]:
    """NSGA-II's crowding distance of each row within ``rows`` (one front): per objective, the
    gap between its two neighbours over the objective's range, summed; the extremes of each
    objective get infinity (Deb et al., 2002, Sec. III-B)."""
    distances = [0.0] * len(rows)
    for metric in objectives:
        order = sorted(range(len(rows)), key=lambda i: rows[i][metric])
        low, high = rows[order[0]][metric], rows[order[-1]][metric]
        distances[order[0]] = distances[order[-1]] = math.inf
        if high == low:
            continue
        for before, here, after in zip(order, order[1:], order[2:], strict=False):
            distances[here] += (rows[after][metric] - rows[before][metric]) / (high - low)
    return distances


def mo_rung_keeps(
    results: Sequence[Mapping[str, Any]], objectives: Mapping[str, str], reduction_factor: float
) -> bool:
    """MO-ASHA's decision for the trial whose result arrived last in ``results`` (the rung's
    results so far, in arrival order): go on, or stop?

    The results are ranked by non-dominated sorting, and inside a front by crowding distance
    (largest first; NSGA-II's tie-break, one of the two the MO-ASHA paper offers — Schmucker
    et al., 2021, Sec. 3). As asynchronous successive halving decides at arrival, the trial
    goes on if at most a 1/``reduction_factor`` share of the results rank strictly ahead of
    it (syne-tune's ``moasha.py`` rule: ``rank / n <= 1 / reduction_factor``) — and always if
    it is on the rung's non-dominated front: nothing seen so far dominates it, so stopping it
    could cut a point of the final front (a deviation from the paper, which may stop trials
    of a front larger than the kept share). A result missing an objective stops."""
    new = len(results) - 1
    fronts = nondominated_fronts(results, objectives)
    mine = next((front for front in fronts if new in front), None)
    if mine is None:
        return False
    if mine is fronts[0]:
        return True
    distances = crowding_distances([results[i] for i in mine], objectives)
    crowding = dict(zip(mine, distances, strict=True))
    ahead = sum(len(front) for front in fronts[: fronts.index(mine)])
    ahead += sum(crowding[i] > crowding[new] for i in mine)
    return ahead / len(results) <= 1 / reduction_factor


# ---------------------------------------------------------------------------------------------
# Describing a trial for people (progress lines, the Pareto table).

#: Threats whose budget is in pixel units: shown as k/255 when that is exact.
PIXEL_BUDGETS = ("linf", "l2", "noise")


def format_budget(threat: str, eps: float | None) -> str:
    if eps is None:
        return "default"
    grey_levels = eps * 255
    if threat in PIXEL_BUDGETS and abs(grey_levels - round(grey_levels)) < 1e-6:
        return f"{round(grey_levels)}/255"
    return f"{eps:.3g}"


def describe_trial(flat: Mapping[str, Any]) -> dict[str, str]:
    """``attack``, ``threat``, ``budgets`` and ``defense`` of a trial's overrides, e.g.
    ``badnets``, ``cat``, ``linf 2/255 ×0.50 + spatial 0.025 ×0.50`` (budgets as the run
    resolves them), ``none``."""
    from bdat_ray.config import at_components

    cfg = from_flat(flat)
    components = at_components(cfg.at)
    if not components:
        budgets = "-"
    elif len(components) == 1:
        budgets = format_budget(components[0].threat, components[0].eps)
    else:
        budgets = " + ".join(
            f"{c.threat} {format_budget(c.threat, c.eps)} ×{c.weight:.2f}" for c in components
        )
    threat = cfg.at.threat
    if threat == "composite":
        threat = f"composite/{cfg.at.mix}"
    attack = cfg.attack.name
    if attack != "none" and cfg.attack.label_mode == "clean":
        attack += " (clean-label)"
    return {"attack": attack, "threat": threat, "budgets": budgets, "defense": cfg.defense.name}
