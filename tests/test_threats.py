"""Contract tests over the whole threat-model registry, run through the one attack loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bdat_ray.data.augment import to_float
from bdat_ray.threats import THREATS, perturb

MAXIMISING = sorted(n for n, cls in THREATS.items() if cls.maximizes)


def make(name: str, eps: float | None = None, steps: int = 7, **knobs):
    """A threat at its defaults; perceptual with its bisection projection, so that the
    membership tests hold (its training default is the soft, unprojected Fast-LPA)."""
    cls = THREATS[name]
    if name == "perceptual":
        knobs.setdefault("projection", "bisection")
    return cls(eps if eps is not None else cls.default_eps, steps=steps, **knobs)


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
@pytest.mark.parametrize("bn_mode", ["eval", "train", "batch"])
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
        assert seen_modes and all(m is (bn_mode != "eval") for m in seen_modes)


@pytest.mark.parametrize(
    ("bn_mode", "updates"), [("eval", False), ("train", True), ("batch", False)]
)
def test_bn_mode_batch_uses_batch_statistics_without_updating(bn_mode, updates, digits, batch):
    """Weng et al.'s reference crafts PGD with batch statistics (training graph) and never
    runs the running-statistics updates; ``train`` updates them at every attack step."""
    from tests.conftest import small_model

    model = small_model(digits).eval()
    x, y = batch
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    seen = []
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    hook = bn.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    perturb(model, x, y, make("linf"), generator=torch.Generator().manual_seed(0), bn_mode=bn_mode)
    hook.remove()
    after = model.state_dict()
    changed = any(not torch.equal(v, after[k]) for k, v in before.items())
    assert changed is updates
    assert all(m is (bn_mode != "eval") for m in seen)


@pytest.mark.parametrize("name", sorted(THREATS))
def test_same_seed_same_perturbation_on_cpu(name, trained_digits_model, batch):
    x, y = batch
    runs = [
        perturb(trained_digits_model, x, y, make(name), generator=torch.Generator().manual_seed(s))
        for s in (3, 3, 4)
    ]
    assert torch.equal(runs[0], runs[1])
    # spatial starts at the identity flow (StAdvAttack): then the seed cannot matter
    assert torch.equal(runs[0], runs[2]) is not make(name).starts_random


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


# -- the reference attacks' definitions (docs/fidelity.md) ---------------------------------------


def test_margin_loss_is_best_other_logit_minus_true():
    from bdat_ray.threats.base import margin_loss

    logits = torch.tensor([[2.0, 5.0, 1.0], [0.0, -1.0, 3.0]])
    assert torch.allclose(margin_loss(logits, torch.tensor([1, 0])), torch.tensor([-3.0, 3.0]))


def test_flow_loss_is_mister_eds_four_neighbour_sum():
    """stAdv_norm of mister_ed: each pixel against its 4 (wrapping) neighbours."""
    from bdat_ray.threats.spatial import flow_smoothness

    flow = torch.zeros(1, 2, 3, 3)
    flow[0, 0, 1, 1] = 0.3  # one moved pixel: differs from its 4 neighbours, they from it
    assert flow_smoothness(flow).item() == pytest.approx(8 * 0.3 + 28e-5, abs=1e-5)
    assert flow_smoothness(torch.full((1, 2, 4, 4), 0.2)).item() == pytest.approx(
        4 * 16 * 1e-5, rel=1e-3
    )


def test_spatial_defaults_are_stadv_attacks():
    """perceptual-advex StAdvAttack: Adam lr 0.01 from the identity, margin loss, flow-loss
    weight 0.0025/bound; the CAT config section resolves to the same."""
    from bdat_ray.config import at_components, from_flat
    from bdat_ray.engine import build_threat

    cfg = from_flat({"at.threat": "spatial", "at.eps": 0.05})
    threat = build_threat(at_components(cfg.at)[0], cfg, random_start=cfg.at.random_start)
    assert (threat.optimizer, threat.step_size, threat.loss) == ("adam", 0.01, "margin")
    assert threat.tau == pytest.approx(0.0025 / 0.05)
    assert not threat.starts_random and not threat.init(torch.zeros(2, 1, 4, 4), None).any()


def neighbour_difference(flow: torch.Tensor) -> float:
    """Mean |Δ| between horizontally and vertically neighbouring flow values."""
    dx = (flow[..., 1:] - flow[..., :-1]).abs().mean()
    dy = (flow[..., 1:, :] - flow[..., :-1, :]).abs().mean()
    return ((dx + dy) / 2).item()


def test_default_flow_loss_makes_the_flow_smooth(trained_digits_model, batch):
    """CAT §2.1's spatial movement loss: with the default weight the searched flow is
    smoother than with τ = 0 and than the old sign-step default (per-pixel jitter), and still
    raises the loss. Measured here (10 steps, ε 0.1): mean neighbouring difference 0.24·ε by
    default, 0.46·ε with τ = 0; sign steps from a random start (the old default) rougher."""
    from bdat_ray.threats.attack import attack_mode

    x, y = batch
    flows = {}
    settings = {"default": {}, "tau 0": {"tau": 0.0}}
    settings["sign, random, tau 0"] = {"tau": 0.0, "optimizer": "sign", "start": "random"}
    for name, knobs in settings.items():
        threat = make("spatial", 0.1, steps=10, **knobs)
        memory = {"model": trained_digits_model}
        delta = threat.init(x, torch.Generator().manual_seed(0))
        with attack_mode(trained_digits_model, "eval"):
            for step in range(threat.steps):  # the loop of `perturb`, keeping the flow
                memory["step"] = step
                delta.requires_grad_(True)
                objective = threat.attack_loss(trained_digits_model(threat.apply(x, delta)), y)
                objective = objective - threat.penalty(x, None, delta, memory)
                (grad,) = torch.autograd.grad(objective.sum(), delta)
                delta = threat.project(x, threat.ascend(x, delta.detach(), grad, memory))
        flows[name] = neighbour_difference(delta) / 0.1
    assert flows["default"] < 0.6 * flows["tau 0"] < 0.6 * flows["sign, random, tau 0"], flows
    x_adv = perturb(trained_digits_model, x, y, make("spatial", 0.1, steps=10))
    assert per_sample_loss(trained_digits_model, x_adv, y).mean() > (
        per_sample_loss(trained_digits_model, x, y).mean()
    )


def test_perceptual_training_attack_is_unprojected_by_default(trained_digits_model, batch):
    """perceptual-advex trains with FastLagrangePerceptualAttack(projection='none'): the bound
    is a soft Lagrangian penalty, so results may lie beyond it; bisection pulls them in."""
    from bdat_ray.config import from_flat

    x, y = batch
    section = from_flat({}).at.perceptual
    assert (section.projection, section.loss) == ("none", "margin")
    soft = THREATS["perceptual"](0.1, steps=10)
    hard = THREATS["perceptual"](0.1, steps=10, projection="bisection")
    gen = torch.Generator().manual_seed(0)
    x_soft = perturb(trained_digits_model, x, y, soft, generator=gen)
    x_hard = perturb(trained_digits_model, x, y, hard, generator=torch.Generator().manual_seed(0))
    assert not soft.contains(x, x_soft, model=trained_digits_model).all()
    assert hard.contains(x, x_hard, model=trained_digits_model).all()
    assert per_sample_loss(trained_digits_model, x_soft, y).mean() > (
        per_sample_loss(trained_digits_model, x_hard, y).mean()
    )
