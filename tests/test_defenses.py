"""Contract tests of the baseline defenses (bdat_ray/defenses) on small real data: the
registry and its config sections, bad input before training, and one test per defense that
fails when the defense does not do what its paper says."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from bdat_ray.config import ConfigError, build_config, from_flat
from bdat_ray.defenses import DEFENSES, STAGES
from bdat_ray.metrics import detection_rates
from tests.conftest import REPO

QUICK = {"eval.robust_samples": 0, "train.epochs": 4}


# -- registry, config, bad input ----------------------------------------------------------


def test_every_defense_declares_its_stage_paper_and_documented_knobs():
    from bdat_ray.config import describe_keys

    listing = describe_keys()
    for name, cls in DEFENSES.items():
        assert cls.stage in STAGES and cls.paper, name
        if cls.section is not None:
            assert f"defense.{name}." in listing, name
    docs = (REPO / "docs" / "defenses.md").read_text()
    for name in DEFENSES:
        assert f"`{name}`" in docs, f"{name} missing from docs/defenses.md"


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["defense.name=spectral", "attack.name=none"], "defense.name"),
        (["defense.name=perfect_filter", "attack.name=none"], "defense.name"),
        (["defense.name=dpsgd", "at.threat=linf"], "defense.name"),
        (
            ["defense.name=abl", "train.epochs=3", "defense.abl.isolation_epochs=5"],
            "defense.abl.isolation_epochs",
        ),
        (["defense.name=nad", "defense.nad.clean_fraction=0"], "defense.nad.clean_fraction"),
    ],
)
def test_bad_defense_input_is_refused_before_any_data_is_read(overrides, key):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert err.value.key == key


def test_a_clean_share_of_no_image_exits_2_with_one_line_before_training():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdat_ray.run",
            "defense.name=nad",
            "defense.nad.clean_fraction=0.0001",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: defense.nad.clean_fraction:") and "epoch" not in proc.stderr


def test_detection_rates_count_against_the_poisoned_set():
    rates = detection_rates(torch.tensor([0, 1, 5, 7]), torch.tensor([0, 1, 2, 3]), n_train=20)
    assert rates == {
        "detect_tpr": 50.0,
        "detect_fpr": 12.5,
        "detect_precision": 50.0,
        "removed": 4.0,
    }


# -- filters --------------------------------------------------------------------------------


def test_perfect_filter_brings_badnets_asr_to_the_clean_baseline_and_random_does_not():
    from bdat_ray.engine import fit

    runs = {
        name: fit(from_flat({**QUICK, "attack.name": attack, "defense.name": name}))
        for name, attack in [
            ("none", "badnets"),
            ("perfect_filter", "badnets"),
            ("random_filter", "badnets"),
        ]
    }
    clean = fit(from_flat({**QUICK, "attack.name": "none"}))
    assert runs["none"].asr > 80  # the backdoor is learnt without a defense
    assert runs["perfect_filter"].asr <= clean.asr + 10
    d = runs["perfect_filter"].defense
    assert (
        d["detect_tpr"] == 100
        and d["detect_fpr"] == 0
        and d["removed"] == runs["none"].poisoned_count
    )
    assert runs["random_filter"].asr > 50  # removing as many at random leaves the backdoor
    assert runs["random_filter"].defense["removed"] == d["removed"]


@pytest.fixture(scope="module")
def mnist_badnets(mnist_subset_path):
    """Dirty-label BadNets 5% on the MNIST subset and a defense context whose trainer trains
    one real auxiliary model (2 epochs) for both detecting filters."""
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import build_defense, train_auxiliary

    cfg = from_flat(
        {
            "data.name": "npz",
            "data.path": str(mnist_subset_path),
            "attack.name": "badnets",
            "train.epochs": 2,
            "defense.name": "spectral",
        }
    )
    from bdat_ray.backdoors import BACKDOORS

    data = load_dataset(cfg.data)
    poisoned = BACKDOORS["badnets"](cfg.attack).poison(data)
    cache: dict = {}

    def trainer(overrides, train):
        if "model" not in cache:
            cache["model"] = train_auxiliary({"train.epochs": 2, **overrides}, train)
        return cache["model"]

    return cfg, data, poisoned, trainer, build_defense


@pytest.mark.parametrize("name", ["spectral", "activation_clustering"])
def test_detecting_filters_find_most_dirty_label_badnets_poison_on_mnist(name, mnist_badnets):
    cfg, data, poisoned, trainer, build_defense = mnist_badnets
    cfg = cfg.replace({"defense.name": name})
    defense = build_defense(cfg, data, poisoned, torch.device("cpu"))
    defense.ctx.trainer = trainer
    removed = defense.filter(poisoned.data)
    rates = detection_rates(removed, poisoned.poison_indices, len(data.y_train))
    # "Most" of the poison (issue 11), few clean images. Measured on the MNIST subset (BadNets
    # 3×3 dirty 5%, 872 poisoned, 2-epoch auxiliary model): spectral TPR 74.7 / FPR 4.0
    # (1308 removed); activation clustering TPR 100.0 / FPR 0.0 (872 removed).
    print(name, rates)
    assert rates["detect_tpr"] > 50
    assert rates["detect_fpr"] < 10


# -- train-stage defenses ------------------------------------------------------------------


def test_dpsgd_model_holds_no_batchnorm_and_clips_every_per_sample_gradient(digits):
    from bdat_ray.engine import fit, prepare

    cfg = from_flat({**QUICK, "defense.name": "dpsgd", "defense.dpsgd.max_grad_norm": 0.5})
    prep = prepare(cfg, digits)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prep.model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in prep.model.modules())
    from bdat_ray.engine import make_optimizer

    optimizer, _ = make_optimizer(prep.model, prep.cfg)
    dp = prep.defense.wrap_optimizer(optimizer, prep.model)
    x = prep.poisoned.data.x_train[:32].float() / 255
    y = prep.poisoned.data.y_train[:32]
    nn.functional.cross_entropy(prep.model(x), y).backward()
    params = [p for p in prep.model.parameters() if p.requires_grad]
    per_sample = torch.cat([p.grad_sample.flatten(1) for p in params], 1)  # (32, D)
    norms = per_sample.norm(dim=1)
    assert (norms > 0.5).any()  # the test would pass vacuously if none needed clipping
    dp.clip_and_accumulate()
    factor = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    expected = (per_sample * factor[:, None]).sum(0)
    summed = torch.cat([p.summed_grad.flatten() for p in params])
    assert torch.allclose(summed, expected, rtol=1e-4, atol=1e-6)
    result = fit(cfg, data=digits)  # and a whole run trains through it
    losses = [h["train_loss"] for h in result.history]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_abl_isolates_its_share_and_scores_it_as_detection(digits):
    from bdat_ray.engine import fit

    result = fit(from_flat({**QUICK, "defense.name": "abl"}), data=digits)
    d = result.defense
    assert d["removed"] == round(0.01 * len(digits.y_train))
    assert result.config["defense.abl.isolation_epochs"] == 1  # 20% of 4 epochs, rounded up
    assert 0 <= d["detect_tpr"] <= 100 and "acc_before_repair" in d


def test_cross_lipschitz_penalty_is_the_pairwise_sum_of_the_reference(digits):
    from bdat_ray.defenses.lipschitz import cross_lipschitz
    from bdat_ray.models.common import batch_statistics_frozen
    from tests.conftest import small_model

    model = small_model(digits).eval()
    x = digits.x_train[:4].float() / 255
    penalty = cross_lipschitz(model, x)
    xr = x.clone().requires_grad_(True)
    # The penalty is taken as training sees the batch: batch statistics, running ones frozen.
    with batch_statistics_frozen(model):
        logits = model(xr)
    grads = [
        torch.autograd.grad(logits[:, k].sum(), xr, retain_graph=True)[0].flatten(1)
        for k in range(10)
    ]
    brute = sum(((grads[a] - grads[m]) ** 2).sum() for a in range(10) for m in range(10)) / (
        10**2 * 4
    )
    assert torch.allclose(penalty, brute, rtol=1e-4)


def test_denoising_blocks_follow_every_stage_start_as_identity_and_compose_with_at(digits):
    from bdat_ray.defenses.denoise import DenoisingBlock
    from bdat_ray.engine import fit, prepare

    for kind in ("nonlocal", "gaussian", "median", "box"):
        cfg = from_flat({**QUICK, "defense.name": "denoise", "defense.denoise.filter": kind})
        prep = prepare(cfg, digits)
        model = prep.model.eval()
        blocks = [m for m in model.modules() if isinstance(m, DenoisingBlock)]
        assert len(blocks) == len(model.stages) and all(s[1] in blocks for s in model.stages)
        x = digits.x_test[:8].float() / 255
        with_blocks = model(x)
        for i, stage in enumerate(model.stages):  # the same network without the blocks
            model.stages[i] = stage[0]
        assert torch.allclose(with_blocks, model(x), atol=1e-5)  # every block starts as identity
    result = fit(
        from_flat(
            {
                **QUICK,
                "train.epochs": 1,
                "defense.name": "denoise",
                "at.threat": "linf",
                "at.steps": 1,
            }
        ),
        data=digits,
    )
    assert "train_adv_acc" in result.history[-1]


# -- repair defenses -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def backdoored(digits):
    """A small CNN with a BadNets backdoor on digits (the prep it was trained in)."""
    from bdat_ray.engine import fit

    cfg = from_flat({"eval.robust_samples": 0, "train.epochs": 8})
    result = fit(cfg, data=digits)
    assert result.asr > 80
    return cfg, result


def repair_with(name: str, base, digits, **knobs):
    from bdat_ray.engine import build_defense, prepare

    cfg, result = base
    cfg = cfg.replace(
        {"defense.name": name, **{f"defense.{name}.{k}": v for k, v in knobs.items()}}
    )
    prep = prepare(cfg, digits)
    import copy

    model = copy.deepcopy(result.model)
    defense = build_defense(cfg, digits, prep.poisoned, torch.device("cpu"))
    return defense, defense.repair(model, prep.poisoned.data)


def test_fine_pruning_removes_the_requested_share_of_channels(backdoored, digits):
    from bdat_ray.defenses.fine_pruning import ChannelMask

    defense, model = repair_with("fine_pruning", backdoored, digits, ratio=0.25, epochs=1)
    masks = [m for m in model.modules() if isinstance(m, ChannelMask)]
    assert len(masks) == 1
    channels = masks[0].mask.numel()
    assert (masks[0].mask == 0).sum().item() == round(0.25 * channels)
    out = model.eval().features(digits.x_test[:16].float() / 255)[-1]
    pruned = masks[0].mask.flatten() == 0
    assert out[:, pruned].abs().max() == 0 and out[:, ~pruned].abs().max() > 0
    assert defense.report()["pruned_fraction"] == pytest.approx(0.25, abs=1 / channels)


def test_nad_reads_only_its_clean_share(backdoored, digits, monkeypatch):
    import bdat_ray.defenses.nad as nad

    seen = []
    real = nad.fine_tune

    def spy(model, data, **kw):
        seen.append(data)
        return real(model, data, **{**kw, "epochs": 1})

    monkeypatch.setattr(nad, "fine_tune", spy)
    defense, _ = repair_with("nad", backdoored, digits)
    share = defense.ctx.clean_share
    assert len(seen) == 2 and all(d is share for d in seen)  # teacher and student
    assert len(share.y_train) == round(0.05 * len(digits.y_train))
    # every image of the share is a clean training image (no trigger, true label)
    clean = {
        (bytes(x.numpy().tobytes()), int(y))
        for x, y in zip(digits.x_train, digits.y_train, strict=True)
    }
    assert all(
        (bytes(x.numpy().tobytes()), int(y)) in clean
        for x, y in zip(share.x_train, share.y_train, strict=True)
    )


def test_neural_cleanse_flags_the_target_class_of_a_backdoored_model(backdoored, digits):
    # 200 images a step instead of 1000 keeps the test near a minute; measured 2026-12-02:
    # target (class 2) mask L1 3.95 (the trigger has 9 pixels), anomaly index 3.24, the
    # only class flagged; the median class needs ~25 pixels
    defense, _ = repair_with(
        "neural_cleanse", backdoored, digits, epochs=2, samples_per_step=200, reverse_steps=300
    )
    report = defense.report()
    print("NC anomaly indices", [round(report[f"nc_anomaly_index_{k}"], 2) for k in range(10)])
    assert report["nc_target_flagged"] == 1.0
    details = defense.details()
    assert defense.ctx.target in details["nc_flagged_classes"]
    assert details["nc_mask_l1"][defense.ctx.target] < min(
        v for k, v in enumerate(details["nc_mask_l1"]) if k != defense.ctx.target
    )
    assert all(1 <= s <= 300 for s in details["nc_reverse_steps"])


# -- analysis ------------------------------------------------------------------------------


def test_fp_ratio_closest_to_cat_accuracy_is_the_one_the_table_keeps():
    import pandas as pd

    from analysis.tables import cat_table, pick_closest_accuracy

    rows = [
        # setting, threat, budgets, defense, ratio, acc, asr
        ("badnets", "none", "-", "none", None, 95.0, 100.0),
        ("badnets", "cat", "linf 2/255 ×0.50 + spatial 0.025 ×0.50", "none", None, 82.0, 2.0),
        ("badnets", "none", "-", "fine_pruning", 0.1, 94.0, 99.0),
        ("badnets", "none", "-", "fine_pruning", 0.5, 83.0, 60.0),  # closest to CAT's 82
        ("badnets", "none", "-", "fine_pruning", 0.9, 40.0, 5.0),
    ]
    trials = pd.DataFrame(
        [
            {
                "outcome": "finished",
                "setting": s,
                "variant": "",
                "threat": t,
                "budgets": b,
                "defense": d,
                "defense.fine_pruning.ratio": r,
                "acc": acc,
                "asr": asr,
                "robust_acc": float("nan"),
                "train.seed": 0,
            }
            for s, t, b, d, r, acc, asr in rows
        ]
    )
    kept, note = pick_closest_accuracy(trials)
    assert list(kept.loc[kept["defense"] == "fine_pruning", "defense.fine_pruning.ratio"]) == [0.5]
    assert "50%" in note
    table = cat_table(trials)
    assert "FP" in table.columns and table.cells["badnets", "FP"].mean["acc"] == 83.0
