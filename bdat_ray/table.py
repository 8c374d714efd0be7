"""``python -m bdat_ray.table SPEC.yaml``: the comparison tables in the docs, reproducible
with one command each — a small rows × columns grid of engine runs on this machine (no Ray,
no MLflow), one after another or ``--jobs N`` at once, written as Markdown (and the raw
results as JSON).

A spec is data only::

    title: Attacks at their defaults, no defense
    fixed: {data.name: npz, data.path: ../shared/data/mnist-subset.npz, train.epochs: 4}
    rows:                                  # label -> overrides
      BadNets 3×3: {attack.name: badnets}
      Blended (noise): {attack.name: blended, attack.blended.trigger: noise}
    columns:                               # optional, label -> overrides
      no AT: {at.threat: none}
      L-inf 8/255: {at.threat: linf, at.eps: 8/255}

Each cell shows ``acc / asr`` (percent; ``metrics: [acc, asr, asr_pred]`` in the spec shows
more, e.g. Weng et al.'s ``asr_pred``) and the mean epoch time; a setting the data cannot
take (e.g. ``channel`` on grey images) shows ``n/a`` with the reason. Paths in the spec are
relative to the working directory (run from the repository root).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from datetime import date
from pathlib import Path
from typing import Any

from bdat_ray.cli import Parser, main_guard
from bdat_ray.config import ConfigError, flatten, from_flat, parse_overrides
from bdat_ray.preflight import writable_file

SECTIONS = ("title", "fixed", "rows", "columns", "notes", "metrics")

TABLE_METRICS = ("acc", "asr", "asr_pred", "robust_acc")


def load_spec(path: Path) -> dict[str, Any]:
    from bdat_ray.safe_yaml import read_yaml

    spec = read_yaml(path, "SPEC") or {}
    if not isinstance(spec, dict):
        raise ConfigError(str(path), f"a table spec is a mapping of {', '.join(SECTIONS)}")
    unknown = sorted(set(spec) - set(SECTIONS), key=str)
    if unknown:
        raise ConfigError(
            f"{path}: {unknown[0]}", f"unknown section; allowed: {', '.join(SECTIONS)}"
        )
    if not isinstance(spec.get("rows"), dict) or not spec["rows"]:
        raise ConfigError(f"{path}: rows", "needs rows: {label: overrides}")
    for section in ("columns", "fixed"):
        if not isinstance(spec.setdefault(section, {"": {}} if section == "columns" else {}), dict):
            raise ConfigError(f"{path}: {section}", "must map labels to overrides")
    for section in ("title", "notes"):
        if not isinstance(spec.get(section, ""), str):
            raise ConfigError(f"{path}: {section}", "must be text")
    for section in ("rows", "columns"):
        for label, overrides in spec[section].items():
            if not isinstance(overrides, dict | None):
                raise ConfigError(f"{path}: {section}.{label}", "must map keys to values")
    spec.setdefault("metrics", ["acc", "asr"])
    if not isinstance(spec["metrics"], list) or not set(spec["metrics"]) <= set(TABLE_METRICS):
        raise ConfigError(f"{path}: metrics", f"must be a list among {', '.join(TABLE_METRICS)}")
    return spec


def cell_overrides(spec: dict[str, Any], extra: dict[str, Any]) -> dict[tuple[str, str], dict]:
    """Every cell's flat config, each checked without its dataset (`from_flat`): a bad value
    in any cell stops the table before the first cell trains."""
    cells = {}
    for row, row_over in spec["rows"].items():
        for col, col_over in spec["columns"].items():
            flat = {
                **flatten(spec["fixed"]),
                **flatten(row_over or {}),
                **flatten(col_over or {}),
                **extra,
            }
            try:
                from_flat(flat)
            except ConfigError as err:
                cell = " / ".join(str(label) for label in (row, col) if label)
                raise ConfigError(err.key, f"{err.message} (table cell {cell})") from None
            cells[row, col] = flat
    return cells


def run_cell(flat: dict[str, Any], data_cache: dict) -> dict[str, Any]:
    from bdat_ray.data import load_dataset
    from bdat_ray.engine import TrainingDiverged, fit

    try:
        cfg = from_flat(flat)
        data_key = repr(cfg.data)  # cells on the same data share one loaded copy
        if data_key not in data_cache:
            data_cache[data_key] = load_dataset(cfg.data)
        result = fit(cfg, data=data_cache[data_key])
    except ConfigError as err:
        return {"error": str(err)}
    except TrainingDiverged as err:
        return {"error": f"diverged: {err}"}
    except Exception as err:  # one broken cell must not cost the finished ones
        traceback.print_exc()
        return {"error": f"failed: {type(err).__name__}: {err}", "crashed": True}
    epoch_seconds = [h["epoch_seconds"] for h in result.history]
    return {**result.to_dict(), "epoch_seconds": sum(epoch_seconds) / len(epoch_seconds)}


#: A worker process's loaded datasets (``--jobs``): its cells on the same data share them.
_WORKER_DATA: dict = {}


def _start_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _run_in_worker(flat: dict[str, Any]) -> dict[str, Any]:
    return run_cell(flat, _WORKER_DATA)


def run_cells(planned: dict[tuple[str, str], dict], metrics: list[str], jobs: int) -> dict:
    """Every cell's result; with ``jobs`` > 1 in that many processes, each with an equal
    share of the cores as torch threads (small models use cores poorly one run at a time).
    Progress on stderr as cells finish."""
    total = len(planned)
    cells: dict[tuple[str, str], dict] = {}

    def show(n: int, key: tuple[str, str], cell: dict[str, Any]) -> None:
        label = f"[{n}/{total}] {key[0]} {key[1]}".rstrip()
        print(f"{label}: {cell_text(cell, metrics)}", file=sys.stderr, flush=True)

    if jobs == 1:
        data_cache: dict = {}
        for n, (key, flat) in enumerate(planned.items(), start=1):
            print(f"[{n}/{total}] {key[0]} {key[1]}".rstrip() + " ...", file=sys.stderr, flush=True)
            cells[key] = run_cell(flat, data_cache)
            show(n, key, cells[key])
        return cells
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // jobs)
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),  # no forked torch thread pools
        initializer=_start_worker,
        initargs=(threads,),
    ) as pool:
        futures = {pool.submit(_run_in_worker, flat): key for key, flat in planned.items()}
        for n, future in enumerate(as_completed(futures), start=1):
            cells[futures[future]] = future.result()
            show(n, futures[future], cells[futures[future]])
    return {key: cells[key] for key in planned}


def cell_text(cell: dict[str, Any], metrics: list[str] = ("acc", "asr")) -> str:
    if "error" in cell:
        return f"n/a ({cell['error'].split(': ', 1)[-1]})"
    values = " / ".join(f"{cell[m]:.1f}" for m in metrics)
    text = f"{values} ({cell['epoch_seconds']:.1f} s)"
    return text + defense_text(cell.get("defense", {}), cell.get("defense_details", {}))


def defense_text(metrics: dict[str, float], details: dict[str, Any]) -> str:
    """A defense's own findings in a cell: what it flagged (filters, ABL) against the poisoned
    images, Neural Cleanse's flagged classes."""
    parts = []
    if "detect_tpr" in metrics:
        parts.append(
            f"TPR {metrics['detect_tpr']:.1f} / FPR {metrics['detect_fpr']:.1f}, "
            f"{metrics['removed']:.0f} flagged"
        )
    if "nc_flagged_classes" in details:
        parts.append(f"NC flags {details['nc_flagged_classes'] or 'none'}")
    return "".join(f"<br>{p}" for p in parts)


