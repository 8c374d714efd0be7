"""Optuna samplers by name: the ``sampler:`` section of a search space.

    sampler: tpe                                   # a name alone
    sampler: {name: tpe, multivariate: true, constant_liar: true}
    sampler: {name: nsga2, population_size: 10}
    sampler: {name: gp}
    sampler: auto                                  # the default: the measured choice below

Each entry of `SAMPLERS` names its Optuna class and the options a space may set, with their
types; an option left out takes Optuna's default. ``auto`` is the sampler that reached the
highest hypervolume per trial in the measurement of BENCHMARKS.md ("Which Optuna sampler"),
rerun with ``python -m benchmarks.samplers``.

Constraints (`bdat_ray.search_space.Constraint`) reach every sampler the same way: the
searcher stores each constraint's violation on the finished trial with Optuna's
``Trial.set_constraint`` (the API that replaced ``constraints_func`` in Optuna 5.0), and
TPE, NSGA-II and GP all read ``FrozenTrial.constraints``; ``study.best_trials`` then holds
feasible trials only.

Pure Python until a sampler is built: Optuna is imported inside `build_sampler`, so
`bdat_ray.search_space` can validate the section without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AUTO = "auto"


@dataclass(frozen=True)
class SamplerKind:
    """One sampler a space can name: its Optuna class and the options it accepts."""

    optuna_class: str
    options: dict[str, type]
    #: Options this project sets unless the space does (documented beside `SAMPLERS`).
    defaults: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, SamplerKind] = {
    # Multi-objective TPE (Ozaki et al., 2022, the MOTPE of Optuna). `group` needs
    # `multivariate`; `constant_liar` keeps trials in flight from being proposed twice.
    "tpe": SamplerKind(
        "TPESampler",
        {"multivariate": bool, "group": bool, "constant_liar": bool, "n_startup_trials": int},
    ),
    # NSGA-II (Deb et al., 2002). Optuna's population of 50 would keep a 40–60-trial sweep
    # in its random first generation; the population is a choice of the space.
    "nsga2": SamplerKind("NSGAIISampler", {"population_size": int}),
    # Gaussian-process BO with log-EHVI for several objectives (Optuna's GPSampler; torch
    # and scipy, both already dependencies).
    "gp": SamplerKind("GPSampler", {"n_startup_trials": int, "deterministic_objective": bool}),
}

#: What ``sampler: auto`` (and a space without a sampler section) runs. Measured (BENCHMARKS.md,
#: 40 trials x 3 seeds on digits): ahead of TPE, NSGA-II and GP after 20 and 30 trials,
#: level with GP after 40, and it models conditional parameters, which GP leaves out.
AUTO_CHOICE: tuple[str, dict[str, Any]] = ("tpe", {"multivariate": True})


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler name (a key of `SAMPLERS`, or ``auto``) and the options the space set."""

    name: str = AUTO
    options: tuple[tuple[str, Any], ...] = ()

    def resolved(self) -> SamplerSpec:
        """``auto`` replaced by the measured choice."""
        if self.name != AUTO:
            return self
        name, options = AUTO_CHOICE
        return SamplerSpec(name, tuple(options.items()))

    def describe(self) -> str:
        spec = self.resolved()
        text = spec.name + "".join(f", {k}={v}" for k, v in spec.options)
        return f"auto ({text})" if self.name == AUTO else text


def parse_sampler(raw: Any) -> SamplerSpec:
    """The ``sampler`` section: a name, or a mapping with ``name`` and options. Raises
    ValueError(key, message) naming the offending key inside the section."""
    if raw is None:
        return SamplerSpec()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, Mapping):
        raise ValueError("", "a sampler name or {name: ..., option: value}")
    name = raw.get("name", AUTO)
    names = (AUTO, *SAMPLERS)
    if name not in names:
        raise ValueError("name", f"unknown sampler {name!r}; one of {', '.join(names)}")
    allowed = {} if name == AUTO else SAMPLERS[name].options
    options = []
    for key, value in raw.items():
        if key == "name":
            continue
        if key not in allowed:
            takes = ", ".join(allowed) or "no options (it is the measured default)"
            raise ValueError(key, f"not an option of {name}; it takes {takes}")
        wanted = allowed[key]
        if type(value) is not wanted or (wanted is int and value < 1):
            shown = "true or false" if wanted is bool else "an integer ≥ 1"
            raise ValueError(key, f"must be {shown}; got {value!r}")
        options.append((key, value))
    spec = SamplerSpec(name, tuple(options))
    chosen = dict(spec.options)
    if chosen.get("group") and not chosen.get("multivariate"):
        raise ValueError("group", "needs multivariate: true (Optuna's rule)")
    return spec


def build_sampler(spec: SamplerSpec, seed: int) -> Any:
    """The Optuna sampler of ``spec``, seeded."""
    import warnings

    import optuna

    spec = spec.resolved()
    kind = SAMPLERS[spec.name]
    options = {**kind.defaults, **dict(spec.options)}
    with warnings.catch_warnings():
        # multivariate/group/constant_liar are "experimental" in Optuna: a warning per
        # option at every start, not a problem.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return getattr(optuna.samplers, kind.optuna_class)(seed=seed, **options)
