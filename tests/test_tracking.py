"""The MLflow adapter on a real sqlite store (no Ray): where runs go, the parent/child layout,
a retried trial continuing its child run without logging an epoch twice, and a diverged
trial refusing to train again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------------------------------------
# A finished trial as an MLflow user meets it: a pt2 model that serves at any batch size, final
# metrics on the LoggedModel, registry aliases, system metrics and dataset inputs.


def _finished_trial(sweep, trial_id, model, data, tmp_path, final):
    import time

    import numpy as np

    run = tracking.TrialRun.open(sweep, trial_id=trial_id, trial_name=f"trial_{trial_id}", tags={})
    run.log_params({"at.threat": "none"})
    run.monitor_system()
    # Longer than one sampling interval, as every real trial is.
    time.sleep(tracking.SYSTEM_METRICS_INTERVAL_S + 1.5)
    workdir = tmp_path / trial_id
    workdir.mkdir()
    np.save(workdir / "poisoned_indices.npy", np.arange(7) * 3 + len(trial_id))
    run.finish(final, step=3, model=model, workdir=workdir, resolved={}, data=data)
    return run


@pytest.fixture(scope="module")
def two_finished_trials(digits, tmp_path_factory):
    from tests.conftest import small_model

    tmp_path = tmp_path_factory.mktemp("finished")
    space_file = tmp_path / "space.yaml"
    space_file.write_text("fixed: {train.epochs: 3}\n")
    sweep = tracking.start_sweep(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        experiment="unit",
        sweep_id="unit-2",
        space_file=space_file,
        params={},
        tags={},
    )
    low = _finished_trial(
        sweep, "tlow", small_model(digits, 1).eval(), digits, tmp_path, {"acc": 90.0, "asr": 12.5}
    )
    high = _finished_trial(
        sweep, "thigh", small_model(digits, 2).eval(), digits, tmp_path, {"acc": 97.0, "asr": 88.0}
    )
    return {"low": low, "high": high}


def _global_uri(uri):
    """``models:/`` URIs and the fluent search resolve through MLflow's global tracking URI."""
    import mlflow

    mlflow.set_tracking_uri(uri)


def test_logged_model_is_pt2_with_a_dynamic_batch_and_a_pyfunc(
    two_finished_trials, digits, tmp_path
):
    import mlflow
    import mlflow.pyfunc
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow import MlflowClient

    from tests.conftest import small_model

    run = two_finished_trials["low"]
    client = MlflowClient(run.sweep.uri)
    uri = client.get_run(run.run_id).data.tags["bdat_ray.model_uri"]
    _global_uri(run.sweep.uri)
    info = mlflow.models.get_model_info(uri)
    assert info.flavors["pytorch"]["model_data"] == "data"
    files = {a.path for a in client.list_logged_model_artifacts(uri.removeprefix("models:/"))}
    assert "data" in files and "code" in files  # pt2 archive, and bdat_ray as code_paths
    assert info.signature.inputs.inputs[0].shape == (-1, 1, 16, 16)
    reference = small_model(digits, 1).eval()
    loaded = mlflow.pytorch.load_model(uri)  # the torch.export program, no pickle
    for batch in (1, 7):
        x = digits.x_test[:batch].float() / 255
        with torch.no_grad():
            assert torch.allclose(loaded(x), reference(x), atol=1e-5)
    batch = (digits.x_test[:5].float() / 255).numpy()
    scores = mlflow.pyfunc.load_model(uri).predict(batch)
    assert scores.shape == (5, 10)
    # `mlflow models predict`, offline, in this environment: what a serving user runs first.
    request = tmp_path / "batch.json"
    request.write_text(json.dumps({"inputs": batch.tolist()}))
    cli = [str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", uri]
    predicted = subprocess.run(
        [*cli, "-i", str(request), "-t", "json", "--env-manager", "local"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": run.sweep.uri},
    )
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    served = json.loads(predicted.stdout.strip().splitlines()[-1])["predictions"]
    assert np.allclose(np.array(served), scores, atol=1e-5)
    requirements = mlflow.pyfunc.get_model_dependencies(uri)
    # The code travels as code_paths, not as a pin on a package no index serves.
    assert "bdat_ray" not in Path(requirements).read_text()


def test_final_metrics_are_on_the_logged_model_and_searchable(two_finished_trials):
    import mlflow
    from mlflow import MlflowClient

    run = two_finished_trials["low"]
    _global_uri(run.sweep.uri)
    found = mlflow.search_logged_models(
        experiment_ids=[run.sweep.experiment_id],
        filter_string="metrics.asr < 20",
        output_format="list",
    )
    assert [m.source_run_id for m in found] == [run.run_id]
    assert found[0].name == "trial_tlow"  # the Models tab names a model by its trial
    # The final metrics come first: the Models tab's metric columns follow this order.
    assert [(m.key, m.value) for m in found[0].metrics][:2] == [("acc", 90.0), ("asr", 12.5)]
    child = MlflowClient(run.sweep.uri).get_run(run.run_id)
    assert child.info.status == "FINISHED" and child.data.metrics["asr"] == 12.5


def test_registry_aliases_point_at_the_picks(two_finished_trials):
    import mlflow
    from mlflow import MlflowClient

    low, high = two_finished_trials["low"], two_finished_trials["high"]
    sweep = low.sweep
    tags = {"sweep_id": sweep.sweep_id}
    versions = tracking.register_models(sweep, "unit-pareto", [(low.run_id, tags)])
    # Registering again (a resumed sweep) finds the model by MLflow's error code and skips.
    versions += tracking.register_models(
        sweep, "unit-pareto", [(low.run_id, tags), (high.run_id, tags)]
    )
    assert versions == ["1", "2"]
    aliases = tracking.set_aliases(
        sweep, "unit-pareto", {"lowest-asr": low.run_id, "best-acc": high.run_id}
    )
    assert aliases == {"lowest-asr": "1", "best-acc": "2"}
    client = MlflowClient(sweep.uri, registry_uri=sweep.uri)
    assert client.get_model_version_by_alias("unit-pareto", "lowest-asr").run_id == low.run_id
    model_id = client.get_run(low.run_id).data.tags["bdat_ray.model_uri"].removeprefix("models:/")
    links = json.loads(client.get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert links == [{"name": "unit-pareto", "version": "1"}]  # the Models tab shows it
    _global_uri(sweep.uri)
    model = mlflow.pytorch.load_model("models:/unit-pareto@best-acc")
    assert model(__import__("torch").rand(3, 1, 16, 16)).shape == (3, 10)


def test_a_child_run_holds_system_metrics_and_dataset_inputs(two_finished_trials):
    from mlflow import MlflowClient

    run = two_finished_trials["high"]
    child = MlflowClient(run.sweep.uri).get_run(run.run_id)
    system = {k for k in child.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
    inputs = {d.dataset.name: {t.key: t.value for t in d.tags} for d in child.inputs.dataset_inputs}
    assert set(inputs) == {"digits-train", "digits-test", "digits-poisoned-indices"}
    assert inputs["digits-train"]["mlflow.data.context"] == "training"
    assert inputs["digits-poisoned-indices"]["mlflow.data.context"] == "poisoning"
    (indices,) = [d.dataset for d in child.inputs.dataset_inputs if "poisoned" in d.dataset.name]
    assert json.loads(indices.profile)["features_shape"] == [7]
    assert (
        json.loads(indices.source)["tags"]["artifact"] == f"runs:/{run.run_id}/poisoned_indices.npy"
    )
