"""The MLflow adapter on a real sqlite store (no Ray): where runs go, the parent/child layout,
a retried trial continuing its child run without logging an epoch twice, and a diverged
trial refusing to train again."""

from __future__ import annotations

import pytest

from bdat_ray import tracking
from bdat_ray.config import ConfigError

pytestmark = pytest.mark.sweep


def test_tracking_uri_precedence_and_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5999"
    # Ray runs trials in other working directories: relative sqlite paths are made absolute.
    assert tracking.resolve_tracking_uri("sqlite:///runs/x.db") == (
        f"sqlite:///{tmp_path / 'runs' / 'x.db'}"
    )
    with pytest.raises(ConfigError, match=r"^--mlflow-uri: .*file store"):
        tracking.resolve_tracking_uri("./mlruns")


def test_passwords_never_leave_the_uri():
    assert tracking.redact("https://ann:s3cret@mlflow.example:443/x") == (
        "https://ann:***@mlflow.example:443/x"
    )
    assert "s3cret" not in tracking.browse_hint("https://ann:s3cret@mlflow.example")
    assert tracking.browse_hint("sqlite:////a/m.db").startswith(
        "mlflow ui --backend-store-uri sqlite:////a/m.db --host 127.0.0.1"
    )


@pytest.fixture
def sweep(tmp_path):
    space_file = tmp_path / "space.yaml"
    space_file.write_text("fixed: {train.epochs: 1}\n")
    return tracking.start_sweep(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="unit",
        sweep_id="unit-1",
        space_file=space_file,
        params={"search": "grid", "trials": 1},
        tags={"bdat_ray.ray_experiment_dir": str(tmp_path)},
    )


def test_parent_and_child_runs_and_a_retry_that_continues(sweep):
    from mlflow import MlflowClient

    client = MlflowClient(sweep.uri)
    parent = client.get_run(sweep.parent_run_id)
    assert parent.data.params["search"] == "grid" and parent.info.status == "RUNNING"
    assert [a.path for a in client.list_artifacts(sweep.parent_run_id)] == ["space.yaml"]

    run = tracking.TrialRun.open(sweep, trial_id="t1", trial_name="trial_t1", tags={})
    run.log_params({"at.threat": "linf", "at.eps": None})
    run.log_epoch({"epoch": 1, "acc": 50.0, "images_per_s": 10.0})
    child = client.get_run(run.run_id)
    assert child.data.tags["mlflow.parentRunId"] == sweep.parent_run_id
    assert child.data.params == {"at.threat": "linf", "at.eps": "None"}
    assert "epoch_images_per_s" in child.data.metrics  # the final images_per_s is the run's

    run.fail("error", "RuntimeError: node lost")  # a retryable failure, then Ray's retry:
    tracking.note_recovery(sweep, "t1", "RuntimeError: node lost")  # (by the driver)
    again = tracking.TrialRun.open(sweep, trial_id="t1", trial_name="trial_t1", tags={})
    assert again.run_id == run.run_id and again.logged_epochs == {1}
    again.log_epoch({"epoch": 1, "acc": 50.0})  # re-run after an older checkpoint: skipped
    again.log_epoch({"epoch": 2, "acc": 60.0})
    child = client.get_run(run.run_id)
    assert [m.step for m in client.get_metric_history(run.run_id, "acc")] == [1, 2]
    assert child.info.status == "RUNNING" and child.data.tags["bdat_ray.attempts"] == "2"
    assert child.data.tags["bdat_ray.recovered_error"] == "RuntimeError: node lost"
    assert "bdat_ray.failure" not in child.data.tags  # the outcome is not decided yet
    assert child.data.tags["bdat_ray.outcome"] == "running"


def test_a_diverged_trial_is_not_trained_again(sweep):
    from mlflow import MlflowClient

    run = tracking.TrialRun.open(sweep, trial_id="t2", trial_name="trial_t2", tags={})
    run.fail("diverged", "training loss became non-finite")
    with pytest.raises(tracking.TrialFailedBefore, match=r"diverged.*non-finite"):
        tracking.TrialRun.open(sweep, trial_id="t2", trial_name="trial_t2", tags={})
    child = MlflowClient(sweep.uri).get_run(run.run_id)
    assert child.info.status == "FAILED"
    assert child.data.tags["bdat_ray.failure_kind"] == "diverged"


def test_errors_are_retried_a_few_times_and_lost_processes_far_more(sweep):
    # A spot reclaim kills the process: the attempt records nothing, only `attempts` grows.
    def reopen():
        return tracking.TrialRun.open(sweep, trial_id="t9", trial_name="trial_t9", tags={})

    for _ in range(tracking.ERROR_RETRIES):  # an exception inside the trial: retried
        reopen().fail("error", "RuntimeError: flaky")
    for _ in range(tracking.MAX_ATTEMPTS - tracking.ERROR_RETRIES - 1):
        run = reopen()  # each reopen without a recorded failure is a lost process
    run.fail("error", "RuntimeError: flaky again")
    with pytest.raises(tracking.TrialFailedBefore, match=r"attempts, 3 errors"):
        reopen()
    from mlflow import MlflowClient

    tags = MlflowClient(sweep.uri).get_run(run.run_id).data.tags
    # Below MAX_ATTEMPTS: the third exception, not the deaths between them, ended it.
    assert tags["bdat_ray.attempts"] == str(tracking.MAX_ATTEMPTS - 1)
    assert tags["bdat_ray.errors"] == str(tracking.ERROR_RETRIES)


def test_lost_processes_alone_stop_only_at_max_attempts(sweep):
    for _ in range(tracking.MAX_ATTEMPTS):
        tracking.TrialRun.open(sweep, trial_id="t8", trial_name="trial_t8", tags={})
    with pytest.raises(tracking.TrialFailedBefore, match=rf"{tracking.MAX_ATTEMPTS} attempts"):
        tracking.TrialRun.open(sweep, trial_id="t8", trial_name="trial_t8", tags={})


def test_commit_comes_from_the_environment_outside_a_checkout(monkeypatch, tmp_path):
    # As synced by `ray up`: the package without the checkout's .git beside it.
    monkeypatch.setattr(tracking, "__file__", str(tmp_path / "bdat_ray" / "tracking.py"))
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV, raising=False)
    assert tracking.git_commit() == ("unknown", False)
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "ab12" * 10 + "-dirty")
    assert tracking.git_commit() == ("ab12" * 10, True)
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "cd34" * 10)
    assert tracking.git_commit() == ("cd34" * 10, False)


def test_driver_marks_early_stopped_trials_and_leaves_closed_ones(sweep):
    from mlflow import MlflowClient

    stopped = tracking.TrialRun.open(sweep, trial_id="t3", trial_name="trial_t3", tags={})
    tracking.mark_trial(sweep, "t3", "early_stopped")
    failed = tracking.TrialRun.open(sweep, trial_id="t4", trial_name="trial_t4", tags={})
    failed.fail("diverged", "nan")
    tracking.mark_trial(sweep, "t4", "failed", "trial process failed: X")  # already closed
    client = MlflowClient(sweep.uri)
    assert client.get_run(stopped.run_id).info.status == "KILLED"
    assert client.get_run(stopped.run_id).data.tags["bdat_ray.outcome"] == "early_stopped"
    assert client.get_run(failed.run_id).data.tags["bdat_ray.failure"] == "nan"
