"""The analysis module: hypervolume and table rules on small hand-computed cases, then the
report end to end on a real sweep (real Ray, real MLflow store): every file within 30 s, the
front it draws equals the non-dominated set computed here from the MLflow runs, the page
renders in headless Chromium with every image loaded, and bad input exits 2 with one line.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from analysis import dominated_volume, hypervolume, hypervolume_curve, pareto_front
from analysis.tables import (
    BEST,
    SECOND,
    adaptive_table,
    cat_table,
    tables,
    to_html,
    to_markdown,
    weng_table,
)

# ---------------------------------------------------------------------------------------------
# Hypervolume: areas and volumes worked out by hand.


@pytest.mark.parametrize(
    ("points", "reference", "volume"),
    [
        ([], [1, 1], 0.0),
        ([(0.2, 0.5)], [1, 1], 0.8 * 0.5),
        # two boxes 0.8×0.4 and 0.5×0.7 overlapping in 0.5×0.4
        ([(0.2, 0.6), (0.5, 0.3)], [1, 1], 0.32 + 0.35 - 0.20),
        ([(0.2, 0.6), (0.5, 0.3), (0.6, 0.7)], [1, 1], 0.47),  # a dominated point adds nothing
        ([(0.2, 0.6), (1.2, 0.1), (0.5, 1.0)], [1, 1], 0.32),  # on or past the reference: 0
        ([(0.3,)], [1], 0.7),
        ([(0.5, 0.5, 0.5)], [1, 1, 1], 0.125),
        ([(0.5, 0, 0), (0, 0.5, 0)], [1, 1, 1], 0.5 + 0.5 - 0.25),
    ],
)
def test_dominated_volume_matches_hand_computed_cases(points, reference, volume):
    assert dominated_volume(points, reference) == pytest.approx(volume)


_ids = itertools.count()


def trial(
    setting: str = "badnets",
    threat: str = "none",
    budgets: str = "-",
    *,
    acc: float = 90.0,
    asr: float = 50.0,
    robust_acc: float = math.nan,
    seed: int = 0,
    outcome: str = "finished",
    variant: str = "",
    end: int = 0,
) -> dict:
    """One row as `analysis.load_sweep` returns it (the columns the rules read)."""
    return {
        "run_id": f"run{next(_ids)}",
        "outcome": outcome,
        "group": f"attack.name={setting.split(',')[0]}",
        "setting": setting,
        "variant": variant,
        "threat": threat,
        "budgets": budgets,
        "train.seed": seed,
        "attack.name": setting.split(",")[0].split(" ")[0],
        "acc": acc,
        "asr": asr,
        "robust_acc": robust_acc,
        "end": pd.Timestamp(end, unit="s"),
    }


def test_hypervolume_is_normalised_against_acc_0_asr_100():
    trials = pd.DataFrame(
        [
            trial(acc=90, asr=10),  # dominates (1 - 0.1) × (1 - 0.1) of the unit square
            trial(acc=95, asr=100),  # on the reference's ASR: adds nothing
            trial(acc=99, asr=1, outcome="early_stopped"),  # partial result: never counts
            trial(acc=math.nan, asr=math.nan, outcome="failed"),
        ]
    )
    assert hypervolume(trials) == pytest.approx(0.81)
    assert hypervolume(trials, {"acc": "max"}) == pytest.approx(0.95)  # 1-D: the best acc
    with pytest.raises(ValueError, match="percent"):
        hypervolume(trials, {"seconds": "min"})


def test_hypervolume_curve_follows_finish_order_per_group():
    trials = pd.DataFrame(
        [
            trial("badnets", acc=80, asr=50, end=1),
            trial("blended", acc=90, asr=0, end=2),
            trial("badnets", acc=90, asr=0, end=3),
            trial("badnets", acc=99, asr=0, end=4, outcome="failed"),
        ]
    )
    curve = hypervolume_curve(trials)
    badnets = curve[curve["group"] == "attack.name=badnets"]["hypervolume"].tolist()
    blended = curve[curve["group"] == "attack.name=blended"]["hypervolume"].tolist()
    assert curve["finished"].tolist() == [1, 2, 2, 3, 3]  # blended from its first trial on
    assert badnets == pytest.approx([0.4, 0.4, 0.9])
    assert blended == pytest.approx([0.9, 0.9])


def test_pareto_front_is_one_front_per_group_of_finished_trials():
    rows = [
        trial("badnets", acc=95, asr=100),
        trial("badnets", "linf", "8/255", acc=90, asr=20),
        trial("badnets", "spatial", "0.05", acc=85, asr=30),  # dominated by linf
        trial("badnets", "linf", "16/255", acc=99, asr=0, outcome="early_stopped"),
        trial("blended", acc=80, asr=100),  # dominated only by badnets trials: another group
        trial("blended", "linf", "8/255", acc=70, asr=100),
    ]
    front = pareto_front(pd.DataFrame(rows))
    assert front["run_id"].tolist() == [rows[i]["run_id"] for i in (0, 1, 4)]


# ---------------------------------------------------------------------------------------------
# Tables: the CAT paper's marks, mean ± std over seeds, Weng's layout.


def test_cat_table_marks_lowest_asr_bold_and_second_lowest_underlined():
    trials = pd.DataFrame(
        [
            trial("badnets", acc=95, asr=100),
            trial("badnets", "linf", "8/255", acc=90, asr=20),
            trial("badnets", "spatial", "0.05", acc=85, asr=5),
            trial("badnets", "cat", "linf 2/255 ×0.50 + spatial 0.025 ×0.50", acc=88, asr=3),
            trial("blended", acc=94, asr=99),
            trial("blended", "linf", "8/255", acc=91, asr=30.04),
            trial("blended", "spatial", "0.05", acc=86, asr=30.01),  # shows as 30.0 too: a tie
            # two defenses only: the lowest is marked, no second
            trial("wanet", acc=93, asr=90),
            trial("wanet", "linf", "8/255", acc=89, asr=10),
        ]
    )
    table = cat_table(trials)
    cat = "cat (linf 2/255 ×0.50 + spatial 0.025 ×0.50)"
    assert table.columns == ["no defense", "linf 8/255", "spatial 0.05", cat]
    assert table.rows == ["badnets", "blended", "wanet", "Average"]
    assert table.marks == {
        ("badnets", cat): BEST,
        ("badnets", "spatial 0.05"): SECOND,
        ("blended", "linf 8/255"): BEST,
        ("blended", "spatial 0.05"): BEST,
        ("blended", "no defense"): SECOND,
        ("wanet", "linf 8/255"): BEST,
        # Average over the three attack rows, for the columns all three have
        ("Average", "linf 8/255"): BEST,  # two cells: no second
    }
    assert table.cells["Average", "linf 8/255"].mean["asr"] == pytest.approx(20.0133, abs=1e-3)
    assert ("Average", "spatial 0.05") not in table.cells  # wanet has no spatial cell
    markdown = to_markdown(table)
    assert "| badnets | 95.0 / 100.0 | 90.0 / 20.0 | 85.0 / <ins>5.0</ins> | 88.0 / **3.0** |" in (
        markdown
    )
    assert "| wanet | 93.0 / 90.0 | 89.0 / **10.0** | — | — |" in markdown
    page = to_html(table)
    assert "<td><strong>3.0</strong></td>" in page and "<td><u>5.0</u></td>" in page


def test_a_table_wider_than_a_page_is_written_transposed():
    # An Optuna sweep over budgets: every trial is a defense of its own.
    budgets = [f"{k}/255" for k in range(1, 13)]
    trials = pd.DataFrame(
        [trial("badnets", acc=95, asr=100)]
        + [trial("badnets", "linf", b, acc=90 - i, asr=50 - 4 * i) for i, b in enumerate(budgets)]
    )
    table = cat_table(trials)
    assert len(table.columns) == 13 and table.transposed
    lines = to_markdown(table).splitlines()
    assert lines[2] == "| Defense (cells: ACC / ASR) | badnets |"
    assert lines[4] == "| no defense | 95.0 / 100.0 |"
    assert lines[-4:-2] == [
        "| linf 11/255 | 80.0 / <ins>10.0</ins> |",
        "| linf 12/255 | 79.0 / **6.0** |",
    ]
    assert "<th>linf 12/255</th><td>79.0</td><td><strong>6.0</strong></td>" in to_html(table)


def test_cells_are_mean_and_sample_std_over_seeds():
    trials = pd.DataFrame(
        [
            trial("badnets", acc=90, asr=10, seed=0),
            trial("badnets", acc=92, asr=30, seed=1),
            trial("badnets", acc=94, asr=20, seed=2),
            trial("badnets", "linf", "8/255", acc=80, asr=1, seed=0),
            trial("badnets", acc=10, asr=0, seed=3, outcome="failed"),  # not averaged in
        ]
    )
    table = cat_table(trials)
    cell = table.cells["badnets", "no defense"]
    assert cell.n == 3
    assert cell.text("acc") == "92.0 ± 2.0" and cell.text("asr") == "20.0 ± 10.0"
    assert table.cells["badnets", "linf 8/255"].text("asr") == "1.0"  # one seed: no ±
    assert "mean ± std over 3 seeds" in table.note


def test_seed_summary_front_is_drawn_from_the_means(tmp_path):
    from analysis.seeds import has_repeats, seed_pareto_plot, seed_summary

    rows = [
        # no AT: 95 ± 1 acc, 100 ± 0 asr over three seeds
        *(trial("badnets", acc=a, asr=100, seed=s) for s, a in enumerate((94, 95, 96))),
        # linf: one lucky seed (asr 2) that alone would dominate spatial; its mean does not
        *(
            trial("badnets", "linf", "8/255", acc=90, asr=r, seed=s)
            for s, r in enumerate((2, 60, 70))
        ),
        *(
            trial("badnets", "spatial", "0.05", acc=91, asr=r, seed=s)
            for s, r in enumerate((30, 31, 32))
        ),
        trial("badnets", "spatial", "0.05", acc=0, asr=0, seed=3, outcome="failed"),
    ]
    trials = pd.DataFrame(rows)
    assert has_repeats(trials) and not has_repeats(trials.iloc[[0, 3]])
    summary = seed_summary(trials, {"acc": "max", "asr": "min"}).set_index("threat")
    assert summary["n"].to_dict() == {"none": 3, "linf": 3, "spatial": 3}  # failed: not a seed
    assert summary.loc["none", "acc_mean"] == pytest.approx(95.0)
    assert summary.loc["none", "acc_std"] == pytest.approx(1.0)
    assert summary.loc["linf", "asr_mean"] == pytest.approx(44.0)
    # sample std: sqrt((42² + 16² + 26²) / 2) = sqrt(1348)
    assert summary.loc["linf", "asr_std"] == pytest.approx(1348**0.5)
    assert summary["front"].to_dict() == {"none": True, "linf": False, "spatial": True}
    assert seed_pareto_plot(trials, {"acc": "max", "asr": "min"}, tmp_path / "s.png", "t") == 2
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_repeated_cells_show_their_count():
    trials = pd.DataFrame(
        [
            trial("badnets", acc=90, asr=10, seed=0),
            trial("badnets", acc=92, asr=30, seed=1),
            trial("badnets", "linf", "8/255", acc=80, asr=1, seed=0),
        ]
    )
    table = cat_table(trials)
    markdown = to_markdown(table)
    assert "| badnets | 91.0 ± 1.4 / 20.0 ± 14.1 (n=2) | 80.0 / **1.0** (n=1) |" in markdown
    assert "<td>20.0 ± 14.1<small> (n=2)</small></td>" in to_html(table)
    single = cat_table(trials.iloc[[0, 2]])
    assert "(n=" not in to_markdown(single)  # one seed everywhere: no counts


def test_weng_layout_only_for_weng_triggers():
    trials = pd.DataFrame(
        [
            trial("sticker", acc=90, asr=64, robust_acc=0),
            trial("sticker", "linf", "8/255", acc=79, asr=99.9, robust_acc=48.9),
            trial(
                "sticker", "linf", "8/255", acc=76, asr=100, robust_acc=43, variant="at.steps=10"
            ),
            trial("sticker, trigger_size=1", acc=91, asr=10, robust_acc=0),
        ]
    )
    table = weng_table(trials)
    assert table.columns == ["standard training", "adversarial training: linf 8/255"]
    assert table.rows == ["sticker", "sticker, at.steps=10", "sticker, trigger_size=1"]
    assert table.metrics == ("acc", "robust_acc", "asr") and not table.marks
    markdown = to_markdown(table)
    assert "| Trigger setting (cells: ACC / robust acc / ASR) | standard training |" in markdown
    assert "| sticker | 90.0 / 0.0 / 64.0 | 79.0 / 48.9 / 99.9 |" in markdown
    assert "| sticker, at.steps=10 | — | 76.0 / 43.0 / 100.0 |" in markdown
    assert [t.title for t in tables(trials)][1] == table.title
    other = pd.DataFrame([trial("badnets"), trial("blended", "linf", "8/255")])
    assert len(tables(other)) == 1


def test_adaptive_attack_in_table4_layout():
    def adaptive(delta, threat="none", budgets="-", budget=0.0, **kw):
        row = trial("adaptive", threat, budgets, **kw)
        return {**row, "attack.adaptive.delta_max": delta, "budget": budget}

    trials = pd.DataFrame(
        [
            adaptive(16 / 255, "linf", "8/255", 8 / 255, acc=84.8, asr=2.5),
            adaptive(16 / 255, acc=94.5, asr=48.7),
            adaptive(8 / 255, acc=93.9, asr=25.1),
            adaptive(8 / 255, "linf", "8/255", 8 / 255, acc=84.7, asr=2.7),
        ]
    )
    table = tables(trials)[-1]
    assert table.title == adaptive_table(trials).title
    assert table.rows == [
        "Adaptive attack (δ_max = 8/255, ε = 0)",
        "Adaptive attack (δ_max = 16/255, ε = 0)",
        "Adaptive attack (δ_max = 8/255, ε = linf 8/255)",
        "Adaptive attack (δ_max = 16/255, ε = linf 8/255)",
    ]
    markdown = to_markdown(table)
    assert "| Adaptive attack (δ_max = 16/255, ε = 0) | 94.5 / 48.7 |" in markdown
    assert len(tables(pd.DataFrame([trial("badnets")]))) == 1


# ---------------------------------------------------------------------------------------------
# End to end on a real sweep.

SPACE = """
fixed:
  train.epochs: 2
  at.steps: 1
  eval.robust_samples: 64
  eval.steps: 2
