"""Faults end with the right count and leave nothing half-done; secrets and pickles stay
out. Real Ray, real MLflow stores and a real MLflow server; the sweeps are driven through
``python -m bdat_ray.sweep`` like a user would, except where a crash has to be injected.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from tests.test_sweep import (  # noqa: F401 (mlflow_server is a fixture)
    _free_port,
    clean_env,
    epochs_logged,
    mlflow_runs,
    mlflow_server,
    run_cli,
    serve_mlflow,
    session_processes,
    space_file,
    start_driver,
    wait_for_children,
)

pytestmark = [pytest.mark.sweep, pytest.mark.slow]


def _one_error_line(proc: subprocess.CompletedProcess, key: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr
    return lines[0]


def _make_read_only(path: Path) -> bool:
    """Read-only for this process, root included (chattr +i where permission bits are
    ignored); False where neither works."""
    path.chmod(0o444)
    if os.geteuid() != 0:
        return True
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


# ---------------------------------------------------------------------------------------------
# MLflow stores that cannot take the sweep: one line, nothing left behind.


def test_a_read_only_store_fails_before_anything_starts(tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()  # a real, initialised store
    if not _make_read_only(db):
        pytest.skip("cannot make a file read-only here")
    try:
        space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "ro")
        started = time.perf_counter()
        proc = run_cli(
            ["--space", str(space), "--mlflow-uri", f"sqlite:///{db}", "--storage", "out"],
            tmp_path,
            timeout=120,
        )
        line = _one_error_line(proc, "--mlflow-uri")
        assert "cannot write" in line
        assert time.perf_counter() - started < 60
        assert not (tmp_path / "out").exists()
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True)


def test_a_store_mlflow_refuses_after_the_checks_leaves_no_sweep_folder(tmp_path):
    """A valid SQLite file with a schema MLflow does not know passes the cheap checks and
    fails when the parent run is created: the half-made sweep folder goes again."""
    db = tmp_path / "alien.db"
    with sqlite3.connect(db) as con:
        con.execute("create table alembic_version (version_num varchar(32) not null)")
        con.execute("insert into alembic_version values ('ffffffffffff')")
    space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "alien")
    (tmp_path / "out").mkdir()
    proc = run_cli(
        ["--space", str(space), "--mlflow-uri", f"sqlite:///{db}", "--storage", "out"],
        tmp_path,
        timeout=180,
    )
    line = _one_error_line(proc, "--mlflow-uri")
    assert "cannot start the sweep's parent run" in line
    assert list((tmp_path / "out").iterdir()) == []


def test_mlflow_down_at_start_fails_in_seconds_with_nothing_left(tmp_path):
    port = _free_port()  # nothing listens there
    space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "down")
    started = time.perf_counter()
    proc = run_cli(
        ["--space", str(space), "--mlflow-uri", f"http://ann:s3cret@127.0.0.1:{port}"],
        tmp_path,
        timeout=120,
    )
    line = _one_error_line(proc, "--mlflow-uri")
    assert "no MLflow server answers" in line and "s3cret" not in proc.stdout + proc.stderr
    assert time.perf_counter() - started < 60  # was 253 s of silent retries
    assert sorted(p.name for p in tmp_path.iterdir()) == ["down.yaml"]


# ---------------------------------------------------------------------------------------------
# A crash after the sweep started: the parent run does not stay RUNNING.


def test_a_crash_after_start_ends_the_parent_run_failed(tmp_path, monkeypatch):
    from bdat_ray import sweep

    def crash() -> None:
        raise RuntimeError("the Tune controller died")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sweep, "_start_ray", crash)
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, os.environ.get(name, "3"))
    space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "crash")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="controller died"):
        sweep.main(["--space", str(space), "--mlflow-uri", uri, "--storage", "out"])
    _, (parent,), _ = mlflow_runs(uri, "crash")
    assert parent.info.status == "FAILED"
    assert "controller died" in parent.data.tags["bdat_ray.failure"]


# ---------------------------------------------------------------------------------------------
# A trial killed more often than Ray retries it: failed, and counted so.


def _trial_workers(driver) -> list[int]:
    return [p for p, cmd in session_processes(driver.pid).items() if "ImplicitFunc" in cmd]


def test_a_trial_killed_beyond_the_retry_limit_counts_as_failed(tmp_path):
    # Ray retries a lost trial process without limit (a spot reclaim must not use up the
    # retries); the trial's own cap on starts, lowered here to 3, ends it as failed.
    max_attempts = 3
    space = space_file(
        tmp_path,
        "fixed:\n  train.epochs: 40\ndimensions:\n  train.seed: {grid: [0]}\n",
        "doomed",
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver, log = start_driver(
        ["--space", str(space), "--mlflow-uri", uri, "--storage", "out"],
        tmp_path,
        clean_env(BDAT_RAY_MAX_ATTEMPTS=str(max_attempts)),
    )
    wait_for_children(driver, log, uri, "doomed", lambda client, children: bool(children))
    killed: set[int] = set()
    deadline = time.time() + 300
    while len(killed) < max_attempts and driver.poll() is None:
        assert time.time() < deadline, log.read_text()[-3000:]
        fresh = [p for p in _trial_workers(driver) if p not in killed]
        if fresh:
            time.sleep(2)  # let it start training
            os.kill(fresh[0], signal.SIGKILL)
            killed.add(fresh[0])
        time.sleep(0.5)
    code = driver.wait(timeout=300)
    text = log.read_text()
    assert code == 1, text[-3000:]
    assert "1 failed of 1 trials" in text, text[-3000:]
    assert "[1/1]" in text and "[2/1]" not in text  # one label across every retry
    _, (parent,), (child,) = mlflow_runs(uri, "doomed")
    assert parent.info.status == "FAILED"
    assert parent.data.metrics["trials_failed"] == 1
    assert parent.data.metrics["trials_unfinished"] == 0
    assert child.info.status == "FAILED"
    assert child.data.tags["bdat_ray.failure_kind"] == "died"


# ---------------------------------------------------------------------------------------------
# The planted hub file: never unpickled.


class _Payload:
    """Unpickling this writes a marker file: the code a planted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({"features.0.weight": _Payload(marker)}, f)


