"""``python -m bdat_ray.sweep``: a search space of poisoned-data training runs under Ray Tune.

    python -m bdat_ray.sweep                                   # search_spaces/quickstart.yaml
    python -m bdat_ray.sweep --space search_spaces/cat_fig2.yaml --gpus-per-trial 0.25
    python -m bdat_ray.sweep --dry-run --space search_spaces/composite_pareto.yaml
    python -m bdat_ray.sweep train.epochs=2                    # KEY=VALUE pins a key everywhere
    python -m bdat_ray.sweep --resume                          # continue the latest sweep

A grid space runs as Tune's grid search; any sampled dimension makes it an Optuna
multi-objective search (`trainable.FinalOnlyOptunaSearch`) whose study is an Optuna journal,
``STORAGE/SWEEP_ID/optuna.journal`` (`optuna_storage`). ``--storage`` may be a local or shared
directory or any URI Ray Tune accepts (``s3://``, ``gs://``; `bdat_ray.storage`). Every trial
is an MLflow child run of the sweep's parent run (`tracking`). Progress goes to stderr; the
Pareto table and where to look next to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import string
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bdat_ray import storage as store
from bdat_ray.cache import cache_dir
from bdat_ray.cli import config_parser, main_guard
from bdat_ray.config import ConfigError, from_flat, parse_overrides
from bdat_ray.preflight import check_tracking_uri, writable_dir
from bdat_ray.search_space import (
    GRID,
    METRICS,
    MultiObjectiveEarlyStopping,
    SearchSpace,
    check_points,
    describe_constraints,
    describe_trial,
    environment_group,
    environment_keys,
    feasible,
    load_space,
    pareto_front,
    show_value,
    varying_keys,
)

SPACES_DIR = Path(__file__).resolve().parents[1] / "search_spaces"
DEFAULT_SPACE = SPACES_DIR / "quickstart.yaml"
DEFAULT_STORAGE = "bdat_results"
RECORD = "sweep.json"
STUDY_FILE = "optuna.journal"
#: Ray Tune's retries of a trial from its last checkpoint: unlimited (-1), because Tune counts
#: every lost node as a failure, and AWS reclaiming a spot instance is one (Tune exempts only
#: nodes its own autoscaler drains). The trial itself bounds what a retry would repeat
#: (`tracking.TrialRun.open`): divergence and bad configs stop at once, an exception in the
#: trial is retried `tracking.ERROR_RETRIES` times, and `tracking.MAX_ATTEMPTS` caps all.
MAX_FAILURES = -1
OUTCOMES = ("finished", "failed", "stopped", "unfinished")
EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by Ctrl-C
NAME_CHARS = frozenset(string.ascii_letters + string.digits + "._-")
#: ASR cap (percent) of the registry alias ``best-acc-asr-le-<cap>``: the most accurate
#: Pareto model that leaves at most this attack success rate.
ALIAS_ASR_CAP = 20


def parser() -> argparse.ArgumentParser:
    p = config_parser(
        "python -m bdat_ray.sweep",
        "Sweep adversarial training against backdoor-poisoned data: Ray Tune runs the trials, "
        "Optuna searches the acc/asr Pareto front of sampled spaces, MLflow records every "
        "trial and model. KEY=VALUE pins a run key in every trial (search space files: "
        "the README's section Sweeps).",
    )
    p.add_argument(
        "--space",
        type=Path,
        metavar="FILE",
        help=f"search space YAML (default {DEFAULT_SPACE.name})",
    )
    p.add_argument("--name", help="sweep name: MLflow experiment (default: the space's name)")
    p.add_argument(
        "--num-samples", type=int, metavar="N", help="Optuna trials, or grid repeats (seeds)"
    )
    p.add_argument(
        "--gpus-per-trial", type=float, metavar="G", help="GPUs per trial, fractions share one"
    )
    p.add_argument("--cpus-per-trial", type=float, metavar="C", help="CPU cores per trial")
    p.add_argument("--max-concurrent", type=int, metavar="K", help="trials in flight at once")
    p.add_argument(
        "--fuse",
        type=int,
        metavar="K",
        help="train up to K trials as one fused network per Ray trial (bdat_ray.fused): "
        "grid trials that are compatible, or K Optuna points at a time; each stays its own "
        "trial in MLflow, the study and the reports",
    )
    p.add_argument(
        "--mlflow-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    p.add_argument(
        "--storage",
        metavar="PATH|URI",
        default=DEFAULT_STORAGE,
        help=f"results and checkpoints: a folder (default ./{DEFAULT_STORAGE}; shared storage "
        "on a cluster) or a URI Ray Tune accepts (s3://bucket/path, gs://...)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the latest sweep in --storage (of --name, if given) where it stopped",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate; print the trial count and resources"
    )
    return p


# ---------------------------------------------------------------------------------------------
# The plan: a validated space plus where its results go.


def plan_text(space: SearchSpace, name: str) -> str:
    count = space.trial_count
    if space.mode == GRID:
        search = f"Tune grid search over {count} trials (no Optuna)"
        if space.samples > 1:
            search += (
                f": every combination {space.samples}× with train.seed + 0..{space.samples - 1}"
            )
    else:
        sampler = space.search_sampler.describe()
        search = f"Optuna multi-objective search ({sampler}, seed {space.seed}), {count} trials"
    goals = ", ".join(
        f"{m} {'↑' if mode == 'max' else '↓'}" for m, mode in space.objectives.items()
    )
    limit = space.concurrency
    per = "Ray trial (fused pack)" if space.fuse > 1 else "trial"
    lines = [
        f"space      {space.path}"
        + (f" — {space.description.splitlines()[0]}" if space.description else ""),
        f"sweep      {name}",
        f"search     {search}",
        f"objectives {goals}",
        f"resources  {space.cpus:g} CPU + {space.gpus:g} GPU per {per}; "
        + (f"at most {limit} at once" if limit else "as many at once as resources allow"),
    ]
    if space.fuse > 1 and space.mode != GRID:
        lines.append(
            f"fusion     {space.fuse} study trials per network: {count} trials in "
            f"{ray_trial_count(space)} Ray trials, each asking Optuna for {space.fuse} points"
        )
    elif space.fuse > 1:
        packs = fused_packs(space)
        fused = [p for p in packs if len(p) > 1]
        lines.append(
            f"fusion     up to {space.fuse} trials per network: {count} trials in "
            f"{len(packs)} Ray trials ({len(fused)} fused, {len(packs) - len(fused)} alone); "
            "packs: " + " ".join("+".join(str(i + 1) for i in p) for p in packs)
        )
    if space.constraints:
        lines.append(
            f"feasible   {describe_constraints(space.constraints)} (final results; only "
            "feasible trials enter the front)"
        )
    if isinstance(space.early_stopping, MultiObjectiveEarlyStopping):
        rule = space.early_stopping
        lines.append(
            f"stopping   MO-ASHA on {', '.join(space.objectives)}, grace {rule.grace_period} "
            f"epochs, factor {rule.reduction_factor:g}; stopped trials never enter the front"
        )
    elif space.early_stopping:
        rule = space.early_stopping
        lines.append(
            f"stopping   ASHA on {rule.metric} ({rule.mode}), grace {rule.grace_period} epochs, "
            f"factor {rule.reduction_factor:g}; stopped trials never enter the front"
        )
    if space.overrides:
        lines.append("pinned     " + ", ".join(f"{k}={v}" for k, v in space.overrides.items()))
    for i, dim in enumerate(space.dimensions):
        lines.append(("dimensions " if i == 0 else " " * 11) + f"{dim.key}: {dim.describe()}")
    for i, variant in enumerate(space.variants):
        changes = [f"{k}={show_value(v)}" for k, v in variant.fixed.items()]
        changes += [f"{d.key}: {d.describe()}" for d in variant.dimensions]
        lines.append(
            ("variants   " if i == 0 else " " * 11) + f"{variant.name}: " + "; ".join(changes)
        )
    return "\n".join(lines)


def grid_listing(space: SearchSpace, limit: int = 40) -> str:
    """One line per trial: what it trains, and the swept values that differ from the most
    common one (the baseline, for variant spaces)."""
    points = space.grid_points()
    usual = {
        key: Counter(repr(p.get(key)) for p in points).most_common(1)[0][0]
        for key in varying_keys(points)
    }
    lines = []
    for i, point in enumerate(points[:limit]):
        what = describe_trial(point)
        values = ", ".join(
            f"{k}={show_value(point[k])}"
            for k in usual
            if k in point and repr(point[k]) != usual[k]
        )
        defense = "" if what["defense"] == "none" else f" · defense {what['defense']}"
        lines.append(
            f"  {i + 1:3d}  {what['attack']} · {what['threat']} {what['budgets']}{defense}"
            f"  [{values}]"
        )
    if len(points) > limit:
        lines.append(f"  ... and {len(points) - limit} more")
    return "\n".join(lines)


def fused_packs(space: SearchSpace) -> list[list[int]]:
    """The grid's trials (indices into `SearchSpace.grid_points`) packed into fused Ray
    trials of at most ``space.fuse`` (`bdat_ray.fused.pack`: compatible trials in grid
    order; one that cannot be fused stays alone)."""
    from bdat_ray.fused import pack

    return pack([from_flat(p) for p in space.grid_points()], space.fuse)


def ray_trial_count(space: SearchSpace) -> int:
    """Ray trials of an Optuna search: ``fuse`` study trials each (the last one the rest)."""
    return math.ceil(space.samples / space.fuse)


def check_optuna_fusion(space: SearchSpace) -> None:
    """Refuse (`ConfigError`) an Optuna space with ``fuse`` > 1 whose points could not share
    one fused network: every dimension is tried at each of its choices (or both ends of its
    range) on the space's first point, and must keep `fused.fusion_key` and stay fusable —
    seeds, learning rates, poison rates and per-sample budgets may vary; threat kinds,
    steps, models, epochs or defenses may not."""
    from bdat_ray.fused import fusion_key, unfusable_reason

    for branch in space.branches():
        base = {**branch.fixed}
        for dim in branch.dimensions:
            base.setdefault(dim.key, dim.values[0] if dim.discrete else dim.low)
        reason = unfusable_reason(from_flat(base))
        if reason is not None:
            raise ConfigError(f"{space.path}: fuse", f"{reason[0]}: {reason[1]}")
        key = fusion_key(from_flat(base))
        for dim in branch.dimensions:
            for value in dim.values if dim.discrete else (dim.low, dim.high):
                cfg = from_flat({**base, dim.key: value})
                if unfusable_reason(cfg) is not None or fusion_key(cfg) != key:
                    raise ConfigError(
                        f"{space.path}: dimensions.{dim.key}",
                        "fused members share one network and must agree on it; search it "
                        "with fuse: 1, or pin it and fuse what remains",
                    )


def grid_trials(space: SearchSpace) -> list[dict[str, Any]]:
    """The grid's Ray trials: each a trial's overrides, or a fused pack of them."""
    from bdat_ray.trainable import FUSED_MEMBERS

    points = space.grid_points()
    if space.fuse == 1:
        return points
    return [
        points[p[0]] if len(p) == 1 else {FUSED_MEMBERS: [points[i] for i in p]}
        for p in fused_packs(space)
    ]


def space_hash(space: SearchSpace) -> str:
    """Short hash of what the sweep runs: the space file's text, the pins and the settings."""
    what = {
        "file": Path(space.path).read_text(),
        "pins": {k: repr(v) for k, v in space.overrides.items()},
        "settings": [space.num_samples, space.max_concurrent, space.cpus, space.gpus]
        + ([space.fuse] if space.fuse > 1 else []),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def _check_name(name: str) -> str:
    if not name or not set(name) <= NAME_CHARS or name[0] in "._-":
        raise ConfigError("--name", f"use letters, digits, '.', '_' and '-'; got {name!r}")
    return name


def _fresh_sweep_dir(storage: str, name: str) -> str:
    """``STORAGE/NAME-YYYYmmdd-HHMMSS`` (sweep names repeat, sweep ids do not)."""
    stamp = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ["", *(f"-{i}" for i in range(2, 100))]:
        location = store.join(storage, f"{stamp}{suffix}")
        if store.make_new_dir(location):
            return location
    raise ConfigError("--storage", f"cannot create a new sweep folder in {storage}")


def find_sweep(storage: str, name: str | None) -> str:
    """The most recent sweep in ``storage`` (of sweep name or id ``name`` when given)."""
    if not store.is_remote(storage) and not Path(storage).is_dir():
        raise ConfigError("--resume", f"no sweep to resume: {storage} is not a folder")
    records = []
    for folder in store.subdirs(storage):
        path = store.join(folder, RECORD)
        if not store.exists(path):
            continue
        record = read_record(path)
        if name in (None, record["name"], record["sweep_id"]):
            records.append((record["created"], folder))
    if not records:
        which = f" named {name}" if name else ""
        raise ConfigError("--resume", f"no sweep{which} in {storage}")
    return max(records)[1]


#: What `--resume` needs from a sweep record (written once MLflow and the folder exist).
RECORD_KEYS = ("name", "sweep_id", "created", "overrides", "settings", "storage", "parent_run_id")


def read_record(location: str) -> dict[str, Any]:
    """A sweep's ``sweep.json``; a truncated, empty or foreign one is a `ConfigError`."""
    try:
        record = json.loads(store.read_text(location))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            "--resume", f"{location} is not a readable sweep record ({err})"
        ) from None
    missing = [k for k in RECORD_KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise ConfigError("--resume", f"{location} is not a sweep record (no {missing[0]})")
    return record


# ---------------------------------------------------------------------------------------------
# Running.


def _quiet_libraries() -> None:
    """Keep the terminal to our progress lines: library INFO chatter goes, warnings stay."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # optuna resets its logger's level
    for name in ("mlflow", "alembic", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Tune logs a full traceback for every failed trial; our progress line names the reason,
    # and the traceback stays in the trial's error.txt and in MLflow.
    # The closing "Trials did not complete" error repeats our FAILED lines and summary, and
    # the analysis warns about trials an interrupted sweep never started (our "unfinished").
    for name in (
        "ray.tune.execution.tune_controller",
        "ray.tune.tune",
        "ray.tune.analysis.experiment_analysis",
    ):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _shared_data(space: SearchSpace) -> Any:
    """The clean dataset, loaded once here and shared through Ray's object store, unless
    trials differ in ``data.*`` keys (then every trial loads its own)."""
    if space.mode == GRID:
        points = space.grid_points()
        if any(k.startswith("data.") for k in varying_keys(points)):
            return None
        data_config = from_flat(points[0]).data
    else:
        if any(d.key.startswith("data.") for d in space.dimensions):
            return None
        data_config = from_flat(space.fixed).data
    from bdat_ray.data import load_dataset

    return load_dataset(data_config)


def _max_epochs(space: SearchSpace) -> int:
    if space.mode == GRID:
        return max(space.value("train.epochs", p) for p in space.grid_points())
    dim = next((d for d in space.dimensions if d.key == "train.epochs"), None)
    if dim is None:
        return space.value("train.epochs")
    return max(dim.values) if dim.discrete else int(dim.high)


def _start_ray() -> None:
    """Connect to the cluster in ``RAY_ADDRESS`` or the one ``ray start`` runs on this machine
    (a ``ray up`` head), else start a local instance (Ray's own lookup order). Locally: no
    dashboard — nothing listens beyond Ray's token-authenticated ports — and trial output
    stays in Ray's log files; the progress people read comes from `SweepProgress`."""
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def _build_tuner(space: SearchSpace, record: dict[str, Any], trainable: Any, callback: Any):
    from ray import tune

    from bdat_ray.trainable import (
        GRID_POINT,
        FinalOnlyOptunaSearch,
        FusedOptunaSearch,
        trial_name,
    )

    searcher = scheduler = None
    param_space: dict[str, Any] = {}
    if space.mode == GRID:
        param_space = {GRID_POINT: tune.grid_search(grid_trials(space))}
    else:
        from ray.tune.search import ConcurrencyLimiter

        from bdat_ray.samplers import build_sampler
        from bdat_ray.search_space import OptunaSpace

        fused = {"members": space.fuse, "trials": space.samples} if space.fuse > 1 else {}
        if fused:
            # A fused trial reports acc/asr per member (``members/<i>/acc``), never at the top
            # where Tune's check looks for the searcher's metrics; FusedOptunaSearch reads them.
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        searcher = ConcurrencyLimiter(
            (FusedOptunaSearch if fused else FinalOnlyOptunaSearch)(
                **fused,
                space=OptunaSpace(space),
                metric=list(space.objectives),
                mode=list(space.objectives.values()),
                storage=optuna_storage(record["optuna_storage"]),
                study_name=record["sweep_id"],
                sampler=build_sampler(space.search_sampler, space.seed),
                constraints=space.constraints,
            ),
            max_concurrent=space.concurrency,
        )
    if isinstance(space.early_stopping, MultiObjectiveEarlyStopping):
        scheduler = _mo_scheduler(space)
    elif space.early_stopping:
        from ray.tune.schedulers import ASHAScheduler

        rule = space.early_stopping
        scheduler = ASHAScheduler(
            time_attr="epoch",
            metric=rule.metric,
            mode=rule.mode,
            # Past the last epoch, so ASHA never stops a trial before its final evaluation.
            max_t=_max_epochs(space) + 1,
            grace_period=rule.grace_period,
            reduction_factor=rule.reduction_factor,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=1 if space.mode == GRID else ray_trial_count(space),
            max_concurrent_trials=space.concurrency if space.mode == GRID else None,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=record["sweep_id"],
            storage_path=record["storage"],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[callback],
            verbose=0,
        ),
    )


def _mo_scheduler(space: SearchSpace) -> Any:
    from bdat_ray.schedulers import MultiObjectiveASHA

    rule = space.early_stopping
    return MultiObjectiveASHA(
        space.objectives,
        max_t=_max_epochs(space),
        grace_period=rule.grace_period,
        reduction_factor=rule.reduction_factor,
    )


def _new_sweep(args: argparse.Namespace, storage: str) -> tuple[SearchSpace, dict[str, Any]]:
    overrides = parse_overrides(args.overrides)
    space = load_space(args.space or DEFAULT_SPACE)
    space = space.with_overrides(overrides).with_settings(
        num_samples=args.num_samples,
        max_concurrent=args.max_concurrent,
        cpus=args.cpus_per_trial,
        gpus=args.gpus_per_trial,
        fuse=args.fuse,
    )
    if space.fuse > 1 and space.mode != GRID:
        check_optuna_fusion(space)
    name = _check_name(space.name if args.name is None else args.name)
    record = {
        "name": name,
        "space": str(Path(space.path).resolve()),
        "overrides": overrides,
        "settings": {
            "num_samples": space.num_samples,
            "max_concurrent": space.max_concurrent,
            "cpus": space.cpus,
            "gpus": space.gpus,
            "fuse": space.fuse,
        },
        "storage": storage,
    }
    return space, record


def _resumed_sweep(args: argparse.Namespace, storage: str) -> tuple[SearchSpace, dict[str, Any]]:
    given = [
        flag
        for flag, value in (
            ("KEY=VALUE", args.overrides),
            ("--num-samples", args.num_samples),
            ("--gpus-per-trial", args.gpus_per_trial),
            ("--cpus-per-trial", args.cpus_per_trial),
            ("--max-concurrent", args.max_concurrent),
            ("--fuse", args.fuse),
        )
        if value
    ]
    if given:
        raise ConfigError("--resume", f"continues with the sweep's own settings; drop {given[0]}")
    sweep_dir = find_sweep(storage, args.name or (args.space and args.space.stem))
    record = read_record(store.join(sweep_dir, RECORD))
    space_copy = _local_copy(store.join(sweep_dir, "space.yaml"), record["sweep_id"])
    space = load_space(space_copy).with_overrides(record["overrides"])
    return space.with_settings(**record["settings"]), record


# ---------------------------------------------------------------------------------------------
# Where the Optuna study lives.


def optuna_storage(path: str) -> Any:
    """The study's Optuna storage. A journal (`JournalFileBackend`: an append-only log under
    a file lock made with an atomic symlink) works on shared file systems such as NFS/EFS,
    where SQLite's locking is unreliable — Optuna's documented choice for NFS. Sweeps
    recorded before it kept SQLite (``optuna.db``) and resume with it."""
    import optuna

    if path.endswith(".db"):
        return optuna.storages.RDBStorage(f"sqlite:///{path}")
    from optuna.storages.journal import JournalFileBackend

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(path))


