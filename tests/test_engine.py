"""End-to-end runs of the engine on real data (digits), CPU determinism, checkpoint resume."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bdat_ray.config import from_flat
from bdat_ray.engine import TrainingDiverged, fit, load_state

FAST = {"train.epochs": 2, "eval.robust_samples": 64}


def test_engine_imports_neither_ray_nor_mlflow():
    import subprocess
    import sys

    code = (
        "import sys, bdat_ray.engine, bdat_ray.run, bdat_ray.bench;"
        "print(sorted({'ray', 'mlflow'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_default_run_learns_the_task_and_the_backdoor():
    """The README's quickstart run: digits, dirty-label BadNets 5%, no AT (issue 2: ≥ 90/90)."""
    result = fit(from_flat({}))
    assert result.acc >= 90 and result.asr >= 90
    assert result.poisoned_count == 70
    assert len(result.history) == 15
    for key in ("train_clean_loss", "train_clean_acc", "epoch_seconds", "acc", "asr", "lr"):
        assert key in result.history[-1]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == 0.1 and lrs[9] == pytest.approx(0.01) and lrs[14] == pytest.approx(0.001)


def test_result_and_artifacts(tmp_path):
    result = fit(from_flat(FAST), workdir=tmp_path)
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["acc"] == result.acc and saved["config"]["at.threat"] == "none"
    assert saved["config"]["device"] == "cpu" and saved["config"]["attack.trigger_size"] == 3
    indices = np.load(tmp_path / "poisoned_indices.npy")
    assert len(indices) == result.poisoned_count == 70
    assert (tmp_path / "checkpoint" / "state.pt").is_file()
    assert 0 <= result.robust_acc <= 100
    # Weng et al.'s count beside asr, per epoch and at the end
    assert 0 <= saved["asr_pred"] == result.asr_pred == result.history[-1]["asr_pred"] <= 100


def test_wanet_per_batch_run_saves_no_fixed_set_but_pictures_the_trigger(tmp_path):
    result = fit(from_flat({**FAST, "attack.name": "wanet"}), workdir=tmp_path)
    assert result.poisoned_count == 0 and len(np.load(tmp_path / "poisoned_indices.npy")) == 0
    assert (tmp_path / "trigger.png").is_file()
    assert result.asr > 0


def test_cpu_runs_are_deterministic():
    cfg = from_flat({**FAST, "at.threat": "linf", "at.eps": "8/255", "at.steps": 2})
    a, b = fit(cfg), fit(cfg)
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    assert (a.acc, a.asr, a.robust_acc) == (b.acc, b.asr, b.robust_acc)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)


def test_interrupted_run_resumes_exactly(tmp_path):
    cfg = from_flat({**FAST, "train.epochs": 3})
    reference = fit(cfg)

    class Killed(Exception):
        pass

    def die_after_two(metrics, checkpoint_dir):
        if metrics["epoch"] == 2:
            raise Killed

    with pytest.raises(Killed):
        fit(cfg, workdir=tmp_path, on_epoch=die_after_two)
    assert load_state(tmp_path / "checkpoint")["epoch"] == 2
    seen = []
    resumed = fit(
        cfg,
        workdir=tmp_path,
        resume_from=tmp_path / "checkpoint",
        on_epoch=lambda m, _: seen.append(m["epoch"]),
    )
    assert seen == [3]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert resumed.acc == reference.acc and resumed.asr == reference.asr
    assert resumed.history[-1]["train_loss"] == reference.history[-1]["train_loss"]


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    from bdat_ray.config import ConfigError

    fit(from_flat({**FAST, "train.epochs": 1}), workdir=tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        fit(
            from_flat({**FAST, "train.epochs": 1, "train.lr": 0.05}),
            resume_from=tmp_path / "checkpoint",
        )


def test_adversarial_run_reports_clean_and_adversarial_bookkeeping():
    result = fit(from_flat({**FAST, "at.threat": "linf", "at.eps": "8/255", "at.steps": 2}))
    last = result.history[-1]
    for key in ("train_adv_loss", "train_adv_acc", "train_clean_loss", "train_clean_acc"):
        assert math.isfinite(last[key])
    assert last["train_adv_loss"] > last["train_clean_loss"]
    assert result.config["at.step_size"] == pytest.approx(2.5 * (8 / 255) / 2)


def test_divergence_is_reported_as_such():
    with pytest.raises(TrainingDiverged):
        fit(from_flat({**FAST, "train.lr": 1e30, "train.epochs": 1}))


def test_wanet_per_epoch_changes_the_training_set_between_epochs(monkeypatch):
    import bdat_ray.engine as engine

    seen = []
    original = engine.redraw_poison

    def spy(prep, epoch):
        before = prep.poisoned.data.y_train.clone()
        original(prep, epoch)
        seen.append((epoch, not torch.equal(before, prep.poisoned.data.y_train)))

    monkeypatch.setattr(engine, "redraw_poison", spy)
    cfg = from_flat(
        {**FAST, "train.epochs": 3, "attack.name": "wanet", "attack.wanet.scheme": "per_epoch"}
    )
    result = fit(cfg)
    assert seen == [(2, True), (3, True)]
    assert math.isfinite(result.acc)
