"""The comparison tables of the two papers, from a sweep's finished trials.

- **CAT paper, Table 2 layout** (`cat_table`): one row per attack setting, one column per
  defense (``no defense`` = ``at.threat=none``, then each AT threat model with its budgets,
  plus any other swept key that is not the attack, e.g. ``at.steps=10``); cells ``ACC / ASR``.
  Per row the lowest ASR is bold and, with three or more defenses in the row, the
  second-lowest underlined, as in the paper; an ``Average`` row (defenses that every
  attack row has) closes the table as in the paper. More than `MAX_COLUMNS` defenses (an
  Optuna sweep over budgets makes every trial its own) are written transposed.
- **Weng et al., Tables 1–8 layout** (`weng_table`, when the sweep trains Weng's
  sticker / watermark / channel triggers): one row per trigger setting (attack keys plus the
  other swept keys), columns standard training vs each adversarial training; cells
  ``acc / robust acc / ASR``.
- **CAT paper, Table 4 layout** (`adaptive_table`, when the sweep trains against the adaptive
  attack, ``search_spaces/cat_table4.yaml``): one row per ``Adaptive attack (δ_max, ε)``,
  standard training (ε = 0) first; cells ``ACC / ASR``.

Trials that differ only in ``train.seed`` share a cell: mean ± sample standard deviation
(n - 1) over them. Values in percent, one decimal (as the sweep's own table); marks compare
the values as shown, so equal shown values share a mark.
"""

from __future__ import annotations

import dataclasses
import html
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from analysis.fronts import FINISHED
from analysis.load import NO_AT, defense_text
from bdat_ray.search_space import format_budget

WENG_ATTACKS = ("sticker", "watermark", "channel")
ADAPTIVE = "adaptive"
ADAPTIVE_COLUMN = "adaptive attack"
LABELS = {
    "acc": "ACC",
    "asr": "ASR",
    "robust_acc": "robust acc",
    "detect_tpr": "TPR",
    "detect_fpr": "FPR",
    "removed": "removed",
}
METRICS = tuple(LABELS)  # every cell keeps all of them; a table shows some
#: How the papers name the baseline defenses (``defense.name`` -> column label).
DEFENSE_LABELS = {
    "perfect_filter": "perfect filter",
    "random_filter": "random filter",
    "spectral": "SS",
    "activation_clustering": "AC",
    "dpsgd": "DPSGD",
    "abl": "ABL",
    "lipschitz": "Lipschitz Reg.",
    "denoise": "Denoising Layer",
    "fine_pruning": "FP",
    "nad": "NAD",
    "neural_cleanse": "NC",
}
NO_DEFENSE = "no defense"
STANDARD = "standard training"
AVERAGE = "Average"
BEST, SECOND = "best", "second"
#: The marks' legend; each renderer fills in its own bold and underline.
MARKS_NOTE = (
    "Per attack the lowest ASR is {bold} and the second-lowest {underlined} (with three or "
    "more defenses for it)."
)
#: Wider tables are written transposed, one line per column (an Optuna sweep over budgets
#: makes every trial its own defense).
MAX_COLUMNS = 10


@dataclass(frozen=True)
class Cell:
    """Trials of one (row, column): their count, and per metric mean and sample std (NaN
    for a single trial)."""

    n: int
    mean: dict[str, float]
    std: dict[str, float]

    def text(self, metric: str) -> str:
        mean, std = self.mean[metric], self.std[metric]
        if not math.isfinite(mean):
            return "–"
        return f"{mean:.1f}" + (f" ± {std:.1f}" if math.isfinite(std) else "")


