"""``python -m bdat_ray.table``: a spec of rows × columns becomes a Markdown table of real
runs; a cell the data cannot take says why; a bad spec exits 2 before anything trains."""

from __future__ import annotations

import json
import textwrap

import pytest

from bdat_ray import table


def write_spec(tmp_path, text: str):
    path = tmp_path / "spec.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_spec_becomes_a_markdown_table_of_runs(tmp_path):
    spec = write_spec(
        tmp_path,
        """
        title: tiny
        fixed: {data.name: digits, train.epochs: 1, eval.robust_samples: 0}
        rows:
          BadNets: {attack.name: badnets}
          channel: {attack.name: channel}      # needs colour images: n/a on grey digits
        columns:
          no AT: {at.threat: none}
          flow noise: {at.threat: flow_noise}
        """,
    )
    assert table.main([str(spec)]) == 0
    text = spec.with_suffix(".md").read_text()
    assert text.startswith("### tiny")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert lines["| BadNets"].count("/") == 2  # two `acc / asr` cells
    assert "n/a (channel zeroes the blue channel" in lines["| channel"]
    raw = json.loads(spec.with_suffix(".json").read_text())
    cell = raw["BadNets | flow noise"]
    assert 0 <= cell["acc"] <= 100 and cell["config"]["at.threat"] == "flow_noise"


def test_cells_trained_at_once_equal_the_cells_one_after_another(tmp_path):
    """``--jobs 2``: every cell in the spec's order, whichever process finished first, with
    the acc/asr of the sequential run up to the float reordering of fewer threads per cell
    (1 instead of 2: measured differences of 0.3 points after one epoch)."""
    spec = write_spec(
        tmp_path,
        """
        fixed: {data.name: digits, data.image_size: 8, train.epochs: 1, eval.robust_samples: 0}
        rows: {BadNets: {attack.name: badnets}, Blended: {attack.name: blended}}
        columns: {no AT: {at.threat: none}, L-inf: {at.threat: linf, at.steps: 1}}
        """,
    )
    results = {}
    for jobs in (1, 2):
        out = tmp_path / f"jobs{jobs}.md"
        assert table.main(["--jobs", str(jobs), "--out", str(out), str(spec)]) == 0
        raw = json.loads(out.with_suffix(".json").read_text())
        results[jobs] = {key: (cell["acc"], cell["asr"]) for key, cell in raw.items()}
    assert list(results[1]) == list(results[2])
    for key, (acc, asr) in results[1].items():
        assert abs(acc - results[2][key][0]) <= 2 and abs(asr - results[2][key][1]) <= 2, key
    assert "2 cells at once" in (tmp_path / "jobs2.md").read_text()


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("rows: {a: {at.treat: linf}}\n", "a"),
        ("colums: {}\nrows: {a: {}}\n", "spec.yaml"),
    ],
)
def test_bad_spec_exits_2_naming_it(tmp_path, text, key, capsys):
    spec = write_spec(tmp_path, text)
    with pytest.raises(SystemExit) as exit_info:
        table.main([str(spec)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0]
    assert not spec.with_suffix(".md").exists()