def _study_path(sweep_dir: str) -> str:
    """The journal's path: inside the sweep folder on a (shared) file system; for object
    storage, which has no locks or appends, a local file that `_push_study` copies beside
    the results and `_pull_study` brings back for ``--resume``."""
    if not store.is_remote(sweep_dir):
        return store.join(sweep_dir, STUDY_FILE)
    return str(cache_dir() / "optuna" / sweep_dir.rsplit("/", 1)[1] / STUDY_FILE)


def _study_copy(record: dict[str, Any]) -> str | None:
    """The durable copy of a remote sweep's journal, or None (a grid, or a file system)."""
    if not record.get("optuna_storage") or not store.is_remote(record["storage"]):
        return None
    return store.join(record["storage"], record["sweep_id"], STUDY_FILE)


def _push_study(record: dict[str, Any]) -> None:
    copy = _study_copy(record)
    if copy and Path(record["optuna_storage"]).is_file():
        store.upload(Path(record["optuna_storage"]), copy)


def _pull_study(record: dict[str, Any]) -> None:
    """The journal only grows: the longer of the local and the stored copy is the newer."""
    copy = _study_copy(record)
    if copy is None:
        return
    local = Path(record["optuna_storage"])
    if store.size(copy) > (local.stat().st_size if local.is_file() else -1):
        store.download(copy, local)


