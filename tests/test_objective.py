"""Composite adversarial training: the three mixing rules and the CAT preset end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bdat_ray.config import from_flat
from bdat_ray.data.augment import to_float
from bdat_ray.threats import THREATS
from bdat_ray.threats.objective import AdversarialTraining


@pytest.fixture(scope="module")
def batch(digits):
    return to_float(digits.x_train[:48], False), digits.y_train[:48]


def components(weights=(0.25, 0.75)):
    return [
        (THREATS["linf"](8 / 255, steps=3), weights[0]),
        (THREATS["noise"](0.1), weights[1]),
    ]


def test_weights_are_normalised_and_must_be_positive():
    objective = AdversarialTraining(components((1.0, 3.0)))
    assert objective.weights == [0.25, 0.75]
    with pytest.raises(ValueError):
        AdversarialTraining(components((0.0, 0.0)))


def test_random_mix_draws_components_in_proportion_to_weight():
    objective = AdversarialTraining(components(), mix="random")
    generator = torch.Generator().manual_seed(0)
    picks = [objective.pick(generator) for _ in range(4000)]
    assert 0.70 < sum(picks) / len(picks) < 0.80  # component 1 has weight 0.75


def test_sum_mix_is_the_weighted_sum_of_component_losses(trained_digits_model, batch):
    model = trained_digits_model
    x, y = batch
    objective = AdversarialTraining(components(), mix="sum")
    out = objective.batch_loss(model, x, y, torch.Generator().manual_seed(5))
    # Recompute each component with the same generator stream.
    gen = torch.Generator().manual_seed(5)
    advs = [objective._adversarial(model, t, x, y, gen, None) for t in objective.threats]
    model.eval()
    expected = sum(
        w * F.cross_entropy(model(xa), y) for w, xa in zip(objective.weights, advs, strict=True)
    )
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.count == 2 * len(y)


def test_max_mix_takes_the_hardest_input_per_sample(trained_digits_model, batch):
    model = trained_digits_model
    x, y = batch
    objective = AdversarialTraining(components(), mix="max")
    adversarial = objective._adversarial(model, objective.threats[0], x, y, None, None)
    chosen = objective.hardest(model, [x, adversarial], y, None)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        adv_loss = F.cross_entropy(model(adversarial), y, reduction="none")
    expect_adv = adv_loss > clean_loss
    assert expect_adv.any()
    assert torch.equal(chosen[expect_adv], adversarial[expect_adv])
    assert torch.equal(chosen[~expect_adv], x[~expect_adv])


@pytest.mark.parametrize("mix", ["sum", "random", "max"])
def test_cat_runs_end_to_end_with_every_mix_rule(mix):
    from bdat_ray.engine import fit

    cfg = from_flat(
        {
            "at.threat": "cat",
            "at.mix": mix,
            "at.steps": 2,
            "train.epochs": 1,
            "eval.robust_samples": 32,
        }
    )
    result = fit(cfg)
    assert result.config["at.linf.eps"] == pytest.approx(2 / 255)
    assert result.config["at.spatial.eps"] == pytest.approx(0.025)
    assert result.config["at.linf.weight"] == pytest.approx(0.5)
    assert 0 <= result.acc <= 100 and "train_adv_loss" in result.history[0]


def test_robust_accuracy_under_another_threat_model():
    from bdat_ray.engine import fit

    cfg = from_flat(
        {
            "train.epochs": 1,
            "eval.threat": "spatial",
            "eval.eps": 0.1,
            "eval.step_size": 0.02,
            "eval.robust_samples": 64,
        }
    )
    result = fit(cfg)
    assert 0 <= result.robust_acc <= result.acc + 10