dimensions:
  attack.name: {grid: [badnets, sticker]}
  at.threat: {grid: [none, linf]}
  at.linf.eps: {grid: ["8/255", "16/255"], when: {at.threat: [linf]}}
variants:
  - name: base
  - name: second_seed            # BadNets without AT gets two seeds: mean ± std
    fixed: {train.seed: 1, attack.name: badnets, at.threat: none}
  - name: diverges               # lr 1e30: NaN within epoch 1, a failed run
    fixed: {train.lr: 1e30, attack.name: badnets, at.threat: none}
max_concurrent: 2
"""
FILES = [
    "pareto.png",
    "pareto_seeds.png",  # BadNets without AT ran with two seeds
    "seeds.csv",
    "hypervolume.png",
    "budget_curves.png",
    "table.md",
    "table.csv",
    "trials.csv",
    "index.html",
]
REPORT_LIMIT_S = 30  # the bound for a report after the quickstart
CHROMIUM = Path("/usr/bin/chromium")


def clean_env() -> dict[str, str]:
    """This environment without a tracking URI: each command here names its store."""
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def report_cli(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "analysis.report", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    return proc, time.perf_counter() - started


def sweep_cli(space: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m bdat_ray.sweep --space SPACE`` in ``cwd`` (its default store), which must
    succeed."""
    sweep = subprocess.run(
        [sys.executable, "-m", "bdat_ray.sweep", "--space", space, "--storage", "results"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        env=clean_env(),
    )
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr[-3000:]
    return sweep


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A real 8-trial sweep (7 finish, 1 diverges) into ``work/mlflow.db`` — the default
    store of a command run in ``work`` — and the report of it, run with no arguments."""
    work = tmp_path_factory.mktemp("analysis")
    (work / "tiny.yaml").write_text(textwrap.dedent(SPACE))
    sweep_cli("tiny.yaml", work)
    report, seconds = report_cli([], work)
    (out,) = (work / "reports").iterdir()
    return {
        "work": work,
        "uri": f"sqlite:///{work / 'mlflow.db'}",
        "report": report,
        "seconds": seconds,
        "out": out,
    }


@pytest.mark.slow
@pytest.mark.sweep
def test_report_writes_every_file_within_30_s(swept):
    report = swept["report"]
    assert report.returncode == 0, report.stderr
    assert swept["seconds"] <= REPORT_LIMIT_S, f"report took {swept['seconds']:.1f} s"
    out = swept["out"]
    assert out.name.startswith("tiny-")  # the latest (only) sweep, named by its id
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
        assert f"reports/{out.name}/{name}" in report.stdout  # relative to where it ran
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"^took\s+\d+\.\d s$", report.stdout, re.M)
    assert "7 finished, 1 failed of 8 trials" in report.stdout
    table = (out / "table.md").read_text()
    assert "Weng et al." in table  # sticker is one of Weng's triggers
    assert "mean ± std over 2 seeds" in table and " ± " in table


def independent_front(uri: str, experiment: str) -> set[str]:
    """Run ids on the front, from the MLflow runs with plain Python: per combination of the
    attack/data params that differ between the sweep's trials, the finished trials that no
    other finished trial of the combination beats in acc (higher) and asr (lower)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id], "tags.`bdat_ray.role` = 'trial'", max_results=1000
    )
    keys = {k for r in runs for k in r.data.params if k.startswith(("attack.", "data."))}
    varying = sorted(k for k in keys if len({r.data.params.get(k) for r in runs}) > 1)
    done = [r for r in runs if r.data.tags["bdat_ray.outcome"] == "finished"]

    def group(run):
        return tuple(run.data.params.get(k) for k in varying)

    def beats(a, b):
        (acc_a, asr_a), (acc_b, asr_b) = (
            (r.data.metrics["acc"], r.data.metrics["asr"]) for r in (a, b)
        )
        return acc_a >= acc_b and asr_a <= asr_b and (acc_a, asr_a) != (acc_b, asr_b)

    return {
        r.info.run_id for r in done if not any(group(q) == group(r) and beats(q, r) for q in done)
    }


