"""Search that fits the question: constraints (feasible fronts), the sampler section, the
hypervolume reference point, and MO-ASHA — the space grammar, the non-dominated ranking,
the Ray scheduler on real Ray ``Trial`` objects, and small real sweeps through the CLI."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bdat_ray.config import ConfigError
from bdat_ray.samplers import AUTO_CHOICE, SamplerSpec, build_sampler
from bdat_ray.search_space import (
    Constraint,
    MultiObjectiveEarlyStopping,
    crowding_distances,
    feasible,
    load_space,
    mo_rung_keeps,
    nondominated_fronts,
)

GOALS = {"acc": "max", "asr": "min"}
SAMPLED = """
fixed: {data.name: digits, train.epochs: 2, eval.robust_samples: 0}
dimensions:
  train.lr: {loguniform: [0.01, 0.2]}
num_samples: 4
"""


def write(tmp_path, body: str, base: str = SAMPLED):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(base) + textwrap.dedent(body))
    return path


# ---------------------------------------------------------------------------------------------
# The space file's sections.


def test_sections_parse_into_the_space(tmp_path):
    space = load_space(
        write(
            tmp_path,
            """
            constraints: {asr: "<= 10", acc: ">= 80.5"}
            sampler: {name: tpe, multivariate: true, group: true, constant_liar: true}
            hypervolume: {reference: {acc: 50, asr: 60}}
            early_stopping: {method: mo_asha, grace_period: 1, reduction_factor: 2}
            """,
        )
    )
    assert space.constraints == (Constraint("asr", "<=", 10.0), Constraint("acc", ">=", 80.5))
    assert space.sampler == SamplerSpec(
        "tpe", (("multivariate", True), ("group", True), ("constant_liar", True))
    )
    assert space.hypervolume_reference == {"acc": 50.0, "asr": 60.0}
    assert space.early_stopping == MultiObjectiveEarlyStopping(1, 2)


def test_defaults_and_the_flat_sampler_form(tmp_path):
    space = load_space(write(tmp_path, ""))
    assert space.constraints == () and space.hypervolume_reference == {}
    assert space.search_sampler.resolved() == SamplerSpec(
        AUTO_CHOICE[0], tuple(AUTO_CHOICE[1].items())
    )
    assert load_space(write(tmp_path, "sampler: nsga2")).sampler == SamplerSpec("nsga2")


@pytest.mark.parametrize(
    ("body", "key", "words"),
    [
        ('constraints: {asr: "< 10"}', "constraints.asr", '"<= NUMBER"'),
        ('constraints: {asr: "<= 1/0"}', "constraints.asr", '"<= NUMBER"'),
        ('constraints: {asr: "<= __import__"}', "constraints.asr", '"<= NUMBER"'),
        ('constraints: {loss: "<= 1"}', "constraints.loss", "unknown metric"),
        ('constraints: {robust_acc: ">= 1"}', "constraints.robust_acc", "robust_samples"),
        ("constraints: []", "constraints", "must map"),
        ("sampler: cmaes", "sampler.name", "tpe, nsga2, gp"),
        ("sampler: {name: tpe, population_size: 4}", "sampler.population_size", "not an option"),
        ("sampler: {name: tpe, multivariate: 1}", "sampler.multivariate", "true or false"),
        ("sampler: {name: tpe, group: true}", "sampler.group", "multivariate"),
        ("sampler: {name: nsga2, population_size: 0}", "sampler.population_size", "≥ 1"),
        ("sampler: {name: auto, multivariate: true}", "sampler.multivariate", "no options"),
        ("hypervolume: {reference: {acc: 100}}", "hypervolume.reference.acc", "ideal 100"),
        ("hypervolume: {reference: {seconds: 3}}", "hypervolume.reference.seconds", "percent"),
        ("hypervolume: {point: {acc: 0}}", "hypervolume", "takes reference"),
        ("early_stopping: {method: moasha}", "early_stopping.method", "asha, mo_asha"),
        ("early_stopping: {method: mo_asha, metric: acc}", "early_stopping.metric", "objectives"),
        ("early_stopping: {method: mo_asha, grace_period: 0}", "grace_period", "≥ 1"),
    ],
)
def test_bad_sections_name_the_key(tmp_path, body, key, words):
    with pytest.raises(ConfigError) as err:
        load_space(write(tmp_path, body))
    assert err.value.key.endswith(key), err.value.key
    assert words in err.value.message, err.value.message


def test_mo_asha_needs_objectives_every_epoch_reports(tmp_path):
    body = """
    objectives: {acc: max, seconds: min}
    early_stopping: {method: mo_asha}
    """
    with pytest.raises(ConfigError, match="seconds is measured only at the end") as err:
        load_space(write(tmp_path, body))
    assert err.value.key.endswith("early_stopping.method")


def test_a_grid_space_refuses_a_sampler(tmp_path):
    grid = "fixed: {data.name: digits}\ndimensions:\n  train.lr: {grid: [0.1, 0.05]}\n"
    with pytest.raises(ConfigError, match="sampled"):
        load_space(write(tmp_path, "sampler: tpe", base=grid))


def test_feasibility_is_one_rule():
    rule = (Constraint("asr", "<=", 10.0), Constraint("acc", ">=", 90.0))
    assert feasible({"acc": 90.0, "asr": 10.0}, rule)  # bounds are inclusive
    assert not feasible({"acc": 95.0, "asr": 10.5}, rule)
    assert not feasible({"acc": 89.9, "asr": 0.0}, rule)
    assert not feasible({"acc": 95.0}, rule)  # a missing metric is infeasible
    assert not feasible({"acc": 95.0, "asr": math.nan}, rule)
    assert rule[0].violation(12.5) == 2.5 and rule[1].violation(92.0) == -2.0


@pytest.mark.parametrize("name", ["tpe", "nsga2", "gp"])
def test_every_sampler_builds_with_its_options(name):
    import optuna

    options = {
        "tpe": (("multivariate", True), ("group", True), ("constant_liar", True)),
        "nsga2": (("population_size", 8),),
        "gp": (("n_startup_trials", 3),),
    }[name]
    sampler = build_sampler(SamplerSpec(name, options), seed=1)
    assert isinstance(sampler, optuna.samplers.BaseSampler)
    assert type(sampler).__name__ == {"tpe": "TPESampler", "nsga2": "NSGAIISampler"}.get(
        name, "GPSampler"
    )


# ---------------------------------------------------------------------------------------------
# Non-dominated sorting and MO-ASHA's rung decision (pure Python).


def test_nondominated_fronts_peel_layer_by_layer():
    rows = [
        {"acc": 90, "asr": 10},  # 0: front 0
        {"acc": 80, "asr": 5},  # 1: front 0
        {"acc": 85, "asr": 20},  # 2: dominated by 0 only -> front 1
        {"acc": 70, "asr": 30},  # 3: dominated by 0, 1, 2 -> front 2
        {"acc": 90, "asr": 10},  # 4: a copy of 0 -> front 0 (equal points do not dominate)
        {"acc": math.nan, "asr": 0},  # 5: no front
    ]
    assert nondominated_fronts(rows, GOALS) == [[0, 1, 4], [2], [3]]


def test_crowding_distance_favours_the_ends_and_the_lonely():
    front = [{"acc": 60, "asr": 0}, {"acc": 70, "asr": 10}, {"acc": 72, "asr": 12},
             {"acc": 90, "asr": 40}]  # fmt: skip
    d = crowding_distances(front, GOALS)
    assert d[0] == d[3] == math.inf
    assert d[1] == pytest.approx((72 - 60) / 30 + (12 - 0) / 40)
    assert d[2] == pytest.approx((90 - 70) / 30 + (40 - 10) / 40)


def test_rung_keeps_the_front_and_stops_the_dominated():
    rung = [{"acc": 90, "asr": 10}]
    assert mo_rung_keeps(rung, GOALS, 3)  # the first arrival always goes on
    assert not mo_rung_keeps([*rung, {"acc": 80, "asr": 20}], GOALS, 3)  # dominated
    # Not dominated by anything seen: kept even when the front is larger than 1/η of the rung.
    many = [{"acc": 90 - i, "asr": 10 - i} for i in range(6)]
    assert all(mo_rung_keeps(many[: i + 1], GOALS, 3) for i in range(6))
    # Dominated, but inside the top 1/η of the ranking: one ahead of it in 3 results, η = 2.
    assert mo_rung_keeps([{"acc": 90, "asr": 10}, {"acc": 50, "asr": 90},
                          {"acc": 80, "asr": 20}], GOALS, 2)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The Ray scheduler, fed results as Tune feeds them (real Trial objects; Ray's own scheduler
# tests pass ``None`` for the controller the same way).


def _epoch(epoch: int, acc: float, asr: float, epochs: int = 9) -> dict:
    return {"epoch": epoch, "epochs": epochs, "acc": acc, "asr": asr, "final": False}


def test_scheduler_stops_the_dominated_trial_at_a_rung_and_never_one_on_its_front():
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from bdat_ray.schedulers import MultiObjectiveASHA

    scheduler = MultiObjectiveASHA(GOALS, max_t=9, grace_period=1, reduction_factor=3)
    assert scheduler.rungs == [1, 3, 9]
    good, tradeoff, dominated, late = (Trial("__fake", stub=True) for _ in range(4))
    go, stop = TrialScheduler.CONTINUE, TrialScheduler.STOP
    for trial in (good, tradeoff, dominated, late):
        scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, good, _epoch(1, 80, 50)) == go
    assert scheduler.on_trial_result(None, tradeoff, _epoch(1, 60, 10)) == go  # on the front
    assert scheduler.on_trial_result(None, dominated, _epoch(1, 55, 60)) == stop
    # Between rungs nothing is judged; at rung 3 the first arrival goes on.
    assert scheduler.on_trial_result(None, good, _epoch(2, 10, 99)) == go
    assert scheduler.on_trial_result(None, good, _epoch(3, 85, 40)) == go
    # A late trial that improves the rung-1 front goes on, as does a non-dominated one at 3.
    assert scheduler.on_trial_result(None, late, _epoch(1, 90, 5)) == go
    assert scheduler.on_trial_result(None, tradeoff, _epoch(3, 70, 5)) == go
    # No rung at the last epoch, and the final report is never judged.
    assert scheduler.on_trial_result(None, tradeoff, _epoch(9, 0, 100)) == go
    final = {**_epoch(9, 0, 100), "final": True}
    assert scheduler.on_trial_result(None, good, final) == go
    assert scheduler.stopped == 1
    assert list(scheduler.recorded[1]) == [good.trial_id, tradeoff.trial_id,
                                           dominated.trial_id, late.trial_id]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Real sweeps through the CLI (real Ray, Optuna, MLflow).

TINY_DIGITS = """
fixed:
  data.name: digits
  data.image_size: 8
  train.epochs: 3
  attack.poison_rate: 0.05
  at.steps: 1
  eval.robust_samples: 0
