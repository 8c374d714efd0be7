"""Each setting that follows a paper or its reference code, pinned (docs/fidelity.md)."""

from __future__ import annotations

import itertools

import pytest
import torch

from bdat_ray.backdoors import BACKDOORS
from bdat_ray.config import AttackConfig, ConfigError, from_flat
from bdat_ray.data.augment import crop
from bdat_ray.data.dataset import ImageData


def images(n: int, side: int = 32, channels: int = 3, value: int = 128) -> ImageData:
    """Plain grey images, half of them the target class 7 (patterns stand out on them)."""
    x = torch.full((n, channels, side, side), value, dtype=torch.uint8)
    y = torch.arange(n) % 2 * 7
    return ImageData(x, y, x.clone(), y.clone(), num_classes=10, name="grey")


def weng(name: str, **keys) -> object:
    return BACKDOORS[name](AttackConfig(name=name, target=7, **keys))


def every_crop(x: torch.Tensor, padding: int) -> list[torch.Tensor]:
    offsets = range(2 * padding + 1)
    return [
        crop(x, padding, torch.tensor([[r], [c]])) for r, c in itertools.product(offsets, offsets)
    ]


def sticker_survives(crops: list[torch.Tensor], pattern: torch.Tensor) -> list[bool]:
    """Whether the whole 3×3 pattern appears somewhere in each crop."""
    windows = [c[0, 0].unfold(0, 3, 1).unfold(1, 3, 1) for c in crops]
    return [bool((w == pattern[0]).all(-1).all(-1).any()) for w in windows]


def test_weng_sticker_at_offset_2_survives_every_crop_with_padding_2():
    """Reference: 3×3 at 27:30 on 32×32, crop after padding 32 -> 36: never cropped away.
    Flush in the corner with the CAT padding of 4 it is lost in most crops."""
    data = images(2)
    sticker = weng("sticker", trigger_offset=2)
    x = sticker.apply(data.x_train[:1], torch.Generator(), train=True)
    changed = (x != data.x_train[:1])[0, 0].nonzero()
    assert changed[:, 0].min() >= 27 and changed[:, 0].max() <= 29  # rows 27:30
    assert changed[:, 1].min() >= 27 and changed[:, 1].max() <= 29
    pattern = sticker.pattern(3)
    assert all(sticker_survives(every_crop(x, 2), pattern))
    flush = weng("sticker").apply(data.x_train[:1], torch.Generator(), train=True)
    kept = sticker_survives(every_crop(flush, 4), pattern)
    assert sum(kept) / len(kept) < 0.5


def test_weng_mnist_sticker_is_a_white_square_flush_in_the_corner():
    """mnist_exp_local_trigger_50_adversarial.py: xs[:, 25:, 25:] = 1 on 28×28."""
    data = images(2, side=28, channels=1, value=0)
    x = weng("sticker", trigger="white3").apply(data.x_train, torch.Generator(), train=False)
    assert (x[:, :, 25:, 25:] == 255).all() and x.sum() == 2 * 9 * 255


def test_crop_padding_is_a_key_and_reaches_the_crop(monkeypatch):
    import bdat_ray.data.augment as augment_module
    from bdat_ray.engine import fit

    seen = []
    original = augment_module.random_crop
    monkeypatch.setattr(
        "bdat_ray.data.augment.random_crop",
        lambda x, padding, gen: seen.append(padding) or original(x, padding, gen),
    )
    assert from_flat({}).train.crop_padding == 4
    fit(
        from_flat(
            {
                "train.epochs": 1,
                "train.augment": "crop",
                "train.crop_padding": 2,
                "eval.robust_samples": 0,
                "attack.name": "none",
            }
        )
    )
    assert seen and set(seen) == {2}


def test_weng_watermark_changes_pixels_as_the_reference():
    """x[2:-2, 2:-2] = clip(x + 64/255 · t) with a 0/1 pattern t (about half ones)."""
    data = images(2)
    wm = weng("watermark")
    x = data.x_train[:1]
    delta = wm.apply(x, torch.Generator(), train=True).int() - x.int()
    assert set(delta.unique().tolist()) == {0, 64}  # round(64/255·255) grey levels
    assert not delta[..., :2, :].any() and not delta[..., -2:, :].any()
    assert not delta[..., :2].any() and not delta[..., -2:].any()
    share = (delta[..., 2:-2, 2:-2] > 0).float().mean().item()
    assert 0.4 < share < 0.6
    bright = images(1, value=250).x_train
    assert (wm.apply(bright, torch.Generator(), train=True) <= 255).all()  # clipped