@pytest.mark.slow
@pytest.mark.sweep
def test_drawn_front_equals_the_non_dominated_set_of_the_mlflow_runs(swept, tmp_path):
    from mlflow import MlflowClient

    listing = pd.read_csv(swept["out"] / "trials.csv")
    drawn = set(listing.loc[listing["on_front"], "run_id"])
    expected = independent_front(swept["uri"], "tiny")
    assert drawn == expected and len(expected) >= 2
    # ... and it is the front the sweep itself printed and saved (pareto.json).
    client = MlflowClient(swept["uri"])
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.`bdat_ray.role` = 'sweep'"
    )
    saved = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "pareto.json", str(tmp_path))
        ).read_text()
    )
    assert {row["run_id"] for row in saved} == drawn
    # The page marks the same trials.
    page = (swept["out"] / "index.html").read_text()
    assert page.count('<tr class="front">') == len(drawn)


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium with no network chatter (it would otherwise try Google's servers)."""
    return subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.sweep
def test_index_html_renders_in_chromium_with_every_image_loaded(swept, tmp_path):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    from PIL import Image, ImageStat

    out = swept["out"]
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(f for f in FILES if f.endswith(".png"))

    shot = tmp_path / "index.png"
    chromium(
        tmp_path / "p1",
        f"--screenshot={shot}",
        "--window-size=1400,2000",
        (out / "index.html").as_uri(),
    )
    with Image.open(shot) as picture:
        assert picture.size == (1400, 2000)
        assert max(ImageStat.Stat(picture.convert("L")).stddev) > 20  # not a blank page

    # The same page plus a probe that writes, once loaded, whether each image decoded.
    probe = out / "probe.html"
    script = (
        "<script>addEventListener('load', () => document.body.setAttribute('data-images', "
        "[...document.images].map(i => i.getAttribute('src') + '=' + (i.complete && "
        "i.naturalWidth > 0)).join(' ')));</script></body>"
    )
    probe.write_text(page.replace("</body>", script))
    dom = chromium(tmp_path / "p2", "--dump-dom", "--virtual-time-budget=10000", probe.as_uri())
    probe.unlink()
    loaded = re.search(r'data-images="([^"]*)"', dom.stdout)
    assert loaded, dom.stderr[-2000:]
    assert sorted(loaded.group(1).split()) == sorted(f"{name}=true" for name in images)


@pytest.mark.slow
@pytest.mark.sweep
def test_load_sweep_gives_one_row_per_trial_for_notebooks(swept):
    import analysis

    trials = analysis.load_sweep(swept["uri"], experiment="tiny")
    assert len(trials) == 8
    assert trials["outcome"].value_counts().to_dict() == {"finished": 7, "failed": 1}
    assert set(trials["group"]) == {"attack.name=badnets", "attack.name=sticker"}
    sweep = analysis.read_sweep(swept["uri"], experiment="tiny")
    assert sweep.tags["bdat_ray.environment_keys"] == '["attack.name"]'  # recorded by the sweep
    assert trials.attrs["objectives"] == {"acc": "max", "asr": "min"}
    linf = trials[trials["threat"] == "linf"]
    assert sorted(linf["budgets"].unique()) == ["16/255", "8/255"]
    assert sorted(linf["budget"].unique()) == pytest.approx([8 / 255, 16 / 255])
    assert (trials.loc[trials["threat"] == "none", "budget"] == 0).all()
    assert trials["train.epochs"].eq(2).all()  # typed config columns
    front = analysis.pareto_front(trials)
    listing = pd.read_csv(swept["out"] / "trials.csv")
    assert set(front["run_id"]) == set(listing.loc[listing["on_front"], "run_id"])
    for _, members in trials.groupby("group"):
        assert 0 < analysis.hypervolume(members) <= 1


SEEDS_SPACE = """
fixed:
  train.epochs: 2
  at.steps: 1
  eval.robust_samples: 0
dimensions:
  at.threat: {grid: [none, linf]}
  at.linf.eps: {grid: ["16/255"], when: {at.threat: [linf]}}
num_samples: 3
max_concurrent: 2
"""


@pytest.mark.slow
@pytest.mark.sweep
def test_a_three_seed_grid_report_shows_mean_std_and_n(tmp_path):
    from mlflow import MlflowClient

    (tmp_path / "seeds.yaml").write_text(textwrap.dedent(SEEDS_SPACE))
    sweep = sweep_cli("seeds.yaml", tmp_path)
    assert "every combination 3× with train.seed + 0..2" in sweep.stdout
    report, _ = report_cli(["--out", "r"], tmp_path)
    assert report.returncode == 0, report.stderr

    # Independently from the MLflow runs: per threat model, the three seeds' acc and asr.
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("seeds")
    runs = client.search_runs(
        [experiment.experiment_id], "tags.`bdat_ray.role` = 'trial'", max_results=100
    )
    expected = pd.DataFrame(
        {
            "threat": [r.data.params["at.threat"] for r in runs],
            "seed": [int(r.data.params["train.seed"]) for r in runs],
            "acc": [r.data.metrics["acc"] for r in runs],
            "asr": [r.data.metrics["asr"] for r in runs],
        }
    )
    assert sorted(expected["seed"]) == [0, 0, 1, 1, 2, 2]
    stats = expected.groupby("threat")[["acc", "asr"]].agg(["mean", "std"])

    summary = pd.read_csv(tmp_path / "r" / "seeds.csv").set_index("threat")
    assert summary["n"].to_dict() == {"none": 3, "linf": 3}
    assert (summary["seeds"] == "0,1,2").all()
    for threat in ("none", "linf"):
        for metric in ("acc", "asr"):
            assert summary.loc[threat, f"{metric}_mean"] == pytest.approx(
                stats.loc[threat, (metric, "mean")]
            )
            assert summary.loc[threat, f"{metric}_std"] == pytest.approx(
                stats.loc[threat, (metric, "std")]
            )
    table = (tmp_path / "r" / "table.md").read_text()
    none = stats.loc["none"]
    cell = f"{none[('acc', 'mean')]:.1f} ± {none[('acc', 'std')]:.1f}"
    assert cell in table and "(n=3)" in table and "mean ± std over 3 seeds" in table
    page = (tmp_path / "r" / "index.html").read_text()
    assert '<img src="pareto_seeds.png"' in page and "(n=3)" in page
    assert (tmp_path / "r" / "pareto_seeds.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, one line naming the option and what exists.


@pytest.fixture(scope="module")
def unfinished_store(tmp_path_factory):
    """A store whose only sweep has one trial still running and none finished: what a report
    sees right after a sweep starts. Written by the sweep's own MLflow adapter."""
    from bdat_ray import tracking

    work = tmp_path_factory.mktemp("unfinished")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    space = work / "early.yaml"
    space.write_text(textwrap.dedent(SPACE))
    sweep = tracking.start_sweep(
        uri,
        experiment="early",
        sweep_id="early-20260101-000000",
        space_file=space,
        params={"space": space.name, "objectives": "acc:max,asr:min", "search": "grid"},
        tags={},
    )
    tracking.TrialRun.open(sweep, trial_id="a_00000", trial_name="trial_a_00000", tags={})
    return uri


BAD_INPUT = [
    (["--experiment", "nosuch"], "--experiment: no experiment 'nosuch'", "with sweeps: early"),
    (["--sweep", "nosuch"], "--sweep: no sweep 'nosuch'", "latest sweeps: early-20260101-000000"),
    (["--experiment", "Default"], "--experiment: experiment 'Default' has no", "sweeps: early"),
    ([], "--sweep: sweep early-20260101-000000", "has no finished trials (1 running)"),
    (["--experiment", "early"], "--experiment: sweep early-", "no finished trials"),
    (["--sweep", "x'y"], "--sweep: sweep ids are", 'got "x\'y"'),
    (["--bogus"], "unrecognized arguments: --bogus", "--help"),
]


@pytest.mark.sweep
@pytest.mark.parametrize(("argv", "start", "end"), BAD_INPUT)
def test_bad_input_exits_2_with_one_line(argv, start, end, unfinished_store, capsys, monkeypatch):
    from analysis import report

    for name in (
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
        "MLFLOW_HTTP_REQUEST_TIMEOUT",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
    ):
        monkeypatch.delenv(name, raising=False)  # main sets them; restored afterwards
    monkeypatch.setenv("MLFLOW_TRACKING_URI", unfinished_store)
    with pytest.raises(SystemExit) as exit_info:
        report.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"error: {start}") and end in line, line
    assert captured.out == ""


@pytest.mark.sweep
def test_missing_store_exits_2_without_creating_one(tmp_path):
    proc, _ = report_cli([], tmp_path)  # no mlflow.db here, no MLFLOW_TRACKING_URI
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --mlflow-uri: no MLflow store at {tmp_path / 'mlflow.db'} (the default: "
        "./mlflow.db); pass --mlflow-uri sqlite:///PATH/mlflow.db (the sweep prints its "
        "store) or run the report where the sweep ran"
    ]
    assert not (tmp_path / "mlflow.db").exists()