"""


def sweep_of(tmp_path: Path, name: str, body: str):
    """``python -m bdat_ray.sweep`` on TINY_DIGITS + ``body``; (its output, the MLflow URI)."""
    from tests.test_sweep import run_cli

    space = tmp_path / f"{name}.yaml"
    space.write_text(textwrap.dedent(TINY_DIGITS) + textwrap.dedent(body))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        ["--space", str(space), "--mlflow-uri", uri, "--storage", "out"], tmp_path, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, uri


@pytest.mark.sweep
@pytest.mark.slow
def test_a_constrained_optuna_sweep_keeps_infeasible_trials_out_of_best_trials(tmp_path):
    import optuna

    from bdat_ray.search_space import pareto_front
    from tests.test_sweep import sweep_dir

    body = """
    dimensions:
      at.threat: {choice: [none, spatial]}
      at.spatial.eps: {uniform: [0.05, 0.15], when: {at.threat: spatial}}
    constraints: {asr: "<= 90"}
    sampler: {name: tpe, n_startup_trials: 2}
    num_samples: 5
    max_concurrent: 2
    seed: 0
    """
    proc, uri = sweep_of(tmp_path, "constrained", body)
    assert "feasible   asr <= 90" in proc.stdout
    directory = sweep_dir(tmp_path / "out")
    from bdat_ray.sweep import optuna_storage

    study = optuna.load_study(
        study_name=directory.name, storage=optuna_storage(str(directory / "optuna.journal"))
    )
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 5
    for trial in complete:  # every finished trial carries its violation: asr - 90
        assert trial.constraints == {"asr <= 90": pytest.approx(trial.values[1] - 90)}
    # BadNets without AT keeps its backdoor (asr ~100 %): at least one trial is infeasible,
    # so the test can fail if best_trials ignored the constraint.
    infeasible = [t for t in complete if t.values[1] > 90]
    assert infeasible, [t.values for t in complete]
    best = study.best_trials
    assert all(t.values[1] <= 90 for t in best)
    feasible_rows = [
        {"acc": t.values[0], "asr": t.values[1], "n": t.number}
        for t in complete
        if t.values[1] <= 90
    ]
    expected = {feasible_rows[i]["n"] for i in pareto_front(feasible_rows, GOALS)}
    assert {t.number for t in best} == expected
    table = proc.stdout.split("Pareto front", 1)[1]
    if not expected:
        assert "none: no finished trial (of 5) meets asr <= 90" in table
    else:
        printed = {line.split()[0] for line in table.splitlines()[3:] if line.strip()}
        ray_ids = {t.user_attrs["ray_trial_id"] for t in best}
        assert ray_ids <= printed
    # The report draws the feasible front and, from the study, importances and parallel
    # coordinates, and says how to open the study in optuna-dashboard.
    report = subprocess.run(
        [sys.executable, "-m", "analysis.report", "--mlflow-uri", uri, "--out", "report"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stdout + report.stderr
    for name in ("feasible.png", "importance.png", "parallel.png"):
        assert (tmp_path / "report" / name).stat().st_size > 10_000, name
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Feasible front" in page and "meet asr &lt;= 90" in page
    assert f"optuna-dashboard {directory / 'optuna.journal'}" in page
    assert "reference point acc = 0 %, asr = 100 % (the worst values)" in page


@pytest.mark.sweep
@pytest.mark.slow
def test_a_grid_sweep_with_mo_asha_stops_exactly_the_dominated_trials(tmp_path):
    """One trial at a time, so the rung sees results in start order: replaying the rule on
    each trial's recorded epoch-1 result must give exactly the trials Ray stopped."""
    import pandas as pd
    from ray.tune import ExperimentAnalysis

    from tests.test_sweep import mlflow_runs, sweep_dir

    body = """
    dimensions:
      train.lr: {grid: [0.1, 0.003, 0.05, 0.001, 0.0003]}
    early_stopping: {method: mo_asha, grace_period: 1, reduction_factor: 3}
    max_concurrent: 1
    """
    proc, uri = sweep_of(tmp_path, "moasha", body)
    assert "stopping   MO-ASHA on acc, asr" in proc.stdout
    analysis = ExperimentAnalysis(str(sweep_dir(tmp_path / "out")))
    lrs = [0.1, 0.003, 0.05, 0.001, 0.0003]
    trials = sorted(analysis.trials, key=lambda t: lrs.index(t.config["grid_point"]["train.lr"]))
    rung: list[dict] = []
    expected_stopped = set()
    for trial in trials:  # rung 1 only: rung 3 is the last epoch, where nothing stops
        epochs = pd.read_csv(Path(trial.path) / "progress.csv")
        first = epochs[epochs["epoch"] == 1].iloc[0]  # the epoch report, not a final one
        rung.append({"acc": float(first["acc"]), "asr": float(first["asr"])})
        if not mo_rung_keeps(rung, GOALS, 3):
            expected_stopped.add(trial.trial_id)
    stopped = {t.trial_id for t in trials if not (t.last_result or {}).get("final")}
    assert stopped == expected_stopped, rung
    assert stopped, f"no trial was dominated at epoch 1: {rung}"
    on_front = {trials[i].trial_id for i in nondominated_fronts(rung, GOALS)[0]}
    assert not stopped & on_front
    _, _, children = mlflow_runs(uri, "moasha")
    outcome = {c.data.tags["bdat_ray.trial_id"]: c.data.tags["bdat_ray.outcome"] for c in children}
    assert {t for t, o in outcome.items() if o == "early_stopped"} == stopped
    table = proc.stdout.split("Pareto front", 1)[1]
    printed = {line.split()[0] for line in table.splitlines()[3:] if line.strip()}
    assert printed and not printed & stopped


def test_the_hypervolume_reference_point_moves_the_normalisation():
    from analysis.fronts import normalised_point, reference_text

    assert normalised_point({"acc": 50, "asr": 25}, GOALS) == (0.5, 0.25)
    point = normalised_point({"acc": 75, "asr": 25}, GOALS, {"acc": 50, "asr": 50})
    assert point == (0.5, 0.5)
    assert reference_text(GOALS, reference={"asr": 50}) == "acc = 0 %, asr = 50 %"
    assert reference_text(GOALS, ideal=True) == "acc = 100 %, asr = 0 %"