def render(
    spec: dict[str, Any],
    cells: dict[tuple[str, str], dict],
    command: str,
    seconds: float,
    extra: dict[str, Any],
    jobs: int = 1,
) -> str:
    columns, metrics = list(spec["columns"]), spec["metrics"]
    names = " / ".join(metrics)
    header = "| | " + " | ".join(c or f"{names} (s/epoch)" for c in columns) + " |"
    lines = [f"### {spec.get('title', 'Results')}", "", header, "|---" * (len(columns) + 1) + "|"]
    for row in spec["rows"]:
        texts = [cell_text(cells[row, c], metrics) for c in columns]
        lines.append(f"| {row} | " + " | ".join(texts) + " |")
    fixed = ", ".join(f"`{k}={v}`" for k, v in {**flatten(spec["fixed"]), **extra}.items())
    lines += [
        "",
        f"Cells: `{names}` in percent (asr over non-target test images; asr_pred over test "
        "images not predicted as the target when clean, Weng et al.'s count) and the mean epoch "
        f"time in seconds. Fixed for every cell: {fixed or 'the defaults'}.",
        f"Produced by `{command}` on {date.today()} ({platform.processor() or platform.machine()}, "
        f"{_device_name(jobs)}) in {seconds / 60:.1f} min.",
    ]
    if spec.get("notes"):
        lines += ["", spec["notes"].strip()]
    return "\n".join(lines) + "\n"


def _device_name(jobs: int) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    if jobs > 1:
        return f"CPU, {jobs} cells at once × {max(1, (os.cpu_count() or 1) // jobs)} threads"
    return f"CPU, {torch.get_num_threads()} threads"


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m bdat_ray.table",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", type=Path, help="table spec (YAML)")
    p.add_argument("--out", type=Path, help="Markdown output (default: SPEC with .md)")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="cells trained at once, in N processes sharing the cores (default 1)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every cell")
    return p


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    spec = load_spec(args.spec)
    extra = parse_overrides(args.overrides)
    out = writable_file("--out", args.out or args.spec.with_suffix(".md"))
    writable_file("--out", out.with_suffix(".json"))
    if not 1 <= args.jobs <= 64:
        raise ConfigError("--jobs", f"must be between 1 and 64; got {args.jobs}")
    planned = cell_overrides(spec, extra)
    command = " ".join(["python -m bdat_ray.table", str(args.spec), *args.overrides])
    started = time.perf_counter()
    cells = run_cells(planned, spec["metrics"], args.jobs)
    seconds = time.perf_counter() - started
    out.write_text(render(spec, cells, command, seconds, extra, args.jobs))
    raw = {f"{r} | {c}": cell for (r, c), cell in cells.items()}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))
    print(out)
    return 1 if any(cell.get("crashed") for cell in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
