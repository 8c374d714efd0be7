"""The one attack loop. Every threat model — L-inf, L2, spatial, perceptual, the random
controls, each component of a composite — is searched by `perturb`; no second loop exists."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from bdat_ray.models.common import batch_statistics_frozen
from bdat_ray.threats.base import ThreatModel

#: BatchNorm during the attack: eval = running statistics (never updated); train = batch
#: statistics, updating the running ones at every attack step; batch = batch statistics,
#: running ones untouched (Weng et al.'s reference crafts PGD on the training graph without
#: running its update ops)
BN_MODES = ("eval", "train", "batch")


@contextmanager
def attack_mode(model: nn.Module, bn_mode: str) -> Iterator[None]:
    """Set BatchNorm mode for the attack and freeze the weights; restore both on exit.

    Freezing (``requires_grad=False``) means autograd builds no weight gradients during the
    attack steps — only the input gradient — which is both correct (the attack must not touch
    ``.grad``) and about a third cheaper per step than a full backward."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.train(bn_mode != "eval")
    for p in params:
        p.requires_grad_(False)
    try:
        with batch_statistics_frozen(model) if bn_mode == "batch" else nullcontext():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


def perturb(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    threat: ThreatModel,
    *,
    generator: torch.Generator | None = None,
    bn_mode: str = "eval",
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Search ``threat`` around ``x`` for inputs that maximise the loss on ``y``.

    Maximises ``threat.attack_loss(f(x'), y) - threat.penalty(...)`` (cross-entropy unless the
    threat's reference attack uses the margin loss) per sample with ``threat.steps`` ascent
    steps from ``threat.init``, projecting after each step, then ``threat.finalize``. Threat
    models that do not maximise (random controls) return their random draw. Returns a
    detached batch in [0, 1].
    """
    with attack_mode(model, bn_mode):
        delta = threat.init(x, generator)
        if threat.maximizes:
            memory: dict = {"model": model}
            autocast = torch.autocast(
                x.device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None
            )
            for step in range(threat.steps):
                memory["step"] = step
                delta.requires_grad_(True)
                x_adv = threat.apply(x, delta)
                with autocast:
                    logits = threat.logits(model, x_adv, memory)
                objective = threat.attack_loss(logits.float(), y)
                objective = objective - threat.penalty(x, x_adv, delta, memory)
                (grad,) = torch.autograd.grad(objective.sum(), delta)
                delta = threat.project(x, threat.ascend(x, delta.detach(), grad, memory))
            delta = threat.finalize(x, delta, memory)
        return threat.apply(x, delta.detach()).detach()