@dataclass(frozen=True)
class Table:
    title: str
    row_header: str  # what rows are (Attack), and columns (Defense)
    column_header: str
    rows: list[str]
    columns: list[str]
    metrics: tuple[str, ...]
    cells: dict[tuple[str, str], Cell]
    marks: dict[tuple[str, str], str]  # (row, column) -> BEST or SECOND (its ASR)
    note: str
    marked: bool  # whether ASR marks apply (their legend follows the note)

    @property
    def repeated(self) -> bool:
        """Whether some cell averages two or more trials (seeds): cells then show their n."""
        return any(c.n > 1 for (row, _), c in self.cells.items() if row != AVERAGE)

    def count_text(self, key: tuple[str, str]) -> str:
        """`` (n=3)``: the trials behind a cell of a repeated table (not the Average row)."""
        cell = self.cells.get(key)
        if cell is None or not self.repeated or key[0] == AVERAGE:
            return ""
        return f" (n={cell.n})"

    @property
    def transposed(self) -> bool:
        return len(self.columns) > MAX_COLUMNS

    def layout(self) -> tuple[str, list[str], list[str]]:
        """(corner header, line labels, column labels) as rendered."""
        if self.transposed:
            return self.column_header, self.columns, self.rows
        return self.row_header, self.rows, self.columns

    def key(self, line: str, column: str) -> tuple[str, str]:
        """The (row, column) of the cell at a rendered line and column."""
        return (column, line) if self.transposed else (line, column)


def _cell(members: pd.DataFrame) -> Cell:
    present = [m for m in METRICS if m in members]  # detection metrics: defended runs only
    return Cell(
        n=len(members),
        mean=dict.fromkeys(METRICS, math.nan) | {m: float(members[m].mean()) for m in present},
        # NaN for one trial
        std=dict.fromkeys(METRICS, math.nan) | {m: float(members[m].std(ddof=1)) for m in present},
    )


def _average(cells: list[Cell]) -> Cell:
    return Cell(
        n=len(cells),
        mean={m: sum(c.mean[m] for c in cells) / len(cells) for m in METRICS},
        std=dict.fromkeys(METRICS, math.nan),
    )


def asr_marks(cells: dict[tuple[str, str], Cell], rows: list[str]) -> dict[tuple[str, str], str]:
    """Per row: the lowest shown ASR is BEST; with three or more cells in the row the next
    lowest shown value is SECOND (ties share the mark)."""
    marks: dict[tuple[str, str], str] = {}
    for row in rows:
        shown = {
            key: round(cell.mean["asr"], 1)
            for key, cell in cells.items()
            if key[0] == row and math.isfinite(cell.mean["asr"])
        }
        ranked = sorted(set(shown.values()))
        for key, value in shown.items():
            if value == ranked[0]:
                marks[key] = BEST
            elif len(shown) >= 3 and value == ranked[1]:
                marks[key] = SECOND
    return marks


def comparison(
    trials: pd.DataFrame,
    *,
    row: pd.Series,
    column: pd.Series,
    metrics: tuple[str, ...],
    title: str,
    row_header: str,
    column_header: str,
    note: str,
    marked: bool,
    average: bool,
) -> Table:
    """A rows × columns table over the finished trials; ``row``/``column`` label each trial
    (Series aligned with ``trials``). Order: first appearance, ``no defense`` columns first."""
    done = trials["outcome"] == FINISHED
    labels = pd.DataFrame({"row": row[done], "column": column[done]})
    rows = list(dict.fromkeys(labels["row"]))
    columns = sorted(
        dict.fromkeys(labels["column"]), key=lambda c: not c.startswith((NO_DEFENSE, STANDARD))
    )
    cells = {
        (r, c): _cell(trials.loc[members.index])
        for (r, c), members in labels.groupby(["row", "column"], sort=False)
    }
    complete = [c for c in columns if all((r, c) in cells for r in rows)]
    if average and len(rows) > 1 and complete:
        cells |= {(AVERAGE, c): _average([cells[r, c] for r in rows]) for c in complete}
        rows = [*rows, AVERAGE]
    marks = asr_marks(cells, rows) if marked else {}
    return Table(
        title, row_header, column_header, rows, columns, metrics, cells, marks, note, marked
    )