@pytest.mark.parametrize("network", ["alex", "vgg"])
def test_a_planted_hub_file_is_refused_unexecuted(tmp_path, monkeypatch, network):
    import torchvision.models as tvm

    from bdat_ray.options import ConfigError
    from bdat_ray.threats.perceptual import ImageNetFeatures

    weights = getattr(tvm, ImageNetFeatures.WEIGHTS[network]).IMAGENET1K_V1
    marker = tmp_path / "marker"
    _plant(tmp_path / "hub" / "checkpoints" / Path(weights.url).name, marker)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"at\.perceptual\.network"):
        ImageNetFeatures(network)
    assert not marker.exists()


def test_weights_are_read_as_tensors_only(tmp_path):
    """Past the hash check too (a matching prefix given), a pickle is not run."""
    import hashlib

    from bdat_ray.options import ConfigError
    from bdat_ray.threats.perceptual import safe_weights

    marker = tmp_path / "marker"
    planted = tmp_path / "w.pth"
    _plant(planted, marker)
    prefix = hashlib.sha256(planted.read_bytes()).hexdigest()[:8]
    with pytest.raises(ConfigError, match="more than tensors"):
        safe_weights(planted, prefix)
    assert not marker.exists()


def test_genuine_weights_fill_lpips_features(tmp_path, monkeypatch):
    """A real torchvision AlexNet state dict (random weights: no download here) placed under
    its expected name fills lpips' feature slices exactly."""
    import hashlib

    import torchvision.models as tvm

    from bdat_ray.threats import perceptual

    state = tvm.alexnet(weights=None).state_dict()
    name = Path(tvm.AlexNet_Weights.IMAGENET1K_V1.url).name
    path = tmp_path / "hub" / "checkpoints" / name
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(perceptual, "expected_sha256_prefix", lambda _path: digest)
    features = perceptual.ImageNetFeatures("alex")
    loaded = features.net.state_dict()  # lpips' slices keep torchvision's indices as names
    assert torch.equal(loaded["slice2.3.weight"], state["features.3.weight"])
    assert torch.equal(loaded["slice5.10.bias"], state["features.10.bias"])
    assert len(loaded) == len([k for k in state if k.startswith("features.")])


