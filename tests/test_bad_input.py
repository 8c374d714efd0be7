"""Every class of bad input, across every command: exit code 2, exactly one stderr line
``error: ...`` naming the key, no traceback, and nothing created — no Ray session, no MLflow
store, no result folder (the case's working directory holds exactly the files it wrote).

Each case runs a CLI's ``main`` in this process (a bad input must fail long before Ray; a
case that reached training or Ray would hang or fail here), in a fresh working directory
with no tracking URI in the environment. `test_the_real_entry_points` runs one case per
command as ``python -m ...`` subprocesses, as a user would.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO

COMMANDS = {
    "run": "bdat_ray.run",
    "sweep": "bdat_ray.sweep",
    "table": "bdat_ray.table",
    "gallery": "bdat_ray.gallery",
    "report": "analysis.report",
    "bench": "bdat_ray.bench",
}
TINY = "fixed: {train.epochs: 1, eval.robust_samples: 0}\n"
GRID = TINY + "dimensions:\n  at.threat: {grid: [none, linf]}\n"
TABLE = "rows:\n  a: {train.epochs: 1}\n"
NOT_UTF8 = b"fixed:\n  train.epochs: 2 # \xff\xfe caf\xe9\n"
LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)
#: Unwritable for everyone, root included (the tests run as root in CI).
UNWRITABLE = "/proc/bdat_ray_cannot_be_here"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sqlite_header_db() -> bytes:
    return b"this is not a database at all" * 10


@dataclass
class Case:
    """``command argv`` in a folder holding ``files`` must fail naming ``key``."""

    id: str
    command: str
    argv: list[str]
    key: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    folders: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.id


def space(text: str, name: str = "s.yaml") -> dict[str, str]:
    return {name: text}


CASES = [
    # -- values that parse but cannot work -----------------------------------------------------
    Case("run-lr-1e999", "run", ["train.lr=1e999"], "train.lr"),
    Case("run-lr-inf", "run", ["train.lr=inf"], "train.lr"),
    Case("run-lr-nan", "run", ["train.lr=nan"], "train.lr"),
    Case("run-lr-fraction-overflow", "run", ["train.lr=1e308/1e-308"], "train.lr"),
    Case("run-wd-1e999", "run", ["train.weight_decay=1e999"], "train.weight_decay"),
    Case("run-width-1e999", "run", ["model.width=1e999"], "model.width"),
    Case("run-width-1e300", "run", ["model.width=1e300"], "model.width"),
    Case("run-eps-1e999", "run", ["at.threat=linf", "at.eps=1e999"], "at.eps"),
    Case("run-eval-eps-inf", "run", ["eval.eps=1e999"], "eval.eps"),
    Case("run-seed-beyond-int64", "run", ["train.seed=99999999999999999999999"], "train.seed"),
    Case("run-seed-2^40", "run", ["train.seed=1099511627776"], "train.seed"),
    Case("run-compile-unknown", "run", ["train.compile=max-autotune"], "train.compile"),
    Case(
        "run-compile-lipschitz",
        "run",
        ["train.compile=on", "defense.name=lipschitz"],
        "train.compile",
    ),
    Case(
        "sweep-compile-dpsgd", "sweep", ["train.compile=on", "defense.name=dpsgd"], "train.compile"
    ),
    Case("run-attack-seed-negative", "run", ["attack.seed=-1"], "attack.seed"),
    Case("run-batch-beyond-int64", "run", ["train.batch_size=99999999999999999999"], "batch_size"),
    Case("run-epochs-true", "run", ["train.epochs=true"], "train.epochs"),
    Case(
        "yaml-epochs-bool",
        "run",
        ["--config", "c.yaml"],
        "train.epochs",
        space("train.epochs: true\n", "c.yaml"),
    ),
    Case(
        "yaml-lr-inf",
        "run",
        ["--config", "c.yaml"],
        "train.lr",
        space("train.lr: .inf\n", "c.yaml"),
    ),
    Case(
        "yaml-lr-nan",
        "run",
        ["--config", "c.yaml"],
        "train.lr",
        space("train.lr: .nan\n", "c.yaml"),
    ),
    Case(
        "yaml-rate-nan",
        "run",
        ["--config", "c.yaml"],
        "attack.poison_rate",
        space("attack: {poison_rate: .NaN}\n", "c.yaml"),
    ),
    Case(
        "yaml-seed-huge",
        "run",
        ["--config", "c.yaml"],
        "train.seed",
        space("train.seed: 123456789012345678901234567890\n", "c.yaml"),
    ),
    Case(
        "yaml-batch-false",
        "run",
        ["--config", "c.yaml"],
        "train.batch_size",
        space("train.batch_size: false\n", "c.yaml"),
    ),
    Case(
        "space-fixed-lr-inf",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.lr",
        space("fixed: {train.lr: .inf}\n"),
    ),
    Case(
        "space-uniform-high-1e999",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.lr",
        space(TINY + "num_samples: 2\ndimensions:\n  train.lr: {uniform: [0.01, 1e999]}\n"),
    ),
    Case(
        "space-loguniform-nan",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.lr",
        space(TINY + "num_samples: 2\ndimensions:\n  train.lr: {loguniform: [.nan, 0.1]}\n"),
    ),
    Case(
        "space-int-high-beyond-int64",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "at.steps",
        space("num_samples: 2\ndimensions:\n  at.steps: {int: [1, 99999999999999999999999]}\n"),
    ),
    Case(
        "space-grid-bool-epochs",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.epochs",
        space("dimensions:\n  train.epochs: {grid: [true, 2]}\n"),
    ),
    Case(
        "space-num-samples-billion",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "num_samples",
        space(TINY + "num_samples: 1000000000\ndimensions:\n  train.lr: {uniform: [0.01, 0.1]}\n"),
    ),
    Case(
        "space-grid-num-samples-billion",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "num_samples",
        space(GRID + "num_samples: 1000000000\n"),
    ),
    Case(
        "cli-num-samples-billion",
        "sweep",
        ["--space", "s.yaml", "--dry-run", "--num-samples", "1000000000"],
        "--num-samples",
        space(GRID),
    ),
    Case(
        "cli-max-concurrent-huge",
        "sweep",
        ["--space", "s.yaml", "--dry-run", "--max-concurrent", "99999999999999999999"],
        "--max-concurrent",
        space(GRID),
    ),
    Case(
        "space-grid-too-large",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "dimensions",
        space(
            "dimensions:\n"
            + "".join(
                f"  {k}: {{grid: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]}}\n"
                for k in (
                    "train.epochs",
                    "train.batch_size",
                    "at.steps",
                    "eval.steps",
                    "eval.batch_size",
                    "attack.seed",
                )
            )
        ),
    ),
    Case(
        "space-sampler-seed-huge",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "seed",
        space(
            TINY
            + "seed: 99999999999999\nnum_samples: 2\n"
            + "dimensions:\n  train.lr: {uniform: [0.01, 0.1]}\n"
        ),
    ),
    Case(
        "space-resources-cpu-inf",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "resources.cpu",
        space(GRID + "resources: {cpu: .inf}\n"),
    ),
    Case(
        "space-asha-factor-inf",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "reduction_factor",
        space(GRID + "early_stopping: {metric: acc, mode: max, reduction_factor: .inf}\n"),
    ),
    Case(
        "space-asha-grace-true",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "grace_period",
        space(GRID + "early_stopping: {metric: acc, mode: max, grace_period: true}\n"),
    ),
    Case(
        "sweep-pin-lr-1e999",
        "sweep",
        ["--space", "s.yaml", "--dry-run", "train.lr=1e999"],
        "train.lr",
        space(GRID),
    ),
    Case(
        "table-cell-lr-inf",
        "table",
        ["t.yaml"],
        "train.lr",
        space("rows:\n  a: {train.lr: .inf}\n", "t.yaml"),
    ),
    # -- files that are not what they claim ----------------------------------------------------
    Case("config-not-utf8", "run", ["--config", "c.yaml"], "c.yaml", {"c.yaml": NOT_UTF8}),
    Case(
        "space-not-utf8",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "s.yaml",
        {"s.yaml": NOT_UTF8},
    ),
    Case("table-not-utf8", "table", ["t.yaml"], "t.yaml", {"t.yaml": NOT_UTF8}),
    Case("config-scalar", "run", ["--config", "c.yaml"], "--config", space("5\n", "c.yaml")),
    Case(
        "config-list",
        "run",
        ["--config", "c.yaml"],
        "--config",
        space("- train.epochs: 2\n", "c.yaml"),
    ),
    Case("space-scalar", "sweep", ["--space", "s.yaml", "--dry-run"], "s.yaml", space("hello\n")),
    Case(
        "space-list", "sweep", ["--space", "s.yaml", "--dry-run"], "s.yaml", space("- fixed: {}\n")
    ),
    Case(
        "space-fixed-list",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "fixed",
        space("fixed: [1, 2]\n"),
    ),
    Case(
        "space-dimensions-list",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "dimensions",
        space("dimensions: [at.threat]\n"),
    ),
    Case(
        "space-dimension-scalar",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "at.threat",
        space("dimensions:\n  at.threat: linf\n"),
    ),
    Case(
        "space-variants-mapping",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "variants",
        space(GRID + "variants: {name: a}\n"),
    ),
    Case(
        "space-description-list",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "description",
        space(GRID + "description: [a, b]\n"),
    ),
    Case(
        "space-when-scalar",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "when",
        space("dimensions:\n  at.eps: {grid: [0.1], when: linf}\n"),
    ),
    Case("table-scalar", "table", ["t.yaml"], "t.yaml", space("hello\n", "t.yaml")),
    Case("table-rows-list", "table", ["t.yaml"], "rows", space("rows: [a, b]\n", "t.yaml")),
    Case("table-row-scalar", "table", ["t.yaml"], "rows.a", space("rows:\n  a: 3\n", "t.yaml")),
    Case(
        "table-columns-list",
        "table",
        ["t.yaml"],
        "columns",
        space(TABLE + "columns: [x]\n", "t.yaml"),
    ),
    Case(
        "table-unknown-section",
        "table",
        ["t.yaml"],
        "colums",
        space(TABLE + "colums: {}\n", "t.yaml"),
    ),
    Case(
        "space-duplicate-section",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "dimensions",
        space(GRID + "dimensions:\n  train.seed: {grid: [0, 1]}\n"),
    ),
    Case(
        "space-duplicate-dimension",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "at.threat",
        space(GRID + "  at.threat: {grid: [spatial]}\n"),
    ),
    Case(
        "space-duplicate-fixed-key",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.epochs",
        space("fixed:\n  train.epochs: 1\n  train.epochs: 2\n"),
    ),
    Case(
        "space-nested-and-dotted",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "train.epochs",
        space("fixed:\n  train: {epochs: 1}\n  train.epochs: 2\n"),
    ),
    Case(
        "config-duplicate-key",
        "run",
        ["--config", "c.yaml"],
        "attack.target",
        space("attack.target: 1\nattack.target: 3\n", "c.yaml"),
    ),
    Case(
        "config-nested-and-dotted",
        "run",
        ["--config", "c.yaml"],
        "at.eps",
        space("at: {eps: 0.1}\nat.eps: 0.2\n", "c.yaml"),
    ),
    Case(
        "table-duplicate-row",
        "table",
        ["t.yaml"],
        "a",
        space("rows:\n  a: {train.epochs: 1}\n  a: {train.epochs: 2}\n", "t.yaml"),
    ),
    Case(
        "space-billion-laughs", "sweep", ["--space", "s.yaml", "--dry-run"], "s.yaml", space(LAUGHS)
    ),
    Case("config-billion-laughs", "run", ["--config", "c.yaml"], "c.yaml", space(LAUGHS, "c.yaml")),
    Case("table-billion-laughs", "table", ["t.yaml"], "t.yaml", space(LAUGHS, "t.yaml")),
    Case(
        "space-bad-yaml",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "s.yaml",
        space("fixed: {a: [1\n"),
    ),
    Case("config-is-folder", "run", ["--config", "cfg"], "--config", folders=("cfg",)),
    Case("space-is-folder", "sweep", ["--space", "sp", "--dry-run"], "--space", folders=("sp",)),
    Case("table-spec-missing", "table", ["nope.yaml"], "SPEC"),
    Case(
        "npz-garbage",
        "run",
        ["data.name=npz", "data.path=g.npz"],
        "data.path",
        {"g.npz": bytes(range(256)) * 4},
    ),
    Case(
        "npz-zip-not-arrays",
        "run",
        ["data.name=npz", "data.path=z.npz"],
        "data.path",
        {"z.npz": b"PK\x03\x04" + b"\0" * 60},
    ),
    Case(
        "blended-file-not-image",
        "run",
        ["attack.name=blended", "attack.blended.trigger=file", "attack.blended.file=t.png"],
        "attack.blended.file",
        {"t.png": b"this is text, not a picture\n"},
    ),
    Case("resume-empty-workdir", "run", ["--workdir", "w", "--resume"], "--resume", folders=("w",)),
    Case(
        "resume-corrupt-checkpoint",
        "run",
        ["--workdir", "w", "--resume"],
        "--resume",
        {"w/checkpoint/state.pt": b"PK\x03\x04 truncated"},
    ),
    Case(
        "resume-empty-checkpoint",
        "run",
        ["--workdir", "w", "--resume"],
        "--resume",
        {"w/checkpoint/state.pt": b""},
    ),
    Case(
        "sweep-resume-empty-storage",
        "sweep",
        ["--resume", "--storage", "st"],
        "--resume",
        folders=("st",),
    ),
    Case(
        "sweep-resume-corrupt-record",
        "sweep",
        ["--resume", "--storage", "st"],
        "--resume",
        {"st/x-20260101-000000/sweep.json": '{"name": "x", "sweep_'},
    ),
    Case(
        "sweep-resume-empty-record",
        "sweep",
        ["--resume", "--storage", "st"],
        "--resume",
        {"st/x-20260101-000000/sweep.json": ""},
    ),
    Case(
        "sweep-resume-foreign-record",
        "sweep",
        ["--resume", "--storage", "st"],
        "--resume",
        {"st/x-20260101-000000/sweep.json": "[1, 2, 3]"},
    ),
    # -- places that cannot be written ---------------------------------------------------------
    Case("run-output-is-folder", "run", ["--output", "o"], "--output", folders=("o",)),
    Case("run-output-under-file", "run", ["--output", "f/r.json"], "--output", {"f": "x"}),
    Case("run-output-unwritable", "run", ["--output", f"{UNWRITABLE}/r.json"], "--output"),
    Case("run-workdir-is-file", "run", ["--workdir", "f"], "--workdir", {"f": "x"}),
    Case("run-workdir-unwritable", "run", ["--workdir", UNWRITABLE], "--workdir"),
    Case(
        "table-out-is-folder",
        "table",
        ["t.yaml", "--out", "o"],
        "--out",
        space(TABLE, "t.yaml"),
        folders=("o",),
    ),
    Case(
        "table-out-under-file",
        "table",
        ["t.yaml", "--out", "f/t.md"],
        "--out",
        {"t.yaml": TABLE, "f": "x"},
    ),
    Case(
        "table-out-unwritable",
        "table",
        ["t.yaml", "--out", f"{UNWRITABLE}/t.md"],
        "--out",
        space(TABLE, "t.yaml"),
    ),
    Case("gallery-out-is-folder", "gallery", ["--out", "o"], "--out", folders=("o",)),
    Case("gallery-out-unwritable", "gallery", ["--out", f"{UNWRITABLE}/g.png"], "--out"),
    Case(
        "sweep-storage-is-file",
        "sweep",
        ["--space", "s.yaml", "--storage", "f"],
        "--storage",
        {"s.yaml": GRID, "f": "x"},
    ),
    Case(
        "sweep-storage-unwritable",
        "sweep",
        ["--space", "s.yaml", "--storage", UNWRITABLE],
        "--storage",
        space(GRID),
    ),
    Case(
        "sweep-uri-unknown-scheme",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", "ftp://example.org/m"],
        "--mlflow-uri",
        space(GRID),
    ),
    Case(
        "sweep-uri-sqlite-folder",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", "sqlite:///{cwd}/db"],
        "--mlflow-uri",
        space(GRID),
        folders=("db",),
    ),
    Case(
        "sweep-uri-sqlite-not-a-database",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", "sqlite:///{cwd}/m.db"],
        "--mlflow-uri",
        {"s.yaml": GRID, "m.db": _sqlite_header_db()},
    ),
    Case(
        "sweep-uri-sqlite-missing-folder",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", "sqlite:///{cwd}/no/such/m.db"],
        "--mlflow-uri",
        space(GRID),
    ),
    Case(
        "sweep-uri-sqlite-unwritable",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", f"sqlite:///{UNWRITABLE}.db"],
        "--mlflow-uri",
        space(GRID),
    ),
    Case(
        "sweep-uri-sqlite-no-path",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", "sqlite://"],
        "--mlflow-uri",
        space(GRID),
    ),
    Case(
        "sweep-uri-server-down",
        "sweep",
        ["--space", "s.yaml", "--mlflow-uri", f"http://127.0.0.1:{_closed_port()}"],
        "--mlflow-uri",
        space(GRID),
    ),
    Case(
        "sweep-env-uri-unknown-scheme",
        "sweep",
        ["--space", "s.yaml", "--dry-run"],
        "MLFLOW_TRACKING_URI",
        space(GRID),
        env={"MLFLOW_TRACKING_URI": "mailto:me@example.org"},
    ),
    Case(
        "report-uri-unknown-scheme",
        "report",
        ["--mlflow-uri", "ftp://example.org/m"],
        "--mlflow-uri",
    ),
    Case("report-out-is-file", "report", ["--out", "f"], "--out", {"f": "x"}),
    # -- checks that need the dataset (a sweep validates every planned trial before Ray) --------
    Case(
        "sweep-target-out-of-range",
        "sweep",
        ["--space", "s.yaml"],
        "attack.target",
        space(GRID + "  attack.target: {grid: [2, 10]}\n"),
    ),
    Case(
        "sweep-pin-target-out-of-range",
        "sweep",
        ["--space", "s.yaml", "attack.target=12"],
        "attack.target",
        space(GRID),
    ),
    Case(
        "sweep-trigger-larger-than-image",
        "sweep",
        ["--space", "s.yaml"],
        "attack.trigger_size",
        space(GRID + "  attack.trigger_size: {grid: [3, 20]}\n"),
    ),
    Case(
        "sweep-colour-trigger-on-grey",
        "sweep",
        ["--space", "s.yaml"],
        "attack.name",
        space(GRID + "  attack.name: {grid: [badnets, channel]}\n"),
    ),
    Case(
        "sweep-optuna-target-out-of-range",
        "sweep",
        ["--space", "s.yaml"],
        "attack.target",
        space(TINY + "num_samples: 2\ndimensions:\n  attack.target: {choice: [2, 11]}\n"),
    ),
    Case(
        "sweep-variant-target-out-of-range",
        "sweep",
        ["--space", "s.yaml"],
        "attack.target",
        space(GRID + "variants:\n  - name: base\n  - name: bad\n    fixed: {attack.target: 10}\n"),
    ),
    # -- commands that used to run bad cells ---------------------------------------------------
    Case(
        "table-cell-bad-rate",
        "table",
        ["t.yaml"],
        "attack.poison_rate",
        space("rows:\n  a: {attack.poison_rate: 1.5}\n", "t.yaml"),
    ),
    Case(
        "table-cell-unknown-key",
        "table",
        ["t.yaml"],
        "at.epsilon",
        space("rows:\n  a: {at.epsilon: 0.1}\n", "t.yaml"),
    ),
    Case(
        "table-column-bad-threat",
        "table",
        ["t.yaml"],
        "at.threat",
        space(TABLE + "columns:\n  x: {at.threat: linfinity}\n", "t.yaml"),
    ),
    Case(
        "table-pin-bad-value",
        "table",
        ["t.yaml", "train.epochs=0"],
        "train.epochs",
        space(TABLE, "t.yaml"),
    ),
    Case("gallery-n-negative", "gallery", ["--n", "-3"], "--n"),
    Case("gallery-n-zero", "gallery", ["--n", "0"], "--n"),
    Case(
        "gallery-target-out-of-range",
        "gallery",
        ["attack.target=12", "--attacks", "badnets"],
        "attack.target",
    ),
    Case("gallery-unknown-attack", "gallery", ["--attacks", "nope"], "--attacks"),
    Case(
        "sweep-empty-name",
        "sweep",
        ["--space", "s.yaml", "--dry-run", "--name", ""],
        "--name",
        space(GRID),
    ),
    Case(
        "sweep-name-with-space",
        "sweep",
        ["--space", "s.yaml", "--dry-run", "--name", "a b"],
        "--name",
        space(GRID),
    ),
    Case("report-sweep-path", "report", ["--sweep", "../x"], "--sweep"),
    Case("run-target-out-of-range", "run", ["attack.target=12"], "attack.target"),
    Case("bench-iters-zero", "bench", ["--iters", "0"], "--iters"),
    Case("bench-warmup-negative", "bench", ["--warmup", "-1"], "--warmup"),
    Case("bench-pgd-steps-zero", "bench", ["--pgd-steps", "0"], "--pgd-steps"),
    Case("bench-rounds-not-a-number", "bench", ["--compile", "--rounds", "x"], "--rounds"),
    Case("bench-config-key", "bench", ["train.lr=nan"], "train.lr"),
]


def test_every_class_has_cases():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)
    assert {c.command for c in CASES} == set(COMMANDS)


def _prepare(case: Case, cwd: Path) -> tuple[list[str], set[Path]]:
    for name, content in case.files.items():
        path = cwd / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    for name in case.folders:
        (cwd / name).mkdir(parents=True, exist_ok=True)
    argv = [a.replace("{cwd}", str(cwd)) for a in case.argv]
    return argv, set(cwd.rglob("*"))


def _check_one_error_line(code: int, out: str, err: str, key: str) -> None:
    assert code == 2, out + err
    assert "Traceback" not in out + err, out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and key in lines[0], lines[0]


@pytest.fixture
def clean_process(tmp_path, monkeypatch):
    """A fresh working directory, no tracking URI, and the environment restored after (a
    sweep sets Tune's and MLflow's variables on its way)."""
    saved = dict(os.environ)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(case, clean_process, capfd):
    cwd = clean_process
    argv, before = _prepare(case, cwd)
    for name, value in case.env.items():
        os.environ[name] = value
    main = importlib.import_module(COMMANDS[case.command]).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capfd.readouterr()
    _check_one_error_line(exit_info.value.code, out, err, case.key)
    assert set(cwd.rglob("*")) == before, "the failed command left files behind"
    assert not Path(UNWRITABLE).exists()
    if "ray" in sys.modules:
        assert not sys.modules["ray"].is_initialized(), "Ray was started"


ENTRY_POINTS = [
    next(c for c in CASES if c.id == name)
    for name in (
        "run-lr-1e999",
        "space-duplicate-dimension",
        "sweep-uri-server-down",
        "sweep-target-out-of-range",
        "table-cell-bad-rate",
        "gallery-n-negative",
        "report-uri-unknown-scheme",
    )
]


@pytest.mark.parametrize("case", ENTRY_POINTS, ids=str)
def test_the_real_entry_points(case, tmp_path):
    argv, before = _prepare(case, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-m", COMMANDS[case.command], *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, **case.env},
    )
    _check_one_error_line(proc.returncode, proc.stdout, proc.stderr, case.key)
    assert set(tmp_path.rglob("*")) == before
