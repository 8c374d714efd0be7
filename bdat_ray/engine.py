"""One poisoned-data (adversarial) training run: `fit(config) -> RunResult`.

Free of Ray and MLflow: the sweep layer wraps `fit` and reports through ``on_epoch``.
Data lives on the training device as uint8; each step slices a batch, augments it as whole-
batch tensor ops, runs the training objective (the attack loop for AT) in channels_last (and
under bf16 autocast on CUDA), and takes an optimiser step. The defaults follow the CAT paper: SGD,
momentum 0.9, weight decay 5e-4, lr 0.1 divided by 10 at 60% and 90% of the epochs
(``train.lr_milestones``; Weng et al.'s reference: epochs 80 and 120).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bdat_ray.backdoors import BACKDOORS, Backdoor, PoisonContext, PoisonedData
from bdat_ray.cache import cached_tensors, content_key
from bdat_ray.config import (
    Component,
    Config,
    ConfigError,
    at_components,
    from_flat,
    parse_lr_milestones,
)
from bdat_ray.data import ImageData, load_dataset
from bdat_ray.data.augment import augment, resolve_augment, shuffled_batches, to_float
from bdat_ray.defenses import DEFENSES, Defense, DefenseContext
from bdat_ray.defenses.base import subset
from bdat_ray.metrics import (
    attack_success_rate,
    attack_success_rate_by_prediction,
    clean_accuracy,
    detection_rates,
    predict,
    robust_accuracy,
)
from bdat_ray.models import build_model
from bdat_ray.models.common import batch_statistics_frozen
from bdat_ray.threats import THREATS, ThreatModel
from bdat_ray.threats.objective import AdversarialTraining, StandardTraining

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite; the run is failed, not retried."""


# ---------------------------------------------------------------------------------------------
# Preparation: resolve defaults, load and poison data, build model and objective.


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} requested but no CUDA device is available")
    return torch.device(name)