def _local_copy(location: str, sweep_id: str) -> Path:
    """A local path for a file of the sweep (downloaded when the storage is remote)."""
    if not store.is_remote(location):
        return Path(location)
    local = cache_dir() / "sweeps" / sweep_id / location.rsplit("/", 1)[1]
    store.download(location, local)
    return local


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from bdat_ray import tracking

    storage = store.resolve(args.storage)
    if not store.is_remote(storage):
        writable_dir("--storage", storage)
    space, record = _resumed_sweep(args, storage) if args.resume else _new_sweep(args, storage)
    uri = tracking.resolve_tracking_uri(args.mlflow_uri)
    uri_key = "--mlflow-uri" if args.mlflow_uri else "MLFLOW_TRACKING_URI"
    check_tracking_uri(uri_key, uri, reach=not args.dry_run)
    print(plan_text(space, record.get("sweep_id", record["name"])), flush=True)
    if args.dry_run:
        if space.mode == GRID:
            print(grid_listing(space))
        print(f"{space.trial_count} trials, {space.cpus:g} CPU + {space.gpus:g} GPU each")
        return 0
    try:
        return run_sweep(space, record, uri, resume=args.resume)
    finally:
        _push_study(record)


def run_sweep(space: SearchSpace, record: dict[str, Any], uri: str, *, resume: bool) -> int:
    # Snapshot the experiment state every second (default: ≥ 10 s), so a killed driver
    # loses no finished trial: without it, restore re-runs trials that ended since.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Tune's context-aware console output prints its banner even at verbose=0 (Ray 2.60
    # TuneTerminalReporter.experiment_started) and ignores RunConfig(progress_reporter=...)
    # (tune.py); the classic output, which RunConfig.verbose's docstring selects with this
    # variable (ray/air/config.py), is silent at verbose=0. SweepProgress prints the lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    _bound_mlflow_retries()
    _quiet_libraries()
    from bdat_ray import tracking

    data = _shared_data(space)  # a missing dataset fails here, before Ray or MLflow start
    check_against_data(space, data)
    if resume:
        sweep_dir = store.join(record["storage"], record["sweep_id"])
        from ray.tune import Tuner

        if not Tuner.can_restore(sweep_dir):
            raise ConfigError(
                "--resume",
                f"{sweep_dir} stopped before Ray Tune saved its first state; start it again",
            )
        sweep = tracking.reopen_sweep(uri, record["parent_run_id"], record["sweep_id"])
        _pull_study(record)
        print(f"resuming   {sweep_dir}", flush=True)
    else:
        with _removed_on_failure(record["storage"], uri) as made:
            sweep_dir = _fresh_sweep_dir(record["storage"], record["name"])
            made.append(sweep_dir)
            sweep = _start_tracking(space, record, uri, sweep_dir)
    print(f"sweep id   {record['sweep_id']}  (MLflow {tracking.redact(uri)})", flush=True)
    try:
        return _run_tuner(space, record, sweep, sweep_dir, data, uri, resume=resume)
    except BaseException as err:
        # Whatever stops the driver from here on (a crashed controller, MLflow gone at the
        # end, a second Ctrl-C) must not leave the parent run RUNNING for ever.
        interrupted = isinstance(err, KeyboardInterrupt)
        tracking.abandon_sweep(sweep, "KILLED" if interrupted else "FAILED", repr(err))
        raise


