"""Contract tests over the whole threat-model registry, run through the one attack loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bdat_ray.data.augment import to_float
from bdat_ray.threats import THREATS, perturb

MAXIMISING = sorted(n for n, cls in THREATS.items() if cls.maximizes)


def make(name: str, eps: float | None = None, steps: int = 7):
    cls = THREATS[name]
    return cls(eps if eps is not None else cls.default_eps, steps=steps)


@pytest.fixture(scope="module")
def batch(digits):
    n = 64
    return to_float(digits.x_test[:n], False), digits.y_test[:n]


def per_sample_loss(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("name", sorted(THREATS))
def test_output_inside_threat_model_and_unit_box(name, trained_digits_model, batch):
    x, y = batch
    threat = make(name)
    x_adv = perturb(trained_digits_model, x, y, threat, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape
    assert threat.contains(x, x_adv, model=trained_digits_model).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad


@pytest.mark.parametrize("name", sorted(THREATS))
def test_membership_rejects_points_outside(name, batch, trained_digits_model):
    x, _ = batch
    threat = make(name)
    far = (x + 0.9).clamp(0, 1)  # moves many pixels by far more than any budget
    assert not threat.contains(x, far, model=trained_digits_model).any()
    assert threat.contains(x, x, model=trained_digits_model).all()


@pytest.mark.parametrize("name", MAXIMISING)
def test_attack_raises_loss_above_clean_and_random(name, trained_digits_model, batch):
    x, y = batch
    model = trained_digits_model
    threat = make(name)
    gen = torch.Generator().manual_seed(0)
    clean = per_sample_loss(model, x, y).mean()
    adv = per_sample_loss(model, perturb(model, x, y, threat, generator=gen), y).mean()
    start = threat.project(x, threat.init(x, torch.Generator().manual_seed(1)))
    random = per_sample_loss(model, threat.apply(x, start), y).mean()
    assert adv > clean
    assert adv > random


@pytest.mark.parametrize("name", sorted(THREATS))
@pytest.mark.parametrize("start_training", [True, False])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_mode_restored_and_no_weight_gradients(name, start_training, bn_mode, digits, batch):
    from tests.conftest import small_model

    model = small_model(digits)
    model.train(start_training)
    frozen_before = [p.requires_grad for p in model.parameters()]
    seen_modes = []
    # normalize is the first layer every forward path goes through (model(), features())
    hook = model.normalize.register_forward_pre_hook(lambda m, _: seen_modes.append(m.training))
    x, y = batch
    perturb(model, x, y, make(name), generator=torch.Generator().manual_seed(0), bn_mode=bn_mode)
    hook.remove()
    assert model.training is start_training
    assert [p.requires_grad for p in model.parameters()] == frozen_before
    assert all(p.grad is None for p in model.parameters())
    if THREATS[name].maximizes:
        assert seen_modes and all(m is (bn_mode == "train") for m in seen_modes)


@pytest.mark.parametrize("name", sorted(THREATS))
def test_same_seed_same_perturbation_on_cpu(name, trained_digits_model, batch):
    x, y = batch
    runs = [
        perturb(trained_digits_model, x, y, make(name), generator=torch.Generator().manual_seed(s))
        for s in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_linf_budget_is_used(trained_digits_model, batch):
    """PGD should push most pixels of most images to the L-inf boundary."""
    x, y = batch
    eps = 8 / 255
    x_adv = perturb(trained_digits_model, x, y, make("linf", eps, steps=10))
    reach = (x_adv - x).abs().flatten(1).amax(1)
    assert (reach > eps - 1e-4).float().mean() > 0.9


def test_registry_matches_the_config_sections():
    from bdat_ray.config import THREAT_NAMES

    assert set(THREATS) == set(THREAT_NAMES)


@pytest.mark.parametrize("name", sorted(THREATS))
def test_every_threat_builds_from_its_config_section(name):
    """The path a run takes: ``at.threat=<name>`` -> resolved component -> its section's knobs."""
    from bdat_ray.config import at_components, from_flat
    from bdat_ray.engine import build_threat

    cfg = from_flat({"at.threat": name})
    (component,) = at_components(cfg.at)
    threat = build_threat(component, cfg, random_start=True)
    assert type(threat) is THREATS[name] and threat.eps == THREATS[name].default_eps
