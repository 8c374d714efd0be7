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
#: per trial, so conditional dimensions can be expanded ahead of time); fused Optuna trials
#: put their members there (`FusedOptunaSearch`).
GRID_POINT = "grid_point"
#: A fused Ray trial (``--fuse K``) holds its members' overrides under this key of its grid
#: point; each member is a trial everywhere else (`trial_members`).
FUSED_MEMBERS = "fused_members"


def trial_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """A Tune trial config -> flat run-config overrides."""
    flat = {k: v for k, v in config.items() if k != GRID_POINT}
    flat.update(config.get(GRID_POINT) or {})
    return flat


@dataclass(frozen=True)
class Member:
    """One trial as users see it: a Ray trial, or one member of a fused Ray trial."""

    trial_id: str  # ``<ray trial id>``, or ``<ray trial id>-<member>`` when fused
    overrides: dict[str, Any]
    last: dict[str, Any]  # its latest result (a fused trial reports per member)


def fused_points(config: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The members' overrides of a fused Ray trial; None for an ordinary trial."""
    return (config.get(GRID_POINT) or {}).get(FUSED_MEMBERS)


def member_id(trial_id: str, member: int) -> str:
    return f"{trial_id}-{member}"


def trial_members(trial: Any) -> list[Member]:
    """The trials a Ray trial stands for: itself, or each member of a fused trial, with the
    member's own latest result (its ``final`` only when it finished; ``failed`` when it
    diverged alone)."""
    last = trial.last_result or {}
    points = fused_points(trial.config)
    if points is None:
        return [Member(trial.trial_id, trial_overrides(trial.config), last)]
    reported = last.get("members") or {}
    shared = {k: last[k] for k in ("epoch", "epochs") if k in last}
    return [
        Member(member_id(trial.trial_id, i), point, {**shared, **reported.get(str(i), {})})
        for i, point in enumerate(points)
    ]


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

    # Ray gives each trial `cpus` cores; torch would otherwise start one thread per core of
    # the machine in every trial and the trials would fight over them.
    torch.set_num_threads(max(1, int(settings.cpus)))
    if fused_points(config) is not None:
        return run_fused_trial(config, settings, data)
    context = tune.get_context()
    flat = _with_device(trial_overrides(config))
    run = _open_run(settings, context.get_trial_id(), context.get_trial_name())
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
        final = _final_metrics(result, settings)
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


def _with_device(flat: dict[str, Any]) -> dict[str, Any]:
    if flat.get("device", "auto") == "auto":
        # Only a GPU Ray assigned to this trial; an unrequested one would be shared unseen.
        return {**flat, "device": "cuda" if ray.get_gpu_ids() else "cpu"}
    return flat


def _open_run(settings: TrialSettings, trial_id: str, name: str, **tags: str) -> Any:
    """The trial's MLflow child run (`tracking.TrialRun.open`), tagged with where it runs."""
    from bdat_ray.tracking import TrialRun

    ray_trial = tune.get_context().get_trial_name()
    return TrialRun.open(
        settings.tracking,
        trial_id=trial_id,
        trial_name=name,
        tags={
            "bdat_ray.trial_dir": f"{settings.results_dir}/{ray_trial}",
            "bdat_ray.node_ip": ray.util.get_node_ip_address(),
            "bdat_ray.node_id": ray.get_runtime_context().get_node_id(),
            **tags,
        },
    )


def _final_metrics(result: Any, settings: TrialSettings) -> dict[str, Any]:
    """What a finished trial logs and reports (percent metrics, seconds, defense figures)."""
    return {
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


def run_fused_trial(config: dict[str, Any], settings: TrialSettings, data: Any = None) -> None:
    """A fused Ray trial (`bdat_ray.fused.fit_fused`): K members trained as one network,
    each its own trial for the user — its own MLflow child run (trial id
    ``<ray trial id>-<member>``, tags ``bdat_ray.fused_trial`` / ``fused_member``) with its
    params, epoch metrics, model and artifacts, and its own entry in every report (Tune
    results carry ``members``: member -> metrics). A member that diverges fails alone; one
    fused checkpoint holds every member, so a retry or ``--resume`` restores them all. The
    system metrics of the shared process go to the first member's run."""
    from bdat_ray.config import ConfigError, from_flat
    from bdat_ray.engine import TrainingDiverged
    from bdat_ray.fused import fit_fused, member_dir
    from bdat_ray.tracking import TrialFailedBefore

    context = tune.get_context()
    ray_id, ray_name = context.get_trial_id(), context.get_trial_name()
    points = [_with_device(p) for p in fused_points(config)]
    runs: dict[int, Any] = {}  # members whose runs are open (not failed before)
    for i in range(len(points)):
        try:
            runs[i] = _open_run(
                settings,
                member_id(ray_id, i),
                f"{ray_name}-{i}",
                **{"bdat_ray.fused_trial": ray_id, "bdat_ray.fused_member": str(i)},
            )
        except TrialFailedBefore:
            continue  # diverged in an earlier attempt: it trains on, frozen, unrecorded
    if not runs:
        raise TrialFailedBefore("every member of this fused trial failed before")
    try:
        cfgs = [from_flat(p) for p in points]
    except ConfigError as err:
        for run in runs.values():
            run.fail("bad_config", str(err))
        raise
    epochs = cfgs[0].train.epochs
    if all(r.final_metrics is not None for r in runs.values()):
        # Finished and logged before the driver recorded it (a kill in between): report only.
        members = {
            str(i): {**r.final_metrics, "final": True, "mlflow_run_id": r.run_id}
            for i, r in runs.items()
        }
        tune.report({"members": members, "final": True, "epoch": epochs})
        return
    for i, run in runs.items():
        run.log_params(cfgs[i].to_flat())
        run.set_tags({"bdat_ray.config_hash": cfgs[i].hash()})
    runs[min(runs)].monitor_system()
    recorded_failures: set[int] = set()

    def record_divergence(diverged: dict[int, TrainingDiverged]) -> None:
        for i, err in diverged.items():
            if i in runs and i not in recorded_failures:
                runs[i].fail("diverged", str(err))
                recorded_failures.add(i)

    def on_epoch(epoch: int, metrics: dict, diverged: dict, checkpoint_dir: Path) -> None:
        for i, m in metrics.items():
            if i in runs:
                runs[i].log_epoch(m)
        record_divergence(diverged)
        (checkpoint_dir / EPOCH_MARKER).write_text(str(epoch))
        members = {
            str(i): {**m, "final": False, "mlflow_run_id": runs[i].run_id}
            for i, m in metrics.items()
            if i in runs
        }
        members |= {str(i): {"failed": True} for i in diverged}
        tune.report(
            {"epoch": epoch, "epochs": epochs, "final": False, "members": members},
            checkpoint=tune.Checkpoint.from_directory(checkpoint_dir),
        )

    with tempfile.TemporaryDirectory(prefix="bdat_fused_") as tmp:
        workdir = Path(tmp)
        resume_from = None
        if (checkpoint := tune.get_checkpoint()) is not None:
            resume_from = Path(checkpoint.to_directory(str(workdir / "resume")))
            epoch = (resume_from / EPOCH_MARKER).read_text()
            for run in runs.values():
                run.set_tags({"bdat_ray.resumed_after_epoch": epoch})
        try:
            if data is None:
                from bdat_ray.data import load_dataset

                data = load_dataset(cfgs[0].data)
            results = fit_fused(
                cfgs, data=data, workdir=workdir, resume_from=resume_from, on_epoch=on_epoch
            )
        except Exception as err:
            kind = "bad_config" if isinstance(err, ConfigError) else "error"
            for i, run in runs.items():
                if i not in recorded_failures:
                    run.fail(kind, str(err) if kind != "error" else f"{type(err).__name__}: {err}")
            raise
        record_divergence({i: r for i, r in enumerate(results) if isinstance(r, TrainingDiverged)})
        members: dict[str, dict[str, Any]] = {}
        # The first member's run is the thread's active MLflow run: it ends first, so the
        # others can each become active in turn to log their model.
        for i in sorted(runs):
            result, run = results[i], runs[i]
            if isinstance(result, TrainingDiverged):
                members[str(i)] = {"failed": True}
                continue
            final = _final_metrics(result, settings)
            if run.final_metrics is None:
                run.finish(
                    final,
                    step=result.epochs,
                    model=result.model,
                    workdir=member_dir(workdir, i),
                    resolved=result.config,
                    data=data,
                )
            reported = {k: v for k, v in final.items() if v is not None}
            members[str(i)] = {**reported, "final": True, "mlflow_run_id": run.run_id}
    if not any(m.get("final") for m in members.values()):
        raise TrainingDiverged("every member of this fused trial diverged")
    tune.report({"members": members, "final": True, "epoch": epochs})


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


class FusedOptunaSearch(FinalOnlyOptunaSearch):
    """``fuse: K`` with Optuna: each Ray trial asks the study for K points (Optuna's ask
    interface, one study trial per member, linked by ``ray_trial_id`` = the member's trial
    id) and trains them as one fused network; each member's final result is told to its own
    study trial, a member that diverged is told FAIL. ``trials`` study trials in all: the last
    Ray trial asks for what is left. Members differ only in what may vary inside a fused
    network (checked before the sweep starts, `sweep.check_optuna_fusion`)."""

    def __init__(self, *args: Any, members: int, trials: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.members, self.trials = members, trials
        self.asked: dict[str, int] = {}  # Ray trial -> its members (saved with the searcher)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        count = min(self.members, self.trials - sum(self.asked.values()))
        if count <= 0:
            return None
        self.asked[trial_id] = count
        ask = super().suggest  # (a bare super() inside a comprehension binds the wrong self)
        points = [ask(member_id(trial_id, i)) for i in range(count)]
        return {GRID_POINT: {FUSED_MEMBERS: points}}

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Nothing: a fused trial's members report together (and fuse forbids schedulers)."""

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        result = result or {}
        for i in range(self.asked.get(trial_id, 0)):
            # Tune hands searchers the flattened result: ``members/<i>/acc`` …
            prefix = f"members/{i}/"
            own = {k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)}
            finished = bool(own.get("final"))  # otherwise it diverged, or the trial failed
            super().on_trial_complete(
                member_id(trial_id, i), result=own if finished else None, error=not finished
            )


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
        """Write a trial's outcome to MLflow (every member's, for a fused trial), or say
        why it could not: an unreachable store must not crash the Tune controller (a
        callback's exception ends the whole sweep)."""
        for member in trial_members(trial):
            try:
                write(self.tracking, member.trial_id, *args)
            except Exception as err:
                progress.warning(
                    "warning: MLflow at %s did not answer (%s); trial %s's outcome is not "
                    "recorded there — the trials that need it fail, and --resume continues "
                    "them once it is back",
                    redact(self.tracking.uri),
                    redact(str(err).strip().splitlines()[0] if str(err).strip() else repr(err)),
                    member.trial_id,
                )
                return

    def _label(self, trials: list, trial: Any, member: str | None = None) -> str:
        # The number in the trial id (``7d032_00003``: Tune counts trials as it creates
        # them), not the trial's place in ``trials``, which changes when Tune retries it.
        number = trial.trial_id.rpartition("_")[2]
        place = int(number) + 1 if number.isdigit() else trials.index(trial) + 1
        if member is not None:  # a fused trial's member: its pack's number and its id
            return f"[fused {place}] {member}"
        return f"[{place}/{self.total}] {trial.trial_id}"

    def _ended(self, trials: list, trial: Any) -> str:
        ended = sum(
            len(trial_members(t))
            for t in trials
            if t.status in ("TERMINATED", "ERROR") or t is trial
        )
        return f"{ended}/{self.total} ended"

    def _members(self, trials: list, trial: Any) -> list[tuple[str, Member]]:
        fused = fused_points(trial.config) is not None
        return [
            (self._label(trials, trial, m.trial_id if fused else None), m)
            for m in trial_members(trial)
        ]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if trial.num_failures and _error(trial)[0] in DETERMINISTIC_ERRORS:
            return  # a retry that ends at once (see on_trial_recover)
        for label, member in self._members(trials, trial):
            what = describe_trial(member.overrides)
            progress.info(
                "%s start  %s · %s %s", label, what["attack"], what["threat"], what["budgets"]
            )

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        if result.get("final"):
            return
        reported = result.get("members")
        for i, (label, _) in enumerate(self._members(trials, trial)):
            last = result if reported is None else {**result, **reported.get(str(i), {})}
            if "acc" not in last:
                continue  # a fused member that diverged
            progress.info(
                "%s epoch %d/%d  acc %.1f  asr %.1f  (%.1f s)",
                label,
                last["epoch"],
                last["epochs"],
                last["acc"],
                last["asr"],
                last["epoch_seconds"],
            )

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        if not (trial.last_result or {}).get("final"):
            self._record(mark_trial, trial, "early_stopped")
            progress.info(
                "%s stopped early by the scheduler after epoch %s (kept out of the front) — %s",
                self._label(trials, trial),
                (trial.last_result or {}).get("epoch", 0),
                self._ended(trials, trial),
            )
            return
        for label, member in self._members(trials, trial):
            last = member.last
            if not last.get("final"):
                progress.info(
                    "%s FAILED  diverged (the fused trial's other members went on)", label
                )
                continue
            robust = last.get("robust_acc")
            progress.info(
                "%s done   acc %.1f  asr %.1f  robust_acc %s  (%.0f s)  — %s",
                label,
                last["acc"],
                last["asr"],
                "n/a" if robust is None else f"{robust:.1f}",
                last["seconds"],
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
