"""Contract tests over the whole backdoor registry, plus BadNets specifics."""

from __future__ import annotations

import pytest
import torch

from bdat_ray.backdoors import BACKDOORS
from bdat_ray.backdoors.triggers import PATTERNS, corner_mask
from bdat_ray.config import AttackConfig, ConfigError

ATTACKS = sorted(set(BACKDOORS) - {"none"})


def configs(name: str) -> list[AttackConfig]:
    """Every label mode the attack supports, at a rate the digits set can hold."""
    cls = BACKDOORS[name]
    return [AttackConfig(name=name, label_mode=m, poison_rate=0.04) for m in cls.label_modes]


def cases():
    return [
        pytest.param(cfg, id=f"{cfg.name}-{cfg.label_mode}") for n in ATTACKS for cfg in configs(n)
    ]


@pytest.mark.parametrize("cfg", cases())
def test_poisoned_count_equals_configured_count(cfg, digits):
    out = BACKDOORS[cfg.name](cfg).poison(digits)
    assert len(out.poison_indices) == round(cfg.poison_rate * len(digits.y_train))
    assert len(out.poison_indices.unique()) == len(out.poison_indices)


@pytest.mark.parametrize("cfg", cases())
def test_labels_follow_the_label_mode(cfg, digits):
    out = BACKDOORS[cfg.name](cfg).poison(digits)
    idx = out.poison_indices
    y_new, y_old = out.data.y_train, digits.y_train
    untouched = torch.ones_like(y_old, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(y_new[untouched], y_old[untouched])
    if cfg.label_mode == "dirty":
        assert (y_new[idx] == cfg.target).all() and (y_old[idx] != cfg.target).all()
    else:
        assert torch.equal(y_new, y_old) and (y_old[idx] == cfg.target).all()


@pytest.mark.parametrize("cfg", cases())
def test_only_poisoned_images_change(cfg, digits):
    out = BACKDOORS[cfg.name](cfg).poison(digits)
    changed = (out.data.x_train != digits.x_train).flatten(1).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(out.poison_indices.tolist())
    assert torch.equal(out.data.x_test, digits.x_test)


@pytest.mark.parametrize("cfg", cases())
def test_same_seed_same_poison_and_other_seed_differs(cfg, digits):
    a = BACKDOORS[cfg.name](cfg).poison(digits)
    b = BACKDOORS[cfg.name](cfg).poison(digits)
    assert torch.equal(a.poison_indices, b.poison_indices)
    assert torch.equal(a.data.x_train, b.data.x_train)
    assert torch.equal(a.x_test_triggered, b.x_test_triggered)
    other = AttackConfig(**{**cfg.__dict__, "seed": cfg.seed + 1})
    c = BACKDOORS[cfg.name](other).poison(digits)
    assert not torch.equal(a.poison_indices, c.poison_indices)


@pytest.mark.parametrize("name", sorted(BACKDOORS))
def test_triggered_test_set_excludes_target_class(name, digits):
    cfg = AttackConfig(name=name, label_mode=BACKDOORS[name].label_modes[0], poison_rate=0.04)
    out = BACKDOORS[name](cfg).poison(digits)
    non_target = digits.y_test != cfg.target
    assert (out.y_test_triggered != cfg.target).all()
    assert len(out.x_test_triggered) == int(non_target.sum())
    assert torch.equal(out.y_test_triggered, digits.y_test[non_target])


# -- BadNets -------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", sorted(PATTERNS))
@pytest.mark.parametrize("size", [None, 1, 4])
def test_badnets_touches_only_the_trigger_corner(trigger, size, digits):
    cfg = AttackConfig(name="badnets", trigger=trigger, trigger_size=size, poison_rate=0.05)
    attack = BACKDOORS["badnets"](cfg)
    out = attack.poison(digits)
    region = corner_mask(digits.image_shape, attack.size, "bottom_right")
    diff = out.data.x_train != digits.x_train
    assert not diff[:, ~region].any()
    triggered = out.x_test_triggered
    expected = attack.pattern(digits.channels)
    k = attack.size
    assert (triggered[:, :, -k:, -k:] == expected).all()
    assert torch.equal(triggered[:, ~region], digits.x_test[digits.y_test != 2][:, ~region])


def test_badnets_checkerboard_patterns():
    gen = torch.Generator().manual_seed(0)
    board = PATTERNS["checkerboard3"][0](3, 1, gen)[0]
    assert board.tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]


def test_badnets_random_corner_uses_all_corners(digits):
    cfg = AttackConfig(name="badnets", position="random_corner", poison_rate=0.1)
    attack = BACKDOORS["badnets"](cfg)
    out = attack.poison(digits)
    masks = {
        c: corner_mask(digits.image_shape, 3, c)
        for c in ("bottom_right", "bottom_left", "top_right", "top_left")
    }
    diff = out.data.x_train[out.poison_indices] != digits.x_train[out.poison_indices]
    anywhere = torch.stack(list(masks.values())).any(0)
    assert not diff[:, ~anywhere].any()
    used = {c for c, m in masks.items() if diff[:, m].any()}
    assert len(used) == 4


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"trigger_size": 17}, "attack.trigger_size"),
        ({"target": 10}, "attack.target"),
        ({"label_mode": "clean", "poison_rate": 0.5}, "attack.poison_rate"),
        ({"poison_rate": 0.99}, "attack.poison_rate"),
    ],
)
def test_badnets_rejects_impossible_settings(overrides, key, digits):
    cfg = AttackConfig(name="badnets", **overrides)
    with pytest.raises(ConfigError) as err:
        BACKDOORS["badnets"](cfg).poison(digits)
    assert err.value.key == key
