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

Workers write with `MlflowClient` and the run id. The trial process also makes its run the
fluent *active run* (`TrialRun.monitor_system`): MLflow's system-metrics monitor samples CPU/GPU
utilisation and memory into it, and `mlflow.pytorch.log_model` logs into it; `finish`/`fail`
end it.

The model is logged as MLflow recommends for PyTorch: ``pt2`` (a `torch.export` program) with
a signature whose batch dimension is ``-1`` (MLflow exports it dynamic), an input example of
real test images, and this package's source as ``code_paths``. Final metrics carry the logged
model's id, so the Models tab and ``mlflow.search_logged_models(filter_string="metrics.asr <
20")`` see them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bdat_ray.config import ConfigError
from bdat_ray.search_space import METRICS

log = logging.getLogger(__name__)

DEFAULT_STORE = "mlflow.db"
TAG = "bdat_ray."
#: Engine epoch keys renamed in MLflow so they do not collide with a final metric of the
#: same name logged at the last step (``images_per_s`` is the whole run's throughput).
EPOCH_RENAMES = {"images_per_s": "epoch_images_per_s"}
#: Failures that would repeat on a retry; a retried trial that finds one stops at once.
NON_RETRYABLE = ("diverged", "bad_config", "no_cuda")
#: Ray retries a trial without limit (a spot reclaim must never use up its retries, see
#: `sweep.MAX_FAILURES`); an exception raised inside the trial is retried this many times,
#: and no trial starts more than MAX_ATTEMPTS times, whatever ended the earlier ones.
ERROR_RETRIES = 2
#: ``BDAT_RAY_MAX_ATTEMPTS`` in the driver's environment (trials inherit it) lowers or raises it.
MAX_ATTEMPTS = int(os.environ.get("BDAT_RAY_MAX_ATTEMPTS", "20"))
#: Where a cluster run finds its commit: ``ray up`` syncs no ``.git``, so the command that
#: starts the driver passes ``BDAT_RAY_GIT_COMMIT="$(git describe --always --dirty
#: --abbrev=40)"`` from the local checkout (docs/cluster.md).
GIT_COMMIT_ENV = "BDAT_RAY_GIT_COMMIT"
#: Seconds between system-metric samples in a trial's run (MLflow's default is 10 s; trials
#: on digits last tens of seconds). Each sample is one small request to the store.
SYSTEM_METRICS_INTERVAL_S = 2.0
#: Images in the logged model's input example. torch.export specialises a size-1 dimension,
#: so the batch dimension is only exported dynamic from an example of two or more.
EXAMPLE_BATCH = 2
PACKAGE_DIR = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------
# Where runs go.


def resolve_tracking_uri(cli_uri: str | None = None) -> str:
    """``--mlflow-uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``.
    Relative sqlite paths become absolute: Ray runs trials in other working directories."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE}"
    key = "--mlflow-uri" if cli_uri else "MLFLOW_TRACKING_URI"
    uri = _credentials_to_environment(uri)
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


def _credentials_to_environment(uri: str) -> str:
    """``http://user:password@host`` -> ``http://host``, with the pair moved to
    ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD`` (which MLflow's client reads, and which local
    Ray workers inherit): the URI travels into params, tags, Ray's saved state and every
    message, the password must not. Variables already set win."""
    from bdat_ray.preflight import split_credentials

    bare, user, password = split_credentials(uri)
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", user)
    if password is not None:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", password)
    return bare


def redact(uri: str) -> str:
    """The URI (or any text holding URIs) without a password: safe to print, log, store."""
    from bdat_ray.preflight import mask_secrets

    return mask_secrets(uri)


def browse_hint(uri: str) -> str:
    """How a person opens the runs: the ``mlflow ui`` command for a local store."""
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {redact(uri)} in a browser"


def git_commit() -> tuple[str, bool]:
    """(commit of the checkout this package runs from, whether it has uncommitted changes);
    from ``$BDAT_RAY_GIT_COMMIT`` (``SHA`` or ``SHA-dirty``) outside a git checkout, as on
    a ``ray up`` cluster; else ("unknown", False)."""
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists() and os.environ.get(GIT_COMMIT_ENV):
        described = os.environ[GIT_COMMIT_ENV].strip()
        return described.removesuffix("-dirty"), described.endswith("-dirty")

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
    for name, text in files.items():
        client.log_text(sweep.parent_run_id, text, name)
    client.set_terminated(sweep.parent_run_id, status)


def abandon_sweep(sweep: SweepTracking, status: str, reason: str) -> None:
    """Best effort after the driver crashed: the parent run, if still RUNNING, ends
    ``status`` with the reason as ``bdat_ray.failure`` (``--resume`` reopens it). Never
    raises: the crash it follows is the error to show."""
    try:
        client = _client(sweep.uri)
        if client.get_run(sweep.parent_run_id).info.status != "RUNNING":
            return
        _set_tags(client, sweep.parent_run_id, {f"{TAG}failure": redact(reason)[:4000]})
        client.set_terminated(sweep.parent_run_id, status)
    except Exception as err:  # MLflow itself may be what failed
        log.warning("could not mark the sweep's parent run %s: %s", status, redact(str(err)))


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
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
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
        _link_version(client, model_id, model_name, str(version.version))
        versions.append(str(version.version))
    return versions


def _link_version(client: Any, model_id: str, model_name: str, version: str) -> None:
    """Record the version on its LoggedModel (tag ``mlflow.modelVersions``), as
    `mlflow.register_model` does: the Models tab's *Registered models* column reads it."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    known = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    links = [*json.loads(known or "[]"), {"name": model_name, "version": version}]
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})