#: What ``train.compile=auto`` resolves to per device type. CPU: measured on the project's
#: 2-core machine (BENCHMARKS.md, "torch.compile of the training and attack step"): the
#: compiled PGD-10 AT step runs at 0.85x (the clean step 1.24x) after ~26 s of compiling. CUDA:
#: unmeasured (no GPU was lent), so off until `python -m bdat_ray.bench --compile` says it pays.
COMPILE_AUTO = {"cpu": False, "cuda": False}


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot build kernels for ``device`` here (None: it can): a C++ compiler on
    CPU (inductor's own search of ``torch._inductor.config.cpp.cxx``), Triton on CUDA."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "needs Triton for CUDA kernels and it is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except ImportError:  # a torch without this private helper: look for the usual compiler
        if shutil.which(os.environ.get("CXX", "g++")) is None:
            return "needs a C++ compiler for CPU kernels and none was found ($CXX, g++)"
    except Exception:  # torch._inductor.exc.InvalidCxxCompiler: none of the candidates runs
        return "needs a C++ compiler for CPU kernels and none was found ($CXX, g++)"
    return None


def resolve_compile(cfg: Config, device: torch.device) -> bool:
    """Whether ``train.compile`` compiles this run's training and attack steps; raises
    `ConfigError` before any training when ``on`` cannot work on this machine."""
    if cfg.train.compile == "auto":
        changes_step = DEFENSES[cfg.defense.name].changes_training_step()
        return COMPILE_AUTO.get(device.type, False) and not changes_step
    if cfg.train.compile == "off":
        return False
    problem = compiler_problem(device)
    if problem is not None:
        raise ConfigError("train.compile", f"on {problem}; use train.compile=off")
    return True


def compile_model(model: nn.Module) -> nn.Module:
    """``model`` under torch.compile for the step; it shares ``model``'s parameters and
    buffers, so checkpoints and evaluation keep using ``model`` itself. Static shapes: the
    short last batch of an epoch is one more graph per mode, compiled once (train/eval
    BatchNorm, frozen weights in the attack, frozen statistics each add one too)."""
    return torch.compile(model, dynamic=False)


def build_threat(component: Component, cfg: Config, *, random_start: bool) -> ThreatModel:
    """A threat model from its resolved component and its ``at.<name>`` section (where the
    threat's own knobs live, e.g. ``at.spatial.tau``)."""
    section = getattr(cfg.at, component.threat)
    return THREATS[component.threat].from_config(component, section, random_start=random_start)


def build_objective(cfg: Config) -> StandardTraining | AdversarialTraining:
    components = at_components(cfg.at)
    if not components:
        return StandardTraining()
    threats = [
        (build_threat(c, cfg, random_start=cfg.at.random_start), c.weight) for c in components
    ]
    return AdversarialTraining(threats, mix=cfg.at.mix, bn_mode=cfg.at.bn_mode)


def eval_threat(cfg: Config) -> ThreatModel:
    """The fixed evaluation attack behind ``robust_acc`` (PGD-20 L-inf 8/255 by default)."""
    e = cfg.eval
    return build_threat(
        Component(e.threat, e.eps, e.steps, e.step_size, 1.0), cfg, random_start=True
    )


def _resolved_threat_keys(cfg: Config, objective) -> dict[str, Any]:
    """What the AT run actually used, for the resolved config (budgets, steps, weights)."""
    if not isinstance(objective, AdversarialTraining):
        return {}
    pairs = list(zip(objective.threats, objective.weights, strict=True))
    if cfg.at.threat not in ("composite", "cat"):
        threat = pairs[0][0]
        return {"at.eps": threat.eps, "at.step_size": threat.step_size}
    out: dict[str, Any] = {}
    for threat, weight in pairs:
        out |= {
            f"at.{threat.name}.eps": threat.eps,
            f"at.{threat.name}.steps": threat.steps,
            f"at.{threat.name}.step_size": threat.step_size,
            f"at.{threat.name}.weight": weight,
        }
    return out


@dataclass
class Prepared:
    cfg: Config  # with every default resolved (what the run actually used)
    device: torch.device
    poisoned: PoisonedData  # on `device`
    model: nn.Module
    objective: StandardTraining | AdversarialTraining
    amp_dtype: torch.dtype | None
    channels_last: bool
    augment_mode: str
    backdoor: Backdoor
    clean: ImageData  # unpoisoned, on CPU: the gallery and per-epoch re-draws start from it
    defense: Defense
    craft_seconds: float  # wall time of building the poisoned set (surrogates, crafting)
    #: the poisoned data before a filter defense removed images (None: nothing removed)
    unfiltered: PoisonedData | None = None
    defense_seconds: float = 0.0  # the defense's own work outside the training epochs
    compiled: nn.Module | None = None  # `model` under torch.compile (train.compile=on)

    @property
    def step_model(self) -> nn.Module:
        """What the training and attack steps call: the compiled model, else ``model``."""
        return self.compiled if self.compiled is not None else self.model


def prepare(cfg: Config, data: ImageData | None = None) -> Prepared:
    """Everything before the first step. ``data``: the clean dataset of ``cfg.data`` if the
    caller already holds it (a sweep shares one copy between trials), else it is loaded.
    Raises `ConfigError` for input that cannot work with this dataset (target class, trigger
    size, class counts) before any training."""
    device = resolve_device(cfg.device)
    compiled = resolve_compile(cfg, device)
    data = data if data is not None else load_dataset(cfg.data)
    backdoor = BACKDOORS[cfg.attack.name](cfg.attack, poison_context(cfg, device))
    craft_started = time.perf_counter()
    poisoned = backdoor.poison(data)
    craft_seconds = time.perf_counter() - craft_started
    defense = build_defense(cfg, data, poisoned, device)
    t0 = time.perf_counter()
    poisoned, unfiltered = apply_filter(defense, poisoned, backdoor)
    filter_seconds = time.perf_counter() - t0
    amp = cfg.train.amp if cfg.train.amp != "auto" else ("bf16" if device.type == "cuda" else "off")

    torch.manual_seed(cfg.train.seed)
    mean, std = poisoned.data.channel_stats()
    model = build_model(
        cfg.model.name,
        num_classes=data.num_classes,
        in_channels=data.channels,
        width=cfg.model.width,
        norm=cfg.model.norm,
        mean=mean,
        std=std,
    )
    model = defense.adapt_model(model)
    # channels_last on every device: on CUDA for the tensor cores; on this project's CPU
    # (oneDNN) it measured 1.25x on a whole quickstart L-inf run and 1.2-1.5x on the
    # small CNN's, Madry CNN's and ResNet-32's training step (BENCHMARKS.md, CPU).
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    objective = build_objective(cfg)
    resolved: dict[str, Any] = {
        "device": str(device),
        "train.amp": amp,
        "train.compile": "on" if compiled else "off",
        "train.augment": resolve_augment(cfg.train.augment, data.channels),
        **backdoor.resolved_keys(),
        **_resolved_threat_keys(cfg, objective),
        **defense.resolved_keys(),
    }
    resolved_cfg = cfg.replace(resolved)
    return Prepared(
        cfg=resolved_cfg,
        device=device,
        poisoned=poisoned.to(device),
        model=model,
        objective=objective,
        amp_dtype=torch.bfloat16 if amp == "bf16" else None,
        channels_last=True,
        augment_mode=resolved_cfg.train.augment,
        backdoor=backdoor,
        clean=data,
        defense=defense,
        unfiltered=unfiltered,
        defense_seconds=filter_seconds,
        craft_seconds=craft_seconds,
        compiled=compile_model(model) if compiled else None,
    )


def check_data(cfg: Config, data: ImageData) -> None:
    """The dataset-dependent checks of `prepare` (target class, trigger size, colour-only
    triggers, class counts) without poisoning or training anything: a sweep runs them for
    every planned trial before it starts. Raises `ConfigError` naming the key."""
    context = poison_context(cfg, torch.device("cpu"))
    BACKDOORS[cfg.attack.name](cfg.attack, context).check_data(data)


def poison_context(cfg: Config, device: torch.device) -> PoisonContext:
    """What an attack may use from the run: its architecture, device, this engine's
    `train_auxiliary` for surrogates, and the run's adversarial training (its set ``at.*``
    keys and objective: the adaptive attack's surrogate trains like the victim)."""
    victim_at = {k: v for k, v in cfg.to_flat().items() if k.startswith("at.") and v is not None}
    return PoisonContext(
        str(device),
        cfg.model.name,
        cfg.model.width,
        train_auxiliary,
        victim_at,
        build_objective(cfg),
    )


def train_auxiliary(overrides: Mapping[str, Any], data: ImageData) -> nn.Module:
    """An auxiliary model trained by this engine on ``data`` as given — an attack's surrogate
    (LC, the adaptive attack): the run defaults, ``overrides``, no poisoning of its own, no
    robust evaluation. Handed to attacks through `PoisonContext` so their imports point down,
    never back to the engine. The weights are cached under ``$BDAT_RAY_CACHE/surrogate`` by
    the config hash and the training data, so a sweep trains each surrogate once."""
    cfg = from_flat({"attack.name": "none", "eval.robust_samples": 0, **overrides})

    def train() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in fit(cfg, data=data).model.state_dict().items()}

    state = cached_tensors("surrogate", content_key(cfg.hash(), data.x_train, data.y_train), train)
    model = prepare(cfg, data).model
    model.load_state_dict(state)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Defenses: the engine calls the hooks of `bdat_ray.defenses.base.Defense` at fixed points of
