"""The metrics, computed in exactly one place each. All are percentages (0–100).

- ``acc``: clean accuracy on the untouched test set.
- ``asr``: attack success rate — of the *triggered* test images whose true label is not the
  target, the share predicted as the target (the seed papers and BackdoorBench both exclude
  target-class images, which would count as successes for free).
- ``asr_pred``: Weng et al.'s count (their reference ``attack_success_rate``): of ALL test
  images triggered, those whose *clean* image the model does not already predict as the
  target, the share predicted as the target. It keeps target-class images the model gets
  wrong and drops non-target images it already calls the target, so it can differ from
  ``asr`` (MadryLab's label-consistent code excludes both, by label and by prediction).
- ``robust_acc``: accuracy under a fixed evaluation attack (PGD-20 L-inf 8/255 by default)
  on the first ``eval.robust_samples`` clean test images.
- ``detect_tpr`` / ``detect_fpr`` / ``detect_precision`` / ``removed``: how the training images
  a defense flagged (a filter's removals, ABL's isolated set) match the poisoned ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bdat_ray.data.augment import to_float
from bdat_ray.threats import ThreatModel, perturb


def percent(hits: torch.Tensor) -> float:
    return 100.0 * hits.float().mean().item() if hits.numel() else float("nan")


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return torch.autocast(device.type, amp_dtype or torch.float32, enabled=amp_dtype is not None)


@torch.no_grad()
def predict(
    model: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 512,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Predicted labels of uint8 (or [0, 1] float) images, in eval mode; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        preds = []
        for chunk in images.split(batch_size):
            x = to_float(chunk, channels_last) if chunk.dtype == torch.uint8 else chunk
            with _autocast(x.device, amp_dtype):
                preds.append(model(x).argmax(1))
        return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=images.device)
    finally:
        model.train(was_training)


def clean_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return percent(predictions == labels)


def attack_success_rate(predictions: torch.Tensor, true_labels: torch.Tensor, target: int) -> float:
    """Share of triggered images *whose true label is not the target* predicted as target."""
    counted = true_labels != target
    return percent(predictions[counted] == target)


def attack_success_rate_by_prediction(
    triggered_predictions: torch.Tensor, clean_predictions: torch.Tensor, target: int
) -> float:
    """Weng et al.'s ASR: predictions on the triggered and on the clean version of the same
    test images (any label); counted are those whose clean prediction is not the target."""
    counted = clean_predictions != target
    return percent(triggered_predictions[counted] == target)


def robust_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    threat: ThreatModel,
    *,
    batch_size: int = 512,
    generator: torch.Generator | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> float:
    """Accuracy on ``threat``'s adversarial examples (model in eval mode). ``on_batch(n)`` is
    called after each batch of n images (progress display)."""
    hits = []
    for xb, yb in zip(images.split(batch_size), labels.split(batch_size), strict=True):
        x = to_float(xb, channels_last)
        x_adv = perturb(
            model, x, yb, threat, generator=generator, bn_mode="eval", amp_dtype=amp_dtype
        )
        hits.append(predict(model, x_adv, batch_size=batch_size, amp_dtype=amp_dtype) == yb)
        if on_batch is not None:
            on_batch(len(yb))
    return percent(torch.cat(hits)) if hits else float("nan")


def detection_rates(
    flagged: torch.Tensor, poisoned: torch.Tensor, n_train: int
) -> dict[str, float]:
    """A defense's flagged training indices against the truly poisoned ones: ``detect_tpr``
    (share of poisoned images flagged), ``detect_fpr`` (share of clean images flagged),
    ``detect_precision`` (share of flagged images that are poisoned), all percent (NaN where
    the denominator is empty), and ``removed`` (how many images were flagged)."""
    flagged = torch.unique(flagged.cpu())
    poisoned = torch.unique(poisoned.cpu())
    hits = torch.isin(flagged, poisoned).sum().item()
    false = len(flagged) - hits
    clean = n_train - len(poisoned)

    def share(k: int, total: int) -> float:
        return 100.0 * k / total if total else float("nan")

    return {
        "detect_tpr": share(hits, len(poisoned)),
        "detect_fpr": share(false, clean),
        "detect_precision": share(hits, len(flagged)),
        "removed": float(len(flagged)),
    }
