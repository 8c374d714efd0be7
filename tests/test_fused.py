"""Fused trials (HFTA-style horizontal fusion): the fused network is the K networks, and a
fused member trains as the run it replaces."""

from __future__ import annotations

import pytest
import torch

from bdat_ray.config import ConfigError, from_flat
from bdat_ray.engine import TrainingDiverged, fit
from bdat_ray.fused import fit_fused
from bdat_ray.models import MODELS, build_model
from bdat_ray.models.fused import fuse, unfuse


@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fused_network_computes_each_member_on_its_own_rows(name, norm):
    members = []
    for k in range(3):
        torch.manual_seed(k)
        mean, std = [0.1 * k, 0.5, 0.4], [0.2, 0.3 + 0.01 * k, 0.25]
        members.append(
            build_model(name, num_classes=10, in_channels=3, norm=norm, mean=mean, std=std)
        )
    fused = fuse(members)
    x = torch.rand(3 * 4, 3, 32, 32)
    for training in (False, True):  # eval: running statistics; train: batch statistics
        fused.train(training)
        for m in members:
            m.train(training)
        expected = torch.cat([m(rows) for m, rows in zip(members, x.chunk(3), strict=True)])
        assert torch.allclose(fused(x), expected, atol=1e-4)
    # Train mode updated both copies' BatchNorm statistics alike; unfuse reads them back.
    for back, original in zip(unfuse(fused, members[0]), members, strict=True):
        mine, theirs = back.state_dict(), original.state_dict()
        assert all(torch.allclose(mine[k].float(), theirs[k].float(), atol=1e-5) for k in mine)


def test_members_must_share_an_architecture():
    small = build_model("small_cnn", num_classes=10, in_channels=1)
    wide = build_model("small_cnn", num_classes=10, in_channels=1, width=2)
    with pytest.raises(ValueError, match="architecture"):
        fuse([small, wide])


RUNS = [
    {"train.seed": 0, "attack.name": "badnets"},
    {"train.seed": 1, "attack.name": "blended", "attack.poison_rate": 0.1},
    {"train.seed": 2, "attack.name": "badnets", "train.lr": 0.05, "attack.seed": 3},
]


@pytest.mark.slow
def test_fused_members_equal_the_runs_they_replace():
    """K = 3 members differing in seed, attack, poison rate and learning rate: the same
    poisoned indices exactly, and acc/asr within 1 point of the three separate runs."""
    cfgs = [from_flat({"train.epochs": 6, "eval.robust_samples": 0, **r}) for r in RUNS]
    fused = fit_fused(cfgs)
    for cfg, member in zip(cfgs, fused, strict=True):
        alone = fit(cfg)
        assert member.poisoned_count == alone.poisoned_count
        assert member.config == alone.config
        assert abs(member.acc - alone.acc) <= 1.0, (member.acc, alone.acc)
        assert abs(member.asr - alone.asr) <= 1.0, (member.asr, alone.asr)
        assert len(member.history) == 6 and member.history[-1]["fused_members"] == 3


@pytest.mark.slow
def test_fused_adversarial_training_keeps_each_members_budget():
    """L-inf AT with budgets 4/255 and 16/255 in one fused run: after an epoch (two steps of
    700 images) each member's weights equal its separate run's up to float reordering."""
    base = {"train.epochs": 1, "train.batch_size": 700, "eval.robust_samples": 0}
    base |= {"at.threat": "linf", "at.steps": 2}
    cfgs = [
        from_flat({**base, "train.seed": s, "at.eps": eps})
        for s, eps in ((0, "4/255"), (1, "16/255"))
    ]
    for cfg, member in zip(cfgs, fit_fused(cfgs), strict=True):
        alone = fit(cfg).model.state_dict()
        mine = member.model.state_dict()
        # Float reordering (grouped vs dense channels_last convolutions, amplified by PGD's
        # sign step) measured 2.0e-3 at most; the other member's budget would move the
        # weights by 1.5e-2 (measured), so 5e-3 tells the two apart.
        assert max((mine[k].float() - alone[k].float()).abs().max() for k in mine) < 5e-3


