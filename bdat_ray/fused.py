"""Fused trials: K runs of one architecture trained as one network (`fit_fused`).

Each member is the run it replaces: its own `engine.prepare` (seed, poisoned data and saved
indices, initial weights), its own data order and augmentation (its own generators, drawn in
the same sequence as `engine.fit` draws them), its own attack starts, learning-rate schedule,
momentum, weight decay and — for threat models whose steps act per sample — its own budget.
Only the arithmetic is shared: `bdat_ray.models.fused` lays the K networks side by side
(grouped convolutions, per-member BatchNorm statistics, batched linear layers) and every
batch is the K members' batches stacked, ``(K·B, C, H, W)``.

What can be fused (`check_fusable` says which key differs otherwise): the same device, dataset
(``data.*``), architecture (``model.*``), ``train.batch_size``, ``train.epochs``, resolved
augmentation, crop padding and autocast, SGD (not Adam), AT threat-model kinds with the same
steps, mixing rule (not ``random``: a per-batch draw per member cannot share a batch),
composite weights and BatchNorm mode, and no defense. Attacks may differ, WaNet's per-batch
poisoning included. Budgets and step sizes may differ per member for ``linf``, ``spatial``,
``noise`` and ``flow_noise`` (their steps are
per-sample arithmetic); ``l2`` and ``perceptual`` members must share them.

Free of Ray and MLflow, like the engine it builds on; evaluation uses the engine's own
functions on each member's unfused copy, so every metric is computed in one place.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from bdat_ray.backdoors import BACKDOORS
from bdat_ray.config import Config, ConfigError, at_components
from bdat_ray.data import ImageData
from bdat_ray.data.augment import augment, shuffled_batches, to_float
from bdat_ray.engine import (
    CHECKPOINT_FILE,
    Prepared,
    RunResult,
    TrainingDiverged,
    evaluate,
    evaluate_robust,
    load_state,
    make_optimizer,
    poison_context,
    prepare,
    save_poisoning_artifacts,
    save_state,
)
from bdat_ray.models.common import batch_statistics_frozen
from bdat_ray.models.fused import FusedModel, copy_member, fuse, member_view
from bdat_ray.threats.base import ThreatModel
from bdat_ray.threats.objective import AdversarialTraining

log = logging.getLogger(__name__)

#: Threat models whose init/ascend/project only broadcast ``eps`` and ``step_size`` per
#: sample, so each member's rows may carry their own budget.
PER_SAMPLE_BUDGETS = ("linf", "spatial", "noise", "flow_noise")
#: Keys every member must share (prefixes end with a dot).
SHARED_KEYS = (
    "device",
    "data.",
    "model.",
    "train.batch_size",
    "train.epochs",
    "train.augment",
    "train.amp",
    "train.optimizer",
    "train.crop_padding",
    "train.compile",
    "at.threat",
    "at.components",
    "at.mix",
    "at.bn_mode",
    "at.random_start",
    "defense.name",
)


def unfusable_reason(cfg: Config) -> tuple[str, str] | None:
    """(key, why) when the run ``cfg`` cannot be fused with any other; None when it can."""
    if cfg.train.optimizer != "sgd":
        return "train.optimizer", "fused members train with SGD (MemberSGD)"
    if cfg.defense.name != "none":
        return "defense.name", "defenses are not fused; run them as single trials"
    if cfg.train.compile == "on":  # fit_fused's grouped step has no torch.compile path
        return "train.compile", "fused networks are not compiled; compile=on trials run alone"
    if cfg.at.mix == "random" and cfg.at.threat in ("composite", "cat"):
        return "at.mix", "mix=random draws one threat per batch and member: not fused"
    attack = BACKDOORS[cfg.attack.name](cfg.attack, poison_context(cfg, torch.device("cpu")))
    if attack.redraws_each_epoch:
        return "attack.name", "attacks that re-draw their poison are not fused"
    return None


def _threat_structure(cfg: Config) -> list[tuple[Any, ...]]:
    """Threat kinds, steps and weights, plus the budget of threats whose budget is shared."""
    return [
        (c.threat, c.steps, round(c.weight, 9))
        + (() if c.threat in PER_SAMPLE_BUDGETS else (c.eps, c.step_size))
        for c in at_components(cfg.at)
    ]


def fusion_key(cfg: Config) -> str:
    """Runs with equal keys can train as one fused network (when `unfusable_reason` is None)."""
    flat = cfg.to_flat()
    shared = sorted((k, repr(v)) for k, v in flat.items() if k.startswith(SHARED_KEYS))
    return repr((shared, _threat_structure(cfg)))


def pack(cfgs: Sequence[Config], members: int) -> list[list[int]]:
    """The runs ``cfgs`` (by index) packed into fused groups of at most ``members``: runs
    with the same `fusion_key`, in their order; a run that cannot be fused stays alone.
    Groups are ordered by their first run."""
    alone, groups = [], {}
    for i, cfg in enumerate(cfgs):
        if members == 1 or unfusable_reason(cfg) is not None:
            alone.append([i])
        else:
            groups.setdefault(fusion_key(cfg), []).append(i)
    packs = alone + [g[j : j + members] for g in groups.values() for j in range(0, len(g), members)]
    return sorted(packs)


def check_fusable(preps: Sequence[Prepared]) -> None:
    """Raise `ConfigError` naming the first key the members may not differ in."""
    flats = [p.cfg.to_flat() for p in preps]
    for key in flats[0]:
        if key.startswith(SHARED_KEYS):
            values = {repr(f[key]) for f in flats}
            if len(values) > 1:
                raise ConfigError(key, f"fused members must share it; got {sorted(values)}")
    for p in preps:
        if (reason := unfusable_reason(p.cfg)) is not None:
            raise ConfigError(*reason)
    shapes = {tuple(p.poisoned.data.x_train.shape) for p in preps}
    if len(shapes) > 1:
        raise ConfigError("data.name", "fused members must train on equally many images")
    first = _threat_structure(preps[0].cfg)
    for p in preps[1:]:
        mine = _threat_structure(p.cfg)
        if [s[:3] for s in mine] != [s[:3] for s in first]:
            raise ConfigError("at.steps", "fused members need the same threat steps and weights")
        for ours, theirs in zip(mine, first, strict=True):
            if ours != theirs:
                raise ConfigError(
                    f"at.{ours[0]}.eps",
                    f"{ours[0]} members must share budget and step size "
                    f"(per-member budgets: {', '.join(PER_SAMPLE_BUDGETS)})",
                )


class StackedThreat:
    """One threat model over the K members' stacked rows: each member's random start comes
    from its own threat model and generator; the steps use per-row budgets."""

    def __init__(self, members: list[ThreatModel], rows_per_member: int):
        self.members = members
        self.inner = copy.copy(members[0])
        eps = torch.tensor([t.eps for t in members]).repeat_interleave(rows_per_member)
        steps = torch.tensor([t.step_size for t in members]).repeat_interleave(rows_per_member)
        # Shaped to broadcast against a batch of images or of flow fields, row by row.
        self.full_eps = self.inner.eps = eps.view(-1, 1, 1, 1)
        self.full_step = self.inner.step_size = steps.view(-1, 1, 1, 1)

    def rows(self, count: int) -> None:
        """Use the first ``count`` rows of every member (the epoch's last, short batch)."""
        k = len(self.members)
        for name, full in (("eps", self.full_eps), ("step_size", self.full_step)):
            setattr(self.inner, name, full.view(k, -1, 1, 1, 1)[:, :count].reshape(-1, 1, 1, 1))

    def to(self, device: torch.device) -> StackedThreat:
        self.full_eps, self.full_step = self.full_eps.to(device), self.full_step.to(device)
        self.inner.eps, self.inner.step_size = self.full_eps, self.full_step
        return self

    def init(self, x: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        chunks = x.chunk(len(self.members))
        return torch.cat(
            [t.init(c, g) for t, c, g in zip(self.members, chunks, generators, strict=True)]
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class MemberSGD:
    """SGD with momentum and weight decay, each member with its own lr, momentum and weight
    decay — `torch.optim.SGD`'s update (dampening 0, no Nesterov) applied to each member's
    block of every fused parameter."""

    def __init__(self, model: FusedModel, cfgs: Sequence[Config]):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.k = model.members
        device = self.params[0].device

        def column(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=device).view(-1, 1)

        self.momentum = column([c.train.momentum for c in cfgs])
        self.weight_decay = column([c.train.weight_decay for c in cfgs])
        self.lr = column([c.train.lr for c in cfgs])
        self.active = torch.ones(self.k, 1, dtype=torch.bool, device=device)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def stop(self, member: int) -> None:
        """Freeze a member (it diverged): its weights never change again, whatever NaNs its
        gradients hold; the others train on."""
        self.active[member] = False

    def state_dict(self) -> dict[str, Any]:
        return {"buffers": self.buffers, "active": self.active}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.active.device
        self.active = state["active"].to(device)
        self.buffers = [None if b is None else b.to(device) for b in state["buffers"]]

    def set_lr(self, lrs: Sequence[float]) -> None:
        self.lr = torch.tensor(list(lrs), device=self.lr.device).view(-1, 1)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            weights = member_view(p, self.k)
            per_member = (self.k,) + (1,) * (weights.dim() - 1)  # broadcast a (K, 1) column
            active = self.active.view(per_member)
            grad = member_view(p.grad, self.k) + self.weight_decay.view(per_member) * weights
            grad = torch.where(active, grad, 0.0)
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = grad.clone()
            else:
                buf.mul_(self.momentum.view(per_member)).add_(grad)
            weights.sub_(torch.where(active, self.lr.view(per_member) * buf, 0.0))


def _lr_schedules(preps: Sequence[Prepared]) -> list[list[float]]:
    """Each member's learning rate per epoch, from the engine's own scheduler."""
    schedules = []
    for p in preps:
        probe = torch.nn.Linear(1, 1)
        optimizer, scheduler = make_optimizer(probe, p.cfg)
        lrs = []
        for _ in range(p.cfg.train.epochs):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        schedules.append(lrs)
    return schedules


def _fused_objective(preps: Sequence[Prepared], device: torch.device):
    first = preps[0].objective
    if not isinstance(first, AdversarialTraining):
        return first
    batch = preps[0].cfg.train.batch_size
    per_component = zip(*(p.objective.threats for p in preps), strict=True)
    threats = [
        (StackedThreat(list(ts), batch).to(device), w)
        for ts, w in zip(per_component, first.weights, strict=True)
    ]
    return AdversarialTraining(threats, mix=first.mix, bn_mode=first.bn_mode)


#: ``on_epoch(epoch, metrics, diverged, checkpoint_dir)`` after each epoch: the metrics of
#: the members still training, every member that diverged so far (index -> error) and the
#: directory holding the fused checkpoint (None without a ``workdir``).
FusedEpochCallback = Callable[
    [int, dict[int, dict[str, float]], dict[int, TrainingDiverged], Path | None], None
]


def member_dir(workdir: Path, member: int) -> Path:
    """Member ``member``'s own files (poisoned indices, trigger picture, result.json)."""
    return workdir / f"member_{member}"


def fit_fused(
    cfgs: Sequence[Config],
    *,
    data: ImageData | None = None,
    workdir: str | Path | None = None,
    resume_from: str | Path | None = None,
    on_epoch: FusedEpochCallback | None = None,
) -> list[RunResult | TrainingDiverged]:
    """Train the runs ``cfgs`` as one fused network. Per member, the `RunResult`
    `engine.fit` would return, or the `TrainingDiverged` it would raise (a member that
    diverges is frozen; the others go on).

    ``workdir`` receives, as `engine.fit`'s does, each member's poisoned indices, trigger
    picture and ``result.json`` (in `member_dir`) and, after every epoch, one checkpoint of
    the whole fused state (``checkpoint/state.pt``: weights, every member's momentum, data
    and attack generators, history and divergence); ``resume_from`` continues from one."""
    started = time.perf_counter()
    preps = [prepare(c, data) for c in cfgs]
    check_fusable(preps)
    k, device = len(preps), preps[0].device
    workdir = Path(workdir) if workdir else None
    checkpoint_dir = workdir / "checkpoint" if workdir else None
    if workdir:
        for i, p in enumerate(preps):
            save_poisoning_artifacts(p, member_dir(workdir, i))
    memory_format = torch.channels_last if preps[0].channels_last else torch.contiguous_format
    model = fuse([p.model for p in preps]).to(device, memory_format=memory_format)
    optimizer = MemberSGD(model, [p.cfg for p in preps])
    schedules = _lr_schedules(preps)
    generators = [
        {
            name: torch.Generator(device).manual_seed(p.cfg.train.seed * 1000 + offset)
            for offset, name in enumerate(("data", "attack"))
        }
        for p in preps
    ]
    objective = _fused_objective(preps, device)
    histories: list[list[dict[str, float]]] = [[] for _ in preps]
    failed: dict[int, TrainingDiverged] = {}
    first_epoch = 1
    hashes = [c.hash() for c in cfgs]
    if resume_from is not None and (Path(resume_from) / CHECKPOINT_FILE).is_file():
        state = load_state(Path(resume_from))
        if state["config_hashes"] != hashes:
            raise ConfigError("--resume", "checkpoint was written by fused runs of other configs")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for mine, saved in zip(generators, state["rng"], strict=True):
            for name, gen in mine.items():
                gen.set_state(saved[name])
        histories = [list(h) for h in state["history"]]
        failed = {int(i): TrainingDiverged(message) for i, message in state["failed"].items()}
        for i, p in enumerate(preps):
            copy_member(model, p.model, i)
        first_epoch = int(state["epoch"]) + 1
        log.info("fused run of %d resumed after epoch %d", k, first_epoch - 1)
    first = preps[0]
    n_train, batch_size = len(first.poisoned.data.y_train), first.cfg.train.batch_size
    for epoch in range(first_epoch, first.cfg.train.epochs + 1):
        t0 = time.perf_counter()
        lrs = [s[epoch - 1] for s in schedules]
        optimizer.set_lr(lrs)
        stats = _train_epoch(model, objective, optimizer, preps, generators, batch_size, n_train)
        seconds = time.perf_counter() - t0
        epoch_metrics: dict[int, dict[str, float]] = {}
        for i, p in enumerate(preps):
            if i in failed:
                continue
            if not math.isfinite(stats[i]["train_loss"]):
                failed[i] = TrainingDiverged(
                    f"training loss became non-finite (NaN/inf) in epoch {epoch}; lower "
                    "train.lr or the budget"
                )
                optimizer.stop(i)
                log.warning("fused member %d diverged in epoch %d; the others go on", i, epoch)
                continue
            copy_member(model, p.model, i)
            epoch_metrics[i] = {
                "epoch": epoch,
                "lr": lrs[i],
                **stats[i],
                **evaluate(p),
                "epoch_seconds": seconds,
                "images_per_s": n_train / seconds,
                "fused_members": k,
            }
            histories[i].append(epoch_metrics[i])
        if checkpoint_dir is not None:
            save_state(
                checkpoint_dir,
                {
                    "epoch": epoch,
                    "config_hashes": hashes,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": [{n: g.get_state() for n, g in gens.items()} for gens in generators],
                    "history": histories,
                    "failed": {str(i): str(err) for i, err in failed.items()},
                },
            )
        if on_epoch is not None:
            on_epoch(epoch, epoch_metrics, dict(failed), checkpoint_dir)
    results: list[RunResult | TrainingDiverged] = []
    for i, p in enumerate(preps):
        if i in failed:
            results.append(failed[i])
            continue
        final = evaluate(p)
        train_seconds = sum(h["epoch_seconds"] for h in histories[i])
        result = RunResult(
            acc=final["acc"],
            asr=final["asr"],
            asr_pred=final["asr_pred"],
            robust_acc=evaluate_robust(p),
            seconds=time.perf_counter() - started,
            epochs=p.cfg.train.epochs,
            images_per_s=n_train * len(histories[i]) / train_seconds,
            poisoned_count=len(p.poisoned.poison_indices),
            device=str(device),
            craft_seconds=p.craft_seconds,
            config=p.cfg.to_flat(),
            history=histories[i],
            model=p.model,
        )
        if workdir:
            (member_dir(workdir, i) / "result.json").write_text(
                json.dumps(result.to_dict(), indent=2)
            )
        results.append(result)
    return results


def _train_epoch(
    model: FusedModel,
    objective,
    optimizer: MemberSGD,
    preps: Sequence[Prepared],
    generators: list[dict[str, torch.Generator]],
    batch_size: int,
    n_train: int,
) -> list[dict[str, float]]:
    """One pass of every member over its own poisoned training set, in its own order."""
    k, device = len(preps), preps[0].device
    first = preps[0]
    model.train()
    orders = [list(shuffled_batches(n_train, batch_size, g["data"], device)) for g in generators]
    sums = torch.zeros(k, 5, device=device)  # loss, correct, count, clean loss, clean correct
    for step in range(len(orders[0])):
        xs, ys = [], []
        for p, g, order in zip(preps, generators, orders, strict=True):
            idx = order[step]
            # as `engine.train_epoch`: per-batch attacks (WaNet) poison, then augmentation
            images, labels = p.backdoor.poison_batch(
                p.poisoned.data.x_train[idx], p.poisoned.data.y_train[idx], g["data"]
            )
            xs.append(augment(images, p.augment_mode, g["data"], p.cfg.train.crop_padding))
            ys.append(labels)
        rows = len(ys[0])
        for threat in getattr(objective, "threats", []):
            threat.rows(rows)
        x, y = to_float(torch.cat(xs), first.channels_last), torch.cat(ys)
        attack_generators = [g["attack"] for g in generators]
        out = objective.batch_loss(model, x, y, attack_generators, first.amp_dtype)
        optimizer.zero_grad()
        # The objective averages over all K·B rows; K× that is Σ_k mean_b, so each member's
        # weights get exactly the gradient of its own batch mean.
        (out.loss * k).backward()
        optimizer.step()
        per_row = out.count // len(y)  # composite sum: every row is trained on once a threat
        sums[:, 0] += out.row_loss.view(k, -1).sum(1)
        sums[:, 1] += out.row_correct.view(k, -1).sum(1)
        sums[:, 2] += rows * per_row
        if objective.adversarial:
            loss, hits = _clean_rows(model, x, y, first.amp_dtype)
            sums[:, 3] += loss.view(k, -1).sum(1)
            sums[:, 4] += hits.view(k, -1).sum(1)
    totals = sums.tolist()
    stats = []
    for loss, correct, count, clean_loss, clean_correct in totals:
        entry = {"train_loss": loss / n_train, "train_acc": 100 * correct / count}
        if objective.adversarial:
            entry |= {
                "train_adv_loss": entry["train_loss"],
                "train_adv_acc": entry["train_acc"],
                "train_clean_loss": clean_loss / n_train,
                "train_clean_acc": 100 * clean_correct / n_train,
            }
        else:
            entry |= {
                "train_clean_loss": entry["train_loss"],
                "train_clean_acc": entry["train_acc"],
            }
        stats.append(entry)
    return stats


@torch.no_grad()
def _clean_rows(model, x, y, amp_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clean loss and hit during AT, as `engine.clean_batch_stats` measures them."""
    with (
        batch_statistics_frozen(model),
        torch.autocast(x.device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None),
    ):
        logits = model(x).float()
    rows = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    return rows, (logits.argmax(1) == y).float()
