"""The command-line contract: bad input exits 2 with one line naming the key, before any
training; a good run prints the result JSON as its last stdout line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bdat_ray import run

BAD_INPUT = [
    (["at.epsilon=0.1"], "at.epsilon"),
    (["train.epochs=many"], "train.epochs"),
    (["attack.poison_rate=1.5"], "attack.poison_rate"),
    (["attack.poison_rate=-0.1"], "attack.poison_rate"),
    (["attack.target=10"], "attack.target"),
    (["at.threat=linf", "at.eps=-8/255"], "at.eps"),
    (["attack.trigger_size=17"], "attack.trigger_size"),
    (["data.name=npz"], "data.path"),
    (["data.name=npz", "data.path=/nonexistent/x.npz"], "data.path"),
    (["data.name=cifar10", "data.path=/nonexistent"], "data.path"),
    (["--config", "/nonexistent.yaml"], "--config"),
    (["--resume"], "--resume"),
    (["--bogus-flag"], "unrecognized"),
]


@pytest.mark.parametrize(("argv", "key"), BAD_INPUT)
def test_bad_input_exits_2_with_one_line(argv, key, capsys, monkeypatch):
    import bdat_ray.engine as engine

    def never(*a, **k):
        raise AssertionError("training started on bad input")

    monkeypatch.setattr(engine, "train_epoch", never)
    with pytest.raises(SystemExit) as exit_info:
        run.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err
    assert len(err.splitlines()) == 1


def test_bad_input_subprocess_has_no_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "bdat_ray.run", "attack.target=12"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: attack.target: must be in [0, 9] for digits; got 12"
    ]


def test_help_lists_keys_with_defaults():
    proc = subprocess.run(
        [sys.executable, "-m", "bdat_ray.run", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "at.eps=none" in proc.stdout and "attack.target=2" in proc.stdout


def test_run_prints_result_json_last(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bdat_ray.run",
            "train.epochs=1",
            "eval.robust_samples=32",
            "--quiet",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(last) >= {"acc", "asr", "robust_acc", "seconds", "config"}
    assert json.loads(out.read_text())["acc"] == last["acc"]
