"""``train.compile``: the training and attack steps under torch.compile train the same model as
eager ones (up to floating-point reordering), while the returned model, its checkpoint and its
export stay those of the plain module; bad values and a machine without a compiler fail before
training with one line and exit code 2."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from bdat_ray.config import from_flat
from bdat_ray.data.augment import to_float
from bdat_ray.engine import clean_batch_stats, fit, load_state, prepare
from bdat_ray.threats.attack import attack_mode
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
    # The epoch's losses (adversarial, and the clean bookkeeping under frozen statistics).
    # Weights are not compared after whole steps: PGD's sign step turns a reordered last bit
    # of a gradient into a different adversarial pixel, which lr 0.1 then amplifies (about 1%
    # of the weights after these 6 steps); `test_one_compiled_step_equals_the_eager_step`
    # compares one step where that cannot happen yet.
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
        assert b["train_clean_loss"] == pytest.approx(a["train_clean_loss"], rel=1e-3)
    # Static shapes: 3 modes (training forward/backward; the attack, eval BatchNorm with
    # frozen weights; the clean bookkeeping with frozen statistics, no grad) x 2 batch
    # shapes (full, short last). More would mean a recompile per step.
    assert graphs == 6


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


@pytest.mark.slow
def test_one_compiled_step_equals_the_eager_step():
    """One PGD-2 AT step on the compiled model and on an eager twin with the same weights:
    the attack's input gradient (eval BatchNorm, frozen weights), the training loss, the
    clean bookkeeping under `batch_statistics_frozen` and the BatchNorm buffers agree to float
    reordering, so every mode switch reached the compiled graphs. Tolerances as measured on
    CPU (torch 2.15): the input gradient differs by 4e-7 (relative), so the sign step flips 3
    of 65 536 pixels; those 3 pixels move the first layer's weight gradient by 0.8 %."""
    prep = prepare(from_flat({**TINY_AT, "train.compile": "on"}))
    eager = replace(prep, model=copy.deepcopy(prep.model), compiled=None)
    x = to_float(prep.poisoned.data.x_train[:256], channels_last=False)
    y = prep.poisoned.data.y_train[:256]
    outcomes = []
    for run in (eager, prep):
        with attack_mode(run.model, "eval"):
            x_in = x.clone().requires_grad_(True)
            loss = F.cross_entropy(run.step_model(x_in), y, reduction="sum")
            (input_grad,) = torch.autograd.grad(loss, x_in)
        run.model.train()
        out = run.objective.batch_loss(run.step_model, x, y, torch.Generator().manual_seed(0))
        out.loss.backward()
        clean_loss, _ = clean_batch_stats(run, x, y)
        grads = {n: p.grad for n, p in run.model.named_parameters()}
        outcomes.append((input_grad, out.loss.detach(), clean_loss, grads, run.model.state_dict()))
    (input_e, loss_e, clean_e, grads_e, state_e) = outcomes[0]
    (input_c, loss_c, clean_c, grads_c, state_c) = outcomes[1]
    assert _relative(input_c, input_e) < 1e-5
    assert _relative(loss_c, loss_e) < 1e-4 and _relative(clean_c, clean_e) < 1e-4
    for name, grad in grads_e.items():
        assert _relative(grads_c[name], grad) < 5e-2, name
    for name, value in state_e.items():
        assert _relative(state_c[name], value) < 1e-4, name
    # one update of the running statistics (the training forward): the attack steps (eval
    # mode) and the clean bookkeeping (frozen) added none
    counts = [int(v) for k, v in state_c.items() if k.endswith("num_batches_tracked")]
    assert counts and all(c == 1 for c in counts), state_c


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
