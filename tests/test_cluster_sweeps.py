"""What a cluster needs of a sweep, offline on one machine: results on an S3 API (moto's
server on 127.0.0.1) that a sweep finishes and resumes from; a sweep submitted with
``ray job submit`` to a ``ray start --head`` with token auth, logging to a basic-auth MLflow
server it learns of from the head's environment (as cluster.yaml sets it); the Optuna
journal on a directory shared by a two-node Ray cluster; and a GPU trial on a node without
CUDA failing with one clear line. Tiny trials: digits, 1–3 epochs, 1–2 trials each."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from bdat_ray.sweep import optuna_storage
from tests.conftest import REPO
from tests.test_sweep import (
    _free_port,
    _wait_for_session_exit,
    clean_env,
    mlflow_runs,
    run_cli,
    session_processes,
    space_file,
)

pytestmark = [pytest.mark.sweep, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _wait_for(what: str, ready, proc: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"{what} exited:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"{what} did not come up:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def _stop_session(proc: subprocess.Popen) -> None:
    """End every process of the session the test started (by pid; never `ray stop`, which
    would stop every Ray on this shared machine)."""
    for pid in session_processes(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    with contextlib.suppress(AssertionError):
        _wait_for_session_exit(proc.pid, timeout=20)
    for pid in session_processes(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _wait_for_session_exit(proc.pid)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# --storage on object storage (moto's S3 server).


@pytest.fixture
def s3(tmp_path):
    """An S3 API on 127.0.0.1 with one bucket; the AWS variables that point boto3, pyarrow
    and so Ray Tune at it."""
    import boto3

    port = _free_port()
    log = tmp_path / "moto.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        _wait_for("moto", lambda: _http_ok(f"{env['AWS_ENDPOINT_URL']}/moto-api/"), server, log)
        client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket="bdat-results")
        yield {"env": env, "client": client}
    finally:
        _stop_session(server)


def test_a_sweep_on_s3_finishes_and_resumes_from_it_alone(tmp_path, s3):
    space = space_file(
        tmp_path,
        """
        dimensions:
          train.lr: {loguniform: [0.01, 0.1]}
        num_samples: 2
        max_concurrent: 1
        seed: 1
        """,
        "remote",
    )
    cache = tmp_path / "cache"  # BDAT_RAY_CACHE: where the driver keeps the study locally
    env = clean_env(**s3["env"], BDAT_RAY_CACHE=str(cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--space", str(space), "--mlflow-uri", uri, "--storage", "s3://bdat-results/sweeps"]
    log = tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, "-m", "bdat_ray.sweep", *args],
        cwd=tmp_path,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:  # Ctrl-C once the first trial is done: the second is left for --resume
        _wait_for("the first trial", lambda: " done " in log.read_text(), driver, log, 300)
        os.kill(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        _stop_session(driver)
    first = log.read_text()
    assert "resume     python -m bdat_ray.sweep --resume" in first
    assert "s3://bdat-results/sweeps" in first
    assert not (tmp_path / "bdat_results").exists()  # nothing went to the local default

    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket="bdat-results")["Contents"]]
    (sweep_id,) = {k.split("/")[1] for k in keys if k.endswith("/sweep.json")}
    assert f"sweeps/{sweep_id}/space.yaml" in keys and f"sweeps/{sweep_id}/optuna.journal" in keys

    shutil.rmtree(cache)  # --resume must find everything in the bucket
    resumed = run_cli(["--resume", *args[2:]], tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "2 finished of 2 trials" in resumed.stdout

    journal = tmp_path / "journal"
    s3["client"].download_file("bdat-results", f"sweeps/{sweep_id}/optuna.journal", str(journal))
    import optuna

    study = optuna.load_study(study_name=sweep_id, storage=optuna_storage(str(journal)))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    _, parents, children = mlflow_runs(uri, "remote")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].data.tags["bdat_ray.ray_experiment_dir"] == (
        f"s3://bdat-results/sweeps/{sweep_id}"
    )
    checkpoints = [k for k in keys if "/checkpoint_" in k]
    assert checkpoints, keys  # trial checkpoints were written to the bucket by the trials


# ---------------------------------------------------------------------------------------------
# `ray job submit` to a token-authenticated head, logging to a basic-auth MLflow server.


@contextlib.contextmanager
def _basic_auth_mlflow(tmp_path: Path, password: str):
    port = _free_port()
    (tmp_path / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    log = tmp_path / "mlflow.log"
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            *f"server --app-name basic-auth --host 127.0.0.1 --port {port} --workers 1".split(),
            *("--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"),
            *("--artifacts-destination", str(tmp_path / "artifacts")),
        ],
        cwd=tmp_path,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": os.urandom(16).hex(),  # CSRF; per server start
        },
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for("mlflow server", lambda: _http_ok(f"{url}/health"), server, log)
        yield url
    finally:
        _stop_session(server)


@contextlib.contextmanager
def _ray_head(env: dict[str, str], log: Path):
    """``ray start --head --block`` on 127.0.0.1 with every port its own, and a temp dir of
    its own (so no other Ray on this machine finds or joins it)."""
    temp = tempfile.mkdtemp(prefix="r15", dir="/tmp")  # short: Ray's socket paths
    dashboard = _free_port()
    ports = {
        "--port": _free_port(),
        "--dashboard-port": dashboard,
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--metrics-export-port": _free_port(),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            "--include-dashboard=true",
            "--num-cpus=2",
            "--num-gpus=0",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
            *(f"{flag}={port}" for flag, port in ports.items()),
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:

        def jobs_api_up() -> bool:
            listing = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=env,
                capture_output=True,
                timeout=60,
            )
            return listing.returncode == 0

        _wait_for("ray head", jobs_api_up, head, log, timeout=180)
        yield address
    finally:
        _stop_session(head)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_logs_to_the_mlflow_server_the_head_names(tmp_path):
    # The cluster's one secret: Ray's token, which is also the MLflow admin password.
    token = tmp_path / "auth_token"
    token.write_text("bdat-test-token-" + os.urandom(8).hex())
    token.chmod(0o600)
    space = space_file(
        tmp_path, "fixed: {train.epochs: 1}\ndimensions:\n  at.threat: {grid: [none]}\n", "job"
    )
    with _basic_auth_mlflow(tmp_path, token.read_text()) as url:
        # What cluster.yaml's head start command exports before `ray start --head`.
        head_env = clean_env(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            MLFLOW_TRACKING_URI=url,
            MLFLOW_TRACKING_USERNAME="admin",
            MLFLOW_TRACKING_PASSWORD=token.read_text(),
            PYTHONPATH=str(REPO),
            PATH=f"{BIN}:{os.environ['PATH']}",
        )
        with _ray_head(head_env, tmp_path / "head.log") as address:
            # The submitting shell knows the token, not the MLflow address or password.
            submit_env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
            unauthorised = subprocess.run(
                [str(BIN / "ray"), "job", "list", "--address", address],
                env=clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="wrong-token"),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert unauthorised.returncode != 0
            job = subprocess.run(
                [
                    str(BIN / "ray"),
                    "job",
                    "submit",
                    "--address",
                    address,
                    "--",
                    "python",
                    "-m",
                    "bdat_ray.sweep",
                    "--space",
                    str(space),
                    "--storage",
                    str(tmp_path / "out"),
                ],
                env=submit_env,
                capture_output=True,
                text=True,
                timeout=420,
            )
            assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
            assert "succeeded" in job.stdout, job.stdout[-3000:]
            assert f"open {url} in a browser" in job.stdout
        with pytest.MonkeyPatch.context() as env:  # the client authenticates like the trials
            env.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            env.setenv("MLFLOW_TRACKING_PASSWORD", token.read_text())
            _, parents, children = mlflow_runs(url, "job")
            assert len(parents) == 1 and len(children) == 1
            assert children[0].info.status == "FINISHED"
            assert children[0].data.metrics["acc"] > 0
            env.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
            from mlflow import MlflowClient
            from mlflow.exceptions import MlflowException

            with pytest.raises(MlflowException):
                MlflowClient(url).search_experiments()
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a default local store


# ---------------------------------------------------------------------------------------------
# The Optuna journal on a directory shared by two nodes.


def test_optuna_journal_on_a_shared_directory_across_two_nodes(tmp_path):
    import optuna
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False}
    )
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        space = space_file(
            tmp_path,
            """
            fixed: {train.epochs: 1}
            dimensions:
              train.lr: {loguniform: [0.01, 0.1]}
            num_samples: 2
            max_concurrent: 2
            """,
            "shared",
        )
        shared = tmp_path / "shared"  # the stand-in for /mnt/shared: both nodes see it
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        proc = run_cli(
            ["--space", str(space), "--mlflow-uri", uri, "--storage", str(shared)],
            tmp_path,
            env=clean_env(RAY_ADDRESS=cluster.address),
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (journal,) = shared.glob("*/optuna.journal")
        assert not list(shared.glob("*/optuna.db"))
        assert "JournalStorage(JournalFileBackend(" in proc.stdout  # the printed hint
        study = optuna.load_study(
            study_name=journal.parent.name, storage=optuna_storage(str(journal))
        )
        assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
        _, _, children = mlflow_runs(uri, "shared")
        nodes = sorted(c.data.tags["bdat_ray.node_id"] for c in children)
        assert nodes == sorted(w.node_id for w in workers)  # one trial on each node
        by_trial = {c.data.tags["bdat_ray.trial_id"]: c for c in children}
        for trial in study.trials:
            child = by_trial[trial.user_attrs["ray_trial_id"]]
            assert trial.values == pytest.approx(
                [child.data.metrics["acc"], child.data.metrics["asr"]]
            )
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---------------------------------------------------------------------------------------------
# A GPU trial that lands on a node without CUDA.


def test_a_cuda_trial_on_a_node_without_cuda_fails_once_with_one_clear_line(tmp_path):
    space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "nocuda")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(
        ["--space", str(space), "--mlflow-uri", uri, "--storage", "out", "device=cuda"],
        tmp_path,
        env=clean_env(CUDA_VISIBLE_DEVICES=""),  # no CUDA here, even on a GPU machine
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = "NoCudaOnNode: device=cuda requested but torch.cuda.is_available() is false on node "
    assert line in proc.stderr and "not retrained: a retry would repeat it" in proc.stderr
    assert "FAILED  TrialFailedBefore" in proc.stderr  # the one retry ended at once
    assert "bad_config" not in proc.stderr and "ConfigError" not in proc.stderr
    _, _, (child,) = mlflow_runs(uri, "nocuda")
    assert child.data.tags["bdat_ray.failure_kind"] == "no_cuda"
    assert child.data.tags["bdat_ray.failure"].startswith("device=cuda requested")
    assert "\n" not in child.data.tags["bdat_ray.failure"]
    assert child.data.tags["bdat_ray.attempts"] == "1"  # the retry stopped before training