# every run (filter here, before the model is built; adapt_model above; wrap_optimizer,
# objective and after_epoch in `fit`; repair after the last epoch). No defense-specific code.


def build_defense(
    cfg: Config, data: ImageData, poisoned: PoisonedData, device: torch.device
) -> Defense:
    """The run's defense with what it may use: an auxiliary trainer of the run's settings, the
    clean share it is entitled to (on ``device``), the target class, the oracle indices."""
    cls = DEFENSES[cfg.defense.name]
    section = getattr(cfg.defense, cls.name, None)
    ctx = DefenseContext(
        device=device,
        num_classes=data.num_classes,
        image_shape=data.image_shape,
        target=poisoned.target,
        poison_indices=poisoned.poison_indices.cpu(),
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        epochs=cfg.train.epochs,
        seed=cfg.train.seed,
        trainer=defense_trainer(cfg),
        clean_share=clean_share(cfg, cls, data).to(device) if cls.needs_clean_data() else None,
    )
    return cls(section, ctx)


def defense_trainer(cfg: Config):
    """`train_auxiliary` with the run's own model, training and AT settings (SS/AC's auxiliary
    network is trained as the run would be, on the data the defense hands it)."""
    run_keys = {
        k: v
        for k, v in cfg.to_flat().items()
        if k == "device" or k.split(".")[0] in ("model", "train", "at")
    }
    return lambda overrides, data: train_auxiliary({**run_keys, **overrides}, data)


