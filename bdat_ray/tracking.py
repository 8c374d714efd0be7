"""The MLflow adapter: the only module that imports mlflow (lazily, inside functions).

Layout (README.md, "What a sweep records", has the full table):

- one **experiment** per sweep name (``--name``, default the space file's stem);
- one **parent run** per sweep (run name = sweep id ``NAME-YYYYmmdd-HHMMSS``): the space file
  as an artifact, the search settings as params, git commit and space hash as tags, and at the
  end counts, the Pareto table and wall time;
- the tracking URI travels to every trial (and into Ray's saved sweep state): credentials
  belong in ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``, never in the URI;
- one **child run** per Ray trial (tag ``mlflow.parentRunId``), created and written by the
  trial process itself so workers on other nodes log to the same server: the flattened config
  as params, per-epoch metrics with ``step = epoch``, final metrics, the model, the poisoned
  indices and the trigger picture, and its outcome (finished / early_stopped / failed).

Workers use `MlflowClient` with the run id (never the fluent ``start_run`` context, which ends
the run on exit) — except once, to log the model at the very end, where ending it is wanted.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bdat_ray.config import ConfigError
from bdat_ray.search_space import METRICS

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
TAG = "bdat_ray."
MODEL_NAME = "model"
#: Engine epoch keys renamed in MLflow so they do not collide with a final metric of the
#: same name logged at the last step (``images_per_s`` is the whole run's throughput).
EPOCH_RENAMES = {"images_per_s": "epoch_images_per_s"}
#: Failures that would repeat on a retry; a retried trial that finds one stops at once.
NON_RETRYABLE = ("diverged", "bad_config")


# ---------------------------------------------------------------------------------------------
# Where runs go.


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
    Relative sqlite paths become absolute: Ray runs trials in other working directories."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    key = "--mlflow-uri" if cli_uri else "MLFLOW_TRACKING_URI"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri.removeprefix('sqlite:///')).resolve()}"
    scheme = urlsplit(uri).scheme
    if scheme in ("", "file") and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "") != "true":
        raise ConfigError(
            key,
            "MLflow 3 keeps its file store in maintenance mode; use sqlite:///PATH.db or an "
            f"http(s):// server; got {redact(uri)}",
        )
    return uri


def redact(uri: str) -> str:
    """The URI without a password (safe to print, log and store)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def browse_hint(uri: str) -> str:
    """How a person opens the runs: the ``mlflow ui`` command for a local store."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {redact(uri)} in a browser"


def git_commit() -> tuple[str, bool]:
    """(commit of the checkout this package runs from, whether it has uncommitted changes);
    ("unknown", False) outside a git checkout (e.g. an installed wheel on a worker)."""
    repo = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "-uno"))
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _param_value(value: Any) -> str:
    return "None" if value is None else str(value)


# ---------------------------------------------------------------------------------------------
# The sweep (parent run): driver side.


@dataclass(frozen=True)
class SweepTracking:
    """What a trial needs to find its sweep in MLflow; pickled to every trial."""

    uri: str
    experiment_id: str
    parent_run_id: str
    sweep_id: str
    git_commit: str


def start_sweep(
    uri: str,
    *,
    experiment: str,
    sweep_id: str,
    space_file: Path,
    params: dict[str, Any],
    tags: dict[str, str],
) -> SweepTracking:
    """Create (or reuse) the experiment and open the sweep's parent run."""
    client = _client(uri)
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        experiment_id = found.experiment_id
    else:
        location = None
        if uri.startswith("sqlite:"):
            # Artifacts beside the store, not in whatever directory the driver started in.
            db = Path(uri.removeprefix("sqlite:///"))
            location = (db.parent / "mlruns" / experiment).as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    commit, dirty = git_commit()
    run = client.create_run(
        experiment_id,
        run_name=sweep_id,
        tags={
            "mlflow.source.git.commit": commit,
            f"{TAG}git_dirty": str(dirty).lower(),
            f"{TAG}role": "sweep",
            f"{TAG}sweep_id": sweep_id,
            **tags,
        },
    )
    from mlflow.entities import Param

    client.log_batch(
        run.info.run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())]
    )
    client.log_artifact(run.info.run_id, str(space_file))
    return SweepTracking(uri, experiment_id, run.info.run_id, sweep_id, commit)


def reopen_sweep(uri: str, parent_run_id: str, sweep_id: str) -> SweepTracking:
    """The parent run of an interrupted sweep, marked running again (``--resume``)."""
    client = _client(uri)
    try:
        run = client.get_run(parent_run_id)
    except Exception:  # MlflowException or a connection error: either way not reachable
        raise ConfigError(
            "--resume",
            f"the sweep's parent run {parent_run_id} is not in {redact(uri)}; pass the "
            "--mlflow-uri (or MLFLOW_TRACKING_URI) the sweep was started with",
        ) from None
    client.update_run(parent_run_id, status="RUNNING")
    commit = run.data.tags.get("mlflow.source.git.commit", "unknown")
    return SweepTracking(uri, run.info.experiment_id, parent_run_id, sweep_id, commit)


