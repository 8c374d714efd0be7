"""Multi-objective early stopping for Ray Tune: MO-ASHA (a Ray adapter, like trainable.py).

Ray Tune's ASHA judges one metric, and Optuna cannot prune a multi-objective study. MO-ASHA
(Schmucker et al., 2021, "Multi-objective multi-fidelity hyperparameter optimization with
application to fairness"; reference implementation syne-tune
``syne_tune/optimizer/schedulers/multiobjective/moasha.py``) keeps asynchronous successive
halving and replaces its one-metric cutoff with non-dominated sorting:

- rungs at ``grace_period`` × ``reduction_factor``^k epochs, below the trial's last epoch
  (stopping a trial at its last epoch saves nothing);
- a trial reaching a rung is judged at once against the results the rung recorded so far
  (`bdat_ray.search_space.mo_rung_keeps`): it goes on if it is on their non-dominated front
  or in the top 1/``reduction_factor`` of their ranking (fronts, then NSGA-II crowding
  distance); otherwise it stops. The first trial at a rung always goes on, as in ASHA.

A stopped trial reports no ``final`` result, so it never enters a Pareto front: the sweep's
table, `trainable.FinalOnlyOptunaSearch` (Optuna: PRUNED) and MLflow (KILLED,
``bdat_ray.outcome=early_stopped``) keep it out, as for ASHA.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from bdat_ray.search_space import mo_rung_keeps

log = logging.getLogger(__name__)


class MultiObjectiveASHA(FIFOScheduler):
    """MO-ASHA on ``objectives`` ({metric: "max" | "min"}, metrics every epoch reports).
    ``time_attr``: the reported epoch; ``max_t``: the most epochs a trial trains."""

    def __init__(
        self,
        objectives: dict[str, str],
        *,
        max_t: int,
        grace_period: int = 3,
        reduction_factor: float = 3.0,
        time_attr: str = "epoch",
    ):
        super().__init__()
        if grace_period < 1 or reduction_factor <= 1:
            raise ValueError("grace_period ≥ 1 and reduction_factor > 1")
        self.objectives = dict(objectives)
        self.time_attr = time_attr
        self.reduction_factor = reduction_factor
        count = int(math.log(max_t / grace_period, reduction_factor) + 1e-9) + 1
        self.rungs = [round(grace_period * reduction_factor**k) for k in range(count)]
        #: rung epoch -> {trial id: the objectives it reported there}, in arrival order.
        self.recorded: dict[int, dict[str, dict[str, float]]] = {r: {} for r in self.rungs}
        self.stopped = 0

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # judges its own objectives; Tune's single metric does not apply

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("final") or self.time_attr not in result:
            return TrialScheduler.CONTINUE
        epoch, last = result[self.time_attr], result.get("epochs", math.inf)
        rung = next((r for r in reversed(self.rungs) if r <= epoch and r < last), None)
        if rung is None or trial.trial_id in self.recorded[rung]:
            return TrialScheduler.CONTINUE
        here = self.recorded[rung]
        here[trial.trial_id] = {m: result.get(m, math.nan) for m in self.objectives}
        if mo_rung_keeps(list(here.values()), self.objectives, self.reduction_factor):
            return TrialScheduler.CONTINUE
        self.stopped += 1
        log.info(
            "MO-ASHA stops %s at the epoch-%d rung (%d trials there)",
            trial.trial_id,
            rung,
            len(here),
        )
        return TrialScheduler.STOP

    def debug_string(self) -> str:
        rungs = ", ".join(f"epoch {r}: {len(self.recorded[r])}" for r in self.rungs)
        return f"MO-ASHA on {', '.join(self.objectives)}: {self.stopped} stopped; {rungs}"