def clean_share(cfg: Config, cls: type[Defense], data: ImageData) -> ImageData:
    """``defense.<name>.clean_fraction`` of the *clean* training set, drawn from
    ``train.seed``: the clean data the papers give the defender (CAT paper §4: 5%)."""
    fraction = getattr(cfg.defense, cls.name).clean_fraction
    n = len(data.y_train)
    count = round(fraction * n)
    if count < 1:
        raise ConfigError(
            f"defense.{cls.name}.clean_fraction",
            f"{fraction:g} of {n} training images leaves no clean image; raise it",
        )
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + 3)
    return subset(data, torch.randperm(n, generator=generator)[:count].sort().values)


def apply_filter(
    defense: Defense, poisoned: PoisonedData, backdoor: Backdoor
) -> tuple[PoisonedData, PoisonedData | None]:
    """(training data after the defense's filter, the data before it — None when the
    defense filters nothing). The poisoned indices are renumbered into the kept set."""
    removed = defense.filter(poisoned.data)
    if removed is None:
        return poisoned, None
    if backdoor.redraws_each_epoch:
        raise ConfigError(
            "defense.name",
            f"{defense.name} filters a fixed training set; "
            "it cannot follow attack.wanet.redraw=true",
        )
    defense.flagged = removed = removed.cpu()
    n = len(poisoned.data.y_train)
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    new_position = keep.long().cumsum(0) - 1

    def renumber(indices: torch.Tensor) -> torch.Tensor:
        indices = indices.cpu()
        return new_position[indices[keep[indices]]]

    kept = replace(
        poisoned,
        data=subset(poisoned.data, keep.nonzero().flatten().to(poisoned.data.x_train.device)),
        poison_indices=renumber(poisoned.poison_indices),
        cross_indices=renumber(poisoned.cross_indices),
    )
    return kept, poisoned


def defense_metrics(prep: Prepared, before_repair: dict[str, float] | None) -> dict[str, float]:
    """The defense's metrics for the result (and MLflow): detection of what it flagged, the
    clean fraction it read, its own seconds, the metrics before a repair, its own report."""
    defense = prep.defense
    if defense.name == "none":
        return {}
    original = prep.unfiltered or prep.poisoned
    out: dict[str, float] = {"defense_seconds": prep.defense_seconds}
    if defense.flagged is not None:
        out |= detection_rates(defense.flagged, original.poison_indices, len(original.data.y_train))
    if defense.ctx.clean_share is not None:
        out["clean_fraction"] = len(defense.ctx.clean_share.y_train) / len(prep.clean.y_train)
    if before_repair is not None:
        out |= {f"{k}_before_repair": v for k, v in before_repair.items()}
    return out | defense.report()


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass
class RunResult:
    acc: float
    asr: float
    asr_pred: float  # Weng et al.'s count (clean prediction not the target), percent
    robust_acc: float | None
    seconds: float
    epochs: int
    images_per_s: float
    poisoned_count: int
    device: str
    craft_seconds: float  # building the poisoned set (LC/adaptive surrogates and crafting)
    config: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    #: the defense's metrics (`defense_metrics`): detect_*, removed, clean_fraction, ...
    defense: dict[str, float] = field(default_factory=dict)
    defense_details: dict[str, Any] = field(default_factory=dict)  # e.g. NC's flagged classes
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, for JSON (`dataclasses.asdict` would deep-copy the
        network only to drop it)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def evaluate(prep: Prepared, model: nn.Module | None = None) -> dict[str, float]:
    """``acc``, ``asr`` and ``asr_pred`` (percent) of ``model`` (default: the run's) on the
    test sets."""
    model = model or prep.model
    p, kw = (
        prep.poisoned,
        {
            "amp_dtype": prep.amp_dtype,
            "channels_last": prep.channels_last,
            "batch_size": prep.cfg.eval.batch_size,
        },
    )
    clean = predict(model, p.data.x_test, **kw)
    triggered = predict(model, p.x_test_triggered, **kw)
    acc = clean_accuracy(clean, p.data.y_test)
    asr = attack_success_rate(triggered, p.y_test_triggered, p.target)
    is_target = p.data.y_test == p.target
    if p.x_test_triggered_target is None:  # an attack that builds its own PoisonedData
        asr_pred = float("nan")
    else:
        asr_pred = attack_success_rate_by_prediction(
            torch.cat([triggered, predict(model, p.x_test_triggered_target, **kw)]),
            torch.cat([clean[~is_target], clean[is_target]]),
            p.target,
        )
    return {"acc": acc, "asr": asr, "asr_pred": asr_pred}