def set_aliases(sweep: SweepTracking, model_name: str, picks: dict[str, str]) -> dict[str, str]:
    """Point each registry alias (alias -> child run id) at that run's version of
    ``model_name``, moving it from an earlier sweep's pick; returns alias -> version. Load one
    with ``mlflow.pytorch.load_model("models:/NAME@ALIAS")``."""
    client = _client(sweep.uri)
    version_of = {
        v.run_id: str(v.version) for v in client.search_model_versions(f"name = '{model_name}'")
    }
    aliases = {}
    for alias, run_id in picks.items():
        if run_id in version_of:
            client.set_registered_model_alias(model_name, alias, version_of[run_id])
            aliases[alias] = version_of[run_id]
    return aliases


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
        kind = run_tags.get(f"{TAG}failure_kind")
        errors = int(run_tags.get(f"{TAG}errors", "0")) + (kind == "error")
        attempts = int(run_tags.get(f"{TAG}attempts", "1")) + 1
        if kind in NON_RETRYABLE or errors > ERROR_RETRIES or attempts > MAX_ATTEMPTS:
            why = kind if kind in NON_RETRYABLE else f"{attempts - 1} attempts, {errors} errors"
            raise TrialFailedBefore(
                f"an earlier attempt failed ({why}): "
                f"{run_tags.get(f'{TAG}failure', '')}; not training again"
            )
        if found.info.status == "FINISHED" and run_tags.get(f"{TAG}outcome") == "finished":
            final = {k: v for k, v in found.data.metrics.items() if k in METRICS}
            return cls(sweep, run_id, client, set(), final)
        _set_tags(client, run_id, {f"{TAG}attempts": str(attempts), f"{TAG}errors": str(errors)})
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
        self.client.log_batch(self.run_id, params=params)  # the client chunks by 100

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

    def monitor_system(self) -> None:
        """Make this run the calling thread's active MLflow run with MLflow's system-metrics
        monitor on (``system/cpu_utilization_percentage``, ``system/system_memory_usage_*``,
        ``system/gpu_<i>_utilization_percentage`` and ``_memory_usage_*`` per GPU of the node —
        all of them, so trials packed onto one GPU show its whole load — every
        `SYSTEM_METRICS_INTERVAL_S`). Needs psutil (and nvidia-ml-py for GPUs); `finish` and
        `fail` end it. A retry continues the series after the last logged step."""
        import mlflow

        mlflow.set_tracking_uri(self.sweep.uri)
        mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
        mlflow.start_run(run_id=self.run_id, log_system_metrics=True)

    def _end(self, status: str) -> None:
        """End the run: through the fluent API when it is this thread's active run (that
        also stops and flushes the system-metrics monitor), else through the client."""
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)

    def finish(
        self,
        final: dict[str, float],
        *,
        step: int,
        model: Any,
        workdir: Path,
        resolved: dict[str, Any],
        data: Any,
    ) -> None:
        """Resolved config, artifacts, dataset inputs, the model and the final metrics
        (linked to the model); ends the run FINISHED. ``data``: the clean `ImageData`."""
        import mlflow
        import torch
        from mlflow.entities import Metric

        requested = self.client.get_run(self.run_id).data.params
        changed = {k: v for k, v in resolved.items() if requested.get(k) != _param_value(v)}
        self.log_params(changed, prefix="resolved.")
        for name in ("poisoned_indices.npy", "removed_indices.npy", "trigger.png", "result.json"):
            if (workdir / name).is_file():
                self.client.log_artifact(self.run_id, str(workdir / name))
        mlflow.set_tracking_uri(self.sweep.uri)
        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            mlflow.start_run(run_id=self.run_id)
        self._log_datasets(data, workdir, resolved)
        # The model first exists empty, so the final metrics are its first (the Models tab
        # lists a model's metrics in that order); log_model then fills it and also links the
        # run's other metrics at the same step (the last epoch's curves, system metrics).
        logged = mlflow.initialize_logged_model(
            name=self.client.get_run(self.run_id).info.run_name, source_run_id=self.run_id
        )
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[
                Metric(k, float(v), now, step, model_id=logged.model_id)
                for k, v in final.items()
                if v is not None
            ],
        )
        info = _log_model(_cpu_copy(model, torch), data, step, logged.model_id)
        self.set_tags({f"{TAG}model_uri": info.model_uri, f"{TAG}outcome": "finished"})
        self._end("FINISHED")

    def _log_datasets(self, data: Any, workdir: Path, resolved: dict[str, Any]) -> None:
        """Dataset lineage (the run's *Datasets used*): the clean training and test sets
        (context ``training`` / ``evaluation``; MLflow's digest over the uint8 images and
        labels, so runs on the same data share it) and the poisoned-index set (context
        ``poisoning``; its file is the run's ``poisoned_indices.npy`` artifact)."""
        import mlflow
        import mlflow.data
        import numpy as np
        from mlflow.data.code_dataset_source import CodeDatasetSource

        with warnings.catch_warnings():  # MLflow registers its local source twice and says so
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
            path = resolved.get("data.path")
            source = (
                str(Path(path).expanduser().resolve())  # a local dataset source
                if path
                else CodeDatasetSource({"loader": f"bdat_ray.data.sources:{data.name}"})
            )
            splits = {"train": "training", "test": "evaluation"}
            datasets = [
                mlflow.data.from_numpy(
                    getattr(data, f"x_{split}").cpu().numpy(),
                    targets=getattr(data, f"y_{split}").cpu().numpy(),
                    source=source,
                    name=f"{data.name}-{split}",
                )
                for split in splits
            ]
            contexts = list(splits.values())
            indices = workdir / "poisoned_indices.npy"
            if indices.is_file():
                artifact = CodeDatasetSource({"artifact": f"runs:/{self.run_id}/{indices.name}"})
                datasets.append(
                    mlflow.data.from_numpy(
                        np.load(indices), source=artifact, name=f"{data.name}-poisoned-indices"
                    )
                )
                contexts.append("poisoning")
            mlflow.log_inputs(datasets, contexts=contexts, tags_list=[None] * len(datasets))

    def fail(self, kind: str, reason: str) -> None:
        """Record why the trial failed and end the run FAILED (a retry reopens it)."""
        self.set_tags(
            {f"{TAG}outcome": "failed", f"{TAG}failure": reason[:4000], f"{TAG}failure_kind": kind}
        )
        self._end("FAILED")


def _log_model(model: Any, data: Any, step: int, model_id: str) -> Any:
    """Log ``model`` into the active run's LoggedModel ``model_id`` as a pt2 program taking
    [0, 1] float32 NCHW images of any batch size (signature ``(-1, C, H, W)`` -> logits
    ``(-1, classes)``); returns MLflow's `ModelInfo`. The pyfunc flavour scores numpy batches
    (`mlflow models predict`)."""
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    example = (data.x_test[:EXAMPLE_BATCH].cpu().float() / 255).numpy()
    with torch.no_grad():
        classes = model(torch.from_numpy(example)).shape[1]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]),
    )
    return mlflow.pytorch.log_model(
        model,
        model_id=model_id,
        serialization_format="pt2",
        signature=signature,
        input_example=example,
        # The exported graph needs no project code to run; the source that trained it travels
        # with it (a pip requirement on this package would name one no index serves).
        code_paths=[str(PACKAGE_DIR)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        step=step,
    )


def _cpu_copy(model: Any, torch: Any) -> Any:
    """The model on CPU in eval mode, so it loads on machines without a GPU."""
    import copy

    clone = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    return clone.eval()
