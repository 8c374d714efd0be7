"""Search spaces as data: the grammar, its validation (bad input names the file and the key,
exit 2, before anything starts), grid expansion, Optuna's define-by-run function, the Pareto
front, and every shipped space passing --dry-run. No Ray, no MLflow: these run in seconds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bdat_ray import sweep
from bdat_ray.config import ConfigError
from bdat_ray.search_space import (
    GRID,
    OptunaSpace,
    describe_trial,
    format_budget,
    load_space,
    pareto_front,
)
from tests.conftest import REPO

SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---------------------------------------------------------------------------------------------
# Grid expansion.


def test_quickstart_is_eight_grid_trials_with_conditional_budgets():
    space = load_space(REPO / "search_spaces" / "quickstart.yaml")
    assert space.mode == GRID
    points = space.grid_points()
    assert len(points) == space.trial_count == 8
    by_threat = {(p["attack.name"], p["at.threat"]): p for p in points}
    assert set(by_threat) == {
        (a, t) for a in ("badnets", "blended") for t in ("none", "linf", "spatial", "cat")
    }
    assert "at.linf.eps" not in by_threat["badnets", "none"]
    assert "at.spatial.eps" not in by_threat["badnets", "linf"]
    cat = by_threat["blended", "cat"]
    assert cat["at.linf.weight"] == 0.5 and cat["at.spatial.eps"] == 0.05
    assert all(p["data.name"] == "digits" for p in points)  # fixed keys ride along


def test_conditional_dimension_replaces_a_fixed_value_only_where_it_applies(tmp_path):
    space = load_space(
        write(
            tmp_path,
            """
            fixed: {attack.poison_rate: 0.05}
            dimensions:
              attack.name: {grid: [badnets, blended]}
              attack.poison_rate: {grid: [0.01, 0.02], when: {attack.name: badnets}}
            """,
        )
    )
    rates = sorted((p["attack.name"], p["attack.poison_rate"]) for p in space.grid_points())
    assert rates == [("badnets", 0.01), ("badnets", 0.02), ("blended", 0.05)]


def test_variants_are_a_union_of_sub_grids_and_shared_trials_run_once(tmp_path):
    space = load_space(
        write(
            tmp_path,
            """
            fixed: {train.epochs: 3}
            dimensions:
              at.threat: {grid: [none, linf]}
            variants:
              - name: base
              - name: base_again            # the same two trials: not run twice
                fixed: {train.epochs: 3}
              - name: wide
                fixed: {model.width: 2}
              - name: l2
                dimensions: {at.threat: {grid: [l2]}}
            """,
        )
    )
    points = space.grid_points()
    assert space.trial_count == len(points) == 5
    assert sorted((p["at.threat"], p.get("model.width", 1.0)) for p in points) == [
        ("l2", 1.0),
        ("linf", 1.0),
        ("linf", 2.0),
        ("none", 1.0),
        ("none", 2.0),
    ]


def test_grid_repeats_vary_the_seed():
    space = load_space(REPO / "search_spaces" / "quickstart.yaml").with_settings(num_samples=3)
    seeds = sorted(p["train.seed"] for p in space.grid_points())
    assert len(seeds) == 24 and set(seeds) == {0, 1, 2}


def test_command_line_pins_remove_a_dimension_and_conditions_follow_them():
    space = load_space(REPO / "search_spaces" / "quickstart.yaml")
    pinned = space.with_overrides({"at.threat": "spatial", "train.epochs": "1"})
    points = pinned.grid_points()
    assert len(points) == 2  # two attacks
    assert all(p["at.spatial.eps"] == 0.05 and "at.linf.eps" not in p for p in points)
    assert all(p["train.epochs"] == 1 for p in points)
    with pytest.raises(ConfigError, match=r"^at\.threat: must be one of"):
        space.with_overrides({"at.threat": "spatail"})


# ---------------------------------------------------------------------------------------------
# Optuna's define-by-run function, with a real (in-memory) study.


def test_optuna_space_draws_conditional_dimensions_only_where_they_apply(tmp_path):
    import optuna

    space = load_space(
        write(
            tmp_path,
            """
            fixed: {train.epochs: 2, at.linf.eps: "8/255"}
            dimensions:
              at.threat: {choice: [none, linf]}
              at.linf.eps: {uniform: ["2/255", "4/255"], when: {at.threat: linf}}
              train.lr: {loguniform: [0.001, 0.1]}
              at.steps: {int: [1, 2]}
            num_samples: 40
            """,
        )
    )
    assert space.mode == "optuna" and space.trial_count == 40
    sampler = OptunaSpace(space)
    study = optuna.create_study(directions=["maximize", "minimize"])
    steps = set()
    for _ in range(40):
        trial = study.ask()
        constants = sampler(trial)
        params = trial.params
        if params["at.threat"] == "linf":
            assert 2 / 255 <= params["at.linf.eps"] <= 4 / 255
            assert "at.linf.eps" not in constants  # the drawn value must win over fixed
        else:
            assert "at.linf.eps" not in params and constants["at.linf.eps"] == 8 / 255
        assert 0.001 <= params["train.lr"] <= 0.1
        steps.add(params["at.steps"])
        assert constants["train.epochs"] == 2
    assert steps == {1, 2}  # int bounds are inclusive


# ---------------------------------------------------------------------------------------------
# The Pareto front and trial descriptions.


def test_pareto_front_keeps_non_dominated_rows_only():
    rows = [
        {"acc": 90, "asr": 50},  # 0: front (best acc)
        {"acc": 80, "asr": 10},  # 1: front
        {"acc": 70, "asr": 20},  # 2: dominated by 1
        {"acc": 80, "asr": 10},  # 3: ties 1, kept
        {"acc": 95, "asr": None},  # 4: incomplete, never in the front
        {"acc": float("nan"), "asr": 0},  # 5: NaN, never in the front
        {"acc": 60, "asr": 5},  # 6: front (lowest asr)
    ]
    assert pareto_front(rows, {"acc": "max", "asr": "min"}) == [0, 1, 3, 6]
    assert pareto_front(rows, {"asr": "min"}) == [5]  # only the objectives are read


def test_registry_picks_per_attack_setting():
    from bdat_ray.sweep import registry_picks

    group = "attack.name=badnets, attack.poison_rate=0.05"
    front = [
        {"group": group, "run_id": "a", "acc": 95.0, "asr": 100.0},
        {"group": group, "run_id": "b", "acc": 90.0, "asr": 18.0},  # best acc with asr ≤ 20
        {"group": group, "run_id": "c", "acc": 80.0, "asr": 4.0},  # lowest asr
        {"group": "attack.name=blended", "run_id": "d", "acc": 94.0, "asr": 60.0},
    ]
    assert registry_picks(front) == {
        "lowest-asr-badnets_0_05": "c",
        "best-acc-asr-le-20-badnets_0_05": "b",
        "lowest-asr-blended": "d",  # nothing under 20 %: no second alias
    }
    single = [{"group": "", "run_id": "x", "acc": 90.0, "asr": 10.0}]
    assert registry_picks(single, asr_cap=5) == {"lowest-asr": "x"}


def test_describe_trial_shows_resolved_budgets():
    assert describe_trial({"at.threat": "linf", "at.eps": "8/255"})["budgets"] == "8/255"
    cat = describe_trial({"at.threat": "cat"})
    assert cat["budgets"] == "linf 2/255 ×0.50 + spatial 0.025 ×0.50"
    assert describe_trial({})["threat"] == "none"
    assert format_budget("spatial", 0.2) == "0.2"  # grid units are never shown as /255
    assert format_budget("linf", None) == "default"


# ---------------------------------------------------------------------------------------------
# Bad space files: one line naming the file and the key, exit 2, nothing started.

BAD_SPACES = [
    ("fixed: {at.epsilon: 0.1}", "fixed.at.epsilon", "unknown key"),
    ("fixed: {attack.poison_rate: 1.5}", "fixed.attack.poison_rate", "must be in [0, 1]"),
    ("dimensions: {at.eps: {uniform: [0.1, 0.01]}}\nnum_samples: 2", "dimensions.at.eps", "low"),
    ("dimensions: {at.eps: {uniform: [-1, 0.1]}}\nnum_samples: 2", "dimensions.at.eps", "≥ 0"),
    ("dimensions: {train.lr: {loguniform: [0, 0.1]}}\nnum_samples: 2", "train.lr", "> 0"),
    ("dimensions: {at.steps: {uniform: [1, 5]}}\nnum_samples: 2", "dimensions.at.steps", "int"),
    ("dimensions: {at.threat: {grid: [linf, spatail]}}", "dimensions.at.threat", "spatial"),
    ("dimensions: {at.threat: {gird: [linf]}}", "dimensions.at.threat", "exactly one of"),
    ("dimensions: {at.treat: {grid: [linf]}}", "dimensions.at.treat", "did you mean at.threat"),
    (
        "dimensions:\n  at.eps: {grid: [0.1], when: {at.threat: [linf]}}\n"
        "  at.threat: {grid: [none, linf]}",
        "dimensions.at.eps.when.at.threat",
        "declared earlier",
    ),
    (
        "dimensions:\n  at.threat: {grid: [none, linf]}\n"
        "  at.eps: {grid: [0.1], when: {at.threat: [l2]}}",
        "dimensions.at.eps.when.at.threat",
        "never drawn",
    ),
    (
        "dimensions:\n  at.threat: {grid: [none, linf]}\n  train.lr: {uniform: [0.01, 0.1]}",
        "dimensions.at.threat",
        "mixed",
    ),
    ("dimensions: {train.lr: {uniform: [0.01, 0.1]}}", "num_samples", "needs num_samples"),
    ("objectives: {accuracy: max}", "objectives.accuracy", "unknown metric"),
    ("objectives: {acc: up}", "objectives.acc", "max or min"),
    ("resources: {gpu: 1.5}", "resources.gpu", "whole number"),
    ("resources: {cpu: 0}", "resources.cpu", "> 0"),
    ("max_concurrent: 0", "max_concurrent", "≥ 1"),
    ("fuse: 0", "fuse", "≥ 1"),
    (  # Optuna points fused into one network may not differ in the threat kind ...
        "dimensions: {at.threat: {choice: [none, linf]}}\nnum_samples: 4\nfuse: 2",
        "dimensions.at.threat",
        "share one network",
    ),
    (  # ... nor in PGD's steps, and defenses are never fused
        "dimensions: {train.lr: {uniform: [0.01, 0.1]}, at.steps: {int: [1, 10]}}\n"
        "fixed: {at.threat: linf}\nnum_samples: 4\nfuse: 2",
        "dimensions.at.steps",
        "share one network",
    ),
    (
        "dimensions: {train.lr: {uniform: [0.01, 0.1]}}\nfixed: {defense.name: nad}\n"
        "num_samples: 4\nfuse: 2",
        "fuse",
        "defense.name",
    ),
    ("fuse: 2\nearly_stopping: {metric: acc, grace_period: 1}", "fuse", "stops whole Ray trials"),
    ("searcher: tpe", "searcher", "unknown section"),
    ("early_stopping: {metric: acc, grace_period: 0}", "early_stopping.grace_period", "≥ 1"),
    # cross-key validation of the trials the space will run (from_flat on each grid point)
    (
        "dimensions: {at.threat: {grid: [linf, cat]}}\nfixed: {at.eps: 0.1}",
        "at.eps",
        "for at.threat=cat",
    ),
    ("variants:\n  - name: a\n  - name: a", "variants[1].name", "unique"),
    ("variants:\n  - name: a\n    fixed: {at.mix: avg}", "variants[0].fixed.at.mix", "sum"),
    ("fixed: {train.epochs: 2}\ndimensions: {train.epochs: {grid: [3]}}", "train.epochs", "fixed"),
    ("- just\n- a list", "space.yaml", "mapping of sections"),
    ("fixed: {at.eps: [1, 2", "space.yaml", "not valid YAML"),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD_SPACES)
def test_bad_space_file_exits_2_naming_file_and_key(tmp_path, capsys, text, key, message):
    path = write(tmp_path, text + "\n")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["--space", str(path), "--dry-run"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: {path}") and key in err and message in err, err


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["--space", "/nonexistent.yaml"], "--space"),
        (["at.threat=spatail"], "at.threat"),
        (["--num-samples", "0"], "--num-samples"),
        (["--fuse", "0"], "--fuse"),
        (["--gpus-per-trial", "-1"], "--gpus-per-trial"),
        (["--name", "../x"], "--name"),
        (["--mlflow-uri", "./mlruns"], "--mlflow-uri"),
        (["--resume", "--storage", "/nonexistent"], "--resume"),
        (["--resume", "train.epochs=1"], "--resume"),
        (["--storage", "foo://bucket/x"], "--storage"),  # no such file system
        (["--storage", "s3://bucket/x?endpoint_override=h"], "--storage"),  # keys go in AWS_*
    ],
)
def test_bad_command_line_exits_2(capsys, argv, key):
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([*argv, "--dry-run"] if "--mlflow-uri" not in argv else argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and key in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_space_passes_dry_run(path, capsys):
    assert sweep.main(["--space", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    count = load_space(path).trial_count
    assert f"{count} trials" in out and "CPU" in out


@pytest.mark.parametrize(
    ("stem", "defenses"),
    [
        ("cat_table2", ["fine_pruning", "nad", "dpsgd", "abl"]),
        ("cat_table3", ["fine_pruning", "nad", "dpsgd", "abl"]),
        (
            "weng_tradeoff",
            ["lipschitz", "denoise", "spectral", "activation_clustering", "neural_cleanse"],
        ),
    ],
)
def test_paper_spaces_plan_their_baseline_defense_columns(stem, defenses, capsys):
    """The defense columns of CAT Tables 2/3 and Weng Tables 1/9 are trials of the grid, and
    the dry run names each trial's defense."""
    space = load_space(REPO / "search_spaces" / f"{stem}.yaml")
    planned = {p.get("defense.name", "none") for p in space.grid_points()}
    assert set(defenses) <= planned
    sweep.main(["--space", str(REPO / "search_spaces" / f"{stem}.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    for name in defenses:
        assert f"defense {name}" in out, name
    if stem.startswith("cat_table"):  # FP's ratio is swept 5%..95% as in the paper
        ratios = {
            p["defense.fine_pruning.ratio"]
            for p in space.grid_points()
            if p.get("defense.name") == "fine_pruning"
        }
        assert ratios == {round(0.05 * k, 2) for k in range(1, 20)}


def test_shipped_spaces_are_the_ones_the_issue_asks_for():
    assert {p.stem for p in SHIPPED} >= {
        "quickstart",
        "cat_fig2",
        "cat_table2",
        "cat_table3",
        "weng_tradeoff",
        "composite_pareto",
        "cat_table1",
    }
    assert load_space(REPO / "search_spaces" / "composite_pareto.yaml").mode == "optuna"


def test_composite_weights_are_searched_only_where_the_mix_reads_them():
    """mix=max takes the hardest threat per sample and ignores the weights."""
    import yaml

    space = yaml.safe_load((REPO / "search_spaces" / "composite_pareto.yaml").read_text())
    weights = {k: v for k, v in space["dimensions"].items() if k.endswith(".weight")}
    assert weights and all(set(v["when"]["at.mix"]) == {"sum", "random"} for v in weights.values())


def test_cat_spaces_use_the_papers_resnet18():
    import yaml

    for name in ("cat_fig2", "cat_table1", "cat_table2", "composite_pareto"):
        space = yaml.safe_load((REPO / "search_spaces" / f"{name}.yaml").read_text())
        assert space["fixed"]["model.name"] == "resnet18", name


def test_dry_run_without_arguments_plans_the_quickstart_and_starts_nothing():
    proc = subprocess.run(
        [sys.executable, "-m", "bdat_ray.sweep", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "quickstart.yaml" in proc.stdout and "8 trials" in proc.stdout
    assert "grid search" in proc.stdout and "no Optuna" in proc.stdout
