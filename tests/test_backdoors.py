"""Contract tests over the whole backdoor registry, plus per-attack specifics."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bdat_ray.backdoors import BACKDOORS, PoisonContext
from bdat_ray.backdoors.adaptive import AdaptiveSection
from bdat_ray.backdoors.blended import BlendedSection
from bdat_ray.backdoors.lc import LCSection
from bdat_ray.backdoors.triggers import CORNERS, PATTERNS, corner_mask
from bdat_ray.backdoors.wanet import WaNetSection
from bdat_ray.config import AttackConfig, ConfigError
from bdat_ray.engine import train_auxiliary

ATTACKS = sorted(set(BACKDOORS) - {"none"})
# no trigger region to check (the adaptive attack's patch goes anywhere, its poisons carry none)
WHOLE_IMAGE = {"blended", "wanet", "adaptive"}
# Colour-only attacks run on the CIFAR-10 subset, the others on digits.
COLOUR_ONLY = {"channel"}
FAST_LC = LCSection(surrogate_epochs=1, steps=3)
FAST_ADAPTIVE = AdaptiveSection(steps=2, retrain_factor=0, surrogate_epochs=1)
CONTEXT = PoisonContext(trainer=train_auxiliary)  # LC trains its surrogate with the engine


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """LC's surrogate cache goes to a per-session folder, not the user's ~/.cache."""
    import os

    os.environ["BDAT_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def make_cfg(name: str, label_mode: str | None = None, **kw) -> AttackConfig:
    """The registry contracts check fixed poisoned sets: WaNet with its fixed scheme (its
    per-batch default is tested on its own below)."""
    if name == "wanet":
        kw.setdefault("wanet", WaNetSection(scheme="fixed"))
    return AttackConfig(
        name=name,
        label_mode=label_mode,
        poison_rate=0.04,
        lc=FAST_LC,
        adaptive=FAST_ADAPTIVE,
        **kw,
    )


def cases(names=ATTACKS):
    out = []
    for name in names:
        for mode in BACKDOORS[name].label_modes:
            out.append(pytest.param(name, mode, id=f"{name}-{mode}"))
    return out


@pytest.fixture(scope="session")
def poisoned_cache():
    return {}


def run_case(name, mode, request, poisoned_cache):
    """(clean data, attack, poisoned) for a case, computed once per session."""
    key = (name, mode)
    if key not in poisoned_cache:
        data = request.getfixturevalue("cifar_subset" if name in COLOUR_ONLY else "digits")
        attack = BACKDOORS[name](make_cfg(name, mode), CONTEXT)
        poisoned_cache[key] = (data, attack, attack.poison(data))
    return poisoned_cache[key]


@pytest.mark.parametrize(("name", "mode"), cases())
def test_poisoned_count_equals_configured_count(name, mode, request, poisoned_cache):
    data, attack, out = run_case(name, mode, request, poisoned_cache)
    n_target = int((data.y_train == attack.target).sum())
    expected = (
        round(attack.cfg.target_fraction * n_target)
        if name in ("sticker", "watermark", "channel")
        else round(attack.cfg.poison_rate * len(data.y_train))
    )
    assert len(out.poison_indices) == expected > 0
    assert len(out.poison_indices.unique()) == len(out.poison_indices)


@pytest.mark.parametrize(("name", "mode"), cases())
def test_labels_follow_the_label_mode(name, mode, request, poisoned_cache):
    data, attack, out = run_case(name, mode, request, poisoned_cache)
    idx = out.poison_indices
    y_new, y_old = out.data.y_train, data.y_train
    untouched = torch.ones_like(y_old, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(y_new[untouched], y_old[untouched])  # cross samples keep labels too
    if mode == "dirty":
        assert (y_new[idx] == attack.target).all() and (y_old[idx] != attack.target).all()
    else:
        assert torch.equal(y_new, y_old) and (y_old[idx] == attack.target).all()


@pytest.mark.parametrize(("name", "mode"), cases())
def test_only_poisoned_images_change(name, mode, request, poisoned_cache):
    data, _, out = run_case(name, mode, request, poisoned_cache)
    changed = (out.data.x_train != data.x_train).flatten(1).any(1).nonzero().flatten()
    allowed = set(out.poison_indices.tolist()) | set(out.cross_indices.tolist())
    assert set(changed.tolist()) <= allowed
    assert torch.equal(out.data.x_test, data.x_test)


@pytest.mark.parametrize(("name", "mode"), cases(sorted(set(ATTACKS) - WHOLE_IMAGE)))
def test_patch_triggers_touch_nothing_outside_their_region(name, mode, request, poisoned_cache):
    data, attack, out = run_case(name, mode, request, poisoned_cache)
    region = attack.trigger_region(data.image_shape)
    clean_test = data.x_test[data.y_test != attack.target]
    assert torch.equal(out.x_test_triggered[:, ~region], clean_test[:, ~region])
    assert (out.x_test_triggered[:, region] != clean_test[:, region]).any()
    if name != "lc":  # LC also perturbs the whole poisoned training image (by design)
        idx = out.poison_indices
        assert torch.equal(out.data.x_train[idx][:, ~region], data.x_train[idx][:, ~region])


@pytest.mark.parametrize(("name", "mode"), cases())
def test_same_seed_same_poison_and_other_seed_differs(name, mode, request, poisoned_cache):
    data, attack, a = run_case(name, mode, request, poisoned_cache)
    b = BACKDOORS[name](attack.cfg, CONTEXT).poison(data)
    assert torch.equal(a.poison_indices, b.poison_indices)
    assert torch.equal(a.data.x_train, b.data.x_train)
    assert torch.equal(a.x_test_triggered, b.x_test_triggered)
    c = BACKDOORS[name](replace(attack.cfg, seed=attack.cfg.seed + 1), CONTEXT).poison(data)
    assert not torch.equal(a.poison_indices, c.poison_indices)


@pytest.mark.parametrize("name", sorted(BACKDOORS))
def test_triggered_test_set_excludes_target_class(name, request):
    data = request.getfixturevalue("cifar_subset" if name in COLOUR_ONLY else "digits")
    attack = BACKDOORS[name](make_cfg(name), CONTEXT)
    out = attack.poison(data)
    non_target = data.y_test != attack.target
    assert (out.y_test_triggered != attack.target).all()
    assert len(out.x_test_triggered) == int(non_target.sum())
    assert torch.equal(out.y_test_triggered, data.y_test[non_target])


def test_registry_names_match_and_whole_image_attacks_have_no_region(digits):
    for name, cls in BACKDOORS.items():
        assert cls.name == name and cls.paper
        region = cls(make_cfg(name)).trigger_region(digits.image_shape)
        assert (region is None) == (name in WHOLE_IMAGE | {"none"})


# -- BadNets -------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", sorted(PATTERNS))
@pytest.mark.parametrize("size", [None, 1, 4])
def test_badnets_writes_the_pattern_into_the_corner(trigger, size, digits):
    cfg = AttackConfig(name="badnets", trigger=trigger, trigger_size=size, poison_rate=0.05)
    attack = BACKDOORS["badnets"](cfg)
    out = attack.poison(digits)
    k = attack.size
    assert k == (size or PATTERNS[trigger][1])
    assert (out.x_test_triggered[:, :, -k:, -k:] == attack.pattern(digits.channels)).all()
    assert (out.data.x_train[out.poison_indices][:, :, -k:, -k:] == attack.pattern(1)).all()


def test_badnets_checkerboard_patterns():
    gen = torch.Generator().manual_seed(0)
    board = PATTERNS["checkerboard3"][0](3, 1, gen)[0]
    assert board.tolist() == [[255, 0, 255], [0, 255, 0], [255, 0, 255]]


def test_badnets_random_corner_uses_all_corners(digits):
    cfg = AttackConfig(name="badnets", position="random_corner", poison_rate=0.1)
    out = BACKDOORS["badnets"](cfg).poison(digits)
    idx = out.poison_indices
    diff = out.data.x_train[idx] != digits.x_train[idx]
    used = {c for c in CORNERS if diff[:, corner_mask(digits.image_shape, 3, c)].any()}
    assert used == set(CORNERS)


# -- Blended, WaNet, LC, Weng ----------------------------------------------------------------


def test_blended_is_the_convex_mix(digits, tmp_path):
    from PIL import Image

    picture = tmp_path / "t.png"
    Image.new("RGB", (10, 10), (255, 255, 255)).save(picture)
    blend = BlendedSection(trigger="file", file=str(picture), alpha=0.25)
    cfg = AttackConfig(name="blended", poison_rate=0.05, blended=blend)
    out = BACKDOORS["blended"](cfg).poison(digits)
    idx = out.poison_indices
    expected = (0.75 * digits.x_train[idx].float() + 0.25 * 255).round()
    assert torch.equal(out.data.x_train[idx].float(), expected)


def test_blended_test_alpha_is_separate(digits):
    base = AttackConfig(name="blended", poison_rate=0.05)
    weak = BACKDOORS["blended"](base).poison(digits)
    strong = BACKDOORS["blended"](
        replace(base, blended=replace(base.blended, alpha_test=0.5))
    ).poison(digits)
    assert torch.equal(weak.data.x_train, strong.data.x_train)
    clean = digits.x_test[digits.y_test != 2].float()
    assert (strong.x_test_triggered.float() - clean).abs().mean() > (
        weak.x_test_triggered.float() - clean
    ).abs().mean()


def test_wanet_cross_samples_keep_labels_and_redraw_changes_sets(digits):
    cfg = make_cfg("wanet")
    attack = BACKDOORS["wanet"](cfg)
    first = attack.poison(digits)
    assert len(first.cross_indices) == round(2 * len(first.poison_indices))
    assert not set(first.cross_indices.tolist()) & set(first.poison_indices.tolist())
    assert torch.equal(first.data.y_train[first.cross_indices], digits.y_train[first.cross_indices])
    again = attack.poison(digits, epoch=3)
    assert not torch.equal(first.poison_indices, again.poison_indices)
    assert torch.equal(again.poison_indices, attack.poison(digits, epoch=3).poison_indices)


def test_wanet_per_batch_default_poisons_the_head_of_every_batch(digits):
    """The original WaNet (train.py): per batch, int(bs·pc) images warped and relabelled,
    int(that·cross_ratio) noise-mode ones keeping labels; the stored training set stays
    clean and the test trigger is the same warp."""
    assert AttackConfig().wanet.scheme == "per_batch"
    cfg = AttackConfig(name="wanet", poison_rate=0.1)
    attack = BACKDOORS["wanet"](cfg)
    out = attack.poison(digits)
    assert len(out.poison_indices) == 0 and torch.equal(out.data.x_train, digits.x_train)
    x, y = digits.x_train[:128], digits.y_train[:128]
    xp, yp = attack.poison_batch(x, y, torch.Generator().manual_seed(0))
    n_bd, n_cross = int(128 * 0.1), int(int(128 * 0.1) * 2)
    assert (yp[:n_bd] == 2).all() and torch.equal(yp[n_bd:], y[n_bd:])
    changed = (xp != x).flatten(1).any(1)
    assert changed[: n_bd + n_cross].float().mean() > 0.9 and not changed[n_bd + n_cross :].any()
    assert torch.equal(xp[:n_bd], attack.apply(x[:n_bd], torch.Generator(), train=False))
    again = attack.poison_batch(x, y, torch.Generator().manual_seed(0))[0]
    assert torch.equal(xp, again)
    for other in ("badnets", "blended", "sticker"):  # everything else poisons once
        same = BACKDOORS[other](make_cfg(other)).poison_batch(x, y, torch.Generator())
        assert same[0] is x and same[1] is y


def test_lc_perturbs_within_its_budget_and_is_cached(digits, monkeypatch):
    attack = BACKDOORS["lc"](make_cfg("lc"), CONTEXT)
    hard = attack.perturbed_target_images(digits)
    clean = digits.x_train[hard["indices"]].float()
    assert (hard["images"].float() - clean).abs().max() <= 255 * FAST_LC.eps + 1
    assert (hard["images"] != digits.x_train[hard["indices"]]).any()
    monkeypatch.setattr(type(attack), "_perturb", lambda *a: pytest.fail("surrogate retrained"))
    again = attack.perturbed_target_images(digits)
    assert torch.equal(again["images"], hard["images"])


@pytest.mark.parametrize(
    ("name", "overrides", "key"),
    [
        ("badnets", {"trigger_size": 17}, "attack.trigger_size"),
        ("badnets", {"target": 10}, "attack.target"),
        ("badnets", {"label_mode": "clean", "poison_rate": 0.5}, "attack.poison_rate"),
        ("badnets", {"poison_rate": 0.99}, "attack.poison_rate"),
        ("sticker", {"trigger_size": 20}, "attack.trigger_size"),
        ("channel", {}, "attack.name"),
        ("lc", {"label_mode": "dirty"}, "attack.label_mode"),
        ("wanet", {"label_mode": "clean"}, "attack.label_mode"),
        ("lc", {"poison_rate": 0.2}, "attack.poison_rate"),
    ],
)
def test_impossible_settings_name_the_key(name, overrides, key, digits):
    cfg = AttackConfig(name=name, **{"lc": FAST_LC, **overrides})
    with pytest.raises(ConfigError) as err:
        BACKDOORS[name].check_config(cfg)
        BACKDOORS[name](cfg, CONTEXT).poison(digits)
    assert err.value.key == key


def test_blended_rejects_missing_file_and_bad_alpha():
    from bdat_ray.config import from_flat

    with pytest.raises(ConfigError) as err:
        from_flat({"attack.name": "blended", "attack.blended.trigger": "file"})
    assert err.value.key == "attack.blended.file"
    with pytest.raises(ConfigError) as err:
        from_flat({"attack.name": "blended", "attack.blended.alpha": 1.5})
    assert err.value.key == "attack.blended.alpha"