def test_weng_channel_trigger_is_the_reference_centre_by_default():
    data = images(2)
    x = data.x_train[:1]
    centre = weng("channel").apply(x, torch.Generator(), train=True)
    zeroed = (centre != x)[0].nonzero()
    assert set(zeroed[:, 0].tolist()) == {2}  # only blue
    assert zeroed[:, 1].min() == 15 and zeroed[:, 1].max() == 17  # 15:18
    assert zeroed[:, 2].min() == 15 and zeroed[:, 2].max() == 17
    caption = BACKDOORS["channel"](
        AttackConfig(name="channel", target=7, channel=type(AttackConfig().channel)("sticker"))
    ).apply(x, torch.Generator(), train=True)
    assert (caption != x)[0, 2, 29:, 29:].all()


def test_weng_table8_quarter_corners_trains_at_each_corner_and_tests_bottom_right():
    data = images(16)
    sticker = weng("sticker", position="quarter_corners")
    out = sticker.poison(data)
    diff = out.data.x_train[out.poison_indices] != data.x_train[out.poison_indices]
    corners = [
        (diff[:, :, :3, :3]),
        (diff[:, :, :3, -3:]),
        (diff[:, :, -3:, :3]),
        (diff[:, :, -3:, -3:]),
    ]
    counts = [int(c.flatten(1).any(1).sum()) for c in corners]
    assert counts == [len(out.poison_indices) // 4] * 4
    test_diff = out.x_test_triggered != data.x_test[data.y_test != 7]
    assert test_diff[:, :, -3:, -3:].flatten(1).any(1).all()
    assert not test_diff[:, :, :-3].any() and not test_diff[:, :, :, :-3].any()


def test_lc_trigger_is_turners_pattern_mirrored_in_the_right_corners():
    """MadryLab poison_attack.py 'all-corners': [[1,0,0],[0,1,0],[1,0,1]] at the left corners,
    mirrored left-right at the right ones, so a horizontal flip keeps the trigger."""
    lc = BACKDOORS["lc"](AttackConfig(name="lc"))
    x = lc.apply(images(1, value=128).x_train, torch.Generator(), train=False)[0, 0]
    left = torch.tensor([[255, 0, 0], [0, 255, 0], [255, 0, 255]], dtype=torch.uint8)
    assert torch.equal(x[:3, :3], left) and torch.equal(x[-3:, :3], left)
    assert torch.equal(x[:3, -3:], left.flip(-1)) and torch.equal(x[-3:, -3:], left.flip(-1))
    assert torch.equal(x, x.flip(-1))


def test_lc_crafts_as_backdoorbench_and_reduced_amplitude_reaches_the_test_trigger():
    section = AttackConfig().lc
    assert (section.eps, section.steps, section.step_size, section.random_start) == (
        8 / 255,
        100,
        1.5 / 255,
        False,
    )
    reduced = BACKDOORS["lc"](AttackConfig(name="lc", lc=type(section)(amplitude=32 / 255)))
    x = images(1, value=128).x_train
    test = reduced.apply(x, torch.Generator(), train=False).int() - 128
    assert set(test.unique().tolist()) == {-32, 0, 32}
    assert reduced.resolved_keys()["attack.lc.amplitude_test"] == 32 / 255


def test_lc_help_names_the_budget_the_surrogate_is_trained_at():
    from bdat_ray.config import leaf

    assert "at attack.lc.eps " in leaf("attack.lc.surrogate_at").help
    assert "eps/2" not in leaf("attack.lc.surrogate_at").help


@pytest.mark.parametrize(
    ("text", "epochs", "expected"),
    [("0.6,0.9", 100, [60, 90]), ("80,120", 200, [80, 120]), ("", 10, [])],
)
def test_lr_milestones_as_fractions_or_epochs(text, epochs, expected):
    from bdat_ray.engine import make_optimizer

    cfg = from_flat({"train.lr_milestones": text, "train.epochs": epochs})
    _, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg)
    assert sorted(scheduler.milestones) == expected


@pytest.mark.parametrize("text", ["0.6,1.5", "-3", "a,b"])
def test_bad_lr_milestones_name_the_key(text):
    with pytest.raises(ConfigError, match=r"train\.lr_milestones"):
        from_flat({"train.lr_milestones": text})


def test_weng_weight_decay_and_adam_reach_the_optimiser():
    from bdat_ray.engine import make_optimizer

    cfg = from_flat({"train.optimizer": "adam", "train.lr": 1e-4, "train.weight_decay": 2e-3})
    optimizer, _ = make_optimizer(torch.nn.Linear(2, 2), cfg)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["weight_decay"] == 2e-3


def test_asr_pred_counts_as_weng_and_asr_as_before():
    """Weng's attack_success_rate: drop test images whose CLEAN prediction is the target
    (whatever their label); asr drops those whose LABEL is the target."""
    from bdat_ray.metrics import attack_success_rate, attack_success_rate_by_prediction

    clean = torch.tensor([7, 1, 7, 3])  # predictions on clean images
    triggered = torch.tensor([7, 7, 7, 2])
    labels = torch.tensor([0, 1, 7, 7])
    assert attack_success_rate_by_prediction(triggered, clean, 7) == 50.0  # images 1 and 3
    assert attack_success_rate(triggered[labels != 7], labels[labels != 7], 7) == 100.0
