"""The Ray Tune adapter (with sweep.py and schedulers.py, the only Ray importers).

- `run_trial`: one trial is one `engine.fit` run. It reports every epoch to Tune with the
  engine's checkpoint, continues from `tune.get_checkpoint()` when Tune restarts it (a retry
  after a failure, or ``--resume``), writes its own MLflow child run (`tracking.TrialRun`), and
  ends with a report carrying ``final: True``.
- `FinalOnlyOptunaSearch`: Ray tells Optuna a trial stopped early by a scheduler is COMPLETE
  with its partial metrics; here only a ``final`` result is COMPLETE, others are PRUNED, so a
  half-trained model never enters the study's Pareto front. With constraints, each final
  result's violations are stored on the study trial before it is told (Optuna's
  ``Trial.set_constraint``), so samplers and ``study.best_trials`` see feasibility.
- `SweepProgress`: one readable line per trial event, and the MLflow outcome of trials that
  could not record it themselves (stopped early, or the process died).

These live in an importable module because Ray pickles them (tuner.pkl, searcher state).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from bdat_ray.search_space import Constraint, describe_trial
from bdat_ray.tracking import ERROR_RETRIES, SweepTracking, mark_trial, note_recovery, redact

progress = logging.getLogger("bdat_ray.progress")

#: Written beside the engine's state.pt in every checkpoint: the epoch it holds, so a
#: resumed trial can say where it continued without loading the whole state.
EPOCH_MARKER = "epoch.txt"
#: Grid spaces put each trial's overrides under this key of the Tune config (one grid value
#: per trial, so conditional dimensions can be expanded ahead of time).
GRID_POINT = "grid_point"


def trial_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial config -> flat run-config overrides."""
    flat = {k: v for k, v in config.items() if k != GRID_POINT}
    flat.update(config.get(GRID_POINT) or {})
    return flat


@dataclass(frozen=True)
class TrialSettings:
    """Everything a trial needs besides its config; passed once through `tune.with_parameters`."""

    tracking: SweepTracking
    cpus: float
    gpus: float  # requested per trial; gpu_seconds = seconds × gpus
    results_dir: str  # the sweep's Ray experiment directory (trial dirs, checkpoints)


class NoCudaOnNode(RuntimeError):
    """The trial wants CUDA and the node it landed on cannot give it: a node problem (no
    NVIDIA driver, or one too old for this torch build), not a bad config."""


def require_cuda(device: str, cuda_available: bool) -> None:
    """Raise `NoCudaOnNode` with one line that names the node and the torch build."""
    if device.startswith("cuda") and not cuda_available:
        import torch

        raise NoCudaOnNode(
            f"device={device} requested but torch.cuda.is_available() is false on node "
            f"{ray.util.get_node_ip_address()} (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}): its NVIDIA driver is missing or too old (docs/cluster.md)"
        )