def _seeds_note(trials: pd.DataFrame) -> str:
    seeds = trials.loc[trials["outcome"] == FINISHED, "train.seed"].nunique()
    if seeds <= 1:
        return "one seed"
    return f"mean ± std over {seeds} seeds (train.seed; sample std; n = a cell's finished seeds)"


def _defense(trials: pd.DataFrame, none: str, prefix: str = "") -> pd.Series:
    """A trial's column: its baseline defense (``defense.name``, as the papers name it) and
    its AT, joined as the papers write "Lipschitz Reg. + Adv. Training"; ``none`` for
    neither."""
    defenses = trials["defense"] if "defense" in trials else pd.Series("none", trials.index)
    labels = []
    for t, b, d in zip(trials["threat"], trials["budgets"], defenses, strict=True):
        parts = [
            DEFENSE_LABELS.get(d, d) if d != "none" else "",
            "" if t == NO_AT else prefix + defense_text(t, b, none),
        ]
        labels.append(" + ".join(p for p in parts if p) or none)
    return pd.Series(labels, index=trials.index)


FP_RATIO = "defense.fine_pruning.ratio"


def pick_closest_accuracy(trials: pd.DataFrame, reference: str = "cat") -> tuple[pd.DataFrame, str]:
    """The CAT paper's rule for Fine-Pruning (§4): of the pruning ratios swept for an attack
    row, keep the one whose clean accuracy is closest to that row's ``reference`` AT (CAT)
    with no baseline defense; rows without a reference keep every ratio. Returns the kept
    trials and a note naming the picked ratios."""
    if "defense" not in trials or FP_RATIO not in trials:
        return trials, ""
    done = trials["outcome"] == FINISHED
    fp = done & (trials["defense"] == "fine_pruning")
    ref = done & (trials["threat"] == reference) & (trials["defense"] == "none")
    keep = pd.Series(True, index=trials.index)
    picks = []
    for setting, members in trials[fp].groupby("setting", sort=False):
        target = trials.loc[ref & (trials["setting"] == setting), "acc"]
        if target.empty or members[FP_RATIO].nunique() < 2:
            continue
        by_ratio = members.groupby(FP_RATIO)["acc"].mean()
        best = (by_ratio - target.mean()).abs().idxmin()
        keep[members.index[members[FP_RATIO] != best]] = False
        picks.append(f"{setting}: {100 * best:.0f}%")
    note = (
        f" FP: the pruning ratio whose ACC is closest to {reference}'s (CAT paper §4) — "
        + "; ".join(picks)
        + "."
        if picks
        else ""
    )
    return trials[keep], note


def _joined(*parts: pd.Series) -> pd.Series:
    joined = [", ".join(p for p in row if p) for row in zip(*parts, strict=True)]
    return pd.Series(joined, index=parts[0].index, dtype=object)


def cat_table(trials: pd.DataFrame) -> Table:
    """The CAT paper's Table 2 layout: attacks × defenses, ``ACC / ASR`` (FP at the ratio
    `pick_closest_accuracy` picks)."""
    trials, fp_note = pick_closest_accuracy(trials)
    table = comparison(
        trials,
        row=trials["setting"],
        column=_joined(_defense(trials, NO_DEFENSE), trials["variant"]),
        metrics=("acc", "asr"),
        title="Attacks × defenses (CAT paper, Table 2 layout)",
        row_header="Attack",
        column_header="Defense",
        note=(
            f"Cells: ACC / ASR in percent, {_seeds_note(trials)}. Average: mean over the "
            "attack rows, for the defenses every row has."
        ),
        marked=True,
        average=True,
    )
    return dataclasses.replace(table, note=table.note + fp_note)


def has_detections(trials: pd.DataFrame) -> bool:
    """Whether a finished trial ran a defense that flags training images (filters, ABL)."""
    if "detect_tpr" not in trials:
        return False
    return bool(trials.loc[trials["outcome"] == FINISHED, "detect_tpr"].notna().any())