def test_a_diverging_member_fails_alone():
    base = {"train.epochs": 2, "eval.robust_samples": 0}
    cfgs = [from_flat({**base, "train.lr": lr}) for lr in (0.1, 1e12)]
    ok, diverged = fit_fused(cfgs)
    assert isinstance(diverged, TrainingDiverged)
    assert ok.acc > 50 and len(ok.history) == 2


RANDOM_MIX = {"at.threat": "cat", "at.mix": "random"}


@pytest.mark.parametrize(
    ("first", "other", "key"),
    [
        ({}, {"model.width": 2}, "model.width"),
        ({}, {"train.batch_size": 64}, "train.batch_size"),
        ({}, {"at.threat": "linf"}, "at.threat"),
        (RANDOM_MIX, RANDOM_MIX, "at.mix"),
        ({"at.threat": "l2"}, {"at.threat": "l2", "at.eps": 0.5}, "at.l2.eps"),
    ],
)
def test_unfusable_members_are_refused_naming_the_key(first, other, key):
    base = {"train.epochs": 1, "eval.robust_samples": 0}
    with pytest.raises(ConfigError) as err:
        fit_fused([from_flat(base | first), from_flat(base | other)])
    assert err.value.key == key


class _Stop(Exception):
    pass


def test_a_fused_run_resumes_every_member_from_its_checkpoint(tmp_path):
    """Stopped after epoch 2 of 3 and resumed from the fused checkpoint: every member ends
    exactly where the uninterrupted fused run ends (weights, history, divergence)."""
    base = {"train.epochs": 3, "eval.robust_samples": 0, "data.image_size": 8}
    cfgs = [from_flat({**base, "train.seed": s, "train.lr": lr}) for s, lr in ((0, 0.1), (1, 1e12))]
    whole = fit_fused(cfgs, workdir=tmp_path / "whole")

    def stop_after_two(epoch, metrics, diverged, checkpoint_dir):
        if epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        fit_fused(cfgs, workdir=tmp_path / "cut", on_epoch=stop_after_two)
    seen = []
    resumed = fit_fused(
        cfgs,
        workdir=tmp_path / "resumed",
        resume_from=tmp_path / "cut" / "checkpoint",
        on_epoch=lambda epoch, metrics, diverged, _: seen.append(
            (epoch, set(metrics), set(diverged))
        ),
    )
    assert seen == [(3, {0}, {1})]  # only the last epoch ran; member 1 stayed diverged
    assert isinstance(resumed[1], TrainingDiverged) and isinstance(whole[1], TrainingDiverged)
    mine, theirs = resumed[0].model.state_dict(), whole[0].model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert [h["acc"] for h in resumed[0].history] == [h["acc"] for h in whole[0].history]
    assert (tmp_path / "resumed" / "member_0" / "result.json").is_file()
    assert (tmp_path / "resumed" / "member_1" / "poisoned_indices.npy").is_file()
    other = [from_flat({**base, "train.seed": 5}), cfgs[1]]
    with pytest.raises(ConfigError, match="other configs"):
        fit_fused(other, resume_from=tmp_path / "cut" / "checkpoint")


def test_grid_trials_are_packed_by_what_they_must_share():
    """Compatible runs pack in order, up to K; other threat kinds, architectures or a
    defense make their own packs (a defense, or train.compile=on, always alone)."""
    from bdat_ray.fused import pack

    flats = [
        {"train.seed": 0},
        {"train.seed": 1, "at.threat": "linf", "at.eps": "4/255"},
        {"train.seed": 2},
        {"train.seed": 3, "at.threat": "linf", "at.eps": "16/255"},  # per-member budget
        {"train.seed": 4, "defense.name": "perfect_filter"},
        {"train.seed": 5, "train.lr": 0.01},
        {"train.seed": 6},
        {"train.seed": 7, "model.width": 2},
        {"train.seed": 8, "train.compile": "on"},  # compiled trials train alone
    ]
    cfgs = [from_flat(f) for f in flats]
    assert pack(cfgs, 3) == [[0, 2, 5], [1, 3], [4], [6], [7], [8]]
    assert pack(cfgs, 1) == [[i] for i in range(9)]
