"""benchmarks/early_stopping.py: trainings in parallel are the trainings one at a time, and the
rank agreement it reports is Kendall's tau of a rung's ranking against the final one."""

import math

import pytest

from benchmarks.early_stopping import main, rank_agreement, train_in_process

SPACE = """
fixed:
  data.name: digits
  data.image_size: 8
  model.name: small_cnn
  train.epochs: 2
  train.augment: none
  attack.name: badnets
  eval.robust_samples: 0
dimensions:
  train.lr: {grid: [0.1, 0.02, 0.05]}
objectives: {acc: max, asr: min}
"""


def trial(epochs: list[tuple[float, float]]) -> dict:
    records = [{"epoch": e, "acc": a, "asr": s} for e, (a, s) in enumerate(epochs, 1)]
    return {"epochs": records, "acc": epochs[-1][0], "asr": epochs[-1][1]}


def test_rank_agreement_is_kendalls_tau_against_the_final_results():
    # acc: epoch 1 ranks the trials in reverse of their end, epoch 2 gets one pair of three
    # right, epoch 3 is the end; asr: equal for all at epoch 1.
    trials = [
        trial([(10, 50), (60, 40), (90, 10)]),
        trial([(20, 50), (80, 20), (80, 20)]),
        trial([(30, 50), (70, 30), (70, 30)]),
    ]
    rows = rank_agreement(trials, 3)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert rows[0][1] == pytest.approx(-1.0) and math.isnan(rows[0][2])
    assert rows[1][1] == pytest.approx(-1.0 / 3.0)  # two of three pairs discordant
    assert rows[2][1] == pytest.approx(1.0) and rows[2][2] == pytest.approx(1.0)


@pytest.mark.slow
def test_trainings_in_parallel_equal_the_same_trainings_one_at_a_time(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    alone = train_in_process(space, tmp_path / "alone.jsonl", jobs=1)
    together = train_in_process(space, tmp_path / "together.jsonl", jobs=2)
    assert [t["trial"] for t in together] == ["00000", "00001", "00002"]  # grid order
    for one, other in zip(alone, together, strict=True):
        assert one["point"] == other["point"]
        assert [(e["acc"], e["asr"]) for e in one["epochs"]] == [
            (e["acc"], e["asr"]) for e in other["epochs"]
        ]
    # A rerun trains nothing more: every trial is read back from the file.
    assert train_in_process(space, tmp_path / "together.jsonl", jobs=2) == together


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--space", "no-such-space.yaml"], "--space: no such file"),
        (["--rules", "3:1"], "--rules: takes GRACE:FACTOR"),
        (["--rules", "0:3"], "--rules: takes GRACE:FACTOR"),
        (["--rules", "three"], "--rules: takes GRACE:FACTOR"),
        (["--jobs", "0"], "--jobs: takes an integer >= 1"),
    ],
)
def test_bad_input_exits_2_with_the_argument_named(argv, says, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    assert says in capsys.readouterr().err
