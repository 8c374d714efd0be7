"""The sweep platform end to end: real Ray, real MLflow stores and server, real Optuna study,
each sweep driven through ``python -m bdat_ray.sweep`` in a subprocess like a user would.
Tiny trials (digits, a few epochs of a small CNN) keep each sweep under a minute on 2 CPUs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from bdat_ray.sweep import optuna_storage

pytestmark = [pytest.mark.sweep, pytest.mark.slow]

TINY = """
fixed:
  train.epochs: 3
  at.steps: 1
  eval.robust_samples: 64
  eval.steps: 2
"""


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without a tracking URI: every sweep here names its own."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, **extra}


def run_cli(
    args: list[str], cwd: Path, timeout: float = 420, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bdat_ray.sweep", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or clean_env(),
    )


@contextlib.contextmanager
def tracking_uri(uri: str):
    """``models:/`` URIs resolve through MLflow's global URI (which also sets the
    environment variable): set it for the block only."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)


def exported_predictions(model, images):
    """Labels a reloaded model predicts for uint8 images. The model is a torch.export program:
    eval-mode semantics are fixed in it, and torch refuses ``.eval()``/``.train()`` on it."""
    import torch

    with torch.no_grad():
        return model(images.float() / 255).argmax(1)


def space_file(directory: Path, body: str, name: str) -> Path:
    """TINY's fixed keys under the body's own (a space file may hold ``fixed`` only once)."""
    import yaml

    doc = yaml.safe_load(textwrap.dedent(body)) or {}
    doc["fixed"] = {**yaml.safe_load(TINY)["fixed"], **(doc.get("fixed") or {})}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    return path