def _set_tags(client: Any, run_id: str, tags: dict[str, str]) -> None:
    """All tags in one request (one round trip to a remote server, not one per tag)."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def end_sweep(
    sweep: SweepTracking,
    *,
    status: str,
    metrics: dict[str, float],
    files: dict[str, str],
    tags: dict[str, str],
) -> None:
    """Close the parent run with summary metrics, tags and small text artifacts
    (name -> text)."""
    client = _client(sweep.uri)
    _set_tags(client, sweep.parent_run_id, tags)
    for key, value in metrics.items():
        client.log_metric(sweep.parent_run_id, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / name).write_text(text)
            client.log_artifact(sweep.parent_run_id, str(Path(tmp) / name))
    client.set_terminated(sweep.parent_run_id, status)


def register_models(
    sweep: SweepTracking, model_name: str, runs: list[tuple[str, dict[str, str]]]
) -> list[str]:
    """Register each (child run id, version tags) run's model under ``model_name``; a run
    already registered there (a resumed sweep ending twice) is skipped. Returns versions."""
    from mlflow.exceptions import MlflowException

    client = _client(sweep.uri)
    try:
        client.create_registered_model(
            model_name, description="Pareto-optimal models of bdat_ray sweeps (acc/asr)"
        )
    except MlflowException as err:
        if "already exists" not in str(err).lower():
            raise
    done = {v.run_id for v in client.search_model_versions(f"name = '{model_name}'")}
    versions = []
    for run_id, tags in runs:
        if run_id in done:
            continue
        uri = client.get_run(run_id).data.tags.get(f"{TAG}model_uri")
        if not uri:
            log.warning("run %s has no logged model; not registered", run_id)
            continue
        # The sqlite registry resolves a models:/ source through MLflow's *global* tracking
        # URI (its own TODO); the logged model's artifact location avoids that lookup.
        model_id = uri.removeprefix("models:/")
        version = client.create_model_version(
            model_name,
            source=client.get_logged_model(model_id).artifact_location,
            run_id=run_id,
            tags=tags,
            model_id=model_id,
            await_creation_for=0,
        )
        versions.append(str(version.version))
    return versions


def mark_trial(sweep: SweepTracking, trial_id: str, outcome: str, reason: str = "") -> None:
    """Driver side: record an outcome the trial process could not (it was stopped early by
    the scheduler, or it died). Leaves runs that the trial already closed alone."""
    client = _client(sweep.uri)
    run = find_trial_run(client, sweep, trial_id)
    if run is None or run.info.status != "RUNNING":
        return
    tags = {f"{TAG}outcome": outcome}
    if reason:
        tags |= {f"{TAG}failure": reason[:4000], f"{TAG}failure_kind": "died"}
    _set_tags(client, run.info.run_id, tags)
    client.set_terminated(run.info.run_id, "KILLED" if outcome == "early_stopped" else "FAILED")


def note_recovery(sweep: SweepTracking, trial_id: str, reason: str) -> None:
    """Driver side: a trial failed and Ray retries it; the error stays on its run as
    ``recovered_error`` (a killed process cannot record it itself)."""
    client = _client(sweep.uri)
    run = find_trial_run(client, sweep, trial_id)
    if run is not None:
        client.set_tag(run.info.run_id, f"{TAG}recovered_error", reason[:4000])


def find_trial_run(client: Any, sweep: SweepTracking, trial_id: str) -> Any:
    runs = client.search_runs(
        [sweep.experiment_id],
        filter_string=(
            f"tags.`{TAG}sweep_id` = '{sweep.sweep_id}' and tags.`{TAG}trial_id` = '{trial_id}'"
        ),
        max_results=1,
    )
    return runs[0] if runs else None


# ---------------------------------------------------------------------------------------------
# One trial (child run): written by the trial process itself.


class TrialFailedBefore(RuntimeError):
    """A retried trial whose earlier attempt failed in a way a retry would repeat."""


@dataclass
class TrialRun:
    sweep: SweepTracking
    run_id: str
    client: Any
    logged_epochs: set[int]
    final_metrics: dict[str, float] | None  # set when an earlier attempt already finished

    @classmethod
    def open(
        cls,
        sweep: SweepTracking,
        *,
        trial_id: str,
        trial_name: str,
        tags: dict[str, str],
    ) -> TrialRun:
        """Find this trial's child run (a retry or a resumed sweep continues it) or create it.
        Raises `TrialFailedBefore` when an earlier attempt diverged or had a bad config."""
        client = _client(sweep.uri)
        found = find_trial_run(client, sweep, trial_id)
        if found is None:
            run = client.create_run(
                sweep.experiment_id,
                run_name=trial_name,
                tags={
                    "mlflow.parentRunId": sweep.parent_run_id,
                    "mlflow.source.git.commit": sweep.git_commit,
                    f"{TAG}role": "trial",
                    f"{TAG}sweep_id": sweep.sweep_id,
                    f"{TAG}trial_id": trial_id,
                    f"{TAG}outcome": "running",
                    f"{TAG}attempts": "1",
                    **tags,
                },
            )
            return cls(sweep, run.info.run_id, client, set(), None)
        run_id, run_tags = found.info.run_id, found.data.tags
        if run_tags.get(f"{TAG}failure_kind") in NON_RETRYABLE:
            raise TrialFailedBefore(
                f"an earlier attempt failed ({run_tags[f'{TAG}failure_kind']}): "
                f"{run_tags.get(f'{TAG}failure', '')}; not training again"
            )
        if found.info.status == "FINISHED" and run_tags.get(f"{TAG}outcome") == "finished":
            final = {k: v for k, v in found.data.metrics.items() if k in METRICS}
            return cls(sweep, run_id, client, set(), final)
        attempts = int(run_tags.get(f"{TAG}attempts", "1")) + 1
        client.set_tag(run_id, f"{TAG}attempts", str(attempts))
        for key in (f"{TAG}failure", f"{TAG}failure_kind"):  # the previous attempt's; the
            if key in run_tags:  # driver keeps it as recovered_error (`note_recovery`)
                client.delete_tag(run_id, key)
        _set_tags(client, run_id, {**tags, f"{TAG}outcome": "running"})
        client.update_run(run_id, status="RUNNING")
        epochs = {int(m.step) for m in client.get_metric_history(run_id, "epoch")}
        return cls(sweep, run_id, client, epochs, None)

    def set_tags(self, tags: dict[str, str]) -> None:
        _set_tags(self.client, self.run_id, tags)

    def log_params(self, flat: dict[str, Any], prefix: str = "") -> None:
        """Params are immutable in MLflow: only keys not logged yet are sent."""
        from mlflow.entities import Param

        have = self.client.get_run(self.run_id).data.params
        params = [
            Param(f"{prefix}{k}", _param_value(v))
            for k, v in flat.items()
            if f"{prefix}{k}" not in have
        ]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 per batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_epoch(self, metrics: dict[str, float]) -> None:
        """One epoch's metrics at ``step = epoch``; an epoch logged by an earlier attempt
        (re-run after a resume from an older checkpoint) is not logged twice."""
        from mlflow.entities import Metric

        epoch = int(metrics["epoch"])
        if epoch in self.logged_epochs:
            return
        now = int(time.time() * 1000)
        batch = [
            Metric(EPOCH_RENAMES.get(k, k), float(v), now, epoch)
            for k, v in metrics.items()
            if isinstance(v, int | float) and math.isfinite(v)
        ]
        self.client.log_batch(self.run_id, metrics=batch)
        self.logged_epochs.add(epoch)

    def finish(
        self,
        final: dict[str, float],
        *,
        step: int,
        model: Any,
        workdir: Path,
        resolved: dict[str, Any],
    ) -> None:
        """Final metrics, resolved config, artifacts and the model; ends the run FINISHED."""
        import mlflow
        import mlflow.pytorch
        import torch
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), now, step) for k, v in final.items() if v is not None],
        )
        requested = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in resolved.items() if requested.get(k) != _param_value(v)}
        self.log_params(changed, prefix="resolved.")
        for name in ("poisoned_indices.npy", "removed_indices.npy", "trigger.png", "result.json"):
            if (workdir / name).is_file():
                self.client.log_artifact(self.run_id, str(workdir / name))
        mlflow.set_tracking_uri(self.sweep.uri)
        cpu_model = _cpu_copy(model, torch)
        with mlflow.start_run(run_id=self.run_id):  # leaving it marks the run FINISHED
            info = mlflow.pytorch.log_model(
                cpu_model,
                name=MODEL_NAME,
                serialization_format="pickle",  # pt2 (the default) fixes the batch size
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "bdat_ray"],
            )
            self.set_tags({f"{TAG}model_uri": info.model_uri, f"{TAG}outcome": "finished"})

    def fail(self, kind: str, reason: str) -> None:
        """Record why the trial failed and end the run FAILED (a retry reopens it)."""
        self.set_tags(
            {f"{TAG}outcome": "failed", f"{TAG}failure": reason[:4000], f"{TAG}failure_kind": kind}
        )
        self.client.set_terminated(self.run_id, "FAILED")


def _cpu_copy(model: Any, torch: Any) -> Any:
    """The model on CPU in eval mode, so it loads on machines without a GPU."""
    import copy

    clone = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    return clone.eval()