# ---------------------------------------------------------------------------------------------
# A password in the tracking URI: never printed, logged or stored.


def test_the_password_of_the_tracking_uri_appears_nowhere(tmp_path, mlflow_server):  # noqa: F811
    secret = "s3cret-pw-91x"
    host = mlflow_server["url"].removeprefix("http://")
    uri = f"http://ann:{secret}@{host}"
    space = space_file(tmp_path, "dimensions:\n  at.threat: {grid: [none]}\n", "secret")
    ray_tmp = Path(tempfile.mkdtemp(prefix="r12", dir="/tmp"))  # unix sockets: short paths
    env = clean_env(RAY_TMPDIR=str(ray_tmp))
    env.pop("MLFLOW_TRACKING_USERNAME", None)
    env.pop("MLFLOW_TRACKING_PASSWORD", None)
    proc = subprocess.run(
        [sys.executable, "-m", "bdat_ray.sweep", "--space", str(space), "--mlflow-uri", uri],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert secret not in proc.stdout + proc.stderr
    assert "View run" not in proc.stdout
    leaks = [
        str(p)
        for root in (ray_tmp, tmp_path)
        for p in root.rglob("*")
        if p.is_file() and secret.encode() in p.read_bytes()
    ]
    assert not leaks, leaks
    assert list(ray_tmp.rglob("worker-*.out")), "no worker logs were searched"
    _, parents, children = mlflow_runs(mlflow_server["url"], "secret")
    assert len(parents) == 1 and len(children) == 1
    for run in [*parents, *children]:
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not [v for v in values if secret in v], run.info.run_name
    shutil.rmtree(ray_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The MLflow server lost mid-sweep: said so, no crash; --resume finishes every trial.


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGKILL)
    server.wait(timeout=30)


def test_mlflow_lost_mid_sweep_is_reported_and_resume_finishes_every_trial(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve_mlflow(tmp_path, port)
    space = space_file(
        tmp_path,
        "fixed:\n  train.epochs: 6\ndimensions:\n  train.seed: {grid: [0, 1]}\nmax_concurrent: 1\n",
        "lost",
    )
    args = ["--space", str(space), "--mlflow-uri", url, "--storage", "out"]
    # One retry per MLflow request instead of the sweep's three: the outage is the same,
    # the test waits less for each trial to give up.
    quick = clean_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    driver, log = start_driver(args, tmp_path, quick)
    try:
        wait_for_children(
            driver,
            log,
            url,
            "lost",
            lambda client, children: any(epochs_logged(client, c) for c in children),
        )
    finally:
        _stop(server)
    code = driver.wait(timeout=600)
    text = log.read_text()
    assert code == 130, text[-3000:]  # not recorded: resumable, not "done"
    assert f"MLflow at {url} did not answer" in text, text[-3000:]
    assert "resume     python -m bdat_ray.sweep --resume" in text

    server = serve_mlflow(tmp_path, port)
    try:
        proc = run_cli(["--resume", "--storage", "out", "--mlflow-uri", url], tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        client, (parent,), children = mlflow_runs(url, "lost")
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["trials_finished"] == 2
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        for child in children:
            assert epochs_logged(client, child) == [1, 2, 3, 4, 5, 6]
    finally:
        _stop(server)
