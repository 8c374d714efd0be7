"""Read one sweep back from MLflow: its parent run and one table row per trial.

The layout read here is the one `bdat_ray.tracking` writes (README.md, "What a sweep
records"): an experiment per sweep name, a parent run tagged ``bdat_ray.role=sweep`` per
sweep, a child run tagged ``bdat_ray.role=trial`` per Ray trial with the flattened run
config as params and the final metrics at the last step. Nothing is recomputed from checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bdat_ray.config import ConfigError, at_components, from_flat, leaf, leaf_keys, parse_value
from bdat_ray.search_space import (
    DEFAULT_OBJECTIVES,
    DEFENSE_METRICS,
    METRICS,
    describe_trial,
    environment_group,
    environment_keys,
    format_budget,
    show_value,
    varying_keys,
)
from bdat_ray.tracking import TAG, redact, resolve_tracking_uri

log = logging.getLogger(__name__)

ROLE = f"{TAG}role"
SWEEP_ID = f"{TAG}sweep_id"
OUTCOME = f"{TAG}outcome"
ENVIRONMENT_KEYS = f"{TAG}environment_keys"
RESOLVED = "resolved."
#: Keys that say which threat model and budget a trial trains with: `describe_trial` turns
#: them into the ``threat`` and ``budgets`` columns, so tables do not repeat them.
THREAT_KEYS = ("at.threat", "at.eps", "at.components", "at.mix")
THREAT_KEY_SUFFIXES = (".eps", ".weight")
#: Keys that differ between trials without making them different settings: repeats
#: (``train.seed``, averaged over) and where a trial happened to run.
REPEAT_KEYS = ("train.seed", "device")
NO_AT = "none"


@dataclass(frozen=True)
class Sweep:
    """One sweep as MLflow holds it. ``trials``: one row per child run (see `trial_frame`)."""

    uri: str
    experiment: str
    experiment_id: str
    sweep_id: str
    parent_run_id: str
    started: pd.Timestamp
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]
    space_text: str | None
    trials: pd.DataFrame = field(repr=False)

    @property
    def objectives(self) -> dict[str, str]:
        return parse_objectives(self.params.get("objectives"))

    def outcomes(self) -> dict[str, int]:
        """Trial count per outcome (finished, failed, early_stopped, running)."""
        return self.trials["outcome"].value_counts().to_dict()


def parse_objectives(text: str | None) -> dict[str, str]:
    """``acc:max,asr:min`` (the parent run's ``objectives`` param) -> ``{"acc": "max", ...}``."""
    if not text:
        return dict(DEFAULT_OBJECTIVES)
    return dict(part.split(":", 1) for part in text.split(","))


def client_for(uri: str | None) -> tuple[Any, str]:
    """An MLflow client for ``uri`` (default: `bdat_ray.tracking.resolve_tracking_uri`, the
    sweep's own rule). A local sqlite store must exist: opening a missing one would create an
    empty store instead of saying that the path is wrong."""
    from mlflow import MlflowClient

    resolved = resolve_tracking_uri(uri)
    if resolved.startswith("sqlite:///"):
        path = Path(resolved.removeprefix("sqlite:///"))
        if not path.is_file():
            from_env = not uri and os.environ.get("MLFLOW_TRACKING_URI")
            default = "" if uri or from_env else " (the default: ./mlflow.db)"
            raise ConfigError(
                "MLFLOW_TRACKING_URI" if from_env else "--mlflow-uri",
                f"no MLflow store at {path}{default}; pass --mlflow-uri sqlite:///PATH/mlflow.db "
                "(the sweep prints its store) or run the report where the sweep ran",
            )
    return MlflowClient(tracking_uri=resolved, registry_uri=resolved), resolved


def _search_all(client: Any, experiment_ids: list[str], query: str, **kwargs: Any) -> list[Any]:
    """Every run matching ``query``: MLflow returns at most 1000 per page."""
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            experiment_ids, query, max_results=1000, page_token=token, **kwargs
        )
        runs += page
        token = page.token
        if not token:
            return runs


