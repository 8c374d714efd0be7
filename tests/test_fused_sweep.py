"""Fused sweeps (``--fuse K``) through ``python -m bdat_ray.sweep``: real Ray, a real MLflow
store; every member of a fused Ray trial is its own trial in MLflow and the reports."""

from __future__ import annotations

import os
import signal

import pytest

from tests.test_sweep import (
    epochs_logged,
    mlflow_runs,
    run_cli,
    session_processes,
    space_file,
    start_driver,
    tracking_uri,
    wait_for_children,
)

pytestmark = [pytest.mark.sweep, pytest.mark.slow]


def test_a_fused_sweep_keeps_every_member_its_own_trial(tmp_path, digits):
    """Three learning rates fused into one Ray trial, the third diverging: two child runs
    finish with their own epochs and models (each reloads and scores its own acc), the
    diverged member fails alone, and the Pareto table lists members, not the pack."""
    import mlflow.pytorch
    import torch

    space = space_file(
        tmp_path, "dimensions:\n  train.lr: {grid: [0.1, 0.05, 1.0e+30]}\n", "fusedlr"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "out"]
    dry = run_cli([*args, "--fuse", "3", "--dry-run"], tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert "3 trials in 1 Ray trials (1 fused, 0 alone); packs: 1+2+3" in dry.stdout
    proc = run_cli([*args, "--fuse", "3"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 finished, 1 failed of 3 trials" in proc.stdout
    assert "diverged (the fused trial's other members went on)" in proc.stderr
    client, _, children = mlflow_runs(uri, "fusedlr")
    assert len(children) == 3
    (pack,) = {c.data.tags["bdat_ray.fused_trial"] for c in children}
    assert {c.data.tags["bdat_ray.trial_id"] for c in children} == {f"{pack}-{i}" for i in range(3)}
    assert f"{pack}-0" in proc.stdout or f"{pack}-1" in proc.stdout  # the front lists members
    by_lr = {float(c.data.params["train.lr"]): c for c in children}
    assert by_lr[1e30].info.status == "FAILED"
    assert by_lr[1e30].data.tags["bdat_ray.failure_kind"] == "diverged"
    for lr in (0.1, 0.05):
        run = by_lr[lr]
        assert run.info.status == "FINISHED", run.data.tags
        assert epochs_logged(client, run) == [1, 2, 3]
        with tracking_uri(uri):
            model = mlflow.pytorch.load_model(run.data.tags["bdat_ray.model_uri"])
        with torch.no_grad():
            predicted = model(digits.x_test.float() / 255).argmax(1)
        acc = 100 * (predicted == digits.y_test).float().mean().item()
        assert abs(acc - run.data.metrics["acc"]) < 0.5, (lr, acc, run.data.metrics["acc"])
    finished = [by_lr[0.1].data.metrics["acc"], by_lr[0.05].data.metrics["acc"]]
    assert finished[0] != finished[1]  # two trainings, not one model logged twice


def test_an_optuna_search_asks_k_points_per_fused_trial(tmp_path):
    """fuse: 2 with Optuna: 4 study trials in 2 Ray trials, each member its own COMPLETE
    study trial linked to its own MLflow child run, told that run's final metrics; the
    members of one Ray trial are different points (their own learning rates)."""
    import optuna

    from bdat_ray.sweep import optuna_storage
    from tests.test_sweep import sweep_dir

    space = space_file(
        tmp_path,
        "dimensions:\n  train.lr: {loguniform: [0.01, 0.2]}\n"
        "  at.linf.eps: {uniform: [0.01, 0.1]}\n"
        "fixed: {at.threat: linf, at.steps: 2}\nnum_samples: 4\nfuse: 2\nseed: 5\n",
        "fusedopt",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["--space", str(space), "--mlflow-uri", uri, "--storage", "out"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 trials in 2 Ray trials, each asking Optuna for 2 points" in proc.stdout
    directory = sweep_dir(tmp_path / "out")
    study = optuna.load_study(
        study_name=directory.name, storage=optuna_storage(str(directory / "optuna.journal"))
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    _, _, children = mlflow_runs(uri, "fusedopt")
    by_trial = {c.data.tags["bdat_ray.trial_id"]: c for c in children}
    assert len(by_trial) == 4 and len({c.data.tags["bdat_ray.fused_trial"] for c in children}) == 2
    for trial in study.trials:
        child = by_trial[trial.user_attrs["ray_trial_id"]]
        assert child.data.tags["bdat_ray.outcome"] == "finished"
        assert float(child.data.params["train.lr"]) == pytest.approx(trial.params["train.lr"])
        assert trial.values == pytest.approx([child.data.metrics["acc"], child.data.metrics["asr"]])
    assert len({t.params["train.lr"] for t in study.trials}) == 4


def test_a_killed_fused_trial_resumes_every_member(tmp_path):
    """SIGKILL the process of a fused trial of two members in mid-training: Ray retries it
    from the fused checkpoint, and both members go on from there — no epoch lost or
    logged twice in either child run."""
    space = space_file(
        tmp_path, "fixed:\n  train.epochs: 6\ndimensions:\n  train.seed: {grid: [0, 1]}\n", "fk"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "out", "--fuse", "2"]
    driver, log = start_driver(args, tmp_path)
    client, _ = wait_for_children(
        driver,
        log,
        uri,
        "fk",
        lambda client, children: (
            len(children) == 2 and all(len(epochs_logged(client, c)) >= 2 for c in children)
        ),
    )
    workers = [pid for pid, cmd in session_processes(driver.pid).items() if "ImplicitFunc" in cmd]
    assert workers, session_processes(driver.pid)
    os.kill(workers[0], signal.SIGKILL)
    assert driver.wait(timeout=400) == 0, log.read_text()[-3000:]
    _, _, children = mlflow_runs(uri, "fk")
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        assert child.data.tags["bdat_ray.attempts"] == "2"
        assert int(child.data.tags["bdat_ray.resumed_after_epoch"]) >= 1  # not from scratch
        assert epochs_logged(client, child) == [1, 2, 3, 4, 5, 6]
    assert "retrying from its last checkpoint" in log.read_text()
