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
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from bdat_ray.config import Config, ConfigError, at_components
from bdat_ray.data import ImageData
from bdat_ray.data.augment import augment, shuffled_batches, to_float
from bdat_ray.engine import (
    Prepared,
    RunResult,
    TrainingDiverged,
    evaluate,
    evaluate_robust,
    make_optimizer,
    prepare,
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
    "at.threat",
    "at.components",
    "at.mix",
    "at.bn_mode",
    "at.random_start",
    "defense.name",
)


def check_fusable(preps: Sequence[Prepared]) -> None:
    """Raise `ConfigError` naming the first key the members may not differ in."""
    flats = [p.cfg.to_flat() for p in preps]
    for key in flats[0]:
        if key.startswith(SHARED_KEYS) or key in SHARED_KEYS:
            values = {repr(f[key]) for f in flats}
            if len(values) > 1:
                raise ConfigError(key, f"fused members must share it; got {sorted(values)}")
    if flats[0]["train.optimizer"] != "sgd":
        raise ConfigError("train.optimizer", "fused members train with SGD (MemberSGD)")
    if flats[0]["defense.name"] != "none":
        raise ConfigError("defense.name", "defenses are not fused; run them as single trials")
    if flats[0]["at.mix"] == "random" and flats[0]["at.threat"] in ("composite", "cat"):
        raise ConfigError("at.mix", "mix=random draws one threat per batch and member: not fused")
    if any(p.backdoor.redraws_each_epoch for p in preps):
        raise ConfigError("attack.name", "attacks that re-draw their poison are not fused")
    shapes = {tuple(p.poisoned.data.x_train.shape) for p in preps}
    if len(shapes) > 1:
        raise ConfigError("data.name", "fused members must train on equally many images")
    structures = []
    for p in preps:
        components = at_components(p.cfg.at)
        structures.append([(c.threat, c.steps, round(c.weight, 9)) for c in components])
        for c in components:
            if c.threat in PER_SAMPLE_BUDGETS:
                continue
            resolved = (c.eps, c.step_size)
            first = next(x for x in at_components(preps[0].cfg.at) if x.threat == c.threat)
            if resolved != (first.eps, first.step_size):
                raise ConfigError(
                    f"at.{c.threat}.eps",
                    f"{c.threat} members must share budget and step size "
                    f"(per-member budgets: {', '.join(PER_SAMPLE_BUDGETS)})",
                )
    if any(s != structures[0] for s in structures):
        raise ConfigError("at.steps", "fused members need the same threat steps and weights")


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
            grad = member_view(p.grad, self.k) + self.weight_decay * weights
            grad = torch.where(self.active, grad, 0.0)
            buf = self.buffers[i]
            if buf is None:
                buf = self.buffers[i] = grad.clone()
            else:
                buf.mul_(self.momentum).add_(grad)
            weights.sub_(torch.where(self.active, self.lr * buf, 0.0))


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


MemberCallback = Callable[[int, dict[str, float]], None]


def fit_fused(
    cfgs: Sequence[Config],
    *,
    data: ImageData | None = None,
    on_epoch: MemberCallback | None = None,
) -> list[RunResult | TrainingDiverged]:
    """Train the runs ``cfgs`` as one fused network. Per member, the `RunResult`
    `engine.fit` would return, or the `TrainingDiverged` it would raise (a member that
    diverges is frozen; the others go on). ``on_epoch(member, metrics)`` after each epoch."""
    started = time.perf_counter()
    preps = [prepare(c, data) for c in cfgs]
    check_fusable(preps)
    k, device = len(preps), preps[0].device
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
    first = preps[0]
    n_train, batch_size = len(first.poisoned.data.y_train), first.cfg.train.batch_size
    for epoch in range(1, first.cfg.train.epochs + 1):
        t0 = time.perf_counter()
        lrs = [s[epoch - 1] for s in schedules]
        optimizer.set_lr(lrs)
        stats = _train_epoch(model, objective, optimizer, preps, generators, batch_size, n_train)
        seconds = time.perf_counter() - t0
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
            metrics = {
                "epoch": epoch,
                "lr": lrs[i],
                **stats[i],
                **evaluate(p),
                "epoch_seconds": seconds,
                "images_per_s": n_train / seconds,
                "fused_members": k,
            }
            histories[i].append(metrics)
            if on_epoch is not None:
                on_epoch(i, metrics)
    results: list[RunResult | TrainingDiverged] = []
    for i, p in enumerate(preps):
        if i in failed:
            results.append(failed[i])
            continue
        final = evaluate(p)
        train_seconds = sum(h["epoch_seconds"] for h in histories[i])
        results.append(
            RunResult(
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
        )
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
