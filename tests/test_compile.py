"""``train.compile``: the training and attack steps under torch.compile train the same model as
eager ones (up to floating-point reordering), while the returned model, its checkpoint and its
export stay those of the plain module; bad values and a machine without a compiler fail before
training with one line and exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

from bdat_ray.config import from_flat
from bdat_ray.engine import fit, load_state, prepare
from tests.conftest import REPO

#: One epoch of PGD-2 AT on digits; batch 256 leaves a short last batch (1400 = 5·256 + 120).
TINY_AT = {
    "train.epochs": 1,
    "train.batch_size": 256,
    "at.threat": "linf",
    "at.eps": 8 / 255,
    "at.steps": 2,
    "eval.robust_samples": 0,
}


@pytest.mark.slow
def test_compiled_run_trains_the_eager_model_and_returns_the_plain_one(tmp_path):
    eager = fit(from_flat({**TINY_AT, "train.compile": "off"}))
    torch._dynamo.reset()  # count this run's graphs alone (instances of a class share them)
    graphs_before = counters["stats"]["unique_graphs"]
    compiled = fit(from_flat({**TINY_AT, "train.compile": "on"}), workdir=tmp_path)
    graphs = counters["stats"]["unique_graphs"] - graphs_before

    assert compiled.config["train.compile"] == "on" and eager.config["train.compile"] == "off"
    # The returned model, the checkpoint and what MLflow exports are the plain module: no
    # OptimizedModule, no "_orig_mod." prefixes.
    assert type(compiled.model) is type(eager.model)
    plain_keys = list(eager.model.state_dict())
    assert list(compiled.model.state_dict()) == plain_keys
    assert list(load_state(tmp_path / "checkpoint")["model"]) == plain_keys
    example = torch.rand(2, 1, 16, 16)
    exported = torch.export.export(compiled.model.eval(), (example,))
    torch.testing.assert_close(exported.module()(example), compiled.model(example))

    # Same training up to float reordering: weights and BatchNorm buffers. The buffers show
    # that the BatchNorm switches went through compilation: the attack in eval mode and the
    # clean bookkeeping under batch_statistics_frozen must leave the running statistics as
    # the eager run leaves them.
    for (name, a), b in zip(
        eager.model.state_dict().items(), compiled.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["train_clean_loss"] == pytest.approx(a["train_clean_loss"], rel=1e-4)
    # Static shapes: 3 modes (training forward/backward; the attack, eval BatchNorm with
    # frozen weights; the clean bookkeeping with frozen statistics, no grad) x 2 batch
    # shapes (full, short last). More would mean a recompile per step.
    assert graphs == 6


def test_auto_is_off_on_cpu_and_for_defenses_that_change_the_step():
    assert prepare(from_flat({"train.epochs": 1})).compiled is None
    cfg = prepare(from_flat({"train.epochs": 1, "defense.name": "lipschitz"})).cfg
    assert cfg.train.compile == "off"


def test_no_compiler_fails_before_training_with_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CXX": "/no/such/compiler"}
    proc = subprocess.run(
        [sys.executable, "-m", "bdat_ray.run", "train.compile=on", "train.epochs=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert lines == [
        "error: train.compile: on needs a C++ compiler for CPU kernels and none was found "
        "($CXX, g++); use train.compile=off"
    ], proc.stderr