def _bound_mlflow_retries() -> None:
    """MLflow retries an unreachable server 7 times with backoff (about 4 minutes, in
    silence) per request; a sweep's driver and trials (which inherit these) give up after
    3 tries of at most 30 s each and say so (the store was checked to answer at start)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # MLflow prints "View run ... at: URL" on stdout for every run it ends; ours prints
    # where to look once, without credentials.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def check_against_data(space: SearchSpace, data: Any) -> None:
    """Every planned trial (grid points, or an Optuna space's representatives) checked
    against its dataset's shape and classes (`engine.check_data`: target class, trigger
    size, colour-only triggers, class counts) before Ray or MLflow start, instead of every
    trial failing after. Trials that sweep ``data.*`` keys load each dataset once here."""
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import check_data

    loaded: dict[str, Any] = {}

    def check(flat: dict[str, Any]) -> None:
        cfg = from_flat(flat)
        if data is not None:
            check_data(cfg, data)
            return
        key = repr(cfg.data)
        if key not in loaded:
            loaded[key] = load_dataset(cfg.data)
        check_data(cfg, loaded[key])

    check_points(space, check)


@contextlib.contextmanager
def _removed_on_failure(storage: str, uri: str) -> Iterator[list[str]]:
    """Folders made inside the block (appended to the list it yields), and ``storage`` if
    the block created it, are removed again when the block fails: a sweep that could not
    start leaves nothing behind (on a local or shared file system; an object store keeps
    the empty prefix). A failure to reach MLflow becomes a one-line error."""
    from bdat_ray.tracking import redact

    local = None if store.is_remote(storage) else Path(storage)
    existed = local is None or local.exists()
    made: list[str] = []
    try:
        yield made
    except BaseException as err:
        if local is not None:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
            if not existed:
                shutil.rmtree(local, ignore_errors=True)
        if isinstance(err, ConfigError | KeyboardInterrupt):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            "--mlflow-uri",
            f"cannot start the sweep's parent run in {redact(uri)}: {type(err).__name__}: {first}",
        ) from None


def _start_tracking(space: SearchSpace, record: dict[str, Any], uri: str, sweep_dir: str) -> Any:
    """The new sweep's parent run and its ``sweep.json`` (written last: a folder without
    one is a sweep that never started)."""
    from bdat_ray import tracking

    record["sweep_id"] = sweep_dir.rsplit("/", 1)[1]
    store.write_text(store.join(sweep_dir, "space.yaml"), Path(space.path).read_text())
    record["optuna_storage"] = _study_path(sweep_dir) if space.mode != GRID else None
    sweep = tracking.start_sweep(
        uri,
        experiment=record["name"],
        sweep_id=record["sweep_id"],
        space_file=Path(space.path),
        params={
            "space": Path(space.path).name,
            "search": space.mode,
            "trials": space.trial_count,
            "num_samples": space.samples,
            "max_concurrent": space.concurrency,
            "cpus_per_trial": space.cpus,
            "gpus_per_trial": space.gpus,
            "fuse": space.fuse,
            "objectives": ",".join(f"{k}:{v}" for k, v in space.objectives.items()),
            "early_stopping": space.early_stopping,
            "sampler_seed": space.seed if space.mode != GRID else None,
            "sampler": space.search_sampler.describe() if space.mode != GRID else None,
            "constraints": describe_constraints(space.constraints) or None,
            "hypervolume_reference": ",".join(
                f"{m}={v:g}" for m, v in space.hypervolume_reference.items()
            )
            or None,
            "overrides": " ".join(f"{k}={v}" for k, v in record["overrides"].items()),
        },
        tags={
            "bdat_ray.space_hash": space_hash(space),
            "bdat_ray.ray_experiment_dir": sweep_dir,
            "bdat_ray.optuna_storage": _study_copy(record) or record["optuna_storage"] or "",
            "bdat_ray.optuna_study": record["sweep_id"] if record["optuna_storage"] else "",
        },
    )
    record |= {
        "parent_run_id": sweep.parent_run_id,
        "experiment_id": sweep.experiment_id,
        "tracking_uri": tracking.redact(uri),
        "mode": space.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    store.write_text(store.join(sweep_dir, RECORD), json.dumps(record, indent=2))
    return sweep


def _run_tuner(
    space: SearchSpace,
    record: dict[str, Any],
    sweep: Any,
    sweep_dir: str,
    data: Any,
    uri: str,
    *,
    resume: bool,
) -> int:
    import ray
    from ray import tune

    from bdat_ray.trainable import SweepProgress, TrialSettings, run_trial

    started = time.perf_counter()
    _start_ray()
    try:
        if space.gpus and ray.cluster_resources().get("GPU", 0) < space.gpus:
            print(
                f"warning: the Ray cluster has no free GPU for {space.gpus:g} per trial yet; "
                "trials wait until one joins (autoscaler) — Ctrl-C to stop",
                file=sys.stderr,
            )
        settings = TrialSettings(
            tracking=sweep, cpus=space.cpus, gpus=space.gpus, results_dir=sweep_dir
        )
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, settings=settings, data=data),
            {"cpu": space.cpus, "gpu": space.gpus},
        )
        if resume:
            # Errored trials too: one that died or lost MLflow continues from its checkpoint,
            # one that diverged or had a bad config ends at once (`TrialFailedBefore`).
            tuner = tune.Tuner.restore(
                sweep_dir, trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = _build_tuner(space, record, trainable, SweepProgress(sweep, space.trial_count))
        grid = tuner.fit()
    finally:
        ray.shutdown()
    # The controller's own trials: the state it saved last can lag one event behind (a
    # trial that failed past the retry limit is PENDING there, with one failure fewer).
    trials = grid._experiment_analysis.trials
    return _report(space, record, sweep, time.perf_counter() - started, uri, trials)


def study_hint(study_name: str, path: str) -> str:
    """The line of Python that loads a sweep's study (printed, and on the report page)."""
    if path.endswith(".db"):
        storage = f"'sqlite:///{path}'"
    else:
        storage = f"optuna.storages.JournalStorage(JournalFileBackend('{path}'))"
    return f"optuna.load_study(study_name='{study_name}', storage={storage}).best_trials"


