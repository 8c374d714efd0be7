"""Neural Cleanse (Wang et al., IEEE S&P 2019), Weng et al. §4.2, Table 9(c).

Followed: the paper and its authors' code, bolunwang/backdoor ``visualizer.py`` with the
settings of ``gtsrb_visualize_example.py``.
1. Reverse engineering, for every class t: a mask m ∈ [0, 1]^{H×W} and a pattern
   p ∈ [0, 1]^{C×H×W} (tanh-parametrised, drawn uniformly at random) minimise
   CE(f((1 − m)·x + m·p), t) + λ·‖m‖₁ over the clean share with Adam (lr 0.1,
   β = (0.5, 0.9)) on mini-batches of 32. A step is ``samples_per_step`` (1000) images; after
   each step, λ follows visualizer.py: it stays 0 until the attack succeeds (≥ 99%) for
   ``patience`` (5) steps, then starts at 1e-3 and is multiplied by 1.5 after 5 successful
   steps in a row, divided by 1.5^1.5 after 5 failed ones. The smallest-norm mask of a
   successful step is kept. A class stops after ``reverse_steps`` (1000) steps, or once λ has
   gone both up and down and 25 steps brought no smaller mask.
2. Detection: the anomaly index of class t is |‖m_t‖₁ − median| / (1.4826 · MAD) over the
   classes' mask norms (MAD: median absolute deviation; 1.4826 the consistency constant); a
   class whose norm is below the median with index > 2 is flagged as a backdoor target.
3. Mitigation by unlearning: the model is fine-tuned on the clean share where ``unlearn_share``
   (20%, the paper's §6) of every batch carries a flagged class's reversed trigger and keeps
   its true label. Nothing is unlearnt when no class is flagged.

Logged: ``nc_anomaly_index_<class>``, ``nc_flagged`` (how many), ``nc_target_flagged`` (1 when
the attack's target is among them); the flagged classes, mask norms and each class's steps in
the result's details.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bdat_ray.data.augment import shuffled_batches, to_float
from bdat_ray.data.dataset import ImageData
from bdat_ray.defenses.base import Defense, FineTuneSection
from bdat_ray.options import above, at_least, option, within

MAD_CONSISTENCY = 1.4826  # MAD → standard deviation under normality (Wang et al. §IV)
TANH_EPS = 1e-7  # keeps arctanh finite at 0 and 1 (Keras' K.epsilon() in visualizer.py)


@dataclass(frozen=True)
class NeuralCleanseSection(FineTuneSection):
    reverse_steps: int = option(
        1000,
        "most optimisation steps per class to reverse its trigger (visualizer.py STEPS: 1000)",
        check=at_least(1),
    )
    samples_per_step: int = option(
        1000,
        "images (drawn over and over from the clean share) averaged into one step's attack "
        "success and mask norm (gtsrb_visualize_example.py NB_SAMPLE: 1000)",
        check=at_least(1),
    )
    reverse_batch: int = option(
        32,
        "mini-batch of the reverse engineering (visualizer.py BATCH_SIZE: 32)",
        check=at_least(1),
    )
    reverse_lr: float = option(
        0.1, "Adam learning rate of mask and pattern (Wang et al.: 0.1)", check=above(0)
    )
    init_cost: float = option(
        1e-3,
        "λ of the mask-norm penalty once the attack first succeeds (Wang et al.: 1e-3)",
        check=above(0),
    )
    cost_multiplier: float = option(
        1.5,
        "λ is multiplied by this after `patience` successful steps and divided by its 1.5th "
        "power after as many failed ones (visualizer.py COST_MULTIPLIER: 1.5)",
        check=above(1),
    )
    patience: int = option(
        5, "steps before λ changes (gtsrb_visualize_example.py PATIENCE: 5)", check=at_least(1)
    )
    early_stop_patience: int = option(
        25,
        "steps without a smaller successful mask before a class stops, once λ has gone both up "
        "and down (gtsrb_visualize_example.py: 5 × PATIENCE)",
        check=at_least(1),
    )
    threshold: float = option(
        2.0, "anomaly index above which a class is flagged (Wang et al.: 2)", check=above(0)
    )
    unlearn_share: float = option(
        0.2,
        "share of each unlearning batch stamped with a reversed trigger (Wang et al.: 20%)",
        check=within(0, 1),
    )


SUCCESS = 0.99  # attack success a reversed trigger must reach (visualizer.py ATTACK_SUCC_THRESHOLD)


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def from_tanh(param: torch.Tensor) -> torch.Tensor:
    return torch.tanh(param) / (2 - TANH_EPS) + 0.5


def to_tanh(value: torch.Tensor) -> torch.Tensor:
    return torch.atanh((value - 0.5) * (2 - TANH_EPS))


@dataclass
class CostSchedule:
    """One class's λ and stopping state, updated once per step as in visualizer.py."""

    cfg: NeuralCleanseSection
    cost: float = 0.0  # RESET_COST_TO_ZERO: λ = 0 until the attack first succeeds
    set_counter: int = 0
    up_counter: int = 0
    down_counter: int = 0
    went_up: bool = False
    went_down: bool = False
    best_norm: float = math.inf
    stop_counter: int = 0
    stop_best: float = math.inf
    steps: int = 0

    def update(self, success: float, norm: float) -> tuple[bool, bool]:
        """(whether this step's mask is the best so far, whether the class is done)."""
        cfg, ok = self.cfg, success >= SUCCESS
        self.steps += 1
        improved = ok and norm < self.best_norm
        if improved:
            self.best_norm = norm
        if self.best_norm < math.inf:
            self.stop_counter = self.stop_counter + 1 if self.best_norm >= self.stop_best else 0
        self.stop_best = min(self.stop_best, self.best_norm)
        done = self.went_up and self.went_down and self.stop_counter >= cfg.early_stop_patience
        if self.cost == 0 and ok:
            self.set_counter += 1
            if self.set_counter >= cfg.patience:
                self.cost = cfg.init_cost
                self.up_counter = self.down_counter = 0
                self.went_up = self.went_down = False
        else:
            self.set_counter = 0
        self.up_counter, self.down_counter = (
            (self.up_counter + 1, 0) if ok else (0, self.down_counter + 1)
        )
        if self.up_counter >= cfg.patience:
            self.up_counter, self.went_up = 0, True
            self.cost *= cfg.cost_multiplier
        elif self.down_counter >= cfg.patience:
            self.down_counter, self.went_down = 0, True
            self.cost /= cfg.cost_multiplier**1.5
        return improved, done or self.steps >= cfg.reverse_steps