def _sweep_names(client: Any, experiment_ids: list[str]) -> list[str]:
    parents = client.search_runs(
        experiment_ids,
        f"tags.`{ROLE}` = 'sweep'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return [p.data.tags.get(SWEEP_ID, p.info.run_name) for p in parents]


def find_parent(client: Any, uri: str, experiment: str | None, sweep: str | None) -> Any:
    """The parent run of sweep id ``sweep`` (in ``experiment`` if given), else the newest
    sweep of ``experiment``, else the newest sweep in the store. `ConfigError` naming the
    option and what exists when there is no such thing."""
    by_name = {e.name: e.experiment_id for e in client.search_experiments()}
    where = redact(uri)

    def with_sweeps() -> str:  # for error messages only: one query per experiment
        names = [name for name, i in by_name.items() if _sweep_names(client, [i])]
        return ", ".join(names) or "none"

    if experiment is not None and experiment not in by_name:
        raise ConfigError(
            "--experiment",
            f"no experiment {experiment!r} in {where}; experiments with sweeps: {with_sweeps()}",
        )
    ids = [by_name[experiment]] if experiment is not None else list(by_name.values())
    query = f"tags.`{ROLE}` = 'sweep'"
    if sweep is not None:
        query += f" and tags.`{SWEEP_ID}` = '{sweep}'"
    found = client.search_runs(ids, query, order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        return found[0]
    if sweep is not None:
        known = _sweep_names(client, ids)
        scope = f"experiment {experiment!r}" if experiment else where
        raise ConfigError(
            "--sweep",
            f"no sweep {sweep!r} in {scope}; latest sweeps: " + (", ".join(known) or "none"),
        )
    if experiment is not None:
        raise ConfigError(
            "--experiment",
            f"experiment {experiment!r} has no bdat_ray sweep (no run tagged {ROLE}=sweep); "
            f"experiments with sweeps: {with_sweeps()}",
        )
    raise ConfigError(
        "--mlflow-uri", f"no bdat_ray sweep in {where}; run python -m bdat_ray.sweep first"
    )


def read_sweep(
    uri: str | None = None, experiment: str | None = None, sweep: str | None = None
) -> Sweep:
    """One sweep from MLflow: by sweep id, else the latest of ``experiment``, else the latest
    in the store (the default store is the sweep's: ``$MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory)."""
    client, resolved = client_for(uri)
    parent = find_parent(client, resolved, experiment, sweep)
    experiment_id = parent.info.experiment_id
    sweep_id = parent.data.tags.get(SWEEP_ID, parent.info.run_name)
    runs = _search_all(
        client,
        [experiment_id],
        f"tags.`{ROLE}` = 'trial' and tags.`{SWEEP_ID}` = '{sweep_id}'",
    )
    recorded = parent.data.tags.get(ENVIRONMENT_KEYS)
    trials = trial_frame(runs, json.loads(recorded) if recorded else None)
    objectives = parse_objectives(parent.data.params.get("objectives"))
    trials.attrs.update(sweep_id=sweep_id, experiment_id=experiment_id, objectives=objectives)
    return Sweep(
        uri=resolved,
        experiment=client.get_experiment(experiment_id).name,
        experiment_id=experiment_id,
        sweep_id=sweep_id,
        parent_run_id=parent.info.run_id,
        started=pd.Timestamp(parent.info.start_time, unit="ms", tz="UTC"),
        status=parent.info.status,
        params=dict(parent.data.params),
        tags=dict(parent.data.tags),
        metrics=dict(parent.data.metrics),
        space_text=_space_text(client, parent),
        trials=trials,
    )


def load_sweep(
    uri: str | None = None, experiment: str | None = None, sweep: str | None = None
) -> pd.DataFrame:
    """The trials of a sweep as a DataFrame (`trial_frame`); ``df.attrs`` holds ``sweep_id``,
    ``experiment_id`` and the sweep's ``objectives``."""
    return read_sweep(uri, experiment, sweep).trials


def _space_text(client: Any, parent: Any) -> str | None:
    """The search space file the sweep ran (an artifact of the parent run)."""
    name = parent.data.params.get("space")
    if not name:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return Path(client.download_artifacts(parent.info.run_id, name, tmp)).read_text()
    except Exception as err:  # an unreachable artifact store costs the page one section only
        log.warning("space file %s not readable from the parent run: %s", name, err)
        return None


# ---------------------------------------------------------------------------------------------
# One row per trial.


def config_of(params: Mapping[str, str]) -> dict[str, Any]:
    """A child run's params -> the typed flat run config. Keys the run did not log take
    their schema default (a trial whose config was refused logs only its overrides); keys
    the schema no longer knows (older runs) are dropped, values it refuses stay as logged."""
    flat = {key: leaf(key).default for key in leaf_keys()}  # schema order
    for key, raw in params.items():
        if key in flat:
            try:
                flat[key] = parse_value(key, raw)
            except ConfigError:
                flat[key] = raw
    return flat


def _described(flat: Mapping[str, Any]) -> dict[str, Any]:
    """``attack``, ``threat``, ``budgets`` (the sweep's own wording) and ``budget``: the
    budget of a single threat model in its unit, 0 for no AT, NaN for composites."""
    try:
        what = describe_trial(flat)
        components = at_components(from_flat(flat).at)
    except ConfigError:  # a refused config: say what was asked, leave the rest open
        return {
            "attack": str(flat["attack.name"]),
            "threat": str(flat["at.threat"]),
            "budgets": "?",
            "budget": math.nan,
        }
    budget = components[0].eps if len(components) == 1 else math.nan
    return {**what, "budget": 0.0 if not components else budget}


def shown(key: str, value: Any, flat: Mapping[str, Any]) -> str:
    """A config value for people: budgets as the sweep shows them (``8/255`` for pixel
    units), other floats to 4 significant digits."""
    if isinstance(value, float) and key.endswith(("eps", "step_size")):
        return format_budget(str(_unit_of(key, flat)), value)
    return show_value(value)


def _unit_of(key: str, flat: Mapping[str, Any]) -> Any:
    """The threat model whose unit a budget key is in (`format_budget` shows pixel units
    as k/255): ``eval.*`` the evaluation attack's, ``at.<threat>.*`` its threat's, ``at.eps``
    the trained threat's, ``attack.lc.eps`` the LC perturbation's norm."""
    parts = key.split(".")
    if parts[0] == "eval":
        return flat["eval.threat"]
    if parts[0] == "at":
        return parts[1] if len(parts) == 3 else flat["at.threat"]
    return flat["attack.lc.norm"] if key.startswith("attack.lc.") else ""


def defense_text(threat: str, budgets: str, none: str, composite_sep: str = " ") -> str:
    """How a trial's AT reads in figures and tables: ``none`` for no AT, ``linf 16/255``, or
    ``cat (linf 16/255 ×0.50 + spatial 0.05 ×0.50)`` (``composite_sep`` before the
    parenthesis, e.g. a line break in figures)."""
    if threat == NO_AT:
        return none
    if "+" in budgets:  # a composite: every component's budget and weight
        return f"{threat}{composite_sep}({budgets})"
    return f"{threat} {budgets}".strip()


def is_threat_key(key: str) -> bool:
    return key in THREAT_KEYS or (key.startswith("at.") and key.endswith(THREAT_KEY_SUFFIXES))


def _usual(keys: list[str], flats: list[dict[str, Any]]) -> dict[str, str]:
    """The most common value (repr) of each key; the first seen wins a tie."""
    return {k: Counter(repr(f[k]) for f in flats).most_common(1)[0][0] for k in keys}


def _outcome(run: Any) -> str:
    return run.data.tags.get(OUTCOME, "unknown")


def trial_frame(runs: list[Any], environment: list[str] | None = None) -> pd.DataFrame:
    """One row per child run, ordered by start time. Columns: ``run_id``, ``trial`` (Ray trial
    id), ``run_name``, ``outcome``, ``status``, ``start``/``end`` (UTC), ``group`` (the
    sweep's environment group, see below), ``attack``/``threat``/``budgets`` (as the sweep
    prints them), ``budget`` (single threat model: its budget; no AT: 0; composite: NaN),
    ``setting`` (the attack as people read it, with the attack keys where the trial departs
    from the sweep's usual value, e.g. ``sticker, trigger_size=2``), ``variant`` (the same
    for other swept keys that are not the threat model, e.g. ``at.steps=10``), the final
    metrics (NaN where absent), then every
    run-config key typed, and the ``resolved.*`` params as logged.

    ``group``: the values of ``environment``, the keys the sweep grouped its fronts by (its
    parent run's ``bdat_ray.environment_keys`` tag; without it, the ``attack.*``/``data.*``
    keys that vary between these runs, `bdat_ray.search_space.environment_keys`); one Pareto
    front is drawn per group (no defense chooses its attack)."""
    runs = sorted(runs, key=lambda r: r.info.start_time)
    flats = [config_of(r.data.params) for r in runs]
    if environment is None:
        environment = environment_keys(flats)
    attack_keys = [k for k in environment if k not in ("attack.name", "attack.label_mode")]
    # What sets finished trials apart besides attack and threat model: failed trials (a
    # diverging learning rate) would otherwise label every finished one with their key.
    finished = [f for r, f in zip(runs, flats, strict=True) if _outcome(r) == "finished"]
    others = [
        k
        for k in varying_keys(finished)
        if k not in environment
        and k not in REPEAT_KEYS
        and not is_threat_key(k)
        and not k.startswith("defense.")  # the tables label defenses themselves
    ]
    usual = {**_usual(attack_keys, flats), **_usual(others, finished)}

    def unusual(flat: Mapping[str, Any], keys: list[str]) -> list[str]:
        """``key=value`` where the trial departs from the sweep's usual value (the paper's
        baseline in variant spaces: a table row names what its variant changed)."""
        return [
            f"{k.removeprefix('attack.')}={shown(k, flat[k], flat)}"
            for k in keys
            if repr(flat[k]) != usual[k]
        ]

    rows = []
    for run, flat in zip(runs, flats, strict=True):
        tags, metrics = run.data.tags, run.data.metrics
        what = _described(flat)
        rows.append(
            {
                "run_id": run.info.run_id,
                "trial": tags.get(f"{TAG}trial_id", run.info.run_name),
                "run_name": run.info.run_name,
                "outcome": _outcome(run),
                "status": run.info.status,
                "start": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                "end": (
                    pd.Timestamp(run.info.end_time, unit="ms", tz="UTC")
                    if run.info.end_time
                    else pd.NaT
                ),
                "group": environment_group(flat, environment),
                **what,
                "setting": ", ".join([what["attack"], *unusual(flat, attack_keys)]),
                "variant": ", ".join(unusual(flat, others)),
                **{m: metrics.get(m, math.nan) for m in (*METRICS, *DEFENSE_METRICS)},
                **flat,
                **{k: v for k, v in run.data.params.items() if k.startswith(RESOLVED)},
            }
        )
    return pd.DataFrame(rows)