def _close_orphan_study_trials(record: dict[str, Any]) -> None:
    """A driver killed between asking Optuna and saving its state leaves study trials
    RUNNING forever (the restored searcher asks again); once the sweep is complete they are
    marked FAIL. (Before that, RUNNING trials may be ones a --resume will finish.)"""
    import optuna

    study = optuna.load_study(
        study_name=record["sweep_id"], storage=optuna_storage(record["optuna_storage"])
    )
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


# ---------------------------------------------------------------------------------------------
# The end: Pareto table, registry, where to look next.


def trial_rows(
    sweep_dir: str, trials: list[Any] | None = None, *, early_stopping: bool = True
) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per trial — per Ray trial, and per member of a fused one (``trials``: the
    controller's, else the experiment's saved state): outcome, metrics, what it trained
    (attack, threat model, budgets) and its environment group; and the keys that make the
    groups. Outcomes: finished (reported ``final``), failed (a fused member that diverged
    alone too), stopped (early, by the scheduler) and unfinished (an interrupted sweep).
    The controller also ends the trials a Ctrl-C leaves behind as TERMINATED: a trial
    without its final report counts as stopped only where a scheduler could stop it
    (``early_stopping``) and it reported an epoch."""
    from ray.tune import ExperimentAnalysis

    from bdat_ray.trainable import trial_members

    if trials is None:
        trials = ExperimentAnalysis(sweep_dir).trials
    members = [(trial, m) for trial in trials for m in trial_members(trial)]
    environment = environment_keys([m.overrides for _, m in members])
    rows = []
    for trial, member in members:
        last = member.last
        if trial.status == "ERROR" or last.get("failed"):
            outcome = "failed"
        elif trial.status == "TERMINATED" and last.get("final"):
            outcome = "finished"
        elif trial.status == "TERMINATED" and early_stopping and "epoch" in last:
            outcome = "stopped"
        else:
            outcome = "unfinished"
        rows.append(
            {
                "trial": member.trial_id,
                "outcome": outcome,
                "group": environment_group(member.overrides, environment),
                "run_id": last.get("mlflow_run_id"),
                **describe_trial(member.overrides),
                **{m: last.get(m) for m in METRICS},
            }
        )
    return rows, environment


def pareto_rows(space: SearchSpace, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished trials on the Pareto front of the space's objectives, drawn per
    environment group (combination of swept attack/data keys), among the feasible ones
    when the space has constraints."""
    front = []
    for group in sorted({r["group"] for r in rows}):
        members = [
            r
            for r in rows
            if r["group"] == group and r["outcome"] == "finished" and feasible(r, space.constraints)
        ]
        front += [members[i] for i in pareto_front(members, space.objectives)]
    first, mode = next(iter(space.objectives.items()))
    return sorted(front, key=lambda r: (r["group"], -r[first] if mode == "max" else r[first]))