def detection_table(trials: pd.DataFrame) -> Table:
    """What the flagging defenses found (Weng et al. Table 9's detection rate): attacks ×
    defenses, cells ``TPR / FPR / removed``."""
    flagged = trials[trials["detect_tpr"].notna() | (trials["outcome"] != FINISHED)]
    return comparison(
        flagged,
        row=flagged["setting"],
        column=_joined(_defense(flagged, NO_DEFENSE), flagged["variant"]),
        metrics=("detect_tpr", "detect_fpr", "removed"),
        title="Poison detection of the filtering defenses (Weng et al. Table 9(a))",
        row_header="Attack",
        column_header="Defense",
        note=(
            "Cells: TPR (share of the poisoned training images flagged) / FPR (share of the "
            "clean ones flagged), in percent, / images removed (ABL: isolated), "
            f"{_seeds_note(flagged)}."
        ),
        marked=False,
        average=False,
    )


def has_weng_dimensions(trials: pd.DataFrame) -> bool:
    """Whether the sweep trains Weng et al.'s clean-label triggers."""
    done = trials[trials["outcome"] == FINISHED]
    return bool(done["attack.name"].isin(WENG_ATTACKS).any())


def weng_table(trials: pd.DataFrame) -> Table:
    """Weng et al.'s layout: trigger settings × (standard vs adversarial training), cells
    ``acc / robust acc / ASR``."""
    return comparison(
        trials,
        row=_joined(trials["setting"], trials["variant"]),
        column=_defense(trials, STANDARD, prefix="adversarial training: "),
        metrics=("acc", "robust_acc", "asr"),
        title="Trigger settings × training (Weng et al., Tables 1–8 layout)",
        row_header="Trigger setting",
        column_header="Training",
        note=(
            f"Cells: clean accuracy / robust accuracy (the run's eval.* attack) / backdoor "
            f"success rate, in percent, {_seeds_note(trials)}."
        ),
        marked=False,
        average=False,
    )


def has_adaptive_trials(trials: pd.DataFrame) -> bool:
    """Whether the sweep trains against the CAT paper's adaptive attack (Appendix B)."""
    done = trials[trials["outcome"] == FINISHED]
    return bool((done["attack.name"] == ADAPTIVE).any())


def adaptive_table(trials: pd.DataFrame) -> Table:
    """The CAT paper's Table 4 layout: one row per (δ_max, victim ε) of the adaptive attack,
    standard training (ε = 0) first, each by increasing δ_max; cells ``ACC / ASR``."""
    adaptive = trials[trials["attack.name"] == ADAPTIVE].sort_values(
        ["budget", "attack.adaptive.delta_max"], kind="stable"
    )
    rows = [
        f"Adaptive attack (δ_max = {format_budget('linf', delta)}, "
        f"ε = {'0' if threat == NO_AT else defense_text(threat, budgets, '')})"
        for delta, threat, budgets in zip(
            adaptive["attack.adaptive.delta_max"],
            adaptive["threat"],
            adaptive["budgets"],
            strict=True,
        )
    ]
    return comparison(
        adaptive,
        row=_joined(pd.Series(rows, index=adaptive.index), adaptive["variant"]),
        column=pd.Series(ADAPTIVE_COLUMN, index=adaptive.index),
        metrics=("acc", "asr"),
        title="Adaptive attack (CAT paper, Table 4 layout)",
        row_header="Setting",
        column_header="",
        note=(
            f"Cells: ACC / ASR in percent, {_seeds_note(adaptive)}. δ_max: the L-inf bound of "
            "the poisons' perturbations; ε: the victim's (and its surrogate's) adversarial "
            "training, 0 = standard training."
        ),
        marked=False,
        average=False,
    )


def tables(trials: pd.DataFrame) -> list[Table]:
    """The tables this sweep has the dimensions for."""
    found = [cat_table(trials)]
    if has_weng_dimensions(trials):
        found.append(weng_table(trials))
    if has_detections(trials):
        found.append(detection_table(trials))
    if has_adaptive_trials(trials):
        found.append(adaptive_table(trials))
    return found


# ---------------------------------------------------------------------------------------------
# Rendering: Markdown, HTML, and a long-format CSV (one line per cell).