def run_trial(config: dict[str, Any], settings: TrialSettings, data: Any = None) -> None:
    """Tune function trainable. ``data``: the clean dataset shared through the object store
    (None when trials differ in ``data.*`` keys: then each trial loads its own)."""
    import torch

    from bdat_ray.config import ConfigError, from_flat
    from bdat_ray.engine import TrainingDiverged, fit
    from bdat_ray.tracking import TrialRun

    # Ray gives each trial `cpus` cores; torch would otherwise start one thread per core of
    # the machine in every trial and the trials would fight over them.
    torch.set_num_threads(max(1, int(settings.cpus)))
    context = tune.get_context()
    flat = trial_overrides(config)
    if flat.get("device", "auto") == "auto":
        # Only a GPU Ray assigned to this trial; an unrequested one would be shared unseen.
        flat["device"] = "cuda" if ray.get_gpu_ids() else "cpu"
    run = TrialRun.open(
        settings.tracking,
        trial_id=context.get_trial_id(),
        trial_name=context.get_trial_name(),
        tags={
            "bdat_ray.trial_dir": f"{settings.results_dir}/{context.get_trial_name()}",
            "bdat_ray.node_ip": ray.util.get_node_ip_address(),
            "bdat_ray.node_id": ray.get_runtime_context().get_node_id(),
        },
    )
    if run.final_metrics is not None:
        # Finished and logged before the driver recorded it (a kill in between): report only.
        tune.report({**run.final_metrics, "final": True, "mlflow_run_id": run.run_id})
        return
    try:
        require_cuda(str(flat.get("device")), torch.cuda.is_available())
    except NoCudaOnNode as err:
        run.fail("no_cuda", str(err))
        raise
    try:
        cfg = from_flat(flat)
    except ConfigError as err:
        run.log_params(flat)
        run.fail("bad_config", str(err))
        raise
    run.log_params(cfg.to_flat())
    run.set_tags({"bdat_ray.config_hash": cfg.hash()})
    run.monitor_system()

    def on_epoch(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        run.log_epoch(metrics)
        (checkpoint_dir / EPOCH_MARKER).write_text(str(int(metrics["epoch"])))
        tune.report(
            {**metrics, "epochs": cfg.train.epochs, "final": False, "mlflow_run_id": run.run_id},
            checkpoint=tune.Checkpoint.from_directory(checkpoint_dir),  # copied right away
        )

    with tempfile.TemporaryDirectory(prefix="bdat_trial_") as tmp:
        workdir = Path(tmp)
        resume_from = None
        if (checkpoint := tune.get_checkpoint()) is not None:  # a retry, or --resume
            resume_from = Path(checkpoint.to_directory(str(workdir / "resume")))
            epoch = (resume_from / EPOCH_MARKER).read_text()
            run.set_tags({"bdat_ray.resumed_after_epoch": epoch})
        try:
            if data is None:  # loaded here, not in fit: MLflow records it as the run's input
                from bdat_ray.data import load_dataset

                data = load_dataset(cfg.data)
            result = fit(
                cfg, workdir=workdir, resume_from=resume_from, on_epoch=on_epoch, data=data
            )
        except Exception as err:
            # Divergence and dataset-dependent config errors (e.g. the target class) would
            # only repeat on a retry; tracking marks them so that a retry stops at once.
            kind = {TrainingDiverged: "diverged", ConfigError: "bad_config"}.get(type(err))
            run.fail(kind or "error", str(err) if kind else f"{type(err).__name__}: {err}")
            raise
        final = {
            "acc": result.acc,
            "asr": result.asr,
            "asr_pred": result.asr_pred,
            "robust_acc": result.robust_acc,
            "seconds": result.seconds,
            "gpu_seconds": result.seconds * settings.gpus,
            "images_per_s": result.images_per_s,
            "craft_seconds": result.craft_seconds,
            **result.defense,  # detect_*, removed, clean_fraction, defense_seconds, ...
        }
        run.finish(
            final,
            step=result.epochs,
            model=result.model,
            workdir=workdir,
            resolved=result.config,
            data=data,
        )
    reported = {k: v for k, v in final.items() if v is not None}
    tune.report({**reported, "epoch": result.epochs, "final": True, "mlflow_run_id": run.run_id})


def trial_name(trial: Any) -> str:
    """Trial names and directory names: ``trial_<ray trial id>`` (the default packs the whole
    config into the directory name)."""
    return f"trial_{trial.trial_id}"


class FinalOnlyOptunaSearch(OptunaSearch):
    """`OptunaSearch` that tells the study COMPLETE only for results with ``final: True``,
    with the space's ``constraints`` evaluated on that final result."""

    def __init__(self, *args: Any, constraints: tuple[Constraint, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.constraints = constraints

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        params = super().suggest(trial_id)
        # Links a study trial to its Ray trial (and so to the MLflow child run's tag).
        self._ot_trials[trial_id].set_user_attr("ray_trial_id", trial_id)
        return params

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if result and not error and not result.get("final", False):
            if trial_id not in self._completed_trials:
                self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
                self._completed_trials.add(trial_id)
            return
        if result and not error and trial_id not in self._completed_trials:
            for constraint in self.constraints:
                violation = constraint.violation(result.get(constraint.metric))
                self._ot_trials[trial_id].set_constraint(constraint.describe(), violation)
        super().on_trial_complete(trial_id, result=result, error=error)


#: Errors a retry would only repeat; their retries end at once (`tracking.TrialRun.open`).
DETERMINISTIC_ERRORS = ("TrainingDiverged", "ConfigError", "TrialFailedBefore", "NoCudaOnNode")
#: Ray's errors for a trial process or node that went away (a spot reclaim, an OOM kill):
#: retried without limit. Any other error is an exception raised inside the trial.
LOST_PROCESS_ERRORS = (
    "ActorDiedError",
    "RayActorError",
    "NodeDiedError",
    "WorkerCrashedError",
    "ActorUnavailableError",
    "OutOfMemoryError",
)


def _error(trial: Any) -> tuple[str, str]:
    """(class name, one-line message) of the trial's latest error. Read from the driver's
    local copy: the one in storage is synced later and may still hold the previous error."""
    path = trial.pickled_error_file
    if path and Path(path).is_file():
        with open(path, "rb") as f:
            error = ray.cloudpickle.load(f)
        cause = getattr(error, "cause", None) or error
        return type(cause).__name__, str(cause).strip().splitlines()[0]
    return "Error", "see error.txt in the trial directory"


class SweepProgress(tune.Callback):
    """Progress a person can follow (logged on ``bdat_ray.progress``), plus the MLflow
    outcome of trials that could not record it themselves. Its only state is the count of
    exceptions per trial; a restored sweep (which unpickles this object as it was at the
    start) counts them afresh."""

    def __init__(self, tracking: SweepTracking, total: int):
        self.tracking = tracking
        self.total = total
        self._exceptions: dict[str, int] = {}  # per trial id: errors raised inside the trial

    def _record(self, write: Callable[..., None], trial: Any, *args: str) -> None:
        """Write a trial's outcome to MLflow, or say why it could not: an unreachable store
        must not crash the Tune controller (a callback's exception ends the whole sweep)."""
        try:
            write(self.tracking, trial.trial_id, *args)
        except Exception as err:
            progress.warning(
                "warning: MLflow at %s did not answer (%s); trial %s's outcome is not recorded "
                "there — the trials that need it fail, and --resume continues them once it is "
                "back",
                redact(self.tracking.uri),
                redact(str(err).strip().splitlines()[0] if str(err).strip() else repr(err)),
                trial.trial_id,
            )

    def _label(self, trials: list, trial: Any) -> str:
        # The number in the trial id (``7d032_00003``: Tune counts trials as it creates
        # them), not the trial's place in ``trials``, which changes when Tune retries it.
        number = trial.trial_id.rpartition("_")[2]
        place = int(number) + 1 if number.isdigit() else trials.index(trial) + 1
        return f"[{place}/{self.total}] {trial.trial_id}"

    def _ended(self, trials: list, trial: Any) -> str:
        ended = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)
        return f"{ended}/{self.total} ended"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.num_failures and _error(trial)[0] in DETERMINISTIC_ERRORS:
            return  # a retry that ends at once (see on_trial_recover)
        what = describe_trial(trial_overrides(trial.config))
        progress.info(
            "%s start  %s · %s %s",
            self._label(trials, trial),
            what["attack"],
            what["threat"],
            what["budgets"],
        )

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get("final"):
            return
        progress.info(
            "%s epoch %d/%d  acc %.1f  asr %.1f  (%.1f s)",
            self._label(trials, trial),
            result["epoch"],
            result["epochs"],
            result["acc"],
            result["asr"],
            result["epoch_seconds"],
        )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("final"):
            robust = last.get("robust_acc")
            progress.info(
                "%s done   acc %.1f  asr %.1f  robust_acc %s  (%.0f s)  — %s",
                self._label(trials, trial),
                last["acc"],
                last["asr"],
                "n/a" if robust is None else f"{robust:.1f}",
                last["seconds"],
                self._ended(trials, trial),
            )
            return
        self._record(mark_trial, trial, "early_stopped")
        progress.info(
            "%s stopped early by the scheduler after epoch %s (kept out of the front) — %s",
            self._label(trials, trial),
            last.get("epoch", 0),
            self._ended(trials, trial),
        )

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        kind, message = _error(trial)
        if kind in DETERMINISTIC_ERRORS:
            # Tune retries without limit (sweep.MAX_FAILURES, for spot reclaims); this makes
            # the next failure final: the retry's `TrialFailedBefore`, raised at once.
            trial.max_failures = 0
        elif kind not in LOST_PROCESS_ERRORS:
            # An exception inside the trial gets ERROR_RETRIES retries. The trial counts them
            # itself in MLflow (`tracking.TrialRun.open`); counted here too, for the errors
            # that keep it from reaching MLflow at all (the store is down).
            self._exceptions[trial.trial_id] = self._exceptions.get(trial.trial_id, 0) + 1
            if self._exceptions[trial.trial_id] >= ERROR_RETRIES:
                trial.max_failures = 0
        if kind == "TrialFailedBefore":
            return  # the first failure was reported; this retry ended at once
        if kind in DETERMINISTIC_ERRORS:
            note = "not retrained: a retry would repeat it"
        else:
            note = "retrying from its last checkpoint"
            self._record(note_recovery, trial, f"{kind}: {message}")
        progress.info("%s %s: %s — %s", self._label(trials, trial), kind, message, note)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        kind, message = _error(trial)
        reason = f"{kind}: {message}"
        self._record(mark_trial, trial, "failed", f"trial process failed: {reason}")
        progress.info(
            "%s FAILED  %s  — %s", self._label(trials, trial), reason, self._ended(trials, trial)
        )
