"""Neural Cleanse (Wang et al., IEEE S&P 2019), Weng et al. §4.2, Table 9(c).

Followed: the paper and BackdoorBench's ``defense/NC/nc.py`` (after bolunwang/backdoor).
1. Reverse engineering, for every class t: a mask m ∈ [0, 1]^{H×W} and a pattern
   p ∈ [0, 1]^{C×H×W} (both tanh-parametrised) minimise CE(f((1 − m)·x + m·p), t) + λ·‖m‖₁
   over the clean share, Adam (lr 0.1, β = (0.5, 0.9)) for ``reverse_steps`` mini-batches; λ
   starts at 1e-3 and adapts as in the paper: after a round of at least 10 steps (or a pass
   over the share) with attack success ≥ 99% it is multiplied by 1.5, otherwise divided by
   1.5^1.5; the smallest-norm mask reaching 99% is kept.
2. Detection: the anomaly index of class t is |‖m_t‖₁ − median| / (1.4826 · MAD) over the
   classes' mask norms (MAD: median absolute deviation; 1.4826 the consistency constant); a
   class whose norm is below the median with index > 2 is flagged as a backdoor target.
3. Mitigation by unlearning: the model is fine-tuned on the clean share where ``unlearn_share``
   (20%, the paper's §6) of every batch carries a flagged class's reversed trigger and keeps
   its true label. Nothing is unlearnt when no class is flagged.

Logged: ``nc_anomaly_index_<class>``, ``nc_flagged`` (how many), ``nc_target_flagged`` (1 when
the attack's target is among them) and the flagged classes in the result's details.
"""

from __future__ import annotations

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


@dataclass(frozen=True)
class NeuralCleanseSection(FineTuneSection):
    reverse_steps: int = option(
        300,
        "optimisation steps (mini-batches of the clean share) per class to reverse its trigger",
        check=at_least(1),
    )
    reverse_lr: float = option(
        0.1, "Adam learning rate of mask and pattern (Wang et al.: 0.1)", check=above(0)
    )
    init_cost: float = option(
        1e-3, "initial λ of the mask-norm penalty (Wang et al.: 1e-3)", check=above(0)
    )
    threshold: float = option(
        2.0, "anomaly index above which a class is flagged (Wang et al.: 2)", check=above(0)
    )
    unlearn_share: float = option(
        0.2,
        "share of each unlearning batch stamped with a reversed trigger (Wang et al.: 20%)",
        check=within(0, 1),
    )


def stamp(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    return (1 - mask) * x + mask * pattern


def reverse_trigger(
    model: nn.Module,
    clean: ImageData,
    target: int,
    cfg: NeuralCleanseSection,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mask (1, 1, H, W), pattern (1, C, H, W), L1 norm of the mask) for class ``target``."""
    _, c, h, w = clean.x_train.shape
    device = clean.x_train.device
    mask_param = torch.zeros(1, 1, h, w, device=device, requires_grad=True)
    pattern_param = torch.zeros(1, c, h, w, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([mask_param, pattern_param], lr=cfg.reverse_lr, betas=(0.5, 0.9))
    cost = cfg.init_cost
    best = None
    n = len(clean.y_train)
    per_round = max(10, math.ceil(n / batch_size))  # the 99% check and cost update happen per round
    for _ in range(math.ceil(cfg.reverse_steps / per_round)):
        hits = seen = 0
        batches = [
            idx
            for _ in range(math.ceil(per_round * batch_size / n))
            for idx in shuffled_batches(n, batch_size, generator, device)
        ][:per_round]
        for idx in batches:
            x = to_float(clean.x_train[idx], False)
            mask = (torch.tanh(mask_param) + 1) / 2
            pattern = (torch.tanh(pattern_param) + 1) / 2
            logits = model(stamp(x, mask, pattern))
            wanted = torch.full_like(clean.y_train[idx], target)
            loss = F.cross_entropy(logits, wanted) + cost * mask.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            hits += (logits.argmax(1) == wanted).sum().item()
            seen += len(idx)
        with torch.no_grad():
            mask = (torch.tanh(mask_param) + 1) / 2
            pattern = (torch.tanh(pattern_param) + 1) / 2
            norm = mask.sum().item()
        if hits / seen >= 0.99:
            if best is None or norm < best[2]:
                best = (mask.clone(), pattern.clone(), norm)
            cost *= 1.5
        else:
            cost /= 1.5**1.5
    if best is None:  # never reached 99%: the last mask stands (a large norm, not an outlier)
        best = (mask.clone(), pattern.clone(), norm)
    return best


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
        triggers = [
            reverse_trigger(
                model, clean, t, self.cfg, self.ctx.batch_size, self.ctx.generator(10 + t)
            )
            for t in range(self.ctx.num_classes)
        ]
        for p in model.parameters():
            p.requires_grad_(True)
        self.norms = torch.tensor([t[2] for t in triggers])
        self.anomaly = anomaly_indices(self.norms)
        below = self.norms < self.norms.median()
        self.flagged_classes = [
            int(k) for k in ((self.anomaly > self.cfg.threshold) & below).nonzero().flatten()
        ]
        if not self.flagged_classes or not self.cfg.epochs:
            return model
        generator = self.ctx.generator(5)
        stamps = [triggers[k][:2] for k in self.flagged_classes]

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
        }
