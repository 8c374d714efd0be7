"""The CUDA path: bf16 autocast, channels_last, device-resident data and generators.
Marked ``gpu``: skipped (with the reason) on machines without CUDA, such as CI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from bdat_ray.config import from_flat
from bdat_ray.data.augment import to_float
from bdat_ray.threats import THREATS, perturb

pytestmark = pytest.mark.gpu


def test_engine_runs_on_cuda_with_bf16_and_channels_last():
    from bdat_ray.engine import fit, prepare

    cfg = from_flat(
        {
            "device": "cuda",
            "train.epochs": 2,
            "at.threat": "cat",
            "at.steps": 2,
            "eval.robust_samples": 128,
        }
    )
    prep = prepare(cfg)
    assert prep.amp_dtype == torch.bfloat16 and prep.channels_last
    assert prep.poisoned.data.x_train.is_cuda
    result = fit(cfg)
    assert result.config["train.amp"] == "bf16" and result.device.startswith("cuda")
    assert math.isfinite(result.acc) and math.isfinite(result.asr)


@pytest.mark.parametrize("name", sorted(THREATS))
def test_threats_stay_inside_under_bf16(name, digits):
    from tests.conftest import small_model

    model = small_model(digits).cuda().eval()
    x = to_float(digits.x_test[:64].cuda(), True)
    y = digits.y_test[:64].cuda()
    threat = THREATS[name](THREATS[name].default_eps, steps=5)
    gen = torch.Generator("cuda").manual_seed(0)
    x_adv = perturb(model, x, y, threat, generator=gen, amp_dtype=torch.bfloat16)
    assert threat.contains(x, x_adv, atol=1e-3, model=model).all()
    assert all(p.grad is None for p in model.parameters())


def test_bench_is_faster_than_the_naive_pipeline_on_cuda(cifar_subset):
    from tests.conftest import SHARED_DATA

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdat_ray.bench",
            "data.name=npz",
            f"data.path={SHARED_DATA / 'cifar10-subset.npz'}",
            "model.name=preact_resnet18",
            "--iters",
            "20",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["clean_speedup"] > 1 and summary["pgd10_at_speedup"] > 1