def reverse_triggers(
    model: nn.Module,
    clean: ImageData,
    num_classes: int,
    cfg: NeuralCleanseSection,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Masks (K, 1, H, W), patterns (K, C, H, W), the masks' L1 norms (K,) and the steps each
    class took, reversed for
    all K classes at once: class k's copy of each mini-batch carries its own trigger and is
    pushed to k. The classes share only the forward pass — Adam is elementwise and class k's
    loss touches only its own mask and pattern — so each follows its own λ schedule and stops
    on its own (visualizer.py runs them one after another; batched, the GPU sees K× larger
    batches). A class that never reaches 99% keeps its last mask (a large norm)."""
    _, c, h, w = clean.x_train.shape
    device, n = clean.x_train.device, len(clean.y_train)
    init = torch.rand(num_classes, 1 + c, h, w, generator=generator).to(device)  # as the example
    params = to_tanh(init).requires_grad_(True)
    optimizer = torch.optim.Adam([params], lr=cfg.reverse_lr, betas=(0.5, 0.9))
    schedules = [CostSchedule(cfg) for _ in range(num_classes)]
    best = from_tanh(params.detach()).clone()
    active = torch.arange(num_classes, device=device)
    batches_per_step = math.ceil(cfg.samples_per_step / cfg.reverse_batch)
    # epoch after epoch of shuffled mini-batches, as Keras' ImageDataGenerator.flow feeds them
    stream = (
        idx
        for _ in itertools.count()
        for idx in shuffled_batches(n, cfg.reverse_batch, generator, device)
    )
    while len(active):
        costs = torch.tensor([schedules[k].cost for k in active.tolist()], device=device)
        hits = torch.zeros(len(active), device=device)
        norms = torch.zeros(len(active), device=device)
        seen = 0
        for _ in range(batches_per_step):
            idx = next(stream)
            x = to_float(clean.x_train[idx], False)
            trigger = from_tanh(params[active])
            mask, pattern = trigger[:, :1], trigger[:, 1:]
            stamped = stamp(x.unsqueeze(0), mask.unsqueeze(1), pattern.unsqueeze(1))
            logits = model(stamped.flatten(0, 1)).unflatten(0, (len(active), len(idx)))
            wanted = active[:, None].expand(-1, len(idx))
            ce = F.cross_entropy(logits.flatten(0, 1), wanted.flatten(), reduction="none")
            l1 = mask.flatten(1).sum(1)
            # visualizer.py: per class the batch-mean CE + λ·‖m‖₁, summed over the classes
            loss = (ce.view(len(active), -1).mean(1) + costs * l1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                hits += (logits.argmax(2) == wanted).float().sum(1)
                norms += l1.detach() * len(idx)
                seen += len(idx)
        still = []
        for row, k in enumerate(active.tolist()):
            improved, done = schedules[k].update(hits[row].item() / seen, norms[row].item() / seen)
            if improved:
                best[k] = from_tanh(params.detach()[k])
            if not done:
                still.append(k)
        active = torch.tensor(still, dtype=torch.long, device=device)
    for k, schedule in enumerate(schedules):  # never successful: the last mask stands
        if schedule.best_norm == math.inf:
            best[k] = from_tanh(params.detach()[k])
    steps = [s.steps for s in schedules]
    return best[:, :1], best[:, 1:], best[:, :1].flatten(1).sum(1), steps


def anomaly_indices(norms: torch.Tensor) -> torch.Tensor:
    """|norm − median| / (1.4826 · MAD) per class."""
    median = norms.median()
    mad = MAD_CONSISTENCY * (norms - median).abs().median()
    return (norms - median).abs() / mad.clamp_min(1e-12)


class NeuralCleanse(Defense):
    name = "neural_cleanse"
    stage = "repair"
    section = NeuralCleanseSection
    paper = "Wang et al. 2019; Weng et al. §4.2, Table 9(c)"

    def repair(self, model: nn.Module, train: ImageData) -> nn.Module:
        clean = self.ctx.clean_share
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        masks, patterns, norms, self.steps = reverse_triggers(
            model, clean, self.ctx.num_classes, self.cfg, self.ctx.generator(10)
        )
        self.norms = norms.cpu()
        for p in model.parameters():
            p.requires_grad_(True)
        self.anomaly = anomaly_indices(self.norms)
        below = self.norms < self.norms.median()
        self.flagged_classes = [
            int(k) for k in ((self.anomaly > self.cfg.threshold) & below).nonzero().flatten()
        ]
        if not self.flagged_classes or not self.cfg.epochs:
            return model
        generator = self.ctx.generator(5)
        stamps = [(masks[k], patterns[k]) for k in self.flagged_classes]

        def with_reversed_triggers(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            count = round(self.cfg.unlearn_share * len(x))
            pick = torch.randint(len(stamps), (1,), generator=generator).item()
            mask, pattern = stamps[pick]
            x = x.clone()
            x[:count] = stamp(x[:count], mask, pattern)
            return x

        return self.fine_tune_on_clean_share(model, draw=6, batch_transform=with_reversed_triggers)

    def report(self) -> dict[str, float]:
        out = {f"nc_anomaly_index_{k}": float(v) for k, v in enumerate(self.anomaly)}
        out["nc_flagged"] = float(len(self.flagged_classes))
        out["nc_target_flagged"] = float(self.ctx.target in self.flagged_classes)
        return out

    def details(self) -> dict[str, object]:
        return {
            "nc_flagged_classes": self.flagged_classes,
            "nc_mask_l1": [float(v) for v in self.norms],
            "nc_anomaly_index": [float(v) for v in self.anomaly],
            "nc_reverse_steps": self.steps,
        }
