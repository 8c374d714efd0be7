"""Reports of bdat_ray sweeps from MLflow: Pareto fronts, hypervolume, the papers' figures
and tables (``python -m analysis.report``), and the same data for notebooks::

    import analysis
    trials = analysis.load_sweep("sqlite:///mlflow.db")          # latest sweep, one row/trial
    analysis.pareto_front(trials)[["trial", "setting", "threat", "budgets", "acc", "asr"]]
    analysis.hypervolume(trials[trials.group == trials.group.iloc[0]])
"""

from analysis.fronts import dominated_volume, hypervolume, hypervolume_curve, pareto_front
from analysis.load import Sweep, load_sweep, read_sweep
from analysis.tables import cat_table, to_markdown, weng_table

__all__ = [
    "Sweep",
    "cat_table",
    "dominated_volume",
    "hypervolume",
    "hypervolume_curve",
    "load_sweep",
    "pareto_front",
    "read_sweep",
    "to_markdown",
    "weng_table",
]