def _cell_text(table: Table, key: tuple[str, str], bold: str, underline: str) -> str:
    cell = table.cells.get(key)
    if cell is None:
        return "—"
    parts = []
    for metric in table.metrics:
        text = cell.text(metric)
        if metric == "asr" and key in table.marks:
            text = (bold if table.marks[key] == BEST else underline).format(text)
        parts.append(text)
    return " / ".join(parts) + table.count_text(key)


def _escape_md(text: str) -> str:
    return text.replace("|", "\\|")


def to_markdown(table: Table) -> str:
    metrics = " / ".join(LABELS[m] for m in table.metrics)
    corner, lines_, columns = table.layout()
    header = [f"{corner} (cells: {metrics})", *columns]
    lines = [
        f"### {table.title}",
        "",
        "| " + " | ".join(map(_escape_md, header)) + " |",
        "|" + "---|" * len(header),
    ]
    for line in lines_:
        cells = [_cell_text(table, table.key(line, c), "**{}**", "<ins>{}</ins>") for c in columns]
        lines.append("| " + " | ".join([_escape_md(line), *cells]) + " |")
    note = table.note
    if table.marked:
        note += " " + MARKS_NOTE.format(bold="**bold**", underlined="<ins>underlined</ins>")
    return "\n".join([*lines, "", note, ""])


def to_html(table: Table) -> str:
    """A ``<table>`` with the paper's two header rows (defense, then its metrics)."""
    e = html.escape
    width = len(table.metrics)
    corner, lines, columns = table.layout()
    marks = (
        " " + MARKS_NOTE.format(bold="<strong>bold</strong>", underlined="<u>underlined</u>")
        if table.marked
        else ""
    )
    head = (
        f'<tr><th rowspan="2">{e(corner)}</th>'
        + "".join(f'<th colspan="{width}">{e(c)}</th>' for c in columns)
        + "</tr><tr>"
        + "".join(f"<th>{LABELS[m]}</th>" for _ in columns for m in table.metrics)
        + "</tr>"
    )
    body = []
    for line in lines:
        tds = []
        for column in columns:
            key = table.key(line, column)
            cell = table.cells.get(key)
            for metric in table.metrics:
                text = e(cell.text(metric)) if cell else "—"
                mark = table.marks.get(key) if metric == "asr" else None
                if mark == BEST:
                    text = f"<strong>{text}</strong>"
                elif mark == SECOND:
                    text = f"<u>{text}</u>"
                if metric == table.metrics[-1] and (count := table.count_text(key)):
                    text += f"<small>{e(count)}</small>"
                tds.append(f"<td>{text}</td>")
        cls = ' class="average"' if line == AVERAGE else ""
        body.append(f"<tr{cls}><th>{e(line)}</th>{''.join(tds)}</tr>")
    return (
        f'<h3>{e(table.title)}</h3>\n<table class="paper">\n<thead>{head}</thead>\n<tbody>\n'
        + "\n".join(body)
        + f'\n</tbody></table>\n<p class="note">{e(table.note)}{marks}</p>\n'
    )


def to_frame(tables_: list[Table]) -> pd.DataFrame:
    """All cells of all tables, one line each: ``table``, ``row``, ``column``, ``n``,
    ``<metric>_mean``/``<metric>_std`` for acc, asr and robust_acc, and ``asr_mark``
    (best / second / empty)."""
    lines: list[dict[str, Any]] = []
    for table in tables_:
        for row in table.rows:
            for column in table.columns:
                cell = table.cells.get((row, column))
                if cell is None:
                    continue
                line: dict[str, Any] = {
                    "table": table.title,
                    "row": row,
                    "column": column,
                    "n": cell.n,
                }
                for metric in METRICS:
                    line[f"{metric}_mean"] = cell.mean[metric]
                    line[f"{metric}_std"] = cell.std[metric]
                line["asr_mark"] = table.marks.get((row, column), "")
                lines.append(line)
    return pd.DataFrame(lines)