def registry_picks(front: list[dict[str, Any]], asr_cap: float = ALIAS_ASR_CAP) -> dict[str, str]:
    """Registry alias -> MLflow run id of the picks a researcher reaches for, per environment
    group (suffix: the group's values, e.g. ``lowest-asr-badnets``): ``lowest-asr`` (ties: the
    higher acc) and ``best-acc-asr-le-<cap>`` (highest acc with asr ≤ cap percent). Both lie
    on the acc/asr front; a group with no trial under the cap gets no second alias."""
    picks = {}
    for group in sorted({r["group"] for r in front}):
        rows = [r for r in front if r["group"] == group and r["run_id"] and r["asr"] is not None]
        values = "_".join(part.split("=", 1)[-1] for part in group.split(", ")) if group else ""
        suffix = "-" + re.sub(r"[^\w-]+", "_", values) if values else ""
        if not rows:
            continue
        lowest = min(rows, key=lambda r: (r["asr"], -r["acc"]))
        picks[f"lowest-asr{suffix}"] = lowest["run_id"]
        capped = [r for r in rows if r["asr"] <= asr_cap]
        if capped:
            best = max(capped, key=lambda r: (r["acc"], -r["asr"]))
            picks[f"best-acc-asr-le-{asr_cap:g}{suffix}"] = best["run_id"]
    return picks


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def pareto_table(front: list[dict[str, Any]]) -> str:
    header = ["trial", "attack", "threat model", "budgets", "acc", "asr", "robust_acc"]
    body = [
        [r["trial"], r["attack"], r["threat"], r["budgets"]]
        + [_fmt(r[m]) for m in ("acc", "asr", "robust_acc")]
        for r in front
    ]
    widths = [max(map(len, column)) for column in zip(header, *body, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _no_feasible_text(space: SearchSpace, rows: list[dict[str, Any]]) -> str:
    """Why the feasible front is empty: no finished trial meets the constraints."""
    finished = [r for r in rows if r["outcome"] == "finished"]
    return (
        f"none: no finished trial (of {len(finished)}) meets "
        f"{describe_constraints(space.constraints)}"
    )


def _report(
    space: SearchSpace,
    record: dict[str, Any],
    sweep: Any,
    seconds: float,
    uri: str,
    trials: list[Any] | None = None,
) -> int:
    from bdat_ray import tracking

    sweep_dir = store.join(record["storage"], record["sweep_id"])
    rows, environment = trial_rows(
        sweep_dir, trials, early_stopping=space.early_stopping is not None
    )
    front = pareto_rows(space, rows)
    count = {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}
    interrupted = count["unfinished"] > 0 or len(rows) < space.trial_count
    if record.get("optuna_storage") and not interrupted:
        _close_orphan_study_trials(record)
    model_name = f"{record['name']}-pareto"
    aliases: dict[str, str] = {}
    table = pareto_table(front)
    try:
        versions = tracking.register_models(
            sweep,
            model_name,
            [
                (r["run_id"], {"sweep_id": record["sweep_id"], "ray_trial_id": r["trial"]})
                for r in front
                if r["run_id"]
            ],
        )
        if {"acc", "asr"} <= set(space.objectives):
            aliases = tracking.set_aliases(sweep, model_name, registry_picks(front))
        tracking.end_sweep(
            sweep,
            status="KILLED" if interrupted else "FINISHED" if count["finished"] else "FAILED",
            metrics={f"trials_{o}": n for o, n in count.items()}
            | {"pareto_size": len(front), "sweep_seconds": seconds},
            files={"pareto.md": table + "\n", "pareto.json": json.dumps(front, indent=2)},
            tags={"bdat_ray.environment_keys": json.dumps(environment)},
        )
    except Exception as err:  # the store went away during the sweep
        versions = []
        interrupted = True  # not recorded: --resume records it (and continues failed trials)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
        print(
            f"warning: MLflow at {tracking.redact(uri)} did not answer at the end "
            f"({tracking.redact(reason)}); the sweep is not recorded there",
            file=sys.stderr,
        )
    summary = ", ".join(f"{n} {o}" for o, n in count.items() if n)
    print(f"\n{summary} of {space.trial_count} trials; this run took {seconds:.0f} s")
    goals = ", ".join(f"{m} {mode}" for m, mode in space.objectives.items())
    per = " — one front per attack setting" if any(r["group"] for r in rows) else ""
    if space.constraints:
        per = f"; feasible: {describe_constraints(space.constraints)}{per}"
    print(f"Pareto front ({goals}{per}):")
    print(table if front or not space.constraints else _no_feasible_text(space, rows))
    print()
    print(f"MLflow     {tracking.browse_hint(uri)}")
    print(f"           experiment {record['name']}, parent run {record['sweep_id']}")
    if versions:
        print(f"models     registered as {model_name}, versions {', '.join(versions)}")
    if aliases:
        print("aliases    " + ", ".join(f"{a} → v{v}" for a, v in aliases.items()))
    print(f"results    {sweep_dir}")
    print(
        f"report     python -m analysis.report --sweep {record['sweep_id']} "
        f"--mlflow-uri {tracking.redact(uri)}"
    )
    if record.get("optuna_storage"):
        print(f"optuna     {study_hint(record['sweep_id'], record['optuna_storage'])}")
    if interrupted:
        print(
            f"resume     python -m bdat_ray.sweep --resume --name {record['sweep_id']} "
            f"--storage {record['storage']}"
        )
        return EXIT_INTERRUPTED
    return 0 if count["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
