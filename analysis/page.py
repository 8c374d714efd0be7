"""``index.html``: one self-contained page (inline style, no script, no external resource)
that shows a sweep's report — what ran, the figures (by relative path, beside the page), the
tables, and every trial with a link to its run in the MLflow UI."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from analysis.load import Sweep
from analysis.tables import Table, to_html
from bdat_ray.sweep import study_hint
from bdat_ray.tracking import browse_hint, redact

DEFAULT_UI = "http://127.0.0.1:5000"
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1300px;
       padding: 0 1.5em; color: #222; }
h1 { margin-bottom: 0.1em; } h1 + p { margin-top: 0; color: #555; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 0.2em 1.2em; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #444; font-size: 0.92em; max-width: 75em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; text-align: center; } tbody th { text-align: left; font-weight: 500; }
tr.average th, tr.average td { border-top: 2px solid #888; }
td.text { text-align: left; } tr.front td { background: #fff6d6; }
p.note { color: #555; font-size: 0.9em; } pre { background: #f6f6f6; padding: 0.8em; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


@dataclass(frozen=True)
class Figure:
    file: str
    title: str
    caption: str


def run_link(ui_url: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI page of one run."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _number(value: float) -> str:
    return f"{value:.1f}" if isinstance(value, float) and math.isfinite(value) else "–"


def _meta(sweep: Sweep, ui_url: str) -> str:
    e = html.escape
    counts = ", ".join(f"{n} {outcome}" for outcome, n in sweep.outcomes().items())
    goals = ", ".join(
        f"{m} {'↑' if mode == 'max' else '↓'}" for m, mode in sweep.objectives.items()
    )
    commit = sweep.tags.get("mlflow.source.git.commit", "unknown")
    if sweep.tags.get("bdat_ray.git_dirty") == "true":
        commit += " (with uncommitted changes)"
    seconds = sweep.metrics.get("sweep_seconds")
    items = [
        ("sweep id", e(sweep.sweep_id)),
        (
            "started",
            e(sweep.started.strftime("%Y-%m-%d %H:%M:%S UTC"))
            + (f", ran {seconds:.0f} s" if seconds else ""),
        ),
        ("status", e(sweep.status)),
        (
            "space file",
            f"<code>{e(sweep.params.get('space', 'unknown'))}</code>"
            + (' (<a href="#space">below</a>)' if sweep.space_text else ""),
        ),
        (
            "search",
            e(
                f"{sweep.params.get('search', '?')}, {sweep.params.get('trials', '?')} "
                "trials planned"
            ),
        ),
        ("trials", e(counts)),
        ("objectives", e(goals)),
        ("git commit", f"<code>{e(commit)}</code>"),
        (
            "MLflow",
            f'<a href="{e(run_link(ui_url, sweep.experiment_id, sweep.parent_run_id))}">'
            f"parent run</a> in <code>{e(redact(sweep.uri))}</code>; UI: "
            f"<code>{e(browse_hint(sweep.uri))}</code>",
        ),
        ("models", f"registered as <code>{e(sweep.experiment)}-pareto</code> (the front)"),
    ]
    if sweep.tags.get("bdat_ray.optuna_storage"):  # Optuna spaces: the study outlives the sweep
        load = study_hint(
            sweep.tags.get("bdat_ray.optuna_study", ""), sweep.tags["bdat_ray.optuna_storage"]
        )
        items.append(("Optuna study", f"<code>{e(load)}</code>"))
    if sweep.params.get("overrides"):
        items.insert(4, ("pinned", f"<code>{e(sweep.params['overrides'])}</code>"))
    return '<dl class="meta">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _trials(trials: pd.DataFrame, front: set[str], sweep: Sweep, ui_url: str) -> str:
    e = html.escape
    head = (
        "<tr><th>trial</th><th>outcome</th><th>attack</th><th>threat model</th>"
        "<th>budgets</th><th>other</th><th>seed</th><th>ACC</th><th>ASR</th>"
        "<th>robust acc</th><th>seconds</th><th>front</th></tr>"
    )
    body = []
    for row in trials.to_dict("records"):
        link = run_link(ui_url, sweep.experiment_id, row["run_id"])
        on_front = row["run_id"] in front
        text = [row[k] for k in ("outcome", "setting", "threat", "budgets", "variant")]
        numbers = [row[k] for k in ("acc", "asr", "robust_acc", "seconds")]
        body.append(
            ('<tr class="front">' if on_front else "<tr>")
            + f'<td class="text"><a href="{e(link)}">{e(row["trial"])}</a></td>'
            + "".join(f'<td class="text">{e(str(t))}</td>' for t in text)
            + f"<td>{row['train.seed']}</td>"
            + "".join(f"<td>{_number(v)}</td>" for v in numbers)
            + f"<td>{'★' if on_front else ''}</td></tr>"
        )
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def index_html(
    sweep: Sweep,
    *,
    figures: Sequence[Figure],
    tables: Sequence[Table],
    notes: Sequence[str],
    front: set[str],
    ui_url: str = DEFAULT_UI,
) -> str:
    """The page. ``front``: run ids drawn as Pareto-optimal; ``notes``: what the report
    could not show and why (e.g. no budget curves without two budgets of a threat model)."""
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(sweep.experiment)} — {e(sweep.sweep_id)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>Sweep {e(sweep.experiment)}</h1>",
        f"<p>bdat_ray report of {e(sweep.sweep_id)}</p>",
        _meta(sweep, ui_url),
    ]
    parts += [f'<p class="note">{e(n)}</p>' for n in notes]
    for fig in figures:
        parts.append(
            f'<figure><h2>{e(fig.title)}</h2><img src="{e(fig.file)}" alt="{e(fig.title)}">'
            f"<figcaption>{e(fig.caption)}</figcaption></figure>"
        )
    parts.append(
        '<h2>Tables</h2><p>Also as <a href="table.md">table.md</a> and '
        '<a href="table.csv">table.csv</a>.</p>'
    )
    parts += [to_html(t) for t in tables]
    parts.append(
        f"<h2>Trials</h2><p>{len(sweep.trials)} trials; ★ = on the Pareto front of its attack "
        'setting; a trial id opens its MLflow run (<a href="trials.csv">trials.csv</a>).</p>'
    )
    parts.append(_trials(sweep.trials, front, sweep, ui_url))
    if sweep.space_text:
        parts.append(
            f'<h2 id="space">Space file {e(sweep.params.get("space", ""))}</h2>'
            f"<pre>{e(sweep.space_text)}</pre>"
        )
    parts.append("</body></html>\n")
    return "\n".join(parts)