def mlflow_runs(uri: str, experiment: str) -> tuple[object, list, list]:
    """(client, parent runs, child runs) of one experiment."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("bdat_ray.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("bdat_ray.role") == "trial"]
    return client, parents, children


def epochs_logged(client, run) -> list[int]:
    return [int(m.step) for m in client.get_metric_history(run.info.run_id, "epoch")]


def sweep_dir(storage: Path) -> Path:
    (path,) = [p.parent for p in storage.glob("*/sweep.json")]
    return path


def session_processes(sid: int) -> dict[int, str]:
    """pid -> command line of the live processes of session ``sid`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found[int(entry.name)] = cmdline
    return found


def _wait_for_session_exit(sid: int, timeout: float = 30) -> None:
    """Ray's workers sit in their own process groups but in the driver's session."""
    deadline = time.time() + timeout
    while session_processes(sid):
        assert time.time() < deadline, f"processes of session {sid} outlived the kill"
        time.sleep(0.2)


def start_driver(
    args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, Path]:
    """A sweep in its own session (so the test can kill all of it), logging to a file."""
    log = cwd / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "bdat_ray.sweep", *args],
        cwd=cwd,
        env=env or clean_env(),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return driver, log


def wait_for_children(driver, log: Path, uri: str, experiment: str, ready, timeout=300):
    """Poll the sweep's child runs until ``ready(client, children)``; returns (client,
    children). The store is opened only once the driver has created it (printed its sweep
    id): two processes creating MLflow's tables in one new sqlite file collide."""
    deadline = time.time() + timeout
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
        if "sweep id" not in log.read_text():
            continue
        client, _, children = mlflow_runs(uri, experiment)
        if ready(client, children):
            return client, children
    raise AssertionError(f"sweep ended or timed out first:\n{log.read_text()[-3000:]}")


# ---------------------------------------------------------------------------------------------
# A small grid sweep: two trials that train, one that diverges.


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    work = tmp_path_factory.mktemp("grid")
    space = space_file(
        work,
        """
        dimensions:
          at.threat: {grid: [none, linf]}
        variants:
          - name: base
          - name: diverges          # lr 1e30: the loss is NaN within the first epoch
            fixed: {train.lr: 1e30}
            dimensions: {at.threat: {grid: [none]}}
        max_concurrent: 2
        """,
        "small",
    )
    uri = f"sqlite:///{work / 'mlflow.db'}"
    started = time.perf_counter()
    proc = run_cli(["--space", str(space), "--mlflow-uri", uri, "--storage", "results"], work)
    return {
        "proc": proc,
        "uri": uri,
        "work": work,
        "seconds": time.perf_counter() - started,
        "dir": sweep_dir(work / "results") if proc.returncode == 0 else None,
    }


def test_two_trial_sweep_end_to_end(grid_sweep):
    proc = grid_sweep["proc"]
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 finished, 1 failed of 3 trials" in proc.stdout
    assert "Pareto front (acc max, asr min)" in proc.stdout
    assert "mlflow ui --backend-store-uri " + grid_sweep["uri"] in proc.stdout
    assert "grid search over 3 trials (no Optuna)" in proc.stdout
    assert "epoch 3/3" in proc.stderr and "Traceback" not in proc.stderr

    from bdat_ray.config import leaf_keys

    client, parents, children = mlflow_runs(grid_sweep["uri"], "small")
    (parent,) = parents
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search"] == "grid" and parent.data.params["trials"] == "3"
    assert parent.data.tags["mlflow.source.git.commit"]
    assert parent.data.metrics["trials_finished"] == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"small.yaml", "pareto.md", "pareto.json"} <= artifacts
    # the keys its fronts were grouped by, for the analysis to group the same way
    assert parent.data.tags["bdat_ray.environment_keys"] == "[]"
    assert f"python -m analysis.report --sweep {parent.info.run_name}" in proc.stdout

    assert len(children) == 3
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 2
    for child in finished:
        assert len(child.data.params) >= len(leaf_keys())  # the full flattened config
        assert child.data.params["data.name"] == "digits"
        assert len(child.data.tags["bdat_ray.config_hash"]) == 12
        assert child.data.tags["bdat_ray.trial_dir"].startswith(str(grid_sweep["dir"]))
        assert epochs_logged(client, child) == [1, 2, 3]
        metrics = child.data.metrics
        assert {"acc", "asr", "asr_pred", "robust_acc", "seconds", "gpu_seconds"} <= set(metrics)
        assert "images_per_s" in metrics
        assert metrics["gpu_seconds"] == 0  # seconds × 0 GPUs requested
        assert {"train_loss", "train_clean_acc", "epoch_seconds"} <= set(metrics)
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "poisoned_indices.npy" in names and "result.json" in names
        assert "system/cpu_utilization_percentage" in metrics  # sampled in the trial process
        contexts = {d.dataset.name: d.tags[0].value for d in child.inputs.dataset_inputs}
        assert contexts == {
            "digits-train": "training",
            "digits-test": "evaluation",
            "digits-poisoned-indices": "poisoning",
        }
    assert (grid_sweep["dir"] / "space.yaml").is_file()


def test_a_diverged_trial_fails_alone_and_is_not_retrained(grid_sweep):
    from ray.tune import ExperimentAnalysis

    client, _, children = mlflow_runs(grid_sweep["uri"], "small")
    (failed,) = [c for c in children if c.info.status == "FAILED"]
    assert failed.data.params["train.lr"] == "1e+30"
    assert failed.data.tags["bdat_ray.failure_kind"] == "diverged"
    assert "non-finite" in failed.data.tags["bdat_ray.failure"]
    assert epochs_logged(client, failed) == []  # diverged within epoch 1

    trials = ExperimentAnalysis(str(grid_sweep["dir"])).trials
    status = sorted(t.status for t in trials)
    assert status == ["ERROR", "TERMINATED", "TERMINATED"]
    (errored,) = [t for t in trials if t.status == "ERROR"]
    # Ray's retries (FailureConfig) of a diverged trial stop at once instead of training.
    errors = (Path(errored.path) / "error.txt").read_text()
    assert "TrainingDiverged" in errors and "not training again" in errors
    assert "FAILED  TrialFailedBefore" in grid_sweep["proc"].stderr


def test_logged_model_reloads_and_reproduces_its_acc(grid_sweep, digits):
    import mlflow.pytorch

    from bdat_ray.metrics import clean_accuracy

    client, _, children = mlflow_runs(grid_sweep["uri"], "small")
    with tracking_uri(grid_sweep["uri"]):
        for child in (c for c in children if c.info.status == "FINISHED"):
            model = mlflow.pytorch.load_model(child.data.tags["bdat_ray.model_uri"])
            acc = clean_accuracy(exported_predictions(model, digits.x_test), digits.y_test)
            assert abs(acc - child.data.metrics["acc"]) <= 0.5
        # Pareto-optimal models are registered and load by registry name too.
        versions = client.search_model_versions("name = 'small-pareto'")
        assert versions and all(v.tags["sweep_id"] == grid_sweep["dir"].name for v in versions)
        model = mlflow.pytorch.load_model(f"models:/small-pareto/{versions[0].version}")
        # The sweep's picks are registry aliases (one attack setting: no suffix).
        lowest = client.get_model_version_by_alias("small-pareto", "lowest-asr")
        assert lowest.run_id in {v.run_id for v in versions}
        assert f"lowest-asr → v{lowest.version}" in grid_sweep["proc"].stdout
        assert mlflow.pytorch.load_model("models:/small-pareto@lowest-asr")(
            digits.x_test[:1].float() / 255
        ).shape == (1, 10)
    assert model(digits.x_test[:7].float() / 255).shape == (7, 10)  # any batch size


# ---------------------------------------------------------------------------------------------
# Optuna: the study outlives the driver, and early-stopped trials stay out of its front.


def test_optuna_study_is_readable_after_the_driver_exits(tmp_path):
    import optuna

    space = space_file(
        tmp_path,
        """
        dimensions:
          at.threat: {choice: [none, linf]}
          at.linf.eps: {uniform: ["4/255", "16/255"], when: {at.threat: linf}}
          train.lr: {loguniform: [0.001, 0.2]}
        num_samples: 6
        max_concurrent: 2
        early_stopping: {metric: acc, mode: max, grace_period: 1, reduction_factor: 2}
        seed: 3
        """,
        "search",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["--space", str(space), "--mlflow-uri", uri, "--storage", "out"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Optuna multi-objective search" in proc.stdout

    # The driver process has exited; the study is read from its journal file.
    directory = sweep_dir(tmp_path / "out")
    study = optuna.load_study(
        study_name=directory.name, storage=optuna_storage(str(directory / "optuna.journal"))
    )
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and states.count("RUNNING") == 0
    assert states.count("PRUNED") >= 1, states  # ASHA stopped some trials early
    front = study.best_trials
    assert front and all(t.state.name == "COMPLETE" for t in front)

    client, _, children = mlflow_runs(uri, "search")
    by_trial = {c.data.tags["bdat_ray.trial_id"]: c for c in children}
    for trial in study.trials:
        child = by_trial[trial.user_attrs["ray_trial_id"]]
        if trial.state.name == "PRUNED":
            assert child.info.status == "KILLED"
            assert child.data.tags["bdat_ray.outcome"] == "early_stopped"
            assert len(epochs_logged(client, child)) < 3
        else:  # a complete trial trained every epoch and its values are its final metrics
            assert child.data.tags["bdat_ray.outcome"] == "finished"
            assert epochs_logged(client, child) == [1, 2, 3]
            assert trial.values == pytest.approx(
                [child.data.metrics["acc"], child.data.metrics["asr"]]
            )
    # The printed Pareto table is the study's front.
    table = proc.stdout.split("Pareto front", 1)[1]
    printed = {line.split()[0] for line in table.splitlines()[3:] if line.strip()}
    printed &= set(by_trial)
    assert printed == {t.user_attrs["ray_trial_id"] for t in front}


# ---------------------------------------------------------------------------------------------
# Killing the driver mid-sweep, then --resume.


def test_resume_after_the_driver_is_killed_loses_and_repeats_nothing(tmp_path):
    import optuna
    from ray.tune import ExperimentAnalysis

    space = space_file(
        tmp_path,
        """
        fixed:
          train.epochs: 4
          at.threat: linf
          at.steps: 4                 # ~2.5 s epochs: longer than Tune's 1 s snapshots
          eval.robust_samples: 64
          eval.steps: 2
        dimensions:
          at.linf.eps: {uniform: ["2/255", "16/255"]}
        num_samples: 4
        max_concurrent: 2
        """,
        "killed",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--mlflow-uri", uri, "--storage", "out"]
    driver, log = start_driver(["--space", str(space), *args], tmp_path)

    def mid_sweep(client, children) -> bool:  # a trial done, another in mid-training
        finished = [c for c in children if c.info.status == "FINISHED"]
        running = [c for c in children if c.info.status == "RUNNING"]
        return bool(finished) and any(len(epochs_logged(client, c)) in (2, 3) for c in running)

    client, _ = wait_for_children(driver, log, uri, "killed", mid_sweep)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait()
    _wait_for_session_exit(driver.pid)
    # Read after the kill: a trial may have finished logging in the moment before it.
    children = mlflow_runs(uri, "killed")[2]
    done_before = {c.info.run_id: c.info.end_time for c in children if c.info.status == "FINISHED"}
    in_flight = {
        c.info.run_id: len(epochs_logged(client, c)) for c in children if c.info.status == "RUNNING"
    }
    assert 1 <= len(done_before) < 4 and any(n >= 2 for n in in_flight.values())

    proc = run_cli(["--resume", *args], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "4 finished of 4 trials" in proc.stdout

    _, parents, children = mlflow_runs(uri, "killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert epochs_logged(client, child) == [1, 2, 3, 4]  # no epoch lost or repeated
    for run_id, end_time in done_before.items():  # finished trials were not run again
        run = client.get_run(run_id)
        assert run.info.end_time == end_time and run.data.tags["bdat_ray.attempts"] == "1"
    # Trials in flight went on from a checkpoint, not from scratch: from the one in Tune's
    # last state snapshot (at most ~1 s old, so possibly an epoch behind the newest).
    for run_id, logged in in_flight.items():
        if logged >= 2:
            assert int(client.get_run(run_id).data.tags["bdat_ray.resumed_after_epoch"]) >= 1
    directory = sweep_dir(tmp_path / "out")
    trials = ExperimentAnalysis(str(directory)).trials
    assert sorted(t.status for t in trials) == ["TERMINATED"] * 4
    study = optuna.load_study(
        study_name=directory.name, storage=optuna_storage(str(directory / "optuna.journal"))
    )
    assert [t.state.name for t in study.trials].count("COMPLETE") == 4
    assert all(t.state.name in ("COMPLETE", "FAIL") for t in study.trials)


def test_a_killed_trial_process_is_retried_from_its_last_checkpoint(tmp_path):
    from ray.tune import ExperimentAnalysis

    space = space_file(
        tmp_path,
        "fixed:\n  train.epochs: 6\ndimensions:\n  train.seed: {grid: [0, 1]}\n",
        "retried",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "out"]
    driver, log = start_driver(args, tmp_path)
    client, _ = wait_for_children(
        driver,
        log,
        uri,
        "retried",
        lambda client, children: any(len(epochs_logged(client, c)) >= 2 for c in children),
    )
    # A lost worker (a reclaimed spot node, an OOM kill): SIGKILL one trial's process.
    workers = [pid for pid, cmd in session_processes(driver.pid).items() if "ImplicitFunc" in cmd]
    assert workers, session_processes(driver.pid)
    os.kill(workers[0], signal.SIGKILL)
    assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]

    _, _, children = mlflow_runs(uri, "retried")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    (retried,) = [c for c in children if c.data.tags["bdat_ray.attempts"] == "2"]
    assert int(retried.data.tags["bdat_ray.resumed_after_epoch"]) >= 1  # not from scratch
    assert "died" in retried.data.tags["bdat_ray.recovered_error"]
    assert "bdat_ray.failure" not in retried.data.tags
    for child in children:
        assert epochs_logged(client, child) == [1, 2, 3, 4, 5, 6]
    trials = ExperimentAnalysis(str(sweep_dir(tmp_path / "out"))).trials
    assert sorted(t.num_failures for t in trials) == [0, 1]
    assert "retrying from its last checkpoint" in log.read_text()


# ---------------------------------------------------------------------------------------------
# A real MLflow tracking server, started here on 127.0.0.1.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """IPv4 addresses with a listening TCP socket on ``port`` (Linux /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def serve_mlflow(work: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` over ``work/server.db`` (artifacts in
    ``work/server-artifacts``, log appended to ``work/server.log``), once it answers."""
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{work / 'server.db'}",
            "--artifacts-destination",
            str(work / "server-artifacts"),
            "--workers",
            "1",
        ],
        stdout=(work / "server.log").open("a"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.read() == b"OK":
                    return server
        except OSError:
            pass
        assert server.poll() is None and time.time() < deadline, work / "server.log"
        time.sleep(0.5)


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    artifacts = tmp_path / "server-artifacts"
    server = serve_mlflow(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "port": port, "artifacts": artifacts}
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    _wait_for_session_exit(server.pid)


def test_sweep_logs_to_a_real_mlflow_server(tmp_path, mlflow_server, digits):
    import mlflow.pytorch

    from bdat_ray.metrics import clean_accuracy

    assert _listening_addresses(mlflow_server["port"]) == {"127.0.0.1"}
    space = space_file(
        tmp_path, "dimensions:\n  at.threat: {grid: [none, linf]}\nmax_concurrent: 2\n", "served"
    )
    proc = run_cli(
        ["--space", str(space), "--mlflow-uri", mlflow_server["url"], "--storage", "out"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"open {mlflow_server['url']} in a browser" in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the local default store

    client, parents, children = mlflow_runs(mlflow_server["url"], "served")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        assert epochs_logged(client, child) == [1, 2, 3]
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        with tracking_uri(mlflow_server["url"]):
            model = mlflow.pytorch.load_model(child.data.tags["bdat_ray.model_uri"])
        acc = clean_accuracy(exported_predictions(model, digits.x_test), digits.y_test)
        assert abs(acc - child.data.metrics["acc"]) <= 0.5
    # The artifacts went through the server into its --artifacts-destination.
    assert list(mlflow_server["artifacts"].rglob("poisoned_indices.npy"))
    assert list(mlflow_server["artifacts"].rglob("model.pt2"))


# ---------------------------------------------------------------------------------------------
# A head and two worker nodes on one machine (Ray's multi-node test cluster).


def test_trials_spread_over_worker_nodes_into_one_experiment(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        # Two worker nodes with one (logical) GPU each; trials take half a GPU and half a
        # CPU, so four run at once, two per node. device=cpu: there is no real GPU here.
        workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        space = space_file(
            tmp_path,
            "dimensions:\n  train.seed: {grid: [0, 1, 2, 3]}\nmax_concurrent: 4\n",
            "spread",
        )
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "out", "device=cpu"]
        proc = run_cli(
            [*args, "--gpus-per-trial", "0.5", "--cpus-per-trial", "0.5"],
            tmp_path,
            env=clean_env(RAY_ADDRESS=cluster.address),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "0.5 CPU + 0.5 GPU per trial" in proc.stdout
        _, parents, children = mlflow_runs(uri, "spread")
        assert len(parents) == 1 and len(children) == 4
        assert len({c.info.experiment_id for c in children + parents}) == 1
        assert all(c.info.status == "FINISHED" for c in children)
        nodes = [c.data.tags["bdat_ray.node_id"] for c in children]
        assert sorted(nodes) == sorted(2 * [w.node_id for w in workers])  # never the head
        for child in children:  # GPU-seconds: seconds × GPUs requested per trial
            metrics = child.data.metrics
            assert metrics["gpu_seconds"] == pytest.approx(0.5 * metrics["seconds"])
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_defenses_run_inside_a_sweep_and_their_metrics_reach_mlflow(tmp_path):
    """A filter and a repair defense as a grid dimension: real Ray trials, real MLflow."""
    space = space_file(
        tmp_path,
        """
        dimensions:
          defense.name: {grid: [perfect_filter, fine_pruning]}
        max_concurrent: 2
        """,
        "defended",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pins = ["train.epochs=2", "eval.robust_samples=0", "defense.fine_pruning.epochs=1"]
    args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "results", *pins]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 finished" in proc.stdout
    client, _, children = mlflow_runs(uri, "defended")
    by_defense = {c.data.params["defense.name"]: c for c in children}
    filtered = by_defense["perfect_filter"].data.metrics
    assert filtered["detect_tpr"] == 100 and filtered["detect_fpr"] == 0
    assert filtered["removed"] == round(0.05 * 1400) and "defense_seconds" in filtered
    names = {a.path for a in client.list_artifacts(by_defense["perfect_filter"].info.run_id)}
    assert "removed_indices.npy" in names
    pruned = by_defense["fine_pruning"].data.metrics
    assert pruned["clean_fraction"] == pytest.approx(0.05, abs=1e-3)
    assert pruned["pruned_fraction"] == pytest.approx(0.2, abs=0.01)
    assert "acc_before_repair" in pruned