def evaluate_robust(prep: Prepared, progress: bool = False) -> float | None:
    """``robust_acc`` under the fixed evaluation attack on the first ``eval.robust_samples``
    clean test images; None when that is 0."""
    n = min(prep.cfg.eval.robust_samples, len(prep.poisoned.data.y_test))
    if n == 0:
        return None
    p = prep.poisoned
    generator = torch.Generator(prep.device).manual_seed(prep.cfg.train.seed + 2)
    threat = eval_threat(prep.cfg)
    bar = _progress_bar(progress, n, f"robust_acc ({threat.name} PGD-{threat.steps})")
    try:
        return robust_accuracy(
            prep.model,
            p.data.x_test[:n],
            p.data.y_test[:n],
            threat,
            batch_size=prep.cfg.eval.batch_size,
            generator=generator,
            amp_dtype=prep.amp_dtype,
            channels_last=prep.channels_last,
            on_batch=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()


# ---------------------------------------------------------------------------------------------
# Training.

EpochCallback = Callable[[dict[str, float], Path | None], None]


def make_optimizer(model: nn.Module, cfg: Config):
    t = cfg.train
    if t.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
    milestones = sorted(
        {
            int(m) if m >= 1 else max(1, math.floor(m * t.epochs))
            for m in parse_lr_milestones(t.lr_milestones)
        }
    )
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
    return optimizer, scheduler


def train_epoch(
    prep: Prepared, optimizer, generators: dict[str, torch.Generator], progress=None, objective=None
) -> dict[str, float]:
    """One pass over the poisoned training set; returns the epoch's bookkeeping.
    ``objective``: the epoch's objective when a defense changes it (default the run's)."""
    model, data = prep.model, prep.poisoned.data
    objective = objective or prep.objective
    model.train()
    sums = {
        k: torch.zeros((), device=prep.device)
        for k in ("loss", "correct", "count", "clean_loss", "clean_correct")
    }
    n_images = 0
    for idx in shuffled_batches(
        len(data.y_train), prep.cfg.train.batch_size, generators["data"], prep.device
    ):
        # attacks defined per batch (WaNet) poison here, before augmentation; others pass
        images, y = prep.backdoor.poison_batch(
            data.x_train[idx], data.y_train[idx], generators["data"]
        )
        x = to_float(
            augment(images, prep.augment_mode, generators["data"], prep.cfg.train.crop_padding),
            prep.channels_last,
        )
        out = objective.batch_loss(prep.step_model, x, y, generators["attack"], prep.amp_dtype)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sums["loss"] += out.loss.detach() * len(y)
        sums["correct"] += out.correct
        sums["count"] += out.count
        if objective.adversarial:
            clean = clean_batch_stats(prep, x, y)
            sums["clean_loss"] += clean[0]
            sums["clean_correct"] += clean[1]
        n_images += len(y)
        if progress is not None:
            progress.update(len(y))
    totals = {k: v.item() for k, v in sums.items()}
    if not math.isfinite(totals["loss"]):
        raise TrainingDiverged(
            "training loss became non-finite (NaN/inf); lower train.lr or the budget"
        )
    stats = {
        "train_loss": totals["loss"] / n_images,
        "train_acc": 100 * totals["correct"] / totals["count"],
    }
    if objective.adversarial:
        stats.update(
            train_adv_loss=stats["train_loss"],
            train_adv_acc=stats["train_acc"],
            train_clean_loss=totals["clean_loss"] / n_images,
            train_clean_acc=100 * totals["clean_correct"] / n_images,
        )
    else:
        stats.update(train_clean_loss=stats["train_loss"], train_clean_acc=stats["train_acc"])
    return stats


@torch.no_grad()
def clean_batch_stats(
    prep: Prepared, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and correct count on the clean batch during AT: one extra forward with the
    same batch statistics training uses, leaving BatchNorm's running statistics alone."""
    with (
        batch_statistics_frozen(prep.model),
        torch.autocast(
            x.device.type, prep.amp_dtype or torch.float32, enabled=prep.amp_dtype is not None
        ),
    ):
        logits = prep.step_model(x).float()
    loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    return loss, (logits.argmax(1) == y).sum()


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)  # atomic: a killed run never leaves half a file


def load_state(path: Path) -> dict[str, Any]:
    return torch.load(path / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def fit(
    cfg: Config,
    *,
    workdir: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool = False,
    data: ImageData | None = None,
) -> RunResult:
    """Train one run end to end and evaluate it.

    ``workdir`` (optional) receives ``checkpoint/state.pt`` after every epoch, the poisoned
    indices (``poisoned_indices.npy``) and ``result.json``. ``resume_from`` is a checkpoint
    directory (ours, or one restored by Ray Tune) to continue from. ``on_epoch(metrics,
    checkpoint_dir)`` is called after each epoch's checkpoint is written. ``data`` is the
    clean dataset of ``cfg.data`` when the caller already holds it (see `prepare`).
    """
    started = time.perf_counter()
    prep = prepare(cfg, data)
    rcfg = prep.cfg
    workdir = Path(workdir) if workdir else None
    checkpoint_dir = workdir / "checkpoint" if workdir else None
    if workdir:
        save_poisoning_artifacts(prep, workdir)

    optimizer, scheduler = make_optimizer(prep.model, rcfg)
    optimizer = prep.defense.wrap_optimizer(optimizer, prep.model)  # DPSGD's clip and noise
    generators = {
        name: torch.Generator(prep.device).manual_seed(rcfg.train.seed * 1000 + offset)
        for offset, name in enumerate(("data", "attack"))
    }
    history: list[dict[str, float]] = []
    first_epoch = 1
    if resume_from is not None and (Path(resume_from) / CHECKPOINT_FILE).is_file():
        state = load_state(Path(resume_from))
        if state["config_hash"] != cfg.hash():
            raise ConfigError("--resume", "checkpoint was written by a run with another config")
        prep.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        for name, gen in generators.items():
            gen.set_state(state["rng"][name])
        history = list(state["history"])
        prep.defense.load_state_dict(state.get("defense", {}))
        first_epoch = int(state["epoch"]) + 1
        log.info("resumed after epoch %d", first_epoch - 1)

    log.info("training %s on %s: %s", rcfg.model.name, prep.clean.name, prep.objective.describe())
    n_train = len(prep.poisoned.data.y_train)
    for epoch in range(first_epoch, rcfg.train.epochs + 1):
        t0 = time.perf_counter()
        if prep.backdoor.redraws_each_epoch and epoch > 1:
            redraw_poison(prep, epoch)
        bar = _progress_bar(progress, n_train, f"epoch {epoch}/{rcfg.train.epochs}")
        lr = optimizer.param_groups[0]["lr"]
        stats = train_epoch(
            prep, optimizer, generators, bar, prep.defense.objective(prep.objective, epoch)
        )
        scheduler.step()
        t_defense = time.perf_counter()
        prep.defense.after_epoch(epoch, prep.model, prep.poisoned.data)
        prep.defense_seconds += time.perf_counter() - t_defense
        seconds = time.perf_counter() - t0
        metrics = {
            "epoch": epoch,
            "lr": lr,
            **stats,
            **evaluate(prep),
            "epoch_seconds": seconds,
            "images_per_s": n_train / seconds,
        }
        history.append(metrics)
        if bar is not None:
            bar.set_postfix(
                loss=f"{stats['train_loss']:.3f}",
                acc=f"{metrics['acc']:.1f}",
                asr=f"{metrics['asr']:.1f}",
            )
            bar.close()
        if checkpoint_dir is not None:
            save_state(
                checkpoint_dir,
                {
                    "epoch": epoch,
                    "config_hash": cfg.hash(),
                    "model": prep.model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": {name: gen.get_state() for name, gen in generators.items()},
                    "history": history,
                    "defense": prep.defense.state_dict(),
                },
            )
        if on_epoch is not None:
            on_epoch(metrics, checkpoint_dir)

    before_repair = repair_model(prep)
    final = evaluate(prep)
    robust = evaluate_robust(prep, progress)
    train_seconds = sum(h["epoch_seconds"] for h in history)
    result = RunResult(
        acc=final["acc"],
        asr=final["asr"],
        asr_pred=final["asr_pred"],
        robust_acc=robust,
        seconds=time.perf_counter() - started,
        epochs=rcfg.train.epochs,
        images_per_s=n_train * len(history) / train_seconds if train_seconds else float("nan"),
        poisoned_count=len(prep.poisoned.poison_indices),
        device=str(prep.device),
        craft_seconds=prep.craft_seconds,
        config=rcfg.to_flat(),
        history=history,
        defense=defense_metrics(prep, before_repair),
        defense_details=prep.defense.details(),
        model=prep.model,
    )
    if workdir:
        (workdir / "result.json").write_text(json.dumps(result.to_dict(), indent=2))
    return result


def repair_model(prep: Prepared) -> dict[str, float] | None:
    """The repair hook after the last epoch; returns acc/asr before it (None: no repair)."""
    if type(prep.defense).repair is Defense.repair:
        return None
    before = evaluate(prep)
    t0 = time.perf_counter()
    prep.model = prep.defense.repair(prep.model, prep.poisoned.data)
    prep.defense_seconds += time.perf_counter() - t0
    return before


def save_poisoning_artifacts(prep: Prepared, workdir: Path) -> None:
    """The poisoned (and WaNet noise-mode) indices, a picture of the trigger (empty for an
    attack poisoning per batch, which keeps no fixed set; its picture shows what it does), and
    the indices a filter defense removed (``removed_indices.npy``, into the unfiltered set)."""
    from bdat_ray.backdoors.pictures import attack_mosaic, panel_title, save_gallery

    workdir.mkdir(parents=True, exist_ok=True)
    p = prep.unfiltered or prep.poisoned
    if prep.unfiltered is not None:
        np.save(workdir / "removed_indices.npy", prep.defense.flagged.numpy())
    np.save(workdir / "poisoned_indices.npy", p.poison_indices.cpu().numpy())
    if len(p.cross_indices):
        np.save(workdir / "cross_indices.npy", p.cross_indices.cpu().numpy())
    if not len(p.poison_indices):
        p = prep.backdoor.illustration(prep.clean)
    if len(p.poison_indices):
        title = panel_title(prep.cfg.to_flat(), p, len(prep.clean.y_train))
        save_gallery([(title, attack_mosaic(prep.clean, p))], workdir / "trigger.png")


def redraw_poison(prep: Prepared, epoch: int) -> None:
    """A fresh poisoned training set for attacks defined per epoch (WaNet's ``per_epoch``),
    seeded by ``attack.seed`` and the epoch so a resumed run draws the same sets."""
    fresh = prep.backdoor.poison(prep.clean, epoch=epoch)
    data = prep.poisoned.data
    data.x_train.copy_(fresh.data.x_train)
    data.y_train.copy_(fresh.data.y_train)


def _progress_bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=True, dynamic_ncols=True)
